"""any4.nn.QuantLinear: a drop-in nn.Linear whose forward is any4.gemm on the quantized weight."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import any4  # noqa: E402
from any4.nn import QuantLinear, dequantize_model  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.detach().double()
    assert torch.isfinite(y).all(), "output has NaN/Inf"
    ref = ref.detach()
    return float((y - ref).norm() / ref.norm())


def make_linear(n: int, k: int, bias: bool, seed: int) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


FORMATS = ["any4", "any3", "any2", "int4", "nf4", "fp4"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dequantized_linear(fmt: str, bias: bool) -> None:
    # N not a multiple of 8, K with a short last group (72 = 64 + 8).
    n, k, G = 37, 72, 64
    lin = make_linear(n, k, bias, seed=FORMATS.index(fmt) * 2 + bias)
    q = QuantLinear.from_linear(lin, fmt, G)
    assert (q.in_features, q.out_features, q.fmt, q.group_size) == (k, n, fmt, G)
    w64 = q.dequantize().double()
    assert w64.shape == (n, k)
    g = torch.Generator().manual_seed(7)
    for shape in [(k,), (5, k), (2, 3, k), (1, 1, 13, k)]:
        x = torch.randn(*shape, generator=g)
        for dtype, tol in TOL.items():
            xd = x.to(dtype)
            ref = xd.double() @ w64.T
            if bias:
                ref = ref + lin.bias.detach().to(dtype).double()
            y = q(xd)
            assert y.dtype == dtype and y.shape == shape[:-1] + (n,)
            assert rel_err(y, ref) < tol, (fmt, shape, dtype)


def test_matches_core_dequantize_and_quantize() -> None:
    lin = make_linear(24, 40, True, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 40, generator=g)
    stats = any4.ChannelStats()
    stats.update(x)
    q = QuantLinear.from_linear(lin, "any4", 16, stats=stats, weighting="mse")
    qt = any4.quantize(
        lin.weight.detach(), "any4", 16, stats=stats, weighting="mse", dtype="bfloat16"
    )
    assert (
        torch.equal(q.packed, qt.packed)
        and torch.equal(q.lut, qt.lut)
        and torch.equal(q.scales, qt.scales)
    )
    assert torch.equal(q.dequantize(), any4.dequantize(qt))
    assert q.lut.dtype == torch.bfloat16  # default table dtype for a float32 layer


def test_float64_input_and_to_linear() -> None:
    lin = make_linear(16, 32, True, seed=5)
    q = QuantLinear.from_linear(lin, "nf4", 32)
    x = torch.randn(3, 32, dtype=torch.float64)
    y = q(x)
    assert y.dtype == torch.float64
    ref = x @ q.dequantize().double().T + lin.bias.detach().double()
    assert rel_err(y, ref) < 1e-5
    dense = q.to_linear()
    assert isinstance(dense, torch.nn.Linear)
    xf = torch.randn(4, 32)
    assert rel_err(q(xf), dense(xf).double()) < 1e-5


def test_bad_inputs_raise() -> None:
    q = QuantLinear.from_linear(make_linear(8, 16, False, seed=6), "int4", 16)
    with pytest.raises(ValueError, match="16"):
        q(torch.randn(2, 15))
    with pytest.raises(TypeError):
        q(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(TypeError):
        q([1.0] * 16)
    with pytest.raises(ValueError):
        QuantLinear(16, 8, group_size=12)
    with pytest.raises(ValueError):
        QuantLinear(16, 8, group_size=32)
    with pytest.raises(ValueError):
        QuantLinear(16, 8, fmt="int5")
    with pytest.raises(TypeError):
        QuantLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
    qt = any4.quantize(torch.randn(8, 16), "any4", 16)
    with pytest.raises(ValueError):
        QuantLinear.from_quantized(qt, bias=torch.zeros(9))


def test_dtype_conversion_keeps_table_dtype() -> None:
    lin = make_linear(16, 32, True, seed=8)
    q = QuantLinear.from_linear(lin, "any4", 32, table_dtype=torch.float32)
    before = q.dequantize()
    q.half()
    assert (
        q.lut.dtype == torch.float32
        and q.scales.dtype == torch.float32
        and q.packed.dtype == torch.uint8
    )
    assert q.bias.dtype == torch.float16
    assert torch.equal(q.dequantize(), before)
    x = torch.randn(2, 32, dtype=torch.float16)
    y = q(x)
    assert y.dtype == torch.float16
    ref = x.double() @ before.double().T + q.bias.double()
    assert rel_err(y, ref) < TOL[torch.float16]


def test_state_dict_and_shell() -> None:
    q = QuantLinear.from_linear(make_linear(10, 24, True, seed=9), "any3", 8)
    sd = q.state_dict()
    assert set(sd) == {"packed", "lut", "scales", "bias"}
    assert (
        sd["lut"].shape == (10, 8)
        and sd["scales"].shape == (10, 3, 2)
        and sd["packed"].shape == (10, 9)  # 24 3-bit codes in 9 bytes
    )
    shell = QuantLinear(24, 10, bias=True, fmt="any3", group_size=8)
    shell.load_state_dict(sd)
    x = torch.randn(4, 24)
    assert torch.equal(shell(x), q(x))
    assert "fmt=any3" in repr(q)
    # any3 at G=8 with bf16 tables and scales: 3 bits + (8 + 2*3) * 16 bits per 24 weights.
    assert q.bits_per_weight == pytest.approx(3 + (8 + 6) * 16 / 24)


def test_dequantize_model_replaces_quantlinear() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    q = torch.nn.Sequential(
        QuantLinear.from_linear(model[0], "any4", 16),
        torch.nn.ReLU(),
        QuantLinear.from_linear(model[2], "any4", 24),
    )
    x = torch.randn(5, 16)
    y = q(x)
    dense = dequantize_model(q)
    assert all(not isinstance(m, QuantLinear) for m in dense.modules())
    assert rel_err(dense(x), y.double()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(
    not any4.cuda_available(), reason="needs a CUDA device and the any4 CUDA kernels"
)
def test_cuda_matches_cpu() -> None:
    q = QuantLinear.from_linear(make_linear(40, 128, True, seed=10), "any4", 64)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    ref = q(x).double()
    qc = q.cuda()
    assert qc.packed.is_cuda and qc.lut.dtype == torch.bfloat16
    y = qc(x.cuda()).cpu()
    assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_traces_without_graph_breaks() -> None:
    q = QuantLinear.from_linear(make_linear(24, 64, True, seed=11), "any4", 32)
    x = torch.randn(3, 64)
    explanation = torch._dynamo.explain(q)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), q(x))


@pytest.mark.parametrize(
    "fmt,limit", [("any4", 4.32), ("any3", 3.30), ("any2", 2.30), ("int3", 3.30), ("int2", 2.30)]
)
def test_bits_per_weight_is_what_is_stored(fmt, limit) -> None:
    """bits_per_weight counts the bytes of the buffers (what a file stores), and at K = 4096,
    G = 128 with bf16 tables the dense 3/2-bit layouts meet their size targets."""
    q = QuantLinear(4096, 48, bias=False, fmt=fmt, group_size=128)
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert q.bits_per_weight == pytest.approx(8 * stored / (48 * 4096))
    assert q.bits_per_weight <= limit
    bits = int(fmt[-1])
    assert q.packed.shape == (48, 4096 * bits // 8)


@pytest.mark.parametrize("fmt", ["any3", "any2"])
def test_nibble_state_dict_loads_into_dense_layout(fmt) -> None:
    """A state dict holding 3/2-bit codes in nibbles (any4 before the dense layouts) loads: the
    same codes, repacked, so the module computes exactly what the original did."""
    q = QuantLinear.from_linear(make_linear(12, 40, True, seed=2), fmt, 8)
    bits = int(fmt[-1])
    sd = dict(q.state_dict())
    sd["packed"] = any4.pack(any4.unpack(sd["packed"], 40, bits))  # nibbles [12, 20]
    assert sd["packed"].shape == (12, 20)
    shell = QuantLinear(40, 12, bias=True, fmt=fmt, group_size=8)
    shell.load_state_dict(sd)
    assert torch.equal(shell.packed, q.packed)
    assert torch.equal(shell.dequantize(), q.dequantize())
    x = torch.randn(3, 40)
    assert torch.equal(shell(x), q(x))
