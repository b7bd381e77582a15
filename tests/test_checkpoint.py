"""Streaming checkpoint quantization (any4.quantize_checkpoint, SPEC §11) on tiny checkpoints:
bit-identity with quantize_model, 2-process identity, resume, faults, and the memory bound."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from _tiny import byte_tokenizer, tiny_llama  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import any4  # noqa: E402
from any4 import checkpoint as ckpt  # noqa: E402
from any4.checkpoint import CheckpointError, quantize_checkpoint  # noqa: E402
from any4.dist import row_ranges, row_slice_seed  # noqa: E402
from any4.model import quantize_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 32


def _save(model, d) -> str:
    model.save_pretrained(d, max_shard_size="20KB")  # several shards + index
    byte_tokenizer().save_pretrained(d)
    assert os.path.isfile(os.path.join(d, ckpt.INDEX_NAME))
    return str(d)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    return _save(tiny_llama(seed=3, dtype=torch.bfloat16), tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def src_untied(tmp_path_factory) -> str:
    return _save(
        tiny_llama(seed=4, tie=False, dtype=torch.bfloat16), tmp_path_factory.mktemp("src_untied")
    )


@pytest.fixture(scope="module")
def src_gpt2(tmp_path_factory) -> str:
    """A tiny GPT-2: its attention and MLP projections are transformers' Conv1D (weight stored
    transposed, [K, N]); N != K for c_attn and c_fc, N == K for c_proj."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=259, n_positions=256,
                        bos_token_id=256, eos_token_id=257)  # fmt: skip
    model = GPT2LMHeadModel(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.1)
    return _save(model, tmp_path_factory.mktemp("src_gpt2"))


def _output_tensors(d) -> dict:
    out = {}
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(out), "a tensor is stored twice"
        out.update(part)
    return out


def _reference(src: str, **kw) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantize_model(model, "any4" if "fmt" not in kw else kw.pop("fmt"), G,
                   tokenizer=byte_tokenizer(), progress=False, **kw)  # fmt: skip
    return model.state_dict()


def _assert_same_as_reference(out_dir: str, ref: dict, src: str) -> None:
    got = _output_tensors(out_dir)
    guard = json.loads(open(os.path.join(out_dir, "config.json")).read())["quantization_config"][
        "guard"
    ]
    assert got.pop(guard).numel() == 0  # the empty guard tensor (see any4.io)
    source = {}
    for f in glob.glob(os.path.join(src, "*.safetensors")):
        source.update(load_file(f))
    quantized = {k for k in ref if k.endswith(".packed")}
    assert quantized and {k for k in got if k.endswith(".packed")} == quantized
    for key, r in ref.items():
        if key not in got:
            assert key == "lm_head.weight", f"{key} missing from the output"  # tied: stored once
            continue
        v = got[key]
        if key.endswith((".packed", ".lut", ".scales")):
            assert v.dtype == r.dtype and torch.equal(v, r), key
        else:  # copied in the source's dtype (bf16); the reference upcast it exactly
            assert v.dtype == source[key].dtype and torch.equal(v, source[key]), key
            assert torch.equal(v.to(r.dtype), r), key
    assert set(got) <= set(ref)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_bit_identical_to_quantize_model(src, tmp_path, mode) -> None:
    dst = str(tmp_path / "out")
    summary = quantize_checkpoint(src, dst, "any4", G, mode=mode, progress=False)
    _assert_same_as_reference(dst, _reference(src, mode=mode), src)
    assert summary["blocks"] == 2 and summary["layers"] == 14 and summary["world_size"] == 1
    assert summary["bits_per_weight"] > 4 and summary["peak_rss_mib"] > 0
    assert not os.path.exists(dst + ckpt.PARTIAL_SUFFIX)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_gpt2_conv1d_bit_identical(src_gpt2, tmp_path, mode) -> None:
    """Conv1D layers stream too (rows of the transposed weight), in both modes."""
    dst = str(tmp_path / "out")
    summary = quantize_checkpoint(src_gpt2, dst, "any4", G, mode=mode, progress=False)
    ref = _reference(src_gpt2, mode=mode)
    assert "transformer.h.1.attn.c_attn.packed" in ref and summary["layers"] == 8
    _assert_same_as_reference(dst, ref, src_gpt2)
    layers = json.load(open(os.path.join(dst, "config.json")))["quantization_config"]["layers"]
    assert layers["transformer.h.0.attn.c_attn"]["shape"] == [192, 64]  # [N, K], not the file's
    assert layers["transformer.h.0.mlp.c_proj"]["shape"] == [64, 256]
    model = any4.load(dst)
    ids = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(model(ids).logits).all()


def test_conv1d_row_shares_of_two_ranks(src_gpt2) -> None:
    """A rank > 0 reads a Conv1D weight from the file ([K, N]) and quantizes its share of the
    output rows; the shares of 2 ranks joined equal one rank's whole matrix (with Lloyd, whose
    per-row seeds the share must keep)."""
    from any4.dist import Group

    settings = {"fmt": "any4", "group_size": G, "mode": "one-pass", "weighting": "none",
                "method": "lloyd", "n_init": 2, "seed": 7, "table_dtype": None, "skip": ["lm_head"],
                "dtype": "float32", "max_calibration_tokens": None, "_dtype": torch.float32}  # fmt: skip
    source = ckpt.SourceCheckpoint(src_gpt2)
    items = [("transformer.h.1.attn.c_attn", None), ("transformer.h.0.mlp.c_proj", None)]
    whole = ckpt._Job(source, settings, Group(0, 1)).quantize_share(items)
    shares = [ckpt._Job(source, settings, Group(r, 2)).quantize_share(items) for r in (0, 1)]
    for j, (name, _) in enumerate(items):
        assert not isinstance(whole[j], str), whole[j]
        assert whole[j][0].shape[0] == (192 if "c_attn" in name else 64)
        for part in range(3):
            joined = torch.cat([shares[0][j][part], shares[1][j][part]])
            assert torch.equal(joined, whole[j][part]), (name, part)


def test_modes_differ(src, tmp_path) -> None:
    """The identity tests can fail: sequential changes the codes of later layers."""
    a = quantize_checkpoint(src, tmp_path / "a", "any4", G, progress=False)
    b = quantize_checkpoint(src, tmp_path / "b", "any4", G, mode="sequential", progress=False)
    ta, tb = _output_tensors(a["dst"]), _output_tensors(b["dst"])
    assert torch.equal(
        ta["model.layers.0.self_attn.q_proj.packed"], tb["model.layers.0.self_attn.q_proj.packed"]
    )
    assert not torch.equal(
        ta["model.layers.1.mlp.down_proj.packed"], tb["model.layers.1.mlp.down_proj.packed"]
    )


def test_lm_head_and_fixed_format(src_untied, tmp_path) -> None:
    """lm_head quantized (calibrated after the final norm), and a fixed format (no forward)."""
    dst = str(tmp_path / "head")
    quantize_checkpoint(src_untied, dst, "any4", G, skip=(), method="lloyd", progress=False)
    ref = _reference(src_untied, skip=(), method="lloyd")
    assert "lm_head.packed" in ref
    _assert_same_as_reference(dst, ref, src_untied)
    dst = str(tmp_path / "nf4")
    quantize_checkpoint(src_untied, dst, "nf4", G, progress=False)
    _assert_same_as_reference(dst, _reference(src_untied, fmt="nf4"), src_untied)


def test_output_layout_v2(src, tmp_path) -> None:
    dst = tmp_path / "out"
    quantize_checkpoint(src, dst, "any4", G, progress=False)
    config = json.loads((dst / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "any4" and q["format_version"] == 2 and q["fmt"] == "any4"
    assert (
        q["group_size"] == G
        and q["mode"] == "one-pass"
        and q["modules_to_not_convert"] == ["lm_head"]
    )
    assert q["layers"]["model.layers.1.mlp.down_proj"] == {
        "fmt": "any4", "group_size": G, "shape": [48, 80], "bias": False, "table_dtype": "bfloat16"
    }  # fmt: skip
    index = json.loads((dst / ckpt.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in dst.glob("model-*.safetensors")) and len(files) == 3
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _output_tensors(dst).values()
    )
    for f in files:
        from safetensors import safe_open

        with safe_open(str(dst / f), "pt") as h:
            meta = h.metadata()
            doc = json.loads(meta["any4"])
            assert meta["format"] == "pt" and doc["format_version"] == 2
            for key in h.keys():
                import hashlib

                t = h.get_tensor(key).contiguous()
                raw = (
                    t.view(torch.uint8).numpy().tobytes()
                    if t.dtype != torch.bfloat16
                    else t.view(torch.int16).numpy().tobytes()
                )
                assert doc["sha256"][key] == hashlib.sha256(raw).hexdigest()
            assert all(index["weight_map"][k + ".packed"] == f for k in doc["layers"])
    from any4.integrity import verify_file

    for f in files:  # sealed: one digest over every byte (any4.integrity)
        assert (
            verify_file(dst / f)["digest"]
            == json.loads((dst / "any4.json").read_text())["files"][f]
        )
    meta = json.loads((dst / "any4.json").read_text())
    assert meta["format_version"] == 2 and set(meta["files"]) == set(files)
    assert meta["settings"]["calibration_tokens"] > 100
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()
    with pytest.raises(FileExistsError):
        quantize_checkpoint(src, dst, "any4", G, progress=False)


def test_any4_load_and_from_pretrained_read_the_output(src, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    dst = str(tmp_path / "out")
    quantize_checkpoint(src, dst, "any4", G, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantize_model(ref, "any4", G, tokenizer=byte_tokenizer(), progress=False)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    ref_state = ref.state_dict()
    # any4.load builds the model in the saved dtype (bf16, the checkpoint's): the same tensors
    loaded = any4.load(dst)
    for key, t in loaded.state_dict().items():
        assert torch.equal(t.to(ref_state[key].dtype), ref_state[key]), key
    # from_pretrained in the dtype asked for: the very model quantize_model made
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    assert isinstance(model.model.layers[1].mlp.down_proj, any4.QuantLinear)
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_row_slice_seed_matches_whole_matrix() -> None:
    """Lloyd's per-row seeds: rows quantized in slices (as ranks do) equal the whole matrix."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 96, generator=g)
    whole = any4.quantize(w, "any4", 32, method="lloyd", seed=7)
    parts = [any4.quantize(w[a:b], "any4", 32, method="lloyd", seed=row_slice_seed(7, a))
             for a, b in row_ranges(37, 3)]  # fmt: skip
    assert torch.equal(torch.cat([p.packed for p in parts]), whole.packed)
    assert torch.equal(torch.cat([p.lut for p in parts]), whole.lut)
    plain = any4.quantize(w[13:], "any4", 32, method="lloyd", seed=7)  # without the shift
    assert not torch.equal(plain.lut, whole.lut[13:])
    assert row_ranges(5, 3) == [(0, 2), (2, 4), (4, 5)] and row_ranges(1, 2) == [(0, 1), (1, 1)]


def test_chunks_cover_every_row_once(src) -> None:
    """With several ranks a block's layers are cut into row ranges that cover every row of
    every layer exactly once, in order, none shorter than MIN_CHUNK_ROWS unless the layer is."""
    from any4.dist import Group

    settings = {"fmt": "any4", "group_size": G, "mode": "one-pass", "weighting": "none",
                "method": "lloyd", "n_init": 1, "seed": 0, "table_dtype": None, "skip": ["lm_head"],
                "dtype": "float32", "max_calibration_tokens": None, "_dtype": torch.float32}  # fmt: skip
    job = ckpt._Job(ckpt.SourceCheckpoint(src), settings, Group(0, 2))
    items = [(n, None) for n in job.block_layers[0]]
    chunks = job.chunks(items)
    assert len(chunks) > len(items)  # some layer is split
    for j, (name, _) in enumerate(items):
        mine = [(r0, r1) for i, r0, r1 in chunks if i == j]
        n = job.features[name][0]
        assert mine[0][0] == 0 and mine[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
        assert all(r1 - r0 >= min(n, ckpt.MIN_CHUNK_ROWS) for r0, r1 in mine[:-1])


def test_claimer_hands_out_each_index_once(monkeypatch) -> None:
    """Ranks claiming from one shared store get disjoint indices that together cover 0..n-1,
    whatever the order they ask in; without a store, a fixed round-robin share."""
    import torch.distributed as dist

    from any4 import dist as any4_dist
    from any4.dist import Group

    store = dist.HashStore()
    monkeypatch.setattr(any4_dist, "_job_store", lambda: store)
    for n in (0, 1, 7, 40):
        ranks = [Group(r, 3) for r in range(3)]
        claims = [g.claimer(n, f"t{n}") for g in ranks]
        got: list = [[], [], []]
        order = [0, 0, 2, 1, 2, 2, 0, 1] * 10  # uneven speeds
        for r in order:
            c = claims[r]()
            if c is not None:
                got[r].append(c)
        assert all(claims[r]() is None for r in range(3))
        flat = sorted(c for g in got for c in g)
        assert flat == list(range(n)), (n, got)
        if n == 40:
            assert len(got[2]) > len(got[1])  # the rank that asks more often gets more
    monkeypatch.setattr(any4_dist, "_job_store", lambda: None)
    shares = [[c for c in iter(Group(r, 3).claimer(8, "x"), None)] for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert list(iter(Group.single().claimer(3, "y"), None)) == [0, 1, 2]


def test_tensor_gather_keeps_structure() -> None:
    """The object sent by gather_tensors is rebuilt with its tensors (any dtype) in place."""
    from any4.dist import _restore_tensors, _strip_tensors

    obj = {3: (torch.arange(5, dtype=torch.uint8), torch.randn(2, 3).bfloat16(), None),
           7: "cannot quantize x", 9: [torch.zeros(0), torch.ones(4, dtype=torch.float64)]}  # fmt: skip
    tensors: list = []
    skeleton = _strip_tensors(obj, tensors)
    assert len(tensors) == 4 and not any(isinstance(v, torch.Tensor) for v in skeleton[3])
    back = _restore_tensors(skeleton, [t.clone() for t in tensors])
    assert back[7] == obj[7] and back[3][2] is None and isinstance(back[3], tuple)
    for a, b in [(back[3][0], obj[3][0]), (back[3][1], obj[3][1]), (back[9][1], obj[9][1])]:
        assert a.dtype == b.dtype and torch.equal(a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.parametrize("mode,method", [("sequential", "lloyd"), ("one-pass", "optimal")])
def test_two_processes_byte_identical(src, tmp_path, mode, method) -> None:
    """2 ranks claiming row ranges as they go write the same bytes as one process."""
    args = ["quantize", src, "--stream", "--group-size", str(G), "--method", method,
            "--mode", mode]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "any4", *args, "--out", str(one)], check=True,
                   timeout=300, env=_env())  # fmt: skip
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           "-m", "any4", *args, "--out", str(two), "--summary-json", str(summary)]  # fmt: skip
    r = subprocess.run(cmd, timeout=300, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    rows = json.loads(summary.read_text())["rows_quantized_ranks"]
    total = sum(t.shape[0] for k, t in _output_tensors(str(one)).items() if k.endswith(".packed"))
    assert len(rows) == 2 and sum(rows) == total and min(rows) >= 0, (rows, total)
    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(two)) and "model.safetensors.index.json" in names
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from any4 import checkpoint
    commit = checkpoint._Run._commit_block
    def commit_then_die(self, index, *a):
        commit(self, index, *a)
        if index == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # a killed process: no cleanup at all
    checkpoint._Run._commit_block = commit_then_die
    checkpoint.quantize_checkpoint(sys.argv[1], sys.argv[2], "any4", 32, mode=sys.argv[4],
                                   progress=False)
    """
)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_resume_after_kill(src, tmp_path, mode) -> None:
    dst = str(tmp_path / "out")
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    r = subprocess.run([sys.executable, str(script), src, dst, "0", mode], timeout=300, env=_env())
    assert r.returncode == -9
    assert not os.path.exists(dst) and os.path.isdir(dst + ckpt.PARTIAL_SUFFIX)
    summary = quantize_checkpoint(src, dst, "any4", G, mode=mode, resume=True, progress=False)
    assert summary["resumed_blocks"] == 1
    full = str(tmp_path / "full")
    quantize_checkpoint(src, full, "any4", G, mode=mode, progress=False)
    for name in sorted(os.listdir(full)):
        assert (
            open(os.path.join(dst, name), "rb").read()
            == open(os.path.join(full, name), "rb").read()
        ), name


def test_resume_refuses_other_settings(src, tmp_path) -> None:
    dst = str(tmp_path / "out")

    def interrupt(self, index, *a):
        raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt._Run, "_commit_block", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, dst, "any4", G, progress=False)
    mp.undo()
    assert not os.path.exists(dst) and os.path.isdir(dst + ckpt.PARTIAL_SUFFIX)
    with pytest.raises(CheckpointError, match="other settings"):
        quantize_checkpoint(src, dst, "any4", 64, resume=True, progress=False)


def _copy(src: str, tmp_path) -> str:
    d = str(tmp_path / "src_copy")
    shutil.copytree(src, d)
    return d


def _no_output(dst: str) -> None:
    assert not os.path.exists(dst) and not os.path.exists(dst + ckpt.PARTIAL_SUFFIX)


def test_rows_of_token_ids_need_no_tokenizer(src, tmp_path) -> None:
    """--calibration-ids rows (a JSON list of equal-length lists) on a checkpoint without a
    tokenizer: the same output as the same ids as a tensor."""
    bare = _copy(src, tmp_path)
    for f in os.listdir(bare):
        if f.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(bare, f))
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    quantize_checkpoint(src, a, "any4", G, calibration=ids, progress=False)
    quantize_checkpoint(bare, b, "any4", G, calibration=ids.tolist(), progress=False)
    ta, tb = _output_tensors(a), _output_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(CheckpointError, match="tokenizer"):  # text still needs one
        quantize_checkpoint(bare, str(tmp_path / "c"), "any4", G, calibration="some text",
                            progress=False)  # fmt: skip


def test_corrupt_or_missing_shard(src, tmp_path) -> None:
    d = _copy(src, tmp_path)
    shards = sorted(glob.glob(os.path.join(d, "model-*.safetensors")))
    dst = str(tmp_path / "out")
    with open(shards[1], "r+b") as f:  # truncated
        f.truncate(os.path.getsize(shards[1]) - 100)
    with pytest.raises(CheckpointError, match=os.path.basename(shards[1]) + ".*truncated"):
        quantize_checkpoint(d, dst, "any4", G, progress=False)
    _no_output(dst)
    shutil.copyfile(os.path.join(src, os.path.basename(shards[1])), shards[1])
    with open(shards[2], "r+b") as f:  # garbage in the header
        f.seek(10)
        f.write(b"\xff\xfe{{{")
    with pytest.raises(CheckpointError, match=os.path.basename(shards[2]) + ".*corrupt"):
        quantize_checkpoint(d, dst, "any4", G, progress=False)
    os.remove(shards[1])
    with pytest.raises(
        CheckpointError, match="missing checkpoint shard .*" + os.path.basename(shards[1])
    ):
        quantize_checkpoint(d, dst, "any4", G, progress=False)
    _no_output(dst)


def test_config_shape_mismatch(src, tmp_path) -> None:
    d = _copy(src, tmp_path)
    path = os.path.join(d, "config.json")
    config = json.loads(open(path).read())
    config["intermediate_size"] = 96
    open(path, "w").write(json.dumps(config))
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight.*shape.*mismatch"):
        quantize_checkpoint(d, dst, "any4", G, progress=False)
    config["num_hidden_layers"] = 3
    config["intermediate_size"] = 80
    open(path, "w").write(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\..*missing"):
        quantize_checkpoint(d, dst, "any4", G, progress=False)
    _no_output(dst)


def test_disk_full_then_resume(src, tmp_path, monkeypatch) -> None:
    dst = str(tmp_path / "out")
    real = ckpt.write_file
    calls = []

    def full_disk(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(ckpt, "write_file", full_disk)
    with pytest.raises(OSError, match="block-00001.*--resume") as e:
        quantize_checkpoint(src, dst, "any4", G, progress=False)
    assert e.value.errno == errno.ENOSPC and not os.path.exists(dst)
    monkeypatch.setattr(ckpt, "write_file", real)
    assert (
        quantize_checkpoint(src, dst, "any4", G, resume=True, progress=False)["resumed_blocks"] == 1
    )
    _assert_same_as_reference(dst, _reference(src), src)


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers, any4
    from any4 import checkpoint
    from transformers.models.llama import modeling_llama  # noqa: F401 (imported before `base`)
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                    if l.startswith(key + ":"))
    base = status("VmRSS")
    s = checkpoint.quantize_checkpoint(sys.argv[1], sys.argv[2], "any4", 128, list(range(300)),
                                       method="lloyd", n_init=1, progress=False)
    # VmHWM: this process's own peak (ru_maxrss would start at the forking parent's RSS,
    # which grows while the test writes the larger source checkpoint)
    print(json.dumps({"peak": status("VmHWM"), "base": base, "blocks": s["blocks"]}))
    """
)


def test_peak_rss_does_not_grow_with_the_model(tmp_path) -> None:
    """4 and 16 blocks of 7.6 MiB each in bf16 (14.5 MiB in float32), each run in a fresh
    process reading its own VmHWM. The 12 more blocks must add less than one block to the peak
    RSS, and the peak above the process's RSS before the call must stay under 40% of the
    16-block model in float32. (Measured: +2-4 MiB and ~60 MiB of 232 MiB. Before the block's
    float weights were released deterministically, a reference cycle kept each block alive
    until the cyclic GC ran: +74 MiB.)"""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        from quantize_scale import write_random_checkpoint
    finally:
        sys.path.pop(0)
    shape = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=2048)  # fmt: skip
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    peaks, above, sizes = {}, {}, {}
    for layers in (4, 16):
        src = str(tmp_path / f"src{layers}")
        sizes[layers] = 2 * write_random_checkpoint(
            src, shape, layers=layers, shard_bytes=32 * 2**20
        )
        r = subprocess.run([sys.executable, str(script), src, str(tmp_path / f"out{layers}")],
                           timeout=600, env=_env(), capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        m = json.loads(r.stdout.strip().splitlines()[-1])
        assert m["blocks"] == layers
        peaks[layers] = m["peak"]
        above[layers] = m["peak"] - m["base"]
        shutil.rmtree(src)
    block_fp32 = (sizes[16] - sizes[4]) / 12
    assert block_fp32 > 14 * 2**20
    grown = peaks[16] - peaks[4]
    mib = {k: round(v / 2**20, 1) for k, v in (*peaks.items(), ("grown", grown),
                                              ("above16", above[16]), ("block", block_fp32))}  # fmt: skip
    # 12 more blocks add less than one block (the heap does not grow block after block)
    assert grown < block_fp32, mib
    # and the peak above the imported libraries is a fraction of the float32 model (16 blocks)
    assert above[16] < 0.4 * 16 * block_fp32, mib
