"""Weighted 1-D k-means (C++; SPEC §2): public entry point ``any4.kmeans``.

Defaults (evidence: bench/results/kmeans_cpu.md, from ``python bench/kmeans_vs_sklearn.py``):
on realistic rows (4096 group-normalised values, k = 16, positive sample weights) a single
Lloyd start lands ~9-12% above the exact optimum on average, 4 starts ~3-4%, 8 starts ~2%,
while the exact dynamic programme costs about as much as 5-6 Lloyd starts. Lloyd is measurably
worse, so ``"optimal"`` is the default method; ``"lloyd"`` (with ``DEFAULT_N_INIT`` restarts)
remains the faster option.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _tensor as T
from ._core import C

METHODS = {"lloyd": 0, "optimal": 1}
DEFAULT_METHOD = "optimal"  # exact; Lloyd is measurably worse (see the module docstring)
DEFAULT_N_INIT = 4  # Lloyd restarts (best inertia kept): ~3-4% above optimal at ~2x one start


def kmeans(
    values: Any,
    weights: Optional[Any] = None,
    k: int = 16,
    method: str = DEFAULT_METHOD,
    *,
    n_init: int = DEFAULT_N_INIT,
    max_iter: int = 100,
    seed: int = 0,
    return_inertia: bool = False,
):
    """Weighted 1-D k-means of each row of ``values`` (rows in parallel on the C++ threads).

    Args:
        values: [n] or [rows, n] float (torch or numpy, CPU); finite, any sign.
        weights: same shape, finite and >= 0, or None (all ones). A row whose weights are all
            zero is treated as unweighted.
        k: number of clusters, 1..256.
        method: "optimal" (exact, globally optimal weighted 1-D k-means by dynamic programming
            over the sorted values) or "lloyd" (sorted Lloyd, O(k log n) per step, weighted
            greedy k-means++ starts, ``n_init`` restarts keeping the lowest inertia).
        n_init, max_iter: Lloyd restarts and iterations per restart.
        seed: base seed; row r uses a seed derived from (seed, r). Results are deterministic
            for a given input and seed, whatever the thread count.
    Returns:
        (centroids float32 [k] / [rows, k] sorted ascending, codes int64 [n] / [rows, n]),
        plus inertia float64 [] / [rows] when ``return_inertia`` (sum of w (v - c)^2 of the
        returned centroids and codes); in the caller's framework. Codes are the nearest
        centroid (ties to the larger one). Rows with D <= k distinct values get those values
        first and repeat the largest (inertia 0); otherwise all k centroids are distinct.
    Raises:
        ValueError: bad k / method / n_init / max_iter, empty or >2-D input, shape mismatch,
            NaN/Inf values, NaN/Inf/negative weights.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if not (1 <= int(k) <= 256):
        raise ValueError(f"k must be in [1, 256], got {k}")
    if n_init < 1 or max_iter < 1:
        raise ValueError("n_init and max_iter must be >= 1")
    T.check_array(values, "values")
    v = np.ascontiguousarray(T.to_numpy(values, "values"), dtype=np.float32)
    if v.ndim not in (1, 2):
        raise ValueError(f"values must be 1-D or 2-D, got shape {v.shape}")
    squeeze = v.ndim == 1
    v2 = v.reshape(1, -1) if squeeze else v
    rows, n = v2.shape
    if n == 0 or rows == 0:
        raise ValueError("values must be non-empty")
    if not np.isfinite(v2).all():
        raise ValueError("values contain NaN or Inf")
    wptr = 0
    if weights is not None:
        T.check_array(weights, "weights")
        w = np.ascontiguousarray(T.to_numpy(weights, "weights"), dtype=np.float32)
        if w.shape != v.shape:
            raise ValueError(f"weights must have the shape of values {v.shape}, got {w.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and >= 0")
        wptr = w.ctypes.data
    cent = np.empty((rows, k), np.float32)
    codes = np.empty((rows, n), np.uint8)
    inertia = np.empty((rows,), np.float64)
    C.kmeans_rows(
        v2.ctypes.data,
        wptr,
        rows,
        n,
        int(k),
        METHODS[method],
        int(max_iter),
        int(n_init),
        int(seed),
        cent.ctypes.data,
        codes.ctypes.data,
        inertia.ctypes.data,
    )
    codes = codes.astype(np.int64)
    if squeeze:
        cent, codes, inertia = cent[0], codes[0], inertia[0]
    out = (T.from_numpy_like(values, cent), T.from_numpy_like(values, codes))
    if return_inertia:
        out = out + (T.from_numpy_like(values, np.asarray(inertia)),)
    return out
