"""Weighted 1-D k-means (any4.kmeans, SPEC §2): exactness, optimality, determinism, edge cases.

Oracles are independent of any4: a brute-force O(k n^2) dynamic programme in numpy (small n),
ckwrap (exact Ckmeans.1d.dp) and scikit-learn KMeans; every inertia is recomputed here in
float64 from the returned centroids and codes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import any4
from conftest import output_per_isa


# ----------------------------------------------------------------------------- references
def inertia64(values, weights, centroids, codes) -> float:
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
    if w.sum() == 0:  # documented: all-zero weights mean an unweighted row
        w = np.ones_like(v)
    c = np.asarray(centroids, np.float64)[np.asarray(codes)]
    return float(np.sum(w * (v - c) ** 2))


def brute_force_optimum(values, weights, k: int) -> float:
    """Exact weighted k-means inertia by the plain O(k n^2) DP over sorted distinct values."""
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
    if w.sum() == 0:
        w = np.ones_like(v)
    uniq, inv = np.unique(v, return_inverse=True)
    wd = np.bincount(inv, weights=w, minlength=uniq.size)
    uniq = uniq - 0.5 * (uniq[0] + uniq[-1])  # centre: the cost is shift-invariant
    n = uniq.size
    if n <= k:
        return 0.0
    PW = np.concatenate([[0.0], np.cumsum(wd)])
    PS = np.concatenate([[0.0], np.cumsum(wd * uniq)])
    PQ = np.concatenate([[0.0], np.cumsum(wd * uniq * uniq)])

    def cost(a, b):  # clusters [a, b), vectorised over a
        W = PW[b] - PW[a]
        S = PS[b] - PS[a]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = (PQ[b] - PQ[a]) - np.where(W > 0, S * S / np.where(W > 0, W, 1), 0.0)
        return np.maximum(c, 0.0)

    E = np.array([cost(0, i) if i > 0 else 0.0 for i in range(n + 1)])
    for j in range(2, k + 1):
        En = np.full(n + 1, np.inf)
        for i in range(j, n + 1):
            m = np.arange(j - 1, i)
            En[i] = np.min(E[m] + cost(m, i))
        E = En
    return float(E[n])


def check_result(values, weights, k, cent, codes, inert):
    """Properties every result must have: sorted centroids, nearest-centroid codes, honest inertia."""
    v = np.asarray(values, np.float64)
    c = np.asarray(cent, np.float64)
    assert c.shape == (k,) and np.isfinite(c).all()
    assert np.all(np.diff(c) >= 0), "centroids not sorted"
    d = np.abs(v[:, None] - c[None, :])
    assert np.all(d[np.arange(v.size), codes] <= d.min(axis=1)), (
        "a code is not the nearest centroid"
    )
    ref = inertia64(values, weights, cent, codes)
    assert float(inert) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    n_distinct = np.unique(v).size
    if n_distinct >= k:
        assert np.unique(c).size == k, "duplicate centroids although there are >= k distinct values"


def realistic_row(rng, n=4096, group=128, heavy=False):
    w = rng.standard_t(3, n) if heavy else rng.standard_normal(n)
    g = w.reshape(-1, group)
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    s = (hi - lo) / 15
    u = ((g - lo) / s).reshape(-1)
    chan = np.exp(rng.standard_normal(n)) ** 2
    wt = chan * np.repeat(s[:, 0], group) ** 2
    return u.astype(np.float32), wt.astype(np.float32)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("method", ["lloyd", "optimal"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_exactly_k_distinct_values(rng, method, weighted, k):
    distinct = np.sort(rng.normal(size=k) * 3).astype(np.float32)
    idx = rng.integers(0, k, size=301)
    idx[:k] = np.arange(k)  # every value present
    values = distinct[idx]
    weights = rng.uniform(0.1, 2.0, size=values.size).astype(np.float32) if weighted else None
    cent, codes, inert = any4.kmeans(values, weights, k, method, return_inertia=True)
    np.testing.assert_array_equal(cent, distinct)
    np.testing.assert_array_equal(codes, idx)
    assert inert == 0.0


@pytest.mark.parametrize("method", ["lloyd", "optimal"])
def test_fewer_distinct_values_than_k(rng, method):
    values = np.array([2.0, -1.0, 2.0, 5.0, -1.0], np.float32)
    cent, codes, inert = any4.kmeans(values, None, 5, method, return_inertia=True)
    # documented: the distinct values first, then the largest one repeated
    np.testing.assert_array_equal(cent, [-1.0, 2.0, 5.0, 5.0, 5.0])
    np.testing.assert_array_equal(np.asarray(cent)[codes], values)
    assert inert == 0.0
    one = any4.kmeans(np.array([3.5], np.float32), None, 16, method)
    np.testing.assert_array_equal(one[0], np.full(16, 3.5, np.float32))
    np.testing.assert_array_equal(one[1], [0])


@pytest.mark.parametrize("n,k", [(5, 2), (17, 3), (40, 5), (33, 7)])
def test_optimal_matches_brute_force(rng, n, k):
    for _ in range(5):
        values = rng.normal(size=n).astype(np.float32)
        weights = rng.exponential(size=n).astype(np.float32)
        cent, codes, inert = any4.kmeans(values, weights, k, "optimal", return_inertia=True)
        check_result(values, weights, k, cent, codes, inert)
        ref = brute_force_optimum(values, weights, k)
        assert inert == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_optimal_matches_ckwrap_and_beats_lloyd(rng):
    ckwrap = pytest.importorskip("ckwrap")
    for r in range(6):
        u, wt = realistic_row(rng, n=1024, heavy=r % 2 == 1)
        cent, codes, inert = any4.kmeans(u, wt, 16, "optimal", return_inertia=True)
        check_result(u, wt, 16, cent, codes, inert)
        res = ckwrap.ckmeans(u.astype(np.float64), 16, weights=wt.astype(np.float64))
        ref = inertia64(u, wt, res.centers, res.labels)
        # any4 rounds its centroids to float32: never better than the exact optimum, and only
        # by rounding worse than it
        assert inert == pytest.approx(ref, rel=1e-9)
        for n_init in (1, 4):
            _, _, lloyd = any4.kmeans(
                u, wt, 16, "lloyd", n_init=n_init, seed=r, return_inertia=True
            )
            assert inert <= lloyd * (1 + 1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 9, 16])
def test_optimal_matches_ckwrap_for_every_split_of_k(rng, k):
    """The DP meets in the middle (k//2 clusters forward, the rest over the reversed row) and
    its last forward layer only solves the boundaries the reversed half kept: exact for odd
    and even k, weighted rows with many zero weights (long runs of equal prefix sums)."""
    ckwrap = pytest.importorskip("ckwrap")
    for r in range(3):
        u, wt = realistic_row(rng, n=1536, heavy=r == 1)
        if r == 2:
            wt[rng.random(wt.size) < 0.4] = 0
        cent, codes, inert = any4.kmeans(u, wt, k, "optimal", return_inertia=True)
        check_result(u, wt, k, cent, codes, inert)
        res = ckwrap.ckmeans(u.astype(np.float64), k, weights=wt.astype(np.float64))
        ref = inertia64(u, wt, res.centers, res.labels)
        assert inert == pytest.approx(ref, rel=1e-9)


def test_lloyd_close_to_sklearn(rng):
    KMeans = pytest.importorskip("sklearn.cluster").KMeans

    ours, theirs = [], []
    for r in range(12):
        n = int(rng.integers(300, 1200))
        values = (rng.standard_t(4, n) * rng.uniform(0.5, 3)).astype(np.float32)
        weights = rng.gamma(1.0, 1.0, n).astype(np.float32)
        cent, codes, inert = any4.kmeans(values, weights, 16, "lloyd", seed=r, return_inertia=True)
        check_result(values, weights, 16, cent, codes, inert)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            km = KMeans(16, init="k-means++", n_init=1, random_state=r)
            km.fit(values.astype(np.float64)[:, None], sample_weight=weights.astype(np.float64))
        ours.append(inert)
        theirs.append(inertia64(values, weights, km.cluster_centers_[:, 0], km.labels_))
    assert np.mean(ours) <= 1.01 * np.mean(theirs)


def test_lloyd_single_start_reasonable(rng):
    # one start is a local optimum: a few percent above the exact optimum on average, never absurd
    ratios = []
    for _ in range(8):
        u, wt = realistic_row(rng, n=2048)
        _, _, lloyd = any4.kmeans(u, wt, 16, "lloyd", n_init=1, return_inertia=True)
        _, _, opt = any4.kmeans(u, wt, 16, "optimal", return_inertia=True)
        ratios.append(lloyd / opt)
    assert min(ratios) >= 1 - 1e-12
    assert np.mean(ratios) < 1.3


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("method", ["lloyd", "optimal"])
def test_negative_values_and_mixed_signs(rng, method):
    values = np.concatenate([rng.normal(-50, 3, 200), rng.normal(0, 0.01, 200), [-0.0, 0.0]])
    values = values.astype(np.float32)
    rng.shuffle(values)
    weights = rng.uniform(0, 2, values.size).astype(np.float32)
    cent, codes, inert = any4.kmeans(values, weights, 6, method, return_inertia=True)
    check_result(values, weights, 6, cent, codes, inert)
    assert cent[0] < -40 and cent[-1] > -1
    if method == "optimal":
        assert inert == pytest.approx(brute_force_optimum(values, weights, 6), rel=1e-9)


@pytest.mark.parametrize("method", ["lloyd", "optimal"])
def test_duplicate_heavy(rng, method):
    values = rng.integers(0, 40, size=3000).astype(np.float32) / 4  # 40 distinct values
    weights = rng.uniform(0.5, 1.5, values.size).astype(np.float32)
    cent, codes, inert = any4.kmeans(values, weights, 16, method, return_inertia=True)
    check_result(values, weights, 16, cent, codes, inert)
    opt = brute_force_optimum(values, weights, 16)
    if method == "optimal":
        assert inert == pytest.approx(opt, rel=1e-9)
    else:
        assert inert >= opt * (1 - 1e-9)


@pytest.mark.parametrize("method", ["lloyd", "optimal"])
def test_zero_weights(rng, method):
    values = rng.normal(size=500).astype(np.float32)
    # all-zero weights: the row is treated as unweighted, bit for bit
    a = any4.kmeans(values, np.zeros_like(values), 8, method, return_inertia=True)
    b = any4.kmeans(values, None, 8, method, return_inertia=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # fewer positive-weight distinct values than k: exact (inertia 0), still distinct centroids
    weights = np.zeros_like(values)
    weights[:5] = 1.0
    cent, codes, inert = any4.kmeans(values, weights, 8, method, return_inertia=True)
    check_result(values, weights, 8, cent, codes, inert)
    assert inert == 0.0
    # many zero weights, enough positive ones
    keep = rng.uniform(size=500) < 0.3
    weights = np.where(keep, rng.uniform(1, 2, 500), 0).astype(np.float32)
    cent, codes, inert = any4.kmeans(values, weights, 8, method, return_inertia=True)
    check_result(values, weights, 8, cent, codes, inert)


def test_k_is_one_and_256(rng):
    values = rng.normal(size=1000).astype(np.float32)
    weights = rng.uniform(0, 1, 1000).astype(np.float32)
    for method in ("lloyd", "optimal"):
        cent, codes, inert = any4.kmeans(values, weights, 1, method, return_inertia=True)
        mean = np.sum(weights.astype(np.float64) * values) / np.sum(weights, dtype=np.float64)
        assert cent[0] == pytest.approx(mean, rel=1e-6)
        assert np.all(codes == 0)
        cent, codes, inert = any4.kmeans(values, weights, 256, method, return_inertia=True)
        check_result(values, weights, 256, cent, codes, inert)


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.integers(-6, 6), min_size=1, max_size=40),
    wts=st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0]), min_size=40, max_size=40),
    k=st.integers(1, 8),
    scale=st.sampled_from([1.0, 0.37, 1e-3, 250.0]),
)
def test_properties_small_rows(data, wts, k, scale):
    values = (np.array(data, np.float64) * scale).astype(np.float32)
    weights = np.array(wts[: values.size], np.float32)
    opt_ref = brute_force_optimum(values, weights, k)
    res = {}
    for method in ("lloyd", "optimal"):
        cent, codes, inert = any4.kmeans(values, weights, k, method, n_init=2, return_inertia=True)
        check_result(values, weights, k, cent, codes, inert)
        res[method] = inert
    assert res["optimal"] == pytest.approx(opt_ref, rel=1e-9, abs=1e-9 * max(1.0, scale**2))
    assert res["optimal"] <= res["lloyd"] * (1 + 1e-9) + 1e-12


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("method", ["lloyd", "optimal"])
def test_bit_identical_across_threads_and_calls(rng, method):
    rows = np.stack([realistic_row(rng, n=1024)[0] for _ in range(9)])
    weights = rng.gamma(1.0, 1.0, rows.shape).astype(np.float32)
    old = any4.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1, 2):
            any4.set_num_threads(threads)
            outs.append(any4.kmeans(rows, weights, 16, method, seed=7, return_inertia=True))
    finally:
        any4.set_num_threads(old)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            np.testing.assert_array_equal(x, y)
    # each row on its own gives the same as inside the batch? (row seeds depend on the row index)
    single = any4.kmeans(rows[0], weights[0], 16, method, seed=7, return_inertia=True)
    for x, y in zip(single, outs[0]):
        np.testing.assert_array_equal(x, y[0])


def test_seed_changes_lloyd_only(rng):
    u, wt = realistic_row(rng, n=2048)
    a = [any4.kmeans(u, wt, 16, "lloyd", n_init=1, seed=s)[0] for s in range(4)]
    assert any(not np.array_equal(a[0], x) for x in a[1:]), "seed has no effect on Lloyd starts"
    b = [any4.kmeans(u, wt, 16, "optimal", seed=s)[0] for s in range(3)]
    for x in b[1:]:
        np.testing.assert_array_equal(b[0], x)


def test_every_instruction_set_build_agrees(rng):
    """The exact DP is built per instruction set; each build must give bit-identical results."""
    code = (
        "import numpy as np, any4, hashlib, sys\n"
        "rng = np.random.default_rng(3)\n"
        "u = rng.standard_normal((6, 777)).astype(np.float32)\n"
        "w = rng.gamma(1, 1, (6, 777)).astype(np.float32)\n"
        "w[:, :50] = 0\n"
        "c, k, i = any4.kmeans(u, w, 16, 'optimal', return_inertia=True)\n"
        "print(hashlib.sha1(c.tobytes() + k.tobytes() + i.tobytes()).hexdigest())\n"
    )
    assert len(output_per_isa(code)) == 1


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": np.array([1.0, np.nan, 2.0], np.float32)}, "NaN|finite"),
        ({"values": np.array([1.0, np.inf, 2.0], np.float32)}, "NaN|finite"),
        ({"weights": np.array([1.0, -1.0, 1.0], np.float32)}, "weights"),
        ({"weights": np.array([1.0, np.nan, 1.0], np.float32)}, "weights"),
        ({"weights": np.ones(4, np.float32)}, "shape"),
        ({"k": 0}, "k must be"),
        ({"k": 257}, "k must be"),
        ({"values": np.zeros(0, np.float32), "weights": None}, "non-empty"),
        ({"values": np.zeros((2, 0), np.float32), "weights": None}, "non-empty"),
        ({"values": np.zeros((2, 2, 2), np.float32), "weights": None}, "1-D or 2-D"),
        ({"method": "magic"}, "method"),
        ({"n_init": 0}, "n_init"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = {"values": np.array([1.0, 2.0, 3.0], np.float32), "weights": None, "k": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        any4.kmeans(args.pop("values"), args.pop("weights"), **args)


def test_core_rejects_bad_rows_directly():
    """The C++ core checks its input too (ValueError through the bindings, never a crash)."""
    from any4._core import C

    v = np.array([[1.0, np.nan, 3.0]], np.float32)
    w = np.array([[1.0, -2.0, 3.0]], np.float32)
    ok = np.array([[1.0, 2.0, 3.0]], np.float32)
    cent = np.empty((1, 2), np.float32)
    codes = np.empty((1, 3), np.uint8)
    inert = np.empty(1, np.float64)
    for vals, wts in ((v, ok), (ok, w)):
        with pytest.raises(ValueError):
            C.kmeans_rows(vals.ctypes.data, wts.ctypes.data, 1, 3, 2, 0, 10, 1, 0,
                          cent.ctypes.data, codes.ctypes.data, inert.ctypes.data)  # fmt: skip
    with pytest.raises(ValueError):
        C.kmeans_rows(ok.ctypes.data, 0, 1, 3, 0, 1, 10, 1, 0,
                      cent.ctypes.data, codes.ctypes.data, inert.ctypes.data)  # fmt: skip


def test_torch_tensors_round_trip(rng):
    torch = pytest.importorskip("torch")
    values = torch.from_numpy(rng.normal(size=(3, 200)).astype(np.float32))
    weights = torch.rand(3, 200)
    cent, codes = any4.kmeans(values, weights, 4, "optimal")
    assert isinstance(cent, torch.Tensor) and cent.shape == (3, 4)
    assert isinstance(codes, torch.Tensor) and codes.shape == (3, 200)
    for r in range(3):
        check_result(values[r].numpy(), weights[r].numpy(), 4, cent[r].numpy(), codes[r].numpy(),
                     inertia64(values[r].numpy(), weights[r].numpy(), cent[r].numpy(), codes[r].numpy()))  # fmt: skip
