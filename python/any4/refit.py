"""Output-error refit of a learned table (SPEC §2, last paragraph).

k-means weighs each element by a diagonal statistic (E[x_k^2] * scale^2), but the expected
squared output error of a quantized row is the full quadratic form

    e_n = (w_n - w^_n) H (w_n - w^_n)^T,    H = E[x x^T]  (the layer's input, [K, K])

Once k-means has assigned the codes, w^_n = lut_n[codes_n] * scale + zero is *linear* in the
row's table (and in its group zeros), so the table minimising e_n is a small least-squares
problem per row (2^bits unknowns, + one per group with ``zero=True``):

    A_n = d w^_n / d lut_n  [K, L]   (A[k, j] = scale[g(k)] if code[k] == j)
    (A_n^T H A_n + D) lut_n = A_n^T H (w_n - zero_n) + D lut_n(old)

(D: a small ridge, ``damp`` x the normal matrix's diagonal, which also keeps unused table
entries where they were). Then the table is rounded to its dtype, sorted, the codes re-assigned to the nearest
rounded entry, and the step repeated while it lowers the error; a row keeps whichever of its
tables (k-means or refit) has the lower e_n on the calibration statistic, so the refit never
makes a row worse on it.

H comes from the calibration activations (:class:`Covariance`, opt-in: a K x K float64 matrix per
layer input, accumulated only when a refit is requested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import validate as V
from .pack import pack, unpack
from .quantize import QuantizedTensor

REFITS = ("none", "lut", "lut+zero")
DEFAULT_REFIT = "none"
DEFAULT_DAMP = 0.01
DEFAULT_ITERS = 3
DEFAULT_RANK = 32
_ROW_CHUNK_ELEMS = 1 << 22  # rows per chunk: R * K * L floats of the one-hot design matrix


@dataclass
class Covariance:
    """Running float64 sum of x x^T over activations x[..., K] (H = sum / count)."""

    count: int = 0
    sum: Optional[torch.Tensor] = None

    def update(self, x: torch.Tensor) -> None:
        """Accumulate a batch of activations [..., K] (torch, any float dtype/device)."""
        xd = x.detach().reshape(-1, x.shape[-1]).double()
        s = (xd.T @ xd).cpu()
        if self.sum is None:
            self.sum = s
        else:
            if s.shape != self.sum.shape:
                raise ValueError(f"channel count changed: {self.sum.shape[0]} -> {s.shape[0]}")
            self.sum += s
        self.count += xd.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        """H = E[x x^T], float64 [K, K]."""
        if self.count == 0 or self.sum is None:
            raise ValueError("no activations were recorded for this layer")
        return self.sum / self.count


class CovarianceCache:
    """H (and its factors) of the last activation tensor seen: layers fed the same input in one
    forward pass (q/k/v, gate/up projections) share one K x K matrix; only one is held."""

    def __init__(self, rank: Optional[int] = DEFAULT_RANK):
        self.rank = rank
        self._x: Optional[torch.Tensor] = None  # held, so its memory cannot be reused meanwhile
        self._key: Optional[tuple] = None
        self._value: Optional[tuple] = None

    def _key_of(self, x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)

    def covariance(self, x: torch.Tensor) -> torch.Tensor:
        """H = E[x x^T] float64 [K, K] of activations x [..., K]."""
        if self._x is None or self._key_of(x) != self._key:
            self._x = self._value = None  # free the previous matrix first
            cov = Covariance()
            cov.update(x)
            self._x, self._key, self._value = x, self._key_of(x), (cov.matrix, {})
        return self._value[0]

    def derived(self, x: torch.Tensor, name: Any, make: Any) -> Any:
        """``make(H)`` for the covariance H of x, computed once per input (e.g. a factor that
        the q/k/v projections share) and dropped with H."""
        H = self.covariance(x)
        cache = self._value[1]
        if name not in cache:
            cache[name] = make(H)
        return cache[name]

    def __call__(self, x: torch.Tensor) -> tuple:
        """(H float64 [K, K], (d, U) from :func:`factor`) of activations x [..., K]."""
        return self.derived(x, "refit", lambda H: (H, factor(H, self.rank)))


def refit_layer(q: Any, linear: torch.nn.Linear, entry: tuple, *, zero: bool = False) -> Any:
    """A QuantLinear ``q`` (quantized from ``linear``) with its tables refit to the output error
    (:func:`refit_table`); ``entry``: (H, factors) from a :class:`CovarianceCache`."""
    from .nn import QuantLinear, is_conv1d

    H, factors = entry
    qt = QuantizedTensor(
        q.packed, q.lut, q.scales, (q.out_features, q.in_features), q.fmt, q.group_size
    )
    w = linear.weight.detach()
    if is_conv1d(linear):  # GPT-2 Conv1D stores the weight transposed [K, N]
        w = w.t()
    new, _ = refit_table(w, qt, H, zero=zero, factors=factors)
    return QuantLinear.from_quantized(new, linear.bias)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row (w - w^) H (w - w^)^T, float64 [N], for w, w^ [N, K] and H [K, K]."""
    d = (w.double() - w_hat.double()).cpu()
    return ((d @ H.double()) * d).sum(1)


def expand_scales(scales: torch.Tensor, K: int, group_size: int) -> tuple:
    """Per-element (scale, zero) float64 [N, K] from scales [N, G, 2]."""
    s = scales.double().repeat_interleave(group_size, dim=1)[:, :K]
    return s[..., 0], s[..., 1]


def _dequant(
    codes: torch.Tensor, lut: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    return lut.gather(1, codes) * s + z


def nearest_codes(
    w: torch.Tensor, lut: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """Codes of the nearest table entry for every element (lut sorted ascending per row)."""
    u = (w - z) / torch.where(s > 0, s, torch.ones_like(s))
    mid = 0.5 * (lut[:, 1:] + lut[:, :-1])
    return torch.searchsorted(mid.contiguous(), u.contiguous(), right=True)


def factor(H: torch.Tensor, rank: Optional[int] = None) -> tuple:
    """H ~= diag(d) + U U^T with U [K, r] from H's top-r eigenpairs and d >= 0 the rest of its
    diagonal (so the diagonal is exact); rank None or >= K: U U^T = H exactly, d = 0."""
    K = H.shape[0]
    vals, vecs = torch.linalg.eigh(H.double())
    vals = vals.clamp_min(0)
    if rank is None or rank >= K:
        return torch.zeros(K, dtype=torch.float64), vecs * vals.sqrt()
    U = vecs[:, K - rank :] * vals[K - rank :].sqrt()
    d = (torch.diagonal(H).double() - (U * U).sum(1)).clamp_min(0)
    return d, U


def _normal_equations(
    codes: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    w: torch.Tensor,
    d: torch.Tensor,
    U: torch.Tensor,
    L: int,
    groups: Optional[torch.Tensor],
) -> tuple:
    """Per row: (M [N, P, P], rhs [N, P]) of min_theta (w - B theta)^T H (w - B theta) with
    H = diag(d) + U U^T, theta = (lut[L], zero[G]) (zeros only when ``groups`` [K] gives each
    element's group; otherwise the zeros are fixed and moved to the right-hand side).
    Cost O(N K r) (scatters of U's rows into the codes' columns), no K x K work per row."""
    N, K = codes.shape
    r = U.shape[1]
    G = 0 if groups is None else int(groups.max()) + 1
    P = L + G
    M = torch.zeros((N, P, P), dtype=torch.float64)
    target = w if groups is not None else w - z
    Ht = d * target + (target @ U) @ U.T  # [N, K] = H target
    rhs = torch.zeros((N, P), dtype=torch.float64)
    rhs[:, :L].scatter_add_(1, codes, s * Ht)
    diag = torch.zeros((N, L), dtype=torch.float64).scatter_add_(1, codes, s * s * d)
    M[:, :L, :L] = torch.diag_embed(diag)
    if groups is not None:
        Z = torch.nn.functional.one_hot(groups, G).double()  # [K, G]
        UZ = U.T @ Z  # [r, G]
        HZ = d[:, None] * Z + U @ UZ  # [K, G]
        M[:, L:, L:] = Z.T @ HZ
        rhs[:, L:] = Ht @ Z
    chunk = max(1, _ROW_CHUNK_ELEMS // (K * max(r, G)))
    rows = torch.arange(chunk)[:, None] * L
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        R = b - a
        idx = (rows[:R] + codes[a:b]).reshape(-1)  # row-major (n, code) slot of each element
        sa = s[a:b].reshape(-1, 1)
        UE = torch.zeros((R * L, r), dtype=torch.float64).index_add_(0, idx, sa * U.repeat(R, 1))
        UE = UE.reshape(R, L, r)
        M[a:b, :L, :L] += UE @ UE.transpose(1, 2)
        if groups is not None:
            src = sa * HZ.repeat(R, 1)  # [R K, G]
            EHZ = torch.zeros((R * L, G), dtype=torch.float64).index_add_(0, idx, src)
            EHZ = EHZ.reshape(R, L, G)
            M[a:b, :L, L:] = EHZ
            M[a:b, L:, :L] = EHZ.transpose(1, 2)
    return M, rhs


def refit_table(
    w: Any,
    qt: QuantizedTensor,
    H: torch.Tensor,
    *,
    zero: bool = False,
    iters: int = DEFAULT_ITERS,
    damp: float = DEFAULT_DAMP,
    rank: Optional[int] = DEFAULT_RANK,
    factors: Optional[tuple] = None,
) -> tuple:
    """Refit a learned-format QuantizedTensor's per-row tables (and group zeros with ``zero``)
    to minimise the output error with the full input covariance ``H`` [K, K].

    Args:
        w: the float weight [N, K] that ``qt`` quantizes (torch, any float dtype).
        qt: its quantization (learned format: lut [N, 2^bits]); torch CPU tensors.
        H: E[x x^T] of the layer's input, float [K, K] (symmetric positive semi-definite).
        zero: also refit each group's zero (the scales stay).
        iters: refit / re-assign rounds (stops early when a round no longer lowers the error).
        damp: ridge as a fraction of the diagonal of each row's normal matrix.
        rank: the least squares use H ~= diag + rank-r (:func:`factor`; None: H exactly, which
            costs O(K^2) per row); the error that decides whether a row keeps its refit uses
            the exact H. ``factors``: (d, U) from :func:`factor` (reused by layers sharing H).
    Returns:
        (new QuantizedTensor, {"before": sum of e_n, "after": sum of e_n, "rows_changed": int,
        "rounds": int}); e_n is computed with the tables and scales as stored (rounded).
    """
    if qt.lut.shape[0] != qt.shape[0]:
        raise ValueError(f"refit needs a per-row (learned) table, got lut {tuple(qt.lut.shape)}")
    N, K = qt.shape
    H = V.covariance(H, K)
    if iters < 1 or damp < 0:
        raise ValueError("iters must be >= 1 and damp >= 0")
    w64 = torch.as_tensor(w).detach().double().cpu()
    if w64.shape != (N, K):
        raise ValueError(f"w must be [N, K] = {(N, K)}, got {tuple(w64.shape)}")
    dtype = qt.lut.dtype
    L = qt.lut.shape[1]
    G = qt.scales.shape[1]
    codes = unpack(qt.packed.cpu(), K, qt.bits).long()
    lut = qt.lut.cpu().double()
    scales = qt.scales.cpu().clone()
    s, z = expand_scales(scales, K, qt.group_size)
    groups = torch.arange(K) // qt.group_size if zero else None
    d, U = factors if factors is not None else factor(H, rank)

    best_err = output_error(w64, _dequant(codes, lut, s, z), H)
    before = float(best_err.sum())
    best = (codes.clone(), lut.clone(), scales.clone())
    rounds = 0
    for _ in range(iters):
        rounds += 1
        M, rhs = _normal_equations(codes, s, z, w64, d, U, L, groups)
        # ridge towards the current values, relative to each unknown's own curvature (an
        # unused table entry, with none, stays where it is)
        diag = torch.diagonal(M, dim1=1, dim2=2)
        floor = 1e-9 * diag[:, :L].mean(1, keepdim=True).clamp_min(1e-300)
        mu = damp * diag + floor
        theta0 = torch.cat([lut, scales[..., 1].double()], 1) if zero else lut
        theta = torch.linalg.solve(M + torch.diag_embed(mu), rhs + mu * theta0)
        new_lut = theta[:, :L].to(dtype).double()
        new_lut, _ = torch.sort(new_lut, dim=1)
        new_scales = scales.clone()
        if zero:
            new_scales[..., 1] = theta[:, L : L + G].to(dtype)
        ns, nz = expand_scales(new_scales, K, qt.group_size)
        new_codes = nearest_codes(w64, new_lut, ns, nz)
        err = output_error(w64, _dequant(new_codes, new_lut, ns, nz), H)
        better = err < best_err
        if not bool(better.any()):
            break
        gain = float((best_err - err)[better].sum())
        codes = torch.where(better[:, None], new_codes, best[0])
        lut = torch.where(better[:, None], new_lut, best[1])
        scales = torch.where(better[:, None, None], new_scales, best[2])
        best_err = torch.where(better, err, best_err)
        best = (codes.clone(), lut.clone(), scales.clone())
        s, z = expand_scales(scales, K, qt.group_size)
        if gain <= 1e-4 * float(best_err.sum()):
            break
    changed = int((best[1] != qt.lut.cpu().double()).any(1).sum())
    out = QuantizedTensor(
        packed=pack(best[0].to(torch.uint8), qt.bits).to(qt.packed.device),
        lut=best[1].to(dtype).contiguous().to(qt.lut.device),
        scales=best[2].contiguous().to(qt.scales.device),
        shape=qt.shape,
        fmt=qt.fmt,
        group_size=qt.group_size,
    )
    return out, {
        "before": before,
        "after": float(best_err.sum()),
        "rows_changed": changed,
        "rounds": rounds,
    }


__all__ = [
    "Covariance",
    "CovarianceCache",
    "refit_layer",
    "DEFAULT_REFIT",
    "REFITS",
    "expand_scales",
    "factor",
    "nearest_codes",
    "output_error",
    "refit_table",
]
