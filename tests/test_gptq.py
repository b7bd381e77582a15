"""GPTQ-style error feedback onto a fixed table (any4.gptq)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import any4  # noqa: E402
from any4.gptq import GPTQ, gptq_codes  # noqa: E402
from any4.refit import expand_scales, output_error  # noqa: E402


def _correlated(T: int, K: int, seed: int) -> torch.Tensor:
    """Activations with strongly correlated channels and a few outliers, float64 [T, K]."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) / K**0.5
    x = torch.randn(T, K, generator=g, dtype=torch.float64) @ (torch.eye(K) + 1.5 * mix)
    x[:, :3] *= 5
    return x


def _weight(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g))


def _reference_gptq(w, qt, H, damp, order):
    """Column-by-column GPTQ in float64 with the explicit inverse (no blocks, no Cholesky of
    the inverse): after quantizing column i, the remaining weights move by the optimal update
    -err * Hinv[i, rest] / Hinv[i, i] and column i is removed from Hinv."""
    N, K = qt.shape
    W = w.double().clone()
    lut = qt.lut.double().expand(N, -1)
    s, z = expand_scales(qt.scales, K, qt.group_size)
    Hd = H.clone() + damp * float(torch.diagonal(H).mean()) * torch.eye(K, dtype=torch.float64)
    perm = (
        torch.argsort(torch.diagonal(H), descending=True, stable=True)
        if order == "act"
        else torch.arange(K)
    )
    Hinv = torch.linalg.inv(Hd[perm][:, perm])
    W, s, z = W[:, perm], s[:, perm], z[:, perm]
    codes = torch.empty((N, K), dtype=torch.long)
    for i in range(K):
        vals = lut * s[:, i : i + 1] + z[:, i : i + 1]  # every entry's value for this column
        c = (vals - W[:, i : i + 1]).abs().argmin(1)
        codes[:, i] = c
        err = W[:, i] - vals.gather(1, c[:, None])[:, 0]
        W[:, i + 1 :] -= err[:, None] * (Hinv[i, i + 1 :] / Hinv[i, i])[None, :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


@pytest.mark.parametrize("fmt,order", [("any4", "act"), ("int4", "natural"), ("any3", "act")])
def test_gptq_matches_the_column_by_column_reference(fmt, order) -> None:
    N, K, G = 7, 40, 16  # K not a multiple of G (short last group), odd N
    w = _weight(N, K, 3)
    x = _correlated(400, K, 4)
    H = x.T @ x / 400
    qt = any4.quantize(w, fmt, G, dtype="float32")
    new = gptq_codes(w, qt, H, GPTQ(damp=0.01, order=order, block=8))
    ref = _reference_gptq(w, qt, H, 0.01, order)
    codes = new.codes().long()
    lut = qt.lut.double().expand(N, -1)
    # codes may differ only where two entries tie within rounding: compare the values
    torch.testing.assert_close(lut.gather(1, codes), lut.gather(1, ref), rtol=0, atol=1e-9)
    assert torch.equal(new.lut, qt.lut) and torch.equal(new.scales, qt.scales)
    assert new.fmt == qt.fmt and new.shape == qt.shape


def test_gptq_lowers_the_output_error_and_block_size_does_not_matter() -> None:
    N, K = 33, 96
    w = _weight(N, K, 5)
    x = _correlated(1000, K, 6)
    H = x.T @ x / 1000
    for fmt in ("any4", "nf4", "int4"):
        qt = any4.quantize(w, fmt, 32, dtype="float32")
        rtn = float(output_error(w, qt.dequantize(), H).sum())
        a = gptq_codes(w, qt, H, GPTQ(damp=0.01, block=7))
        b = gptq_codes(w, qt, H, GPTQ(damp=0.01, block=128))
        assert torch.equal(a.packed, b.packed)
        err = float(output_error(w, a.dequantize(), H).sum())
        assert err < 0.8 * rtn, (fmt, err, rtn)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest() -> None:
    w = _weight(9, 48, 8)
    H = torch.diag(torch.rand(48, dtype=torch.float64) + 0.5)
    for fmt in ("any4", "fp4"):
        qt = any4.quantize(w, fmt, 16, dtype="float32")
        assert torch.equal(gptq_codes(w, qt, H).packed, qt.packed)


def test_gptq_dead_channels_and_bad_input() -> None:
    w = _weight(5, 32, 9)
    x = _correlated(200, 32, 10)
    x[:, 5] = 0  # a channel that never fires: its error reaches no output
    H = x.T @ x / 200
    qt = any4.quantize(w, "any4", 16, dtype="float32")
    new = gptq_codes(w, qt, H)
    assert float(output_error(w, new.dequantize(), H).sum()) <= float(
        output_error(w, qt.dequantize(), H).sum()
    )
    with pytest.raises(ValueError):
        gptq_codes(w, qt, H[:-1, :-1])
    with pytest.raises(ValueError):
        gptq_codes(w[:-1], qt, H)
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        gptq_codes(w, qt, bad)
    for kw in ({"damp": 0.0}, {"order": "random"}, {"block": 0}):
        with pytest.raises(ValueError):
            GPTQ(**kw)


def test_quantize_model_gptq_lowers_the_output_error_on_the_calibration() -> None:
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    model = tiny_llama(seed=1)
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).logits

    def err(m) -> float:
        with torch.no_grad():
            return float((m(ids).logits - ref).pow(2).mean())

    for fmt in ("any4", "int4"):
        base = any4.quantize_model(copy.deepcopy(model), fmt, 16, ids, progress=False)
        for mode in ("one-pass", "sequential"):
            q = any4.quantize_model(
                copy.deepcopy(model), fmt, 16, ids, gptq=True, mode=mode, progress=False
            )
            assert q.any4_settings["gptq"] == {"damp": 0.01, "order": "act"}
            assert err(q) < err(base), (fmt, mode)
            one = q.model.layers[0].mlp.up_proj
            ref_layer = base.model.layers[0].mlp.up_proj
            assert torch.equal(one.lut, ref_layer.lut) or mode == "sequential"
    q = any4.quantize_model(copy.deepcopy(model), "any4", 16, ids, progress=False, gptq=False)
    assert q.any4_settings["gptq"] is None
    with pytest.raises(TypeError):
        any4.quantize_model(copy.deepcopy(model), "any4", 16, ids, gptq="yes")
