"""any4.quantize_model on a tiny randomly initialised Llama: formats, calibration modes, skips."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import HIDDEN, INTERMEDIATE, byte_tokenizer, random_ids, tiny_llama  # noqa: E402

import any4  # noqa: E402
from any4.calibration import (  # noqa: E402
    DEFAULT_ROW_TOKENS,
    DEFAULT_SAMPLES,
    ActivationRecorder,
    calibration_ids,
    default_text,
    run_model,
    sample_text,
)  # fmt: skip
from any4.model import eligible_layers, matches_skip  # noqa: E402
from any4.nn import QuantLinear, dequantize_model  # noqa: E402

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def rel_err(a, b) -> float:
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def float_model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def calib():
    return random_ids(96, seed=11)


@pytest.mark.parametrize("fmt", ["any4", "any3", "any2", "int4", "nf4", "fp4"])
def test_quantize_model_each_format(float_model, calib, fmt: str) -> None:
    model = copy.deepcopy(float_model)
    out = any4.quantize_model(model, fmt, 64, calib, progress=False)
    assert out is model
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 2 * LINEARS_PER_LAYER
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    for name, m in quant.items():
        assert m.fmt == fmt
        # K=48 < 64: the layer uses G=48; K=80 keeps G=64 with a short last group.
        assert m.group_size == (48 if m.in_features == HIDDEN else 64), name
    assert model.model.layers[1].mlp.down_proj.in_features == INTERMEDIATE
    assert model.any4_settings["fmt"] == fmt and model.any4_settings["layers"] == 14

    # The quantized model computes exactly the float model with each weight replaced by its
    # dequantized value (dense reference, same architecture).
    ids = random_ids(40, seed=12)
    reference = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, m in quant.items():
            reference.get_submodule(name).weight.copy_(m.dequantize())
    y = logits(model, ids)
    assert rel_err(y, logits(reference, ids)) < 1e-4
    # Quantization changed the function, but not into garbage.
    err = rel_err(y, logits(float_model, ids))
    assert 0 < err < 1.0


def test_one_pass_uses_float_model_statistics(float_model, calib) -> None:
    model = copy.deepcopy(float_model)
    any4.quantize_model(model, "any4", 32, calib, progress=False)
    target = "model.layers.1.mlp.down_proj"
    with ActivationRecorder({target: float_model.get_submodule(target)}) as rec:
        run_model(float_model, calib)
    w = float_model.get_submodule(target).weight.detach()
    qt = any4.quantize(w, "any4", 32, stats=rec.stats[target], weighting="mse", dtype="bfloat16")
    q = model.get_submodule(target)
    assert (
        torch.equal(q.lut, qt.lut)
        and torch.equal(q.packed, qt.packed)
        and torch.equal(q.scales, qt.scales)
    )


def test_sequential_uses_partially_quantized_model(float_model, calib) -> None:
    seq = any4.quantize_model(
        copy.deepcopy(float_model), "any4", 32, calib, mode="sequential", progress=False
    )
    one = any4.quantize_model(
        copy.deepcopy(float_model), "any4", 32, calib, mode="one-pass", progress=False
    )
    first = "model.layers.0.self_attn.q_proj"  # its input does not depend on any quantized layer
    assert torch.equal(seq.get_submodule(first).lut, one.get_submodule(first).lut)

    target = "model.layers.1.mlp.down_proj"
    # Reference: every layer quantized as in `seq` (dense dequantized weights, as during
    # calibration) except target, in float; target's input statistics come from that model.
    ref = dequantize_model(copy.deepcopy(seq))
    float_target = float_model.get_submodule(target)
    ref_target = ref.get_submodule(target)
    with torch.no_grad():
        ref_target.weight.copy_(float_target.weight)
    with ActivationRecorder({target: ref_target}) as rec:
        run_model(ref, calib)
    qt = any4.quantize(
        float_target.weight.detach(), "any4", 32, stats=rec.stats[target], dtype="bfloat16"
    )
    q = seq.get_submodule(target)
    assert torch.equal(q.lut, qt.lut) and torch.equal(q.packed, qt.packed)
    assert not torch.equal(q.lut, one.get_submodule(target).lut)


def test_skip_patterns(float_model, calib) -> None:
    model = any4.quantize_model(
        copy.deepcopy(float_model), "int4", 32, calib, skip=("lm_head", "mlp.down_proj", "model.layers.0.self_attn.*"),
        progress=False,
    )  # fmt: skip
    kinds = {
        n: type(m).__name__
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, QuantLinear))
    }
    for name, kind in kinds.items():
        skipped = (
            name == "lm_head"
            or name.endswith("down_proj")
            or name.startswith("model.layers.0.self_attn.")
        )
        assert kind == ("Linear" if skipped else "QuantLinear"), name
    assert (
        matches_skip("a.b.c", ["b.c"])
        and not matches_skip("a.bb.c", ["b.c"])
        and matches_skip("x.y", ["x.*"])
    )
    assert "lm_head" in eligible_layers(float_model, skip=())


def test_weighting_none_and_fixed_formats_need_no_calibration(float_model) -> None:
    for fmt, kw in (("any4", {"weighting": "none"}), ("nf4", {})):
        model = any4.quantize_model(
            copy.deepcopy(float_model), fmt, 32, calibration="some text", progress=False, **kw
        )
        assert model.any4_settings["calibration_tokens"] == 0


def test_text_calibration_and_options(float_model) -> None:
    tok = byte_tokenizer()
    text = "a short text, with words"
    m1 = any4.quantize_model(copy.deepcopy(float_model), "any4", 32, text, tokenizer=tok, method="lloyd",
                             n_init=2, weighting="rms", progress=False)  # fmt: skip
    assert m1.any4_settings["calibration_tokens"] == len(text)
    assert m1.any4_settings["n_init"] == 2 and m1.any4_settings["weighting"] == "rms"
    assert m1.any4_settings["method"] == "lloyd"
    # The same layer quantized directly with the same options and statistics.
    target = "model.layers.0.mlp.gate_proj"
    with ActivationRecorder({target: float_model.get_submodule(target)}) as rec:
        run_model(float_model, calibration_ids(text, tok))
    qt = any4.quantize(float_model.get_submodule(target).weight.detach(), "any4", 32, stats=rec.stats[target],
                       weighting="rms", method="lloyd", n_init=2, dtype="bfloat16")  # fmt: skip
    assert torch.equal(m1.get_submodule(target).lut, qt.lut)
    m2 = any4.quantize_model(
        copy.deepcopy(float_model), "any4", 32, text, tokenizer=tok, weighting="rms", progress=False
    )
    assert m2.any4_settings["method"] == "optimal"  # the default
    assert not torch.equal(m2.get_submodule(target).lut, qt.lut)
    ids = calibration_ids(["first text", "second"], tok)
    assert ids.shape == (1, len("first text\n\nsecond"))
    assert calibration_ids(torch.arange(10), seq_len=4).shape == (2, 4)
    assert calibration_ids(list(range(5)), max_tokens=3).shape == (1, 3)
    rows = calibration_ids([[1, 2, 3], [4, 5, 6]])  # rows of ids (a --calibration-ids file)
    assert rows.tolist() == [[1, 2, 3], [4, 5, 6]] and rows.dtype == torch.int64
    with pytest.raises(ValueError, match="one length"):
        calibration_ids([[1, 2, 3], [4, 5]])
    with pytest.raises(TypeError, match="token ids"):
        calibration_ids([[1, 2.5], [3, 4]])


def test_bad_arguments(float_model, calib) -> None:
    model = copy.deepcopy(float_model)
    assert any4.quantize_model(model, "fp") is model
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match="format"):
        any4.quantize_model(model, "any5", progress=False)
    with pytest.raises(ValueError, match="mode"):
        any4.quantize_model(model, "any4", 32, calib, mode="twice", progress=False)
    with pytest.raises(ValueError, match="group_size"):
        any4.quantize_model(model, "any4", 12, calib, progress=False)
    with pytest.raises(ValueError, match="weighting"):
        any4.quantize_model(model, "any4", 32, calib, weighting="max", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        any4.quantize_model(model, "any4", 32, "text without a tokenizer", progress=False)
    with pytest.raises(RuntimeError):  # a float tensor is an example input; an LM wants ids
        any4.quantize_model(model, "any4", 32, torch.randn(5), progress=False)
    with pytest.raises(TypeError):
        any4.quantize_model(model, "any4", 32, object(), progress=False)
    with pytest.raises(TypeError):
        any4.quantize_model("not a model", "any4")
    assert not any(
        isinstance(m, QuantLinear) for m in model.modules()
    )  # failed calls changed nothing


def test_unused_layer_warns(calib) -> None:
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(256, 16)
            self.used = torch.nn.Linear(16, 16)
            self.unused = torch.nn.Linear(16, 16)

        def forward(self, ids):
            return self.used(self.emb(ids))

    model = WithUnused()
    with pytest.warns(UserWarning, match="no calibration input"):
        any4.quantize_model(model, "any4", 16, calib, progress=False)
    assert isinstance(model.unused, QuantLinear) and isinstance(model.used, QuantLinear)


def test_shipped_calibration_texts() -> None:
    for name in DEFAULT_SAMPLES:
        assert 2000 < len(sample_text(name)) < 20000
        assert sample_text(name) in default_text()
    # The previous default, still shipped: several scripts (languages) and code.
    mixed = sample_text("mixed")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in mixed) and any(
        "\u0400" <= ch <= "\u04ff" for ch in mixed
    )
    assert "def " in mixed
    with pytest.raises(ValueError, match="unknown calibration sample"):
        sample_text("../calibration")


def test_default_calibration_rows() -> None:
    """The default: one row per shipped sample, its first DEFAULT_ROW_TOKENS tokens, cut to
    max_tokens // 3 and seq_len; quantize_model records the tokens it used."""
    tok = byte_tokenizer()
    ids = calibration_ids("default", tok)
    assert ids.shape == (len(DEFAULT_SAMPLES), DEFAULT_ROW_TOKENS)
    for row, name in zip(ids, DEFAULT_SAMPLES):
        assert row.tolist() == tok(sample_text(name))["input_ids"][:DEFAULT_ROW_TOKENS]
    assert torch.equal(calibration_ids(None, tok), ids)
    assert torch.equal(calibration_ids("default", tok, max_tokens=300), ids[:, :100])
    assert torch.equal(calibration_ids("default", tok, seq_len=64), ids[:, :64])
    assert torch.equal(calibration_ids("default", tok, max_tokens=2), ids[:1, :2])
    with pytest.raises(ValueError, match="empty"):
        calibration_ids("default", tok, max_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_ids("default")


def test_calibration_text_does_not_overlap_heldout() -> None:
    from any4.builtin import heldout_text

    held = heldout_text()
    text = default_text() + "\n" + sample_text("mixed")
    # lines of prose (reST underlines such as "*****" are in both and say nothing)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 5]
    assert lines
    assert not [ln for ln in lines if ln in held]
