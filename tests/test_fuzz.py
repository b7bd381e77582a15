"""Fuzz tests of every class of bad input (issue 18, SPEC §12): clear errors, never a crash, a
hang or a silently wrong result.

Classes: group sizes, code range vs table length, K vs packed width, fp16 overflow of tables and
scales, custom Format tables, ChannelStats NaN/Inf, complex input, thread counts (and thread
creation failure), file integrity (any byte, any metadata field), atomic saves killed midway.
Inputs that used to crash or hang the interpreter run in subprocesses with a time limit.
Hypothesis runs derandomized (the same cases on every run) with bounded example counts, so the
whole file takes well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import any4  # noqa: E402
from any4 import integrity  # noqa: E402
from any4 import validate as V  # noqa: E402
from any4.gemm import CPU_IMPLS  # noqa: E402
from any4.integrity import Any4FormatError  # noqa: E402
from any4.nn import QuantLinear  # noqa: E402
from conftest import TOL, dequant_ref, rel_err  # noqa: E402

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IMPLS = [name for name, code in CPU_IMPLS.items() if any4._C.cpu_impl_supported(code)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _operands(seed: int, N: int, K: int, G: int, L: int, dtype=torch.float32):
    """Random codes < L, per-row table [N, L], scales [N, ceil(K/G), 2] (torch, CPU)."""
    g = np.random.default_rng(seed)
    codes = torch.from_numpy(g.integers(0, L, size=(N, K), dtype=np.uint8))
    lut = torch.from_numpy(np.sort(g.normal(size=(N, L)), axis=1)).to(dtype)
    scales = torch.from_numpy(g.uniform(0.5, 1.5, size=(N, -(-K // G), 2))).to(dtype)
    return codes, any4.pack(codes), lut, scales


group_sizes = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-64, 1100),
    st.sampled_from([0, 1, 7, 8, 129, 136, 2**31, 2**31 + 8, 2**32, 2**62, 2**63 - 8]),
)


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    N=st.integers(1, 12),
    K=st.integers(1, 300),
    true_g=st.sampled_from([8, 16, 24, 32, 64, 128]),
    G=group_sizes,
    impl=st.sampled_from(IMPLS),
    dtype=st.sampled_from(DTYPES),
)
def test_gemm_group_size(seed, N, K, true_g, G, impl, dtype) -> None:
    """Any group size: the product for a valid one (checked against float64), else an error."""
    codes, packed, lut, scales = _operands(seed, N, K, true_g, 16, dtype)
    n_groups = scales.shape[1]
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(seed)).to(dtype)
    valid = (
        G > 0 and G % 8 == 0 and G <= V.max_group_size(K) and -(-K // G) == n_groups
    )  # the rule of SPEC §12
    if not valid:
        with pytest.raises(ValueError, match="group_size"):
            any4.gemm(x, packed, lut, scales, G, impl=impl)
        return
    y = any4.gemm(x, packed, lut, scales, G, impl=impl)
    ref = x.double().numpy() @ dequant_ref(packed, lut, scales, K, G).T
    assert rel_err(y, ref) < TOL[str(dtype).replace("torch.", "")]


def _inject(codes: torch.Tensor, L: int, draw_pos, value: int) -> torch.Tensor:
    bad = codes.clone()
    n, k = draw_pos
    bad[n % bad.shape[0], k % bad.shape[1]] = value
    return bad


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3]),
    N=st.integers(1, 9),
    K=st.integers(16, 200),
    pos=st.tuples(st.integers(0, 100), st.integers(0, 1000)),
    value=st.integers(0, 15),
)
def test_codes_out_of_range_are_refused_everywhere(seed, bits, N, K, pos, value) -> None:
    """3/2-bit codes in nibbles (how files stored them before the dense layouts) can hold 8..15:
    every entry point that takes nibble rows refuses a code past the table; the dense layout
    (any4.pack(codes, bits), what QuantizedTensor holds) cannot even hold one."""
    L = 1 << bits
    G = 16
    codes, packed, lut, scales = _operands(seed, N, K, G, L, torch.bfloat16)
    codes = _inject(codes, L, pos, value)
    packed = any4.pack(codes)  # nibbles
    bad = value >= L
    x = torch.randn(2, K).bfloat16()
    entry_points = {
        "gemm": lambda: any4.gemm(x, packed, lut, scales, G),
        "load_state_dict": lambda: QuantLinear(
            K, N, bias=False, fmt=f"any{bits}", group_size=G
        ).load_state_dict({"packed": packed, "lut": lut, "scales": scales}),
        "pack_for_gpu": lambda: any4.pack_for_gpu(packed, lut, scales, K, G),
    }
    for _name, call in entry_points.items():
        if bad:
            with pytest.raises(ValueError, match="past the table"):
                call()
        else:
            call()
    if bad:
        with pytest.raises(ValueError, match=f"< {L}"):
            any4.pack(codes, bits)
        return
    qt = any4.QuantizedTensor(any4.pack(codes, bits), lut, scales, (N, K), f"any{bits}", G)
    QuantLinear.from_quantized(qt)
    any4.pack_for_gpu(qt)
    ref_w = dequant_ref(packed, lut, scales, K, G)
    np.testing.assert_allclose(any4.dequantize(qt).double().numpy(), ref_w, rtol=1e-6, atol=1e-9)
    ref = x.double().numpy() @ ref_w.T
    for p in (packed, qt.packed):  # nibbles and dense: the same product
        assert rel_err(any4.gemm(x, p, lut, scales, G), ref) < TOL["bfloat16"]


def test_codes_changed_in_place_after_a_good_call_are_caught() -> None:
    """gemm checks codes once per tensor version: an in-place edit is checked again."""
    codes, packed, lut, scales = _operands(1, 4, 64, 32, 8)
    x = torch.randn(1, 64)
    any4.gemm(x, packed, lut, scales)
    packed[2, 5] = 0xF0  # code 15 with an 8-entry table
    with pytest.raises(ValueError, match="row 2"):
        any4.gemm(x, packed, lut, scales)
    with pytest.raises(ValueError, match="row 2"):
        torch.ops.any4.gemm(x, packed, lut, scales, 32)


@FUZZ
@given(seed=st.integers(0, 2**16), N=st.integers(1, 9), half=st.integers(9, 100))
def test_k_one_short_of_the_weight_is_refused(seed, N, half) -> None:
    """K and K+1 pack to the same bytes: an odd K needs the pad nibble to be 0."""
    K = 2 * half  # the weight's K (even); callers pass K - 1
    codes, packed, lut, scales = _operands(seed, N, K, 16, 16, torch.bfloat16)
    codes[0, K - 1] = 1 + seed % 15  # a real last column
    packed = any4.pack(codes)
    x = torch.randn(2, K - 1).bfloat16()
    with pytest.raises(ValueError, match="pad nibble"):
        any4.gemm(x, packed, lut, scales, 16)
    with pytest.raises(ValueError, match="pad nibble"):
        any4.dequantize(any4.QuantizedTensor(packed, lut, scales, (N, K - 1), "any4", 16))
    with pytest.raises(ValueError, match="pad nibble"):
        any4.pack_for_gpu(packed, lut, scales, K - 1, 16)
    with pytest.raises(ValueError, match="pad nibble"):
        QuantLinear.from_quantized(
            any4.QuantizedTensor(packed, lut, scales, (N, K - 1), "any4", 16)
        )
    shell = QuantLinear(K - 1, N, bias=False, group_size=16, table_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="pad nibble"):
        shell.load_state_dict({"packed": packed, "lut": lut, "scales": scales})
    y = any4.gemm(torch.randn(2, K).bfloat16(), packed, lut, scales, 16)  # the right K works
    assert y.shape == (2, N)


@FUZZ
@given(
    seed=st.integers(0, 2**16),
    exponent=st.floats(0, 9),
    fmt=st.sampled_from(["any4", "int4", "nf4", "any3"]),
)
def test_fp16_overflow_is_an_error_naming_the_row(seed, exponent, fmt) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 64, generator=g)
    row = seed % 6
    w[row] *= 10.0**exponent
    try:
        qt = any4.quantize(w, fmt, 32, dtype="float16", method="lloyd", n_init=1)
    except ValueError as e:
        assert f"row {row}" in str(e) and "float16" in str(e)
        assert float(w[row].abs().max()) > 6e4  # only for a row beyond float16's range
        return
    assert torch.isfinite(qt.lut).all() and torch.isfinite(qt.scales).all()
    # float32 activations: the product itself may exceed float16's range, the weight does not.
    y = any4.gemm(torch.randn(2, 64), qt.packed, qt.lut, qt.scales, 32)
    assert torch.isfinite(y).all() and torch.isfinite(any4.dequantize(qt)).all()


def test_fp16_overflow_anchor() -> None:
    w = torch.randn(4, 64)
    w[2] *= 1e6
    with pytest.raises(ValueError, match="row 2: the scales overflow float16"):
        any4.quantize(w, "any4", 32, dtype="float16")
    qt = any4.quantize(w, "any4", 32, dtype="bfloat16")  # the advice in the message works
    assert torch.isfinite(qt.scales).all()
    lut = qt.lut.float().half()
    lut[1, 3] = float("inf")
    with pytest.raises(ValueError, match="lut row 1"):
        QuantLinear.from_quantized(
            any4.QuantizedTensor(qt.packed, lut, qt.scales.float().half(), (4, 64), "any4", 32)
        )


@FUZZ
@given(bits=st.integers(-1, 6), length=st.integers(0, 20), finite=st.booleans())
def test_custom_format_tables(bits, length, finite) -> None:
    table = tuple(float(i) for i in range(length))
    if length and not finite:
        table = table[:-1] + (float("nan"),)
    ok = bits in (2, 3, 4) and length == 1 << bits and finite
    if ok:
        f = any4.Format("custom", bits, table, False)
        qt = any4.quantize(torch.randn(3, 32), f, 16)
        assert qt.lut.shape == (1, length)
    else:
        with pytest.raises((ValueError, TypeError)):
            any4.Format("custom", bits, table, False)


@FUZZ
@given(
    K=st.integers(1, 40),
    rows=st.integers(1, 5),
    poison=st.sampled_from([None, float("nan"), float("inf"), -float("inf"), 1e200]),
    pos=st.integers(0, 10**6),
    as_torch=st.booleans(),
)
def test_channel_stats_refuse_nan_inf(K, rows, poison, pos, as_torch) -> None:
    x = np.random.default_rng(pos).normal(size=(rows, K))
    if poison is not None:
        x.reshape(-1)[pos % x.size] = poison
    x = torch.from_numpy(x) if as_torch else x
    stats = any4.ChannelStats()
    if poison is None:
        stats.update(x)
        assert np.isfinite(stats.mean_sq).all()
    else:
        with pytest.raises(ValueError, match=f"channel {pos % (rows * K) % K}"):
            stats.update(x)
        assert stats.count == 0  # nothing recorded


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_complex_input_is_refused_without_truncation(framework) -> None:
    z = np.ones((4, 32), np.complex64)
    z = torch.from_numpy(z) if framework == "torch" else z
    real = torch.ones(4, 32) if framework == "torch" else np.ones((4, 32), np.float32)
    calls = {
        "quantize": lambda: any4.quantize(z, "any4", 16),
        "kmeans values": lambda: any4.kmeans(z[0], k=4),
        "kmeans weights": lambda: any4.kmeans(real[0], z[0], k=4),
        "sample_weight": lambda: any4.quantize(real, "any4", 16, sample_weight=z[0]),
        "ChannelStats": lambda: any4.ChannelStats().update(z),
        "gemm x": lambda: any4.gemm(z, *_operands(0, 3, 32, 16, 16)[1:], 16),
    }
    for _name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a ComplexWarning would mean silent truncation
            with pytest.raises(TypeError, match="real|float|complex"):
                call()


@FUZZ
@given(n=st.one_of(st.integers(-(2**40), 2**40), st.sampled_from([0, 1025, 100000, 2**31])))
def test_thread_counts_are_capped(n) -> None:
    before = any4.get_num_threads()
    if 1 <= n <= 1024:
        return  # valid (not started here: starting 1024 threads is not a unit test)
    with pytest.raises(ValueError, match="1024"):
        any4.set_num_threads(n)
    assert any4.get_num_threads() == before
    for bad in (True, 2.0, "3", None):
        with pytest.raises(TypeError):
            any4.set_num_threads(bad)


def _run(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.mark.parametrize("value", ["100000", "1025", "0", "-3", "abc", "4x"])
def test_bad_any4_num_threads_fails_fast_and_clearly(value) -> None:
    r = _run("import any4", {"ANY4_NUM_THREADS": value}, timeout=60)
    assert r.returncode == 1
    assert "ANY4_NUM_THREADS" in r.stderr and "Segmentation" not in r.stderr


THREAD_FAILURE = """
import resource
import numpy as np
import any4

def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024

x = np.random.default_rng(0).random((64, 512)).astype(np.float32)
lim = vm() + 48 * 2**20  # room for the work, not for 64 thread stacks
resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
for attempt in range(2):
    try:
        {call}
        print("no error")
    except RuntimeError as e:
        print("RuntimeError", "could not start" in str(e))
    print("threads", any4.get_num_threads())
print("kmeans", any4.kmeans(x, k=16)[0].shape)
"""


@pytest.mark.parametrize(
    "call, env",
    [
        ("any4.set_num_threads(64)", {}),
        ("any4.kmeans(x, k=16)", {"ANY4_NUM_THREADS": "64"}),  # first parallel region
    ],
    ids=["set_num_threads", "first-use"],
)
def test_thread_creation_failure_is_a_clean_error(call, env) -> None:
    r = _run(THREAD_FAILURE.format(call=call), env, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "RuntimeError True", r.stdout
    assert lines[1] == "threads 1"  # fell back to one thread, still usable
    assert "kmeans (64, 16)" in r.stdout


CRASHERS = """
import torch, any4
from any4.gemm import CPU_IMPLS
from any4.nn import QuantLinear

qt = any4.quantize(torch.randn(8, 256), "any4", 128)
results = []
def attempt(name, fn):
    try:
        fn()
        results.append(name + ": no error")
    except (ValueError, TypeError) as e:
        results.append(name + ": " + type(e).__name__)

for impl, code in CPU_IMPLS.items():
    if not any4._C.cpu_impl_supported(code):
        continue
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 256).to(dt)
        for G in (2**62, 2**31, 2**31 + 8, 2**40, 0, -8, 129, 7):
            attempt(f"gemm {impl} {dt} {G}", lambda: any4.gemm(x, qt.packed, qt.lut.to(dt),
                    qt.scales.to(dt), G, impl=impl))
for G in (0, -8, 7, 2**62, 2**31):
    bad = any4.QuantizedTensor(qt.packed, qt.lut, qt.scales, qt.shape, "any4", G)
    attempt(f"dequantize {G}", lambda: any4.dequantize(bad))
    attempt(f"pack_for_gpu {G}", lambda: any4.pack_for_gpu(qt.packed, qt.lut, qt.scales, 256, G))
    attempt(f"QuantLinear {G}", lambda: QuantLinear(256, 8, group_size=G))
for n in (100000, 2**31, 2**40):
    attempt(f"threads {n}", lambda: any4.set_num_threads(n))
print("\\n".join(results))
"""


def test_former_crashers_raise_in_a_subprocess() -> None:
    r = _run(CRASHERS, timeout=120)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}"
    lines = [line for line in r.stdout.splitlines() if line]
    assert len(lines) >= 3 * 8 + 5 * 3 + 3
    wrong = [line for line in lines if line.endswith("no error")]
    assert wrong == []


# ---- files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_files")
    qt = any4.quantize(torch.randn(6, 40), "any3", 16, dtype="bfloat16")
    state = {"layer": qt, "bias": torch.randn(6), "steps": torch.arange(3)}
    file = d / "m.safetensors"
    any4.save(state, file)
    return file, file.read_bytes(), state


def _load_equal(file, state) -> None:
    out = any4.load(file)
    assert torch.equal(out["layer"].packed, state["layer"].packed)
    assert torch.equal(out["bias"], state["bias"])


@FUZZ
@given(where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_any_byte_change_is_refused(saved, tmp_path_factory, where, flip) -> None:
    file, data, state = saved
    target = tmp_path_factory.mktemp("flip") / "m.safetensors"
    bad = bytearray(data)
    i = int(where * len(data))
    bad[i] ^= flip
    target.write_bytes(bytes(bad))
    with pytest.raises(Any4FormatError):
        any4.load(target)
    with pytest.raises(Any4FormatError):
        any4.io.verify(target)


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 9, 100, -1, -17])
def test_truncation_is_refused(saved, tmp_path, cut) -> None:
    file, data, state = saved
    target = tmp_path / "m.safetensors"
    target.write_bytes(data[:cut] if cut else b"")
    with pytest.raises(Any4FormatError):
        any4.load(target)


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, -8, 7, 8, 16, 24, 2**31, 2**62, 10**30]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(["any4", "any2", "int4", "nf4", "float16", "float32", "bfloat16"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = [
    ("layers", "layer", "fmt"),
    ("layers", "layer", "group_size"),
    ("layers", "layer", "shape"),
    ("layers", "layer", "bias"),
    ("layers", "layer", "table_dtype"),
    ("layers", "layer"),
    ("layers",),
    ("tied",),
    ("settings",),
    ("settings", "model_dtype"),
    ("extra",),
    ("format_version",),
    ("format",),
]


def _edited_meta(file, path, value):
    sealed = integrity.read_file(file)
    doc = json.loads(json.dumps(sealed.any4))
    doc.pop("digest")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return sealed.tensors, doc


@FUZZ
@given(field=st.sampled_from(FIELDS), value=json_values, reseal=st.booleans())
def test_any_metadata_field_edit(saved, tmp_path_factory, field, value, reseal) -> None:
    """A field edited in place is refused by the digest. Written with a fresh digest (as a buggy
    writer or a forger would) or as a version-1 file, the metadata checks take over: the load
    raises Any4FormatError or gives the original tensors, never another exception or a crash."""
    file, data, state = saved
    target = tmp_path_factory.mktemp("field") / "m.safetensors"
    tensors, doc = _edited_meta(file, field, value)
    if reseal:
        integrity.write_file(target, tensors, doc)
    else:  # the edit without a valid digest: the placeholder stays, then tamper the header
        integrity.write_file(target, tensors, doc)
        raw = bytearray(target.read_bytes())
        at = raw.find(b"sha256:")
        raw[at + 7 : at + 71] = b"1" * 64  # a digest that is not the file's
        target.write_bytes(bytes(raw))
    try:
        out = any4.load(target)
    except Any4FormatError:
        return
    assert reseal
    assert torch.equal(out["bias"], state["bias"])
    if "layer" in out and isinstance(out["layer"], any4.QuantizedTensor):
        assert torch.equal(any4.dequantize(out["layer"]), any4.dequantize(state["layer"]))


@pytest.mark.parametrize(
    "field, value",
    [
        (("layers", "layer", "group_size"), 2**62),
        (("layers", "layer", "group_size"), 0),
        (("layers", "layer", "group_size"), 12),
        (("layers", "layer", "group_size"), 40),  # 1 group; the scales have 3
        (("layers", "layer", "shape"), [6, 41]),
        (("layers", "layer", "shape"), [6, 2**62]),
        (("layers", "layer", "fmt"), "any4"),  # 16 levels vs an 8-entry table
        (("layers", "layer", "table_dtype"), "float16"),
        (("layers", "layer", "bias"), True),
        (("settings",), {"model_dtype": "int8"}),
        (("tied",), {"bias": "steps"}),
        (("tied",), {"x": "nothing"}),
    ],
)
def test_resealed_bad_metadata_is_refused(saved, tmp_path, field, value) -> None:
    file, data, state = saved
    target = tmp_path / "m.safetensors"
    tensors, doc = _edited_meta(file, field, value)
    integrity.write_file(target, tensors, doc)
    with pytest.raises(Any4FormatError):
        any4.load(target)


def test_version_1_metadata_errors_are_format_errors(saved, tmp_path) -> None:
    """Version-1 files have no whole-file digest: their metadata is checked field by field."""
    import hashlib

    from safetensors.torch import save_file

    file, data, state = saved
    sealed = integrity.read_file(file)
    doc = dict(sealed.any4)
    doc.pop("digest")
    doc["format_version"] = 1
    doc["sha256"] = {
        k: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, t in sealed.tensors.items()
    }
    v1 = tmp_path / "v1.safetensors"
    save_file(sealed.tensors, v1, metadata={"any4": json.dumps(doc)})
    _load_equal(v1, state)
    for field, value in [("group_size", 0), ("group_size", "16"), ("shape", None), ("fmt", 3)]:
        bad = json.loads(json.dumps(doc))
        bad["layers"]["layer"][field] = value
        save_file(sealed.tensors, v1, metadata={"any4": json.dumps(bad)})
        with pytest.raises(Any4FormatError, match=field):
            any4.load(v1)
    bad = json.loads(json.dumps(doc))
    bad["sha256"] = None
    save_file(sealed.tensors, v1, metadata={"any4": json.dumps(bad)})
    with pytest.raises(Any4FormatError):
        any4.load(v1)


# ---- atomic saves --------------------------------------------------------------------------------

KILLED_SAVE = """
import sys, time, torch, any4
from any4 import integrity
real = integrity._tensor_bytes
calls = []
def slow(t):
    calls.append(1)
    if len(calls) == 2:
        print("writing", flush=True)
        time.sleep(600)
    return real(t)
integrity._tensor_bytes = slow
any4.save({"a": torch.randn(1000), "b": torch.randn(1000)}, sys.argv[1])
"""


def test_killed_save_leaves_nothing_and_the_next_save_cleans_up(tmp_path) -> None:
    out = tmp_path / "ckpt"
    p = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    names = os.listdir(out)
    assert "model.safetensors" not in names and "any4.json" not in names
    assert len(names) == 1 and names[0].endswith(".any4-tmp")
    any4.save({"a": torch.ones(3)}, out)
    assert sorted(os.listdir(out)) == ["any4.json", "model.safetensors"]
    assert torch.equal(any4.load(out)["a"], torch.ones(3))


def test_failed_save_writes_nothing(tmp_path) -> None:
    out = tmp_path / "ckpt"
    with pytest.raises(TypeError):
        any4.save({"a": torch.ones(3)}, out, extra={"x": object()})
    with pytest.raises(TypeError):
        any4.save({"a": torch.ones(3, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    assert not out.exists() or os.listdir(out) == []
    assert not (tmp_path / "c.safetensors").exists()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".any4-tmp")] == []


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from _tiny import random_ids, tiny_llama

    model = tiny_llama(seed=5)
    any4.quantize_model(model, "any4", 16, random_ids(32, seed=6), progress=False)
    d = tmp_path_factory.mktemp("fuzz_ckpt") / "ckpt"
    any4.save(model, d, max_shard_size=30_000)
    assert (d / "model.safetensors.index.json").is_file()
    return d


CONFIG_FIELDS = [
    ("config.json", ("quantization_config", "format_version")),
    ("config.json", ("quantization_config", "guard")),
    ("config.json", ("quantization_config", "layers")),
    ("config.json", ("quantization_config", "layers", "model.layers.0.mlp.up_proj")),
    ("config.json", ("quantization_config", "layers", "model.layers.0.mlp.up_proj", "group_size")),
    ("config.json", ("quantization_config", "layers", "model.layers.0.mlp.up_proj", "shape")),
    ("config.json", ("quantization_config", "layers", "model.layers.1.self_attn.q_proj", "fmt")),
    ("config.json", ("quantization_config", "quant_method")),
    ("config.json", ("quantization_config",)),
    ("model.safetensors.index.json", ("weight_map",)),
    ("model.safetensors.index.json", ("weight_map", "model.norm.weight")),
    ("model.safetensors.index.json", ("metadata",)),
    ("any4.json", ("files",)),
    ("any4.json", ("layers",)),
    ("any4.json", ("settings",)),
    ("any4.json", ("tied",)),
]


@settings(FUZZ, max_examples=40)
@given(field=st.sampled_from(CONFIG_FIELDS), value=json_values)
def test_any_json_field_edit_of_a_checkpoint(sharded_dir, tmp_path_factory, field, value) -> None:
    """config.json, the shard index and any4.json: any edited field is refused with
    Any4FormatError (or, where harmless, the checkpoint still loads the same tensors)."""
    import shutil

    from _tiny import tiny_llama

    name, path = field
    d = tmp_path_factory.mktemp("json") / "ckpt"
    shutil.copytree(sharded_dir, d)
    doc = json.loads((d / name).read_text())
    node = doc
    for key in path[:-1]:
        node = node[key]
    if node.get(path[-1]) == value:
        return
    node[path[-1]] = value
    (d / name).write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            any4.io.verify(d)
            model = any4.load(d, model=tiny_llama())
        except Any4FormatError:
            return
    reference = any4.load(sharded_dir, model=tiny_llama())
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
