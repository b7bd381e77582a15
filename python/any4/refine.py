"""Least-squares refinement of a learned table and its group affine (after k-means).

k-means (SPEC §2) fixes each group's affine at its range, ``scale = (max - min)/(2^b - 1)``,
``zero = min``, and learns only the row's table in that normalised domain. The weighted error
it minimises is, in the weight's own domain,

    e_n = sum_k d_k (lut_n[c_k] * scale_g(k) + zero_g(k) - w_k)^2

(d_k = E[x_k^2] for the default mse weighting, the expected squared output error without the
off-diagonal terms; in general d = k-means' sample weight / scale^2). That error is linear least
squares in (scale_g, zero_g) for fixed table and codes (a 2 x 2 system per group), and in the
table for fixed affine and codes (one weighted mean per entry), and the codes are then
re-assigned to the nearest dequantized value. ``rounds`` alternations of those three steps
(block coordinate descent: none of them raises e_n) free the affine from the range, which is
what the range costs: an outlier sets it for the whole group.

After the rounds the table and affine are rounded to their dtype, the table sorted, the codes
re-assigned once more (C++ core, the quantizer's own re-assignment), and a row keeps the result
only where its e_n went down: so refinement never makes a row worse on k-means' own objective.
A group whose system is singular (one distinct code, a constant group) or whose refit scale is
not positive keeps its affine. Measured on the built-in model (bench/results/accuracy_notes.md).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import _tensor as T
from ._core import C
from .validate import MAX_REFINE, check_refine  # noqa: F401 (the refine setting's check)

DEFAULT_REFINE = 4
_ROWS = 64  # rows per block: float64 temporaries of a few MB (K = 14336: ~7 MB each)


def _round(t: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to ``dtype`` (round to nearest even), as float32."""
    t = np.ascontiguousarray(t, dtype=np.float32)
    if dtype == "float16":
        return t.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        b = t.view(np.uint32).astype(np.uint64)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        out = b.astype(np.uint32).view(np.float32)
        return np.where(np.isfinite(t), out, t)
    return t


def _assign(
    w: np.ndarray, lut: np.ndarray, sc: np.ndarray, G: int, codes: np.ndarray
) -> np.ndarray:
    """Nearest-value codes (in place, uint8 [n, K]) and the residual deq - w, float32 [n, K]."""
    n, K = w.shape
    lut = np.ascontiguousarray(lut, dtype=np.float32)
    sc = np.ascontiguousarray(sc, dtype=np.float32)
    res = np.empty((n, K), np.float32)
    C.refit_assign_rows(
        w.ctypes.data, lut.ctypes.data, sc.ctypes.data, n, K, lut.shape[1], G,
        codes.ctypes.data, res.ctypes.data,
    )  # fmt: skip
    return res


def refine_rows(
    w32: np.ndarray,
    codes: np.ndarray,
    lut: np.ndarray,
    scales: np.ndarray,
    group_size: int,
    dtype: str,
    rounds: int = DEFAULT_REFINE,
    *,
    chan: Optional[np.ndarray] = None,
    power: int = 0,
    elem: Optional[np.ndarray] = None,
) -> int:
    """Refine a learned quantization in place (C++ core, cpp/refine.h: rows in parallel, the
    GIL released); returns how many rows changed. Arguments as for :func:`refine_rows_reference`
    (all C-contiguous float32 / uint8 numpy arrays)."""
    if rounds <= 0:
        return 0
    N, K = w32.shape
    for name, a, dt in (("w32", w32, np.float32), ("codes", codes, np.uint8), ("lut", lut, np.float32),
                        ("scales", scales, np.float32)):  # fmt: skip
        if a.dtype != dt or not a.flags.c_contiguous:
            raise TypeError(f"refine_rows: {name} must be C-contiguous {np.dtype(dt).name}")
    c_chan = None if chan is None else np.ascontiguousarray(chan, dtype=np.float32)
    c_elem = None if elem is None else np.ascontiguousarray(elem, dtype=np.float32)
    return int(C.refine_rows(
        w32.ctypes.data, N, K, lut.shape[1], int(group_size),
        0 if c_chan is None else c_chan.ctypes.data, int(power),
        0 if c_elem is None else c_elem.ctypes.data, T.DTYPE_CODE[dtype], int(rounds),
        codes.ctypes.data, lut.ctypes.data, scales.ctypes.data,
    ))  # fmt: skip


def refine_rows_reference(
    w32: np.ndarray,
    codes: np.ndarray,
    lut: np.ndarray,
    scales: np.ndarray,
    group_size: int,
    dtype: str,
    rounds: int = DEFAULT_REFINE,
    *,
    chan: Optional[np.ndarray] = None,
    power: int = 0,
    elem: Optional[np.ndarray] = None,
) -> int:
    """Refine a learned quantization in place; returns how many rows changed (numpy, the
    reference the C++ :func:`refine_rows` is tested against).

    w32 float32 [N, K] (C-contiguous); codes uint8 [N, K]; lut float32 [N, L] (sorted, values
    representable in ``dtype``); scales float32 [N, ceil(K/G), 2] (scale, zero); k-means'
    sample weight: per channel ``chan`` float32 [K] times scale**power, or per element ``elem``
    float32 [N, K], or neither (all ones); the error's weight d follows (:func:`element_weight`,
    computed a block of rows at a time, so the temporaries stay a few MB whatever the matrix).
    """
    if rounds <= 0:
        return 0
    N, K = w32.shape
    G = int(group_size)
    ng = -(-K // G)
    pad = ((0, 0), (0, ng * G - K))
    L = lut.shape[1]
    changed = 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for r0 in range(0, N, _ROWS):
            r1 = min(N, r0 + _ROWS)
            n = r1 - r0
            w = np.ascontiguousarray(w32[r0:r1])
            d = element_weight(
                chan, power, None if elem is None else elem[r0:r1], scales[r0:r1], n, K, G
            )
            cur = np.array(codes[r0:r1], np.uint8)  # re-assigned to the nearest value first
            res0 = _assign(w, lut[r0:r1], scales[r0:r1], G, cur)
            e0 = (d * res0.astype(np.float64) ** 2).sum(1)
            W = np.pad(w.astype(np.float64), pad).reshape(n, ng, G)
            D = np.pad(d, pad).reshape(n, ng, G)
            a22, b2 = D.sum(-1), (D * W).sum(-1)
            offset = (np.arange(n) * L)[:, None]
            lt = lut[r0:r1].astype(np.float64)
            s, z = scales[r0:r1, :, 0].astype(np.float64), scales[r0:r1, :, 1].astype(np.float64)
            for _ in range(rounds):
                c = np.pad(cur.astype(np.int64), pad)
                v = np.take_along_axis(lt, c, 1).reshape(n, ng, G)
                Dv = D * v
                a11, a12, b1 = (Dv * v).sum(-1), Dv.sum(-1), (Dv * W).sum(-1)
                det = a11 * a22 - a12 * a12
                ok = det > 1e-9 * a11 * a22
                ns = (b1 * a22 - b2 * a12) / det
                nz = (a11 * b2 - a12 * b1) / det
                ok &= (ns > 0) & np.isfinite(ns) & np.isfinite(nz)
                s, z = np.where(ok, ns, s), np.where(ok, nz, z)
                sk, zk = s[..., None], z[..., None]
                idx = (c + offset).ravel()
                num = np.bincount(idx, (D * sk * (W - zk)).ravel(), n * L).reshape(n, L)
                den = np.bincount(idx, (D * sk * sk).ravel(), n * L).reshape(n, L)
                lt = np.sort(np.where(den > 0, num / np.where(den > 0, den, 1.0), lt), 1)
                _assign(w, lt, np.stack([s, z], -1), G, cur)
            lt_r = np.sort(_round(lt, dtype), 1)
            sc_r = _round(np.stack([s, z], -1), dtype)
            res1 = _assign(w, lt_r, sc_r, G, cur)
            e1 = (d * res1.astype(np.float64) ** 2).sum(1)
            finite = np.isfinite(lt_r).all(1) & np.isfinite(sc_r).reshape(n, -1).all(1)
            rows = np.flatnonzero((e1 < e0) & finite)
            if rows.size:
                lut[r0 + rows] = lt_r[rows]
                scales[r0 + rows] = sc_r[rows]
                codes[r0 + rows] = cur[rows]
                changed += int(rows.size)
    return changed


def element_weight(
    chan: Optional[np.ndarray],
    power: int,
    elem: Optional[np.ndarray],
    scales: np.ndarray,
    N: int,
    K: int,
    group_size: int,
) -> np.ndarray:
    """The weight d, float64 [N, K], of refine_rows from k-means' sample weight (per channel ``chan`` [K]
    times scale**power, per element ``elem`` [N, K], or none: all ones), divided by scale^2 (the
    error of the normalised domain is scale^2 times that of the weight's domain). Elements of a
    group whose scale is 0 (a constant group) get k-means' weight unchanged."""
    g = np.arange(K) // group_size
    scale = np.abs(scales[:, g, 0]).astype(np.float64)  # [N, K]
    if elem is not None:
        du = elem.astype(np.float64)
        p = 0
    elif chan is not None:
        du = np.broadcast_to(chan.astype(np.float64), (N, K))
        p = power
    else:
        du = np.ones((N, K))
        p = 0
    safe = np.where(scale > 0, scale, 1.0)
    return du * safe ** float(p - 2)
