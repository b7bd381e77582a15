"""Hugging Face integration (SPEC §10): from_pretrained of any4 checkpoints (pre-quantized, on
the meta device), quantize on load == quantize_model, save_pretrained / sharding / hub cache,
Conv1D, MoE coverage, calibration of any module. Offline, tiny random configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _tiny import byte_tokenizer, random_ids, tiny_config, tiny_llama  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import any4  # noqa: E402
from any4.io import INDEX_NAME, Any4FormatError, read_metadata  # noqa: E402
from any4.nn import QuantLinear  # noqa: E402
from any4.stats import ChannelStats  # noqa: E402

COMMON = dict(vocab_size=259, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=256, eos_token_id=257, pad_token_id=258)  # fmt: skip


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of an architecture (weights larger than default so quantization
    visibly changes the outputs)."""
    cfg = {
        "llama": lambda: tiny_config(tie=False),
        "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
        "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=16),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=259,
            n_positions=256,
            n_embd=48,
            n_layer=2,
            n_head=4,
            bos_token_id=256,
            eos_token_id=257,
        ),  # fmt: skip
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.1)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


ARCHS = ("llama", "qwen2", "mistral", "gpt2")


@pytest.fixture(scope="module", params=ARCHS)
def quantized(request):
    model = tiny(request.param, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's 48-wide layers use a short last group
        any4.quantize_model(model, "any4", 32, random_ids(64, seed=4), progress=False)
    return request.param, model


def test_save_and_save_pretrained_round_trip(quantized, tmp_path) -> None:
    arch, model = quantized
    ids = random_ids(21, seed=5, rows=2)
    expected = logits(model, ids)
    n_layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_layers == (8 if arch == "gpt2" else 14)  # GPT-2: c_attn, c_proj, c_fc, mlp.c_proj

    plain = tmp_path / "plain"
    any4.save(model, plain)
    qc = json.loads((plain / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "any4" and qc["format_version"] == 2
    assert len(qc["layers"]) == n_layers and qc["fmt"] == "any4" and qc["group_size"] == 32

    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="30KB")
    index = json.loads((sharded / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and index["metadata"]["total_size"] > 0
    # each header keeps format "pt" and lists the layers stored in that file
    seen = {}
    for name in files:
        with safe_open(str(sharded / name), framework="pt") as f:
            meta = f.metadata()
            keys = set(f.keys())
        assert meta["format"] == "pt"
        layers = json.loads(meta["any4"])["layers"]
        assert all(f"{layer}.packed" in keys for layer in layers)
        seen.update(layers)
    assert len(seen) == n_layers

    for directory in (plain, sharded):
        loaded = AutoModelForCausalLM.from_pretrained(directory)
        assert isinstance(loaded.get_submodule(next(iter(qc["layers"]))), QuantLinear)
        assert torch.equal(logits(loaded, ids), expected)
        again = any4.load(directory)
        assert torch.equal(logits(again, ids), expected)
        assert again.any4_settings["fmt"] == "any4"
    if arch == "qwen2":  # tied embeddings: stored once, tied again on load
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # a loaded model saves again (save_pretrained of a from_pretrained model)
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(any4.load(tmp_path / "again"), ids), expected)


def test_from_pretrained_without_any4_refuses(tmp_path) -> None:
    model = tiny("llama", seed=1)
    any4.quantize_model(model, "int4", 16, progress=False)
    any4.save(model, tmp_path / "q")
    code = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "q")!r})
        except Exception as e:
            print("refused:", type(e).__name__, e)
        else:
            print("loaded")
        assert "any4" not in sys.modules
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused: RuntimeError"), out.stdout
    assert "Unknown quantization type, got any4" in out.stderr  # transformers says why


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    out = {}
    for arch in ("llama", "gpt2"):
        d = tmp_path_factory.mktemp(f"float_{arch}")
        tiny(arch, seed=7).save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        out[arch] = d
    return out


def test_transformers_own_save_pretrained_is_readable(tmp_path) -> None:
    """Bypassing any4's writer (the class's save_pretrained): no any4 digests, but config.json
    still carries the layers and the guard, and both readers load it."""
    model = tiny("llama", seed=8)
    any4.quantize_model(model, "nf4", 16, progress=False)
    transformers.PreTrainedModel.save_pretrained(model, tmp_path / "t")
    qc = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "any4" and qc["guard"] and len(qc["layers"]) == 14
    ids = random_ids(9, seed=1)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "t"), ids),
                       logits(model, ids))  # fmt: skip
    with pytest.warns(UserWarning, match="not verified"):
        assert torch.equal(logits(any4.load(tmp_path / "t", model=tiny("llama")), ids),
                           logits(model, ids))  # fmt: skip


@pytest.mark.parametrize(
    "arch,fmt,options",
    [
        ("llama", "int4", {}),  # fixed format: quantized weight by weight while loading
        ("gpt2", "nf4", {}),
        ("llama", "any4", {"weighting": "none"}),
        ("llama", "any4", {}),  # calibrated: default text, the checkpoint's tokenizer
        ("llama", "any3", {"mode": "sequential", "calibration": "A short text. " * 20}),
    ],
)
def test_quantize_on_load_equals_quantize_model(float_dirs, arch, fmt, options, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(
            float_dirs[arch], quantization_config=any4.Any4Config(fmt=fmt, group_size=16, **options)
        )
        ref_options = dict(options)
        calibration = ref_options.pop("calibration", "default")
        reference = any4.quantize_model(
            tiny(arch, seed=7), fmt, 16, calibration, tokenizer=byte_tokenizer(), progress=False,
            **ref_options,
        )  # fmt: skip
    assert (
        sum(isinstance(m, QuantLinear) for m in loaded.modules())
        == sum(isinstance(m, QuantLinear) for m in reference.modules())
        > 0
    )
    assert same_state(loaded, reference)
    assert (
        loaded.any4_settings["quantized_fraction"] == reference.any4_settings["quantized_fraction"]
    )
    # and it saves as a pre-quantized checkpoint
    loaded.save_pretrained(tmp_path / "q")
    ids = random_ids(19, seed=8)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), ids),
                       logits(reference, ids))  # fmt: skip


def test_conv1d_quantized_with_transposed_weight() -> None:
    model = tiny("gpt2", seed=2)
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [in=48, out=192]
    w = conv.weight.detach().clone()
    x = torch.randn(5, 48)
    y = conv(x)
    q = QuantLinear.from_linear(conv, "int4", 16)
    assert (q.out_features, q.in_features) == (192, 48)
    w_hat = q.dequantize()
    assert torch.linalg.norm(w_hat - w.T) / torch.linalg.norm(w) < 0.1
    assert torch.allclose(q(x), x @ w_hat.T + conv.bias, atol=1e-4)
    assert torch.linalg.norm(q(x) - y) / torch.linalg.norm(y) < 0.1


def test_moe_experts_warn_with_fraction() -> None:
    cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    experts = [p for n, p in model.named_parameters() if p.ndim == 3]
    assert experts  # transformers 5 stores experts as 3-D tensors
    expert_params = sum(p.numel() for p in experts)
    total = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match=r"3-D tensors .* stay in float") as record:
        any4.quantize_model(model, "int4", 16, progress=False)
    pct = f"{100 * expert_params / total:.1f}%"
    assert any(pct in str(r.message) for r in record)
    s = model.any4_settings
    quantized = sum(
        m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    assert s["expert_params"] == expert_params and s["quantized_params"] == quantized
    assert s["quantized_fraction"] == pytest.approx(quantized / total, abs=1e-6)
    assert "% of the" in any4.model.quantize_summary(s) and "MoE" in any4.model.quantize_summary(s)


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(24, 40)
        self.b = torch.nn.Linear(40, 16)

    def forward(self, x, scale: float = 1.0):
        return self.b(torch.relu(self.a(x * scale)))


@pytest.mark.parametrize("kind", ["tensor", "dict", "list", "callable"])
def test_calibration_with_example_inputs(kind) -> None:
    torch.manual_seed(0)
    base = TwoLayer()
    x1, x2 = torch.randn(7, 24) * torch.linspace(0.1, 3, 24), torch.randn(5, 24)
    inputs = {
        "tensor": (x1, [x1]),
        "dict": ({"x": x1, "scale": 2.0}, [x1 * 2.0]),
        "list": ([x1, {"x": x2}], [x1, x2]),
        "callable": (lambda m: m(x2), [x2]),
    }[kind]
    model = any4.quantize_model(_copy(base), "any4", 8, inputs[0], progress=False)
    # reference: statistics of exactly those inputs, layer by layer
    stats_a, stats_b = ChannelStats(), ChannelStats()
    with torch.no_grad():
        for x in inputs[1]:
            stats_a.update(x)
            stats_b.update(torch.relu(base.a(x)))
    for name, stats in (("a", stats_a), ("b", stats_b)):
        ref = any4.model.quantize_layer(getattr(base, name), "any4", 8, stats)
        got = getattr(model, name)
        assert torch.equal(got.packed, ref.packed) and torch.equal(got.lut, ref.lut)
        assert torch.equal(got.scales, ref.scales)
    none = any4.model.quantize_layer(base.a, "any4", 8, None)  # the statistics mattered
    assert not torch.equal(model.a.lut, none.lut)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_hub_repo_id_from_local_cache(tmp_path) -> None:
    model = tiny("qwen2", seed=5)
    any4.quantize_model(model, "nf4", 16, progress=False)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-any4"
    snapshot = repo / "snapshots" / commit
    any4.save(model, snapshot, tokenizer=byte_tokenizer())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    ids = random_ids(15, seed=9)
    loaded = any4.load("someone/tiny-any4", cache_dir=str(cache), local_files_only=True)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    with pytest.raises(FileNotFoundError, match="hub"):
        any4.load("someone/absent", cache_dir=str(cache), local_files_only=True)


def test_save_with_tokenizer_and_generation_config(tmp_path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    model = tiny_llama(seed=2)
    model.generation_config.max_new_tokens = 7
    any4.quantize_model(model, "int4", 16, progress=False)
    any4.save(model, tmp_path / "q", tokenizer=byte_tokenizer())
    tok = AutoTokenizer.from_pretrained(tmp_path / "q")
    assert tok("ab")["input_ids"] == byte_tokenizer()("ab")["input_ids"]
    assert GenerationConfig.from_pretrained(tmp_path / "q").max_new_tokens == 7
    assert not [n for n in os.listdir(tmp_path / "q") if n.startswith(".")]  # no temp files left


def test_resave_replaces_shards_and_tampered_shard_fails(tmp_path) -> None:
    model = tiny_llama(seed=4)
    any4.quantize_model(model, "int4", 16, progress=False)
    d = tmp_path / "q"
    any4.save(model, d, max_shard_size="20KB")
    shards = sorted(n for n in os.listdir(d) if n.startswith("model-"))
    assert len(shards) > 2 and (d / INDEX_NAME).is_file()
    data = bytearray((d / shards[1]).read_bytes())
    data[-5] ^= 0x5A
    (d / shards[1]).write_bytes(bytes(data))
    with pytest.raises(Any4FormatError, match="checksum|digest"):
        any4.load(d)
    any4.save(model, d)  # one file now: the old shards and index are gone
    assert sorted(n for n in os.listdir(d) if n.endswith(".safetensors")) == ["model.safetensors"]
    assert not (d / INDEX_NAME).exists()
    ids = random_ids(11, seed=3)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(d), ids), logits(model, ids))


def test_format_version_1_directory_still_loads(tmp_path) -> None:
    from safetensors.torch import save_file

    model = tiny_llama(seed=6)
    any4.quantize_model(model, "int4", 16, progress=False)
    file = tmp_path / "m.safetensors"
    any4.save(model, file)
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["any4"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("digest")  # as version 1 wrote it: per-tensor checksums of the data
    meta["format_version"] = 1
    meta["sha256"] = {k: any4.io._digest(t) for k, t in tensors.items()}
    d = tmp_path / "v1"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"any4": json.dumps(meta)})
    any4.io.save_hf_config(model.config, d)  # as version 1 wrote it: no quantization_config
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    ids = random_ids(13, seed=2)
    assert torch.equal(logits(any4.load(d), ids), logits(model, ids))
    assert read_metadata(d)["format_version"] == 1


def test_any4_config_round_trip_and_errors() -> None:
    cfg = any4.Any4Config(fmt="nf4", group_size=64, skip=["lm_head", "mlp.down_proj"],
                          table_dtype=torch.float16)  # fmt: skip
    d = cfg.to_dict()
    assert d["quant_method"] == "any4" and d["modules_to_not_convert"] == [
        "lm_head",
        "mlp.down_proj",
    ]
    assert d["table_dtype"] == "float16"
    back = any4.Any4Config.from_dict(d)
    assert back.to_dict() == d
    assert json.loads(cfg.to_json_string())["fmt"] == "nf4"
    assert any4.Any4Config(calibration=torch.tensor([1, 2])).to_dict()["calibration"] is None
    for bad in (dict(fmt="any5"), dict(group_size=12), dict(weighting="max"), dict(mode="twice"),
                dict(table_dtype="int8")):  # fmt: skip
        with pytest.raises(ValueError):
            any4.Any4Config(**bad)


PEAK_RSS = """
import json, sys, time
import torch, any4
from transformers import AutoModelForCausalLM

def status(field):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))

def reset_peak():  # VmHWM restarts at the current RSS (ru_maxrss would keep the parent's peak)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

path, warmup = sys.argv[1], sys.argv[2]
AutoModelForCausalLM.from_pretrained(warmup)  # imports and first-call costs, not measured
reset_peak()
before = status("VmRSS")
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path)
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"before": before, "peak": peak, "seconds": seconds}))
"""


def _peak_rss(path, warmup) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(warmup)],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shell_checkpoint(cfg, directory) -> int:
    """An any4 checkpoint of ``cfg`` with int4 shells as quantized layers (contents do not matter
    for memory); returns the float32 model's size in bytes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    for name, lin in list(any4.model.eligible_layers(model).items()):
        q = QuantLinear(lin.in_features, lin.out_features, bias=False, fmt="int4", group_size=128)
        any4.nn.set_submodule(model, name, q)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    any4.save(model, directory)
    weights = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    return 4 * (sum(p.numel() for p in model.parameters()) + weights)


def test_prequantized_load_peak_memory_below_float_size(tmp_path) -> None:
    """from_pretrained of an any4 folder never holds the float weights: the peak RSS it adds
    is well below the float model's size (subprocess; a ~160 MB float32 model)."""

    def cfg(hidden, inter, layers):
        return transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=8,
                                        num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip

    float_bytes = _shell_checkpoint(cfg(1024, 2816, 3), tmp_path / "q")
    _shell_checkpoint(cfg(128, 256, 1), tmp_path / "warmup")
    assert float_bytes > 120e6
    r = _peak_rss(tmp_path / "q", tmp_path / "warmup")
    added = r["peak"] - r["before"]
    checkpoint = sum(os.path.getsize(tmp_path / "q" / n) for n in os.listdir(tmp_path / "q"))
    assert added < 0.5 * float_bytes, (added, float_bytes, checkpoint)


def test_nibble_any3_checkpoint_of_format_2_still_loads(tmp_path) -> None:
    """A format-2 directory whose 3-bit layers hold nibbles and no code_layout (what any4 wrote
    before the dense layouts) loads through any4.load and from_pretrained to the same codes, so
    the same logits; the current writer stores them densely."""
    import numpy as np

    from any4 import integrity
    from conftest import unpack_ref

    model = tiny_llama(seed=6)
    any4.quantize_model(model, "any3", 16, random_ids(64, seed=4), progress=False)
    d = tmp_path / "old"
    any4.save(model, d)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert {info["code_layout"] for info in qc["layers"].values()} == {"dense"}
    sealed = integrity.read_file(d / "model.safetensors")
    tensors, meta = dict(sealed.tensors), dict(sealed.any4)
    for name, info in meta["layers"].items():
        N, K = info["shape"]
        codes = unpack_ref(tensors[f"{name}.packed"].numpy(), K, 3).astype(np.uint8)
        codes = np.pad(codes, ((0, 0), (0, K % 2)))
        tensors[f"{name}.packed"] = torch.from_numpy(codes[:, 0::2] | (codes[:, 1::2] << 4))
        del info["code_layout"]
    extra = {k: v for k, v in sealed.metadata.items() if k not in ("any4", "format")}
    digest = integrity.write_file(d / "model.safetensors", tensors, meta, metadata=extra)
    for info in qc["layers"].values():
        del info["code_layout"]
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(config))
    summary = json.loads((d / "any4.json").read_text())
    summary["files"] = {"model.safetensors": digest}
    for info in summary.get("layers", {}).values():
        info.pop("code_layout", None)
    (d / "any4.json").write_text(json.dumps(summary))

    ids = random_ids(13, seed=2)
    expected = logits(model, ids)
    for loaded in (any4.load(d), AutoModelForCausalLM.from_pretrained(d)):
        assert torch.equal(logits(loaded, ids), expected)
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                assert torch.equal(loaded.get_submodule(name).packed, m.packed)


def test_registration_on_import_without_importing_transformers() -> None:
    code = textwrap.dedent("""
        import sys
        import any4
        assert "transformers" not in sys.modules and "torch" not in sys.modules
        import transformers.modeling_utils  # imports the quantizer registry: any4 registers
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        assert AUTO_QUANTIZER_MAPPING["any4"] is any4.Any4HfQuantizer
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_import_any4_without_transformers() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # as if not installed: any import of it fails
        import numpy as np
        import any4
        w = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
        qt = any4.quantize(w, "int4", 16)
        assert any4.dequantize(qt).shape == (16, 32)
        try:
            any4.Any4Config
        except ImportError:
            print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_load_verifies_each_file_once_and_from_pretrained_still_verifies(
    tmp_path, monkeypatch
) -> None:
    from any4 import integrity

    model = tiny_llama(seed=5)
    any4.quantize_model(model, "int4", 16, progress=False)
    d = tmp_path / "q"
    any4.save(model, d, max_shard_size="20KB")
    shards = sorted(n for n in os.listdir(d) if n.startswith("model-"))
    calls: list = []
    real = integrity.verify_file
    monkeypatch.setattr(
        integrity, "verify_file", lambda f, *a, **k: calls.append(f) or real(f, *a, **k)
    )
    ids = random_ids(11, seed=3)
    assert torch.equal(logits(any4.load(d), ids), logits(model, ids))
    assert sorted(os.path.basename(f) for f in calls) == shards  # each shard hashed once
    calls.clear()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(d), ids), logits(model, ids))
    assert sorted(os.path.basename(f) for f in calls) == shards  # the quantizer's own check
    data = bytearray((d / shards[0]).read_bytes())
    data[-3] ^= 0x11
    (d / shards[0]).write_bytes(bytes(data))
    with pytest.raises(Any4FormatError, match="checksum|digest"):
        AutoModelForCausalLM.from_pretrained(d)
