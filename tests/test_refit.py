"""Output-error refit of learned tables (any4.refit)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import any4  # noqa: E402
from any4.refit import (  # noqa: E402
    Covariance,
    _normal_equations,
    expand_scales,
    factor,
    output_error,
    refit_table,
)
from any4.stats import ChannelStats  # noqa: E402


def _correlated(T: int, K: int, seed: int) -> torch.Tensor:
    """Activations with correlated channels and a few outlier channels, float64 [T, K]."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) / K**0.5
    x = torch.randn(T, K, generator=g, dtype=torch.float64) @ (torch.eye(K) + 0.8 * mix)
    x[:, :3] *= 6
    return x


def test_covariance_is_the_mean_outer_product() -> None:
    x = _correlated(300, 40, 0)
    cov = Covariance()
    cov.update(x[:100].float().reshape(4, 25, 40))
    cov.update(x[100:].float())
    x32 = x.float().double()
    torch.testing.assert_close(cov.matrix, x32.T @ x32 / 300, rtol=1e-12, atol=1e-12)
    assert cov.count == 300
    with pytest.raises(ValueError):
        cov.update(torch.zeros(3, 41))
    with pytest.raises(ValueError):
        _ = Covariance().matrix


@pytest.mark.parametrize("rank", [None, 5])
def test_factor_reconstructs_h(rank) -> None:
    x = _correlated(200, 30, 1)
    H = x.T @ x / 200
    d, U = factor(H, rank)
    approx = torch.diag(d) + U @ U.T
    if rank is None:
        torch.testing.assert_close(approx, H, rtol=1e-9, atol=1e-9)
    else:
        assert U.shape == (30, rank)
        torch.testing.assert_close(torch.diagonal(approx), torch.diagonal(H), rtol=1e-9, atol=1e-9)
        vals, vecs = torch.linalg.eigh(H)
        top = (vecs[:, -rank:] * vals[-rank:]) @ vecs[:, -rank:].T
        torch.testing.assert_close(U @ U.T, top, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("rank", [None, 4])
def test_normal_equations_match_the_dense_least_squares(zero, rank) -> None:
    N, K, L, G = 5, 37, 16, 16  # short last group
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, L, (N, K), generator=g)
    scales = torch.rand(N, -(-K // G), 2, generator=g, dtype=torch.float64) + 0.1
    s, z = expand_scales(scales, K, G)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    x = _correlated(100, K, 3)
    d, U = factor(x.T @ x / 100, rank)
    Ht = torch.diag(d) + U @ U.T
    groups = torch.arange(K) // G if zero else None
    M, rhs = _normal_equations(codes, s, z, w, d, U, L, groups)
    for n in range(N):
        A = torch.nn.functional.one_hot(codes[n], L).double() * s[n, :, None]  # [K, L]
        target = w[n] - z[n]
        if zero:
            A = torch.cat([A, torch.nn.functional.one_hot(groups).double()], 1)
            target = w[n]
        torch.testing.assert_close(M[n], A.T @ Ht @ A, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(rhs[n], A.T @ Ht @ target, rtol=1e-10, atol=1e-10)


def _layer(seed: int, N: int = 24, K: int = 96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    x = _correlated(400, K, seed + 10)
    stats = ChannelStats()
    stats.update(x)
    return w, x, stats, x.T @ x / x.shape[0]


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("rank", [None, 8])
def test_refit_lowers_output_error_and_never_hurts_a_row(zero, rank) -> None:
    w, _, stats, H = _layer(4)
    qt = any4.quantize(w, "any4", 32, stats=stats, dtype="bfloat16")
    new, info = refit_table(w, qt, H, zero=zero, rank=rank)
    before = output_error(w, qt.dequantize(), H)
    after = output_error(w, new.dequantize(), H)
    assert bool((after <= before).all())  # per-row acceptance on the calibration statistic
    # correlated inputs: a real gain (less with H cut to rank 8 of 96 + its diagonal)
    assert float(after.sum()) < (0.9 if rank is None else 0.95) * float(before.sum())
    assert info["before"] == pytest.approx(float(before.sum()), rel=1e-9)
    assert info["after"] == pytest.approx(float(after.sum()), rel=1e-9)
    assert info["rows_changed"] > 0
    # the stored form stays valid: sorted bf16 tables, codes < 16, same shapes and dtypes
    assert new.lut.dtype == torch.bfloat16 and new.scales.dtype == torch.bfloat16
    assert bool((new.lut[:, 1:] >= new.lut[:, :-1]).all())
    assert new.packed.shape == qt.packed.shape and new.scales.shape == qt.scales.shape
    if not zero:
        assert torch.equal(new.scales, qt.scales)


def test_refit_with_diagonal_h_keeps_the_kmeans_optimum() -> None:
    # With H diagonal and equal to the k-means weights' statistic, exact k-means already
    # minimises the error for these scales: the refit cannot find anything (beyond rounding).
    w, x, stats, _ = _layer(5)
    H = torch.diag(torch.as_tensor(stats.mean_sq))
    qt = any4.quantize(w, "any4", 32, stats=stats, dtype="float32")
    new, info = refit_table(w, qt, H, rank=None)
    assert info["after"] <= info["before"]
    assert info["after"] > 0.999 * info["before"]


def test_refit_rejects_bad_input() -> None:
    w, _, stats, H = _layer(6)
    qt = any4.quantize(w, "any4", 32, stats=stats)
    with pytest.raises(ValueError):
        refit_table(w, any4.quantize(w, "int4", 32), H)  # shared table
    with pytest.raises(ValueError):
        refit_table(w, qt, H[:-1, :-1])
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        refit_table(w, qt, bad)
    with pytest.raises(ValueError):
        refit_table(w[:-1], qt, H)
    with pytest.raises(ValueError):
        refit_table(w, qt, H, iters=0)


def test_quantize_model_refit_lowers_the_output_error_on_the_calibration() -> None:
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    model = tiny_llama(seed=1)
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).logits
    err = {}
    for refit in ("none", "lut", "lut+zero"):
        q = any4.quantize_model(copy.deepcopy(model), "any4", 16, ids, refit=refit, progress=False)
        assert q.any4_settings["refit"] == refit
        with torch.no_grad():
            err[refit] = float((q(ids).logits - ref).pow(2).mean())
    assert err["lut"] < 0.95 * err["none"] and err["lut+zero"] < 0.95 * err["none"]
    # sequential mode: each layer's H comes from the partly quantized model
    q = any4.quantize_model(
        copy.deepcopy(model), "any4", 16, ids, refit="lut", mode="sequential", progress=False
    )
    with torch.no_grad():
        assert float((q(ids).logits - ref).pow(2).mean()) < err["none"]
    # fixed formats have no table to refit: the option changes nothing
    a = any4.quantize_model(copy.deepcopy(model), "int4", 16, ids, refit="lut", progress=False)
    b = any4.quantize_model(copy.deepcopy(model), "int4", 16, ids, progress=False)
    assert torch.equal(a.model.layers[0].mlp.up_proj.packed, b.model.layers[0].mlp.up_proj.packed)
    with pytest.raises(ValueError):
        any4.quantize_model(copy.deepcopy(model), "any4", 16, ids, refit="full")
    assert np.isfinite(err["lut"])


def test_covariance_cache_shares_one_input_and_never_confuses_two() -> None:
    from any4.refit import CovarianceCache

    cache = CovarianceCache(rank=None)
    x = torch.randn(2, 7, 12)
    a = cache(x)
    assert cache(x) is a  # same tensor (q/k/v projections): computed once
    torch.testing.assert_close(a[0], x.reshape(-1, 12).double().T @ x.reshape(-1, 12).double() / 14)
    x.mul_(2)  # modified in place: recomputed
    b = cache(x)
    assert b is not a and torch.allclose(b[0], 4 * a[0])
    del x, a, b
    for _ in range(5):  # fresh tensors of the same shape (the allocator may reuse memory)
        y = torch.randn(2, 7, 12)
        yy = y.reshape(-1, 12).double()
        torch.testing.assert_close(cache(y)[0], yy.T @ yy / 14)
