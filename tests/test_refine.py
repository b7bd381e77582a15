"""any4.refine: least-squares refinement of the table and group affine after k-means."""

import numpy as np
import pytest
import torch

import any4
from any4.refine import MAX_REFINE, _round, element_weight, refine_rows, refine_rows_reference
from any4.stats import ChannelStats
from conftest import to_f64


def _weighted_error(w, qt, d):
    """Per-row sum_k d_k (deq - w)^2 in float64 (deq from the library's dequantize)."""
    deq = to_f64(any4.dequantize(qt, "float32"))
    return ((to_f64(w) - deq) ** 2 * d).sum(1)


def _heavy(N, K, seed):
    """Rows with outliers (what the range affine handles worst): Student-t, 3 dof."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(N, K, generator=g)
    chi = torch.randn(N, K, 3, generator=g).pow(2).sum(-1) / 3
    return (n / chi.sqrt()).float()


@pytest.mark.parametrize("fmt", ["any4", "any3", "any2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("K,G", [(256, 64), (200, 64), (136, 128)])
def test_refine_never_worse_per_row_and_better_overall(fmt, dtype, K, G):
    N = 12
    w = _heavy(N, K, seed=K + G)
    d = np.random.default_rng(K).uniform(0.05, 3.0, K).astype(np.float32) ** 2
    base = any4.quantize(w, fmt, G, sample_weight=d, scale_power=2, dtype=dtype, refine=0)
    ref = any4.quantize(w, fmt, G, sample_weight=d, scale_power=2, dtype=dtype, refine=4)
    e0, e1 = _weighted_error(w, base, d), _weighted_error(w, ref, d)
    assert (e1 <= e0 * (1 + 1e-6)).all()  # a row keeps the refinement only where it helps
    assert e1.sum() < 0.99 * e0.sum()  # and on heavy-tailed rows it helps (2.4-17% here)
    assert str(ref.lut.dtype) == f"torch.{dtype}" and str(ref.scales.dtype) == f"torch.{dtype}"
    lut = to_f64(ref.lut)
    assert (np.diff(lut, axis=1) >= 0).all()  # tables stay sorted
    # each code is the nearest dequantized value of the refined table and affine
    sc = to_f64(ref.scales)
    g = np.arange(K) // G
    cand = lut[:, None, :] * sc[:, g, 0][..., None] + sc[:, g, 1][..., None]
    err_all = np.abs(cand - to_f64(w)[..., None])
    codes = ref.codes().numpy().astype(int)
    err_code = np.take_along_axis(err_all, codes[..., None], axis=-1)[..., 0]
    assert (err_code <= err_all.min(-1) + 1e-5 * np.abs(to_f64(w)).max()).all()


def test_more_rounds_do_not_raise_the_error():
    w = _heavy(16, 512, seed=1)
    d = np.ones(512, np.float32)
    errs = [
        _weighted_error(w, any4.quantize(w, "any4", 128, sample_weight=d, refine=r), d).sum()
        for r in (0, 1, 4, 12)
    ]
    assert errs[1] < errs[0] and errs[2] <= errs[1] * (1 + 1e-6) and errs[3] <= errs[2] * (1 + 1e-6)


def test_refine_with_stats_is_the_default_path():
    # quantize_model's path (stats, mse weighting) refines by default and matches refine=4
    w = _heavy(8, 192, seed=2)
    stats = ChannelStats()
    x = torch.randn(64, 192) * torch.linspace(0.1, 3.0, 192)
    stats.update(x)
    a = any4.quantize(w, "any4", 64, stats=stats)
    b = any4.quantize(w, "any4", 64, stats=stats, refine=4)
    c = any4.quantize(w, "any4", 64, stats=stats, refine=0)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.lut, b.lut)
    assert torch.equal(a.scales, b.scales)
    d = stats.mean_sq
    assert _weighted_error(w, a, d).sum() < _weighted_error(w, c, d).sum()


def test_constant_and_degenerate_groups_stay_exact():
    w = torch.zeros(4, 128)
    w[1] = 2.5  # a constant row
    w[2, :64] = -1.0  # one constant group, one random group
    w[2, 64:] = torch.randn(64)
    w[3, ::2] = 1.0  # two values only
    for dtype in ("float32", "bfloat16", "float16"):
        qt = any4.quantize(w, "any4", 64, dtype=dtype, refine=4)
        base = any4.quantize(w, "any4", 64, dtype=dtype, refine=0)
        deq = any4.dequantize(qt, "float32")
        assert torch.isfinite(deq).all()
        assert torch.equal(deq[:2], w[:2]) and torch.equal(deq[2, :64], w[2, :64])
        # two values: exact up to the table's rounding, and never worse than k-means alone
        err = (deq[3] - w[3]).abs().max()
        assert err <= (any4.dequantize(base, "float32")[3] - w[3]).abs().max() and err < 1e-2


def test_numpy_input_and_element_weights():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, (6, 96)).astype(np.float32)
    elem = rng.uniform(0.1, 2.0, (6, 96)).astype(np.float32)
    base = any4.quantize(w, "any4", 32, sample_weight=elem, dtype="float32", refine=0)
    ref = any4.quantize(w, "any4", 32, sample_weight=elem, dtype="float32", refine=3)
    assert isinstance(ref.lut, np.ndarray)
    # the objective in the weight's domain: k-means' element weight / scale^2 of the range affine
    d = element_weight(None, 0, elem, np.asarray(base.scales), 6, 96, 32)
    assert (_weighted_error(w, ref, d) <= _weighted_error(w, base, d) * (1 + 1e-6)).all()
    assert _weighted_error(w, ref, d).sum() < _weighted_error(w, base, d).sum()


def test_fixed_formats_ignore_refine():
    w = _heavy(4, 128, seed=4)
    for fmt in ("int4", "nf4", "fp4"):
        a = any4.quantize(w, fmt, 64, refine=0)
        b = any4.quantize(w, fmt, 64, refine=7)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("bad", [-1, MAX_REFINE + 1, 10**9])
def test_bad_refine_values(bad):
    with pytest.raises(ValueError, match="refine"):
        any4.quantize(torch.randn(4, 64), "any4", 32, refine=bad)


@pytest.mark.parametrize("bad", [1.5, "4", True, None])
def test_bad_refine_types(bad):
    with pytest.raises(TypeError, match="refine"):
        any4.quantize(torch.randn(4, 64), "any4", 32, refine=bad)


def test_bfloat16_rounding_matches_torch():
    x = np.random.default_rng(5).standard_normal(4096).astype(np.float32) * 1e3
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    got = _round(x, "bfloat16")
    want = torch.from_numpy(x).bfloat16().float().numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fmt,K,G", [("any4", 200, 64), ("any3", 256, 128), ("any2", 136, 32)])
def test_cpp_matches_the_numpy_reference(fmt, dtype, K, G):
    """The C++ refinement (quantize's path) against refine_rows_reference from the same k-means
    result: the same weighted error per row (float64 sums in another order) and codes."""
    N = 40
    w = _heavy(N, K, seed=7 + K).numpy()
    chan = np.random.default_rng(K).uniform(0.05, 3.0, K).astype(np.float32) ** 2
    base = any4.quantize(w, fmt, G, sample_weight=chan, scale_power=2, dtype="float32", refine=0)
    # the k-means result in the requested dtype, as quantize hands it to the refinement
    lut = _round(np.asarray(base.lut), dtype)
    sc = _round(np.asarray(base.scales), dtype)
    outs = []
    for fn in (refine_rows, refine_rows_reference):
        c, lt, s = base.codes().copy(), lut.copy(), sc.copy()
        fn(w, c, lt, s, G, dtype, 4, chan=chan, power=2)
        qt = any4.QuantizedTensor(
            packed=any4.pack(c, base.bits), lut=lt, scales=s, shape=(N, K), fmt=fmt, group_size=G
        )
        outs.append((c, _weighted_error(w, qt, chan)))
    (c1, e1), (c2, e2) = outs
    np.testing.assert_allclose(e1, e2, rtol=1e-5)
    assert (c1 == c2).mean() > 0.999


def test_cpp_rejects_bad_arrays():
    w = np.zeros((2, 64), np.float32)
    with pytest.raises(TypeError, match="codes"):
        refine_rows(w, np.zeros((2, 64), np.int64), np.zeros((2, 16), np.float32),
                    np.ones((2, 1, 2), np.float32), 64, "float32", 2)  # fmt: skip
