"""Output-error refit of a learned table (SPEC §2, last paragraph).

k-means weighs each element by a diagonal statistic (E[x_k^2] * scale^2), but the expected
squared output error of a quantized row is the full quadratic form

    e_n = r_n H r_n^T,    r_n = w^_n - w_n,    H = E[x x^T]  (the layer's input, [K, K])

Once k-means has assigned the codes, w^_n = lut_n[codes_n] * scale + zero is *linear* in the
row's unknowns theta_n = (lut_n [L], and with ``zero=True`` its group zeros [G]):
w^_n = A_n theta_n (+ the fixed zeros), A_n [K, L (+G)] with A[k, j] = scale_k where
code_k == j (and A[k, L + g(k)] = 1). Each round minimises, for every row at once,

    (A_n theta - w_n) H (A_n theta - w_n)^T + (theta - theta_old)^T D_n (theta - theta_old)

(D_n: a small ridge, ``damp`` x the curvature that k-means sees, A^T diag(H) A, which also keeps
unused table entries where they were) from the EXACT gradient A^T H r (r: the residual at the
current tables, whose H r the previous round's error check already computed): the default step
is a Newton step with the normal matrix of H ~= diag(d) + U U^T (U: a randomized rank-r sketch of
H's top eigenvectors, d the rest of its diagonal), assembled per row as a small [L+G, L+G]
matrix in one O(K r) pass over its codes and factored by one batched Cholesky; over the rounds
this is an iterative refinement towards the exact-H least squares. ``steps`` > 0 adds that many
preconditioned conjugate-gradient steps with the exact H per round (each one [rows, K] x [K, K]
product for all the rows of the layer; P steps solve a P-unknown round exactly).

Then the tables (and zeros) are rounded to their dtype, sorted, the codes re-assigned to the
nearest dequantized value (C++ core, the quantizer's own re-assignment), and e_n of the result
with the exact H decides per row: a row keeps the refit only where its e_n went down by more
than 1e-4 relative (float32 products, whose error is ~1e-6 relative: so the refit never makes
a row worse on the calibration statistic), and only rows that improved take part in the next
round. Every round costs one [rows, K] x [K, K] float32 product for the check (its H r is the
next round's exact gradient) plus one per conjugate-gradient step; the per-row assembly and the
re-assignment are single passes in C++ (cpp/refit_rows.h).

H comes from the calibration activations (:class:`Covariance`, opt-in: a K x K float64 matrix per
layer input, accumulated only when a refit is requested); :class:`Curvature` holds it with its
float32 copy and sketch, shared by the layers that read the same input (q/k/v, gate/up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import _tensor as T
from . import validate as V
from ._core import C
from .pack import pack, unpack
from .quantize import QuantizedTensor

REFITS = ("none", "lut", "lut+zero")
DEFAULT_REFIT = "none"
DEFAULT_DAMP = 0.01
DEFAULT_ITERS = 3
DEFAULT_STEPS = 0
DEFAULT_RANK = 32
# a row keeps a refit only where its error (float32 products, ~1e-6 relative) fell by more than this
_ACCEPT = 1e-4


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


def low_rank(H: torch.Tensor, rank: Optional[int], *, power: int = 2, seed: int = 0) -> tuple:
    """H ~= diag(d) + U U^T in H's float dtype: U [K, r] spans a randomized sketch of H's top-r
    eigenvectors (subspace iteration with ``power`` passes from a seeded Gaussian start, then
    Rayleigh-Ritz), d >= 0 the rest of H's diagonal (so the diagonal is exact wherever
    U U^T does not exceed it). rank None or >= K: the exact eigendecomposition (d = 0,
    U U^T = H); rank 0: d = diag(H), U [K, 0]. Cost O(K^2 r) (no K x K eigendecomposition)."""
    K = H.shape[0]
    dt = H.dtype
    if rank is None or rank >= K:
        vals, vecs = torch.linalg.eigh(H)
        return torch.zeros(K, dtype=dt), vecs * vals.clamp_min(0).sqrt()
    if rank < 0:
        raise ValueError(f"rank must be >= 0 or None, got {rank}")
    diag = torch.diagonal(H).clone()
    if rank == 0:
        return diag.clamp_min(0), torch.zeros((K, 0), dtype=dt)
    p = min(K, rank + 8)
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(H @ torch.randn(K, p, generator=g, dtype=torch.float64).to(dt))[0]
    for _ in range(power):
        Q = torch.linalg.qr(H @ Q)[0]
    vals, vecs = torch.linalg.eigh(Q.T @ H @ Q)
    U = (Q @ vecs[:, -rank:]) * vals[-rank:].clamp_min(0).sqrt()
    return (diag - (U * U).sum(1)).clamp_min(0), U


@dataclass(frozen=True)
class Curvature:
    """One layer input's H = E[x x^T] in the forms the refit uses (built by :func:`curvature`)."""

    H: torch.Tensor  # float64 [K, K]: the exact error that decides
    H32: torch.Tensor  # float32 [K, K]: the solver's products
    d: torch.Tensor  # float32 [K]: preconditioner diagonal
    U: torch.Tensor  # float32 [K, r]: preconditioner low-rank factor
    diag: torch.Tensor  # float32 [K]: diag(H), for the ridge


def curvature(H: Any, rank: Optional[int] = DEFAULT_RANK) -> Curvature:
    """The :class:`Curvature` of a covariance H [K, K] (checked: square, finite)."""
    H = torch.as_tensor(H)
    H = V.covariance(H, H.shape[0] if H.ndim == 2 else -1)
    f = torch.float32
    H32 = H.to(f)
    d, U = low_rank(H32, rank)  # a preconditioner: float32 is plenty
    return Curvature(H, H32, d.contiguous(), U.contiguous(), torch.diagonal(H32).clone())


class CovarianceCache:
    """H (and its :class:`Curvature`) of the last activation tensor seen: layers fed the same
    input in one forward pass (q/k/v, gate/up projections) share one K x K matrix; only one is
    held."""

    def __init__(self, rank: Optional[int] = DEFAULT_RANK):
        self.rank = rank
        self._x: Optional[torch.Tensor] = None  # held, so its memory cannot be reused meanwhile
        self._key: Optional[tuple] = None
        self._value: Optional[tuple] = None

    def _key_of(self, x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)

    def covariance(self, x: torch.Tensor) -> torch.Tensor:
        """H = E[x x^T] float64 [K, K] of activations x [..., K], from one float32 product
        (rounding ~1e-6 relative, far below the calibration sample's own noise; a float64
        product costs ~2x as much)."""
        if self._x is None or self._key_of(x) != self._key:
            self._x = self._value = None  # free the previous matrix first
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if x2.shape[0] == 0:
                raise ValueError("no activations were recorded for this layer")
            H = (x2.T @ x2).cpu().double() / x2.shape[0]
            self._x, self._key, self._value = x, self._key_of(x), (H, {})
        return self._value[0]

    def derived(self, x: torch.Tensor, name: Any, make: Any) -> Any:
        """``make(H)`` for the covariance H of x, computed once per input (e.g. a factor that
        the q/k/v projections share) and dropped with H."""
        H = self.covariance(x)
        cache = self._value[1]
        if name not in cache:
            cache[name] = make(H)
        return cache[name]

    def __call__(self, x: torch.Tensor) -> Curvature:
        """The :class:`Curvature` of activations x [..., K]."""
        return self.derived(x, "refit", lambda H: curvature(H, self.rank))


def refit_layer(q: Any, linear: torch.nn.Linear, H: Any, *, zero: bool = False) -> Any:
    """A QuantLinear ``q`` (quantized from ``linear``) with its tables refit to the output error
    (:func:`refit_table`); ``H``: a :class:`Curvature` (from a :class:`CovarianceCache`) or
    the covariance [K, K]."""
    from .nn import QuantLinear, is_conv1d

    qt = QuantizedTensor(
        q.packed, q.lut, q.scales, (q.out_features, q.in_features), q.fmt, q.group_size
    )
    w = linear.weight.detach()
    if is_conv1d(linear):  # GPT-2 Conv1D stores the weight transposed [K, N]
        w = w.t()
    new, _ = refit_table(w, qt, H, zero=zero)
    return QuantLinear.from_quantized(new, linear.bias)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row (w - w^) H (w - w^)^T, float64 [N], for w, w^ [N, K] and H [K, K]."""
    d = (w.double() - w_hat.double()).cpu()
    return ((d @ H.double()) * d).sum(1)


def expand_scales(scales: torch.Tensor, K: int, group_size: int) -> tuple:
    """Per-element (scale, zero) float64 [N, K] from scales [N, G, 2]."""
    s = scales.double().repeat_interleave(group_size, dim=1)[:, :K]
    return s[..., 0], s[..., 1]


class _Design:
    """The rows' design matrices A_n [K, L (+G)] (see the module docstring), applied without
    being formed: codes [n, K] int64, s [n, K] (the work dtype), groups [K] (None: the zeros are
    fixed, not unknowns)."""

    def __init__(
        self, codes: torch.Tensor, s: torch.Tensor, L: int, groups: Optional[torch.Tensor]
    ):
        self.codes, self.s, self.L, self.groups = codes, s, L, groups
        self.G = 0 if groups is None else int(groups.max()) + 1

    def apply(self, theta: torch.Tensor) -> torch.Tensor:
        """A theta: [n, K] (work dtype) from theta [n, L + G]."""
        t = theta.to(self.s.dtype)
        v = self.s * t[:, : self.L].gather(1, self.codes)
        if self.groups is not None:
            v = v + t[:, self.L :][:, self.groups]
        return v

    def transpose(self, u: torch.Tensor) -> torch.Tensor:
        """A^T u: float64 [n, L + G] from u [n, K]."""
        n = u.shape[0]
        out = torch.zeros((n, self.L + self.G), dtype=torch.float64)
        out[:, : self.L] = torch.zeros((n, self.L), dtype=u.dtype).scatter_add_(
            1, self.codes, self.s * u
        )
        if self.groups is not None:
            out[:, self.L :] = torch.zeros((n, self.G), dtype=u.dtype).index_add_(1, self.groups, u)
        return out


def _row_args(codes, scales, hr, L, group_size, zero, d, U, diag) -> tuple:
    """Checked raw arguments of the C++ row assembly (cpp/refit_rows.h) and P."""
    n, K = codes.shape
    P = L + (-(-K // group_size) if zero else 0)
    f32 = ("float32",)
    bufs = (
        T.buffer(codes, "codes", dtypes=("uint8",), ndim=2, device="cpu"),
        T.buffer(scales, "scales", dtypes=f32, ndim=3, device="cpu"),
        T.buffer(hr, "hr", dtypes=f32, ndim=2, device="cpu"),
        T.buffer(U, "U", dtypes=f32, ndim=2, device="cpu"),
        T.buffer(d, "d", dtypes=f32, ndim=1, device="cpu"),
        T.buffer(diag, "diag", dtypes=f32, ndim=1, device="cpu"),
    )
    if tuple(scales.shape) != (n, -(-K // group_size), 2) or tuple(hr.shape) != (n, K):
        raise ValueError(f"scales must be [n, ceil(K/G), 2] and hr [n, K] = {(n, K)}")
    if U.shape[0] != K or d.shape != (K,) or diag.shape != (K,):
        raise ValueError(f"U must be [K, r] and d, diag [K] with K = {K}")
    c, sc, h, u, dd, dg = (b.ptr for b in bufs)
    return (c, sc, h, n, K, L, group_size, zero, u, int(U.shape[1]), dd, dg), P


def normal_rows(
    codes: torch.Tensor,
    scales: torch.Tensor,
    hr: torch.Tensor,
    L: int,
    group_size: int,
    zero: bool,
    d: torch.Tensor,
    U: torch.Tensor,
    diag: torch.Tensor,
) -> tuple:
    """Each row's normal-equation pieces in one pass over its codes (C++ core,
    cpp/refit_rows.h): with A the row's design matrix (module docstring; P = L + G unknowns,
    G = ceil(K / group_size) zeros when ``zero``, else P = L):

        M [n, P, P] = A^T (diag(d) + U U^T) A,   grad [n, P] = A^T hr,
        curv [n, P] = diagonal of A^T diag(diag) A            (all float64)

    (A^T U is accumulated in float32, everything else in float64.) codes uint8 [n, K] (< L);
    scales float32 [n, ceil(K / group_size), 2] (scale, zero); hr float32 [n, K]; d, diag
    float32 [K]; U float32 [K, r]."""
    args, P = _row_args(codes, scales, hr, L, group_size, zero, d, U, diag)
    n = codes.shape[0]
    M = torch.empty((n, P, P), dtype=torch.float64)
    grad = torch.empty((n, P), dtype=torch.float64)
    curv = torch.empty((n, P), dtype=torch.float64)
    if n:
        C.refit_normal_rows(
            *args, T.buffer(M, "M").ptr, T.buffer(grad, "grad").ptr, T.buffer(curv, "curv").ptr
        )
    return M, grad, curv


def newton_rows(
    codes: torch.Tensor,
    scales: torch.Tensor,
    hr: torch.Tensor,
    L: int,
    group_size: int,
    zero: bool,
    d: torch.Tensor,
    U: torch.Tensor,
    diag: torch.Tensor,
    damp: float,
) -> torch.Tensor:
    """The default step of a round for every row, float64 [n, P]: -(M + diag(ridge))^{-1} grad
    with (M, grad, curv) of :func:`normal_rows` and ridge = damp * curv + 1e-9 * mean(curv[:L])
    (+1e-300), solved by a per-row Cholesky factorisation in the C++ core (0 for a row whose
    matrix is not positive definite in floating point)."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    args, P = _row_args(codes, scales, hr, L, group_size, zero, d, U, diag)
    x = torch.empty((codes.shape[0], P), dtype=torch.float64)
    if codes.shape[0]:
        C.refit_newton_rows(*args, float(damp), T.buffer(x, "x").ptr)
    return x


def assign_rows(
    w: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Re-assign ``codes`` (uint8 [n, K], updated in place) to the nearest dequantized value
    fma(lut, scale, zero) in float32 (the quantizer's own re-assignment; ties keep the old code)
    and return the residual deq[codes] - w, float32 [n, K] (C++ core, cpp/refit_rows.h).
    w float32 [n, K]; lut float32 [n, L], sorted ascending; scales float32 [n, ceil(K/G), 2]."""
    n, K = codes.shape
    f32 = ("float32",)
    bw = T.buffer(w, "w", dtypes=f32, ndim=2, device="cpu")
    bl = T.buffer(lut, "lut", dtypes=f32, ndim=2, device="cpu")
    bs = T.buffer(scales, "scales", dtypes=f32, ndim=3, device="cpu")
    bc = T.buffer(codes, "codes", dtypes=("uint8",), ndim=2, device="cpu")
    if (
        tuple(w.shape) != (n, K)
        or lut.shape[0] != n
        or tuple(scales.shape) != (n, -(-K // group_size), 2)
    ):
        raise ValueError("assign_rows: w [n, K], lut [n, L] and scales [n, ceil(K/G), 2] disagree")
    res = torch.empty((n, K), dtype=torch.float32)
    if n:
        C.refit_assign_rows(
            bw.ptr,
            bl.ptr,
            bs.ptr,
            n,
            K,
            int(lut.shape[1]),
            group_size,
            bc.ptr,
            T.buffer(res, "res").ptr,
        )
    return res


def solve_rows(
    design: _Design,
    grad: torch.Tensor,
    H: torch.Tensor,
    precond: torch.Tensor,
    ridge: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """``steps`` of preconditioned conjugate gradients, batched over rows, on
    (A^T H A + diag(ridge)) x = -grad from x = 0 (the step that minimises the rows' quadratic
    model of the output error): float64 [n, P].

    Args:
        design: the rows' A_n (:class:`_Design`); grad: A^T H r, float64 [n, P];
        H: [K, K] in the work dtype; precond: SPD [n, P, P] float64 (the preconditioner);
        ridge: [n, P] float64 > 0.
    """
    chol, info = torch.linalg.cholesky_ex(precond)
    if bool((info != 0).any()):  # not expected (SPD by construction); stay safe
        bad = info != 0
        chol[bad] = torch.linalg.cholesky(
            precond[bad] + torch.diag_embed(ridge[bad] * 1e-3 + 1e-300)
        )

    def psolve(v: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(v[..., None], chol)[..., 0]

    res = -grad
    z = psolve(res)
    if steps == 0:  # the approximate Newton step itself
        return z
    x = torch.zeros_like(grad)
    p = z
    rz = (res * z).sum(1)
    for i in range(steps):
        q = design.transpose(design.apply(p) @ H) + ridge * p
        pq = (p * q).sum(1)
        alpha = torch.where(pq > 0, rz / torch.where(pq > 0, pq, 1.0), 0.0)
        x = x + alpha[:, None] * p
        if i + 1 == steps:
            break
        res = res - alpha[:, None] * q
        z = psolve(res)
        rz_new = (res * z).sum(1)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x


def refit_table(
    w: Any,
    qt: QuantizedTensor,
    H: Union[torch.Tensor, Curvature],
    *,
    zero: bool = False,
    iters: int = DEFAULT_ITERS,
    damp: float = DEFAULT_DAMP,
    steps: int = DEFAULT_STEPS,
    rank: Optional[int] = DEFAULT_RANK,
) -> tuple:
    """Refit a learned-format QuantizedTensor's per-row tables (and group zeros with ``zero``)
    to minimise the output error with the full input covariance ``H`` [K, K].

    Args:
        w: the float weight [N, K] that ``qt`` quantizes (torch, any float dtype).
        qt: its quantization (learned format: lut [N, 2^bits]); torch CPU tensors.
        H: E[x x^T] of the layer's input, float [K, K] (symmetric positive semi-definite), or
            its :class:`Curvature` (reused by layers sharing the input; ``rank`` then unused).
        zero: also refit each group's zero (the scales stay).
        iters: refit / re-assign rounds (stops early when a round no longer lowers the error).
        damp: ridge as a fraction of the k-means curvature A^T diag(H) A of each unknown.
        steps: conjugate-gradient steps per round with the exact H (one [rows, K] x [K, K]
            product each); L + G steps solve each round's least squares exactly.
        rank: rank of the preconditioner's sketch of H (:func:`low_rank`; None: exact).
    Returns:
        (new QuantizedTensor, {"before": sum of e_n, "after": sum of e_n, "rows_changed": int,
        "rounds": int}); e_n is computed with the tables and scales as stored (rounded),
        dequantized as the kernels do (float32 fma), with float32 products summed in float64
        (~1e-6 relative); a row takes a round's result only where its e_n fell by > 1e-4
        relative.
    """
    if qt.lut.shape[0] != qt.shape[0]:
        raise ValueError(f"refit needs a per-row (learned) table, got lut {tuple(qt.lut.shape)}")
    N, K = qt.shape
    if iters < 1 or damp < 0 or steps < 0:
        raise ValueError("iters and steps must be >= 1 and damp >= 0")
    if isinstance(H, Curvature):
        if H.H.shape != (K, K):
            raise ValueError(f"H must be [K, K] = {(K, K)}, got {tuple(H.H.shape)}")
        cv = H
    else:
        cv = curvature(V.covariance(H, K), rank)
    w32 = torch.as_tensor(w).detach().to(device="cpu", dtype=torch.float32).contiguous()
    if w32.shape != (N, K):
        raise ValueError(f"w must be [N, K] = {(N, K)}, got {tuple(w32.shape)}")
    dtype = qt.lut.dtype
    L = qt.lut.shape[1]
    G = qt.scales.shape[1]
    f32 = torch.float32
    codes = unpack(qt.packed.cpu(), K, qt.bits)  # uint8 [N, K]
    # the table dtype's values, exactly; copies (updated in place below, never qt's own tensors)
    lut = qt.lut.cpu().to(f32, copy=True).contiguous()
    scales = qt.scales.cpu().to(f32, copy=True).contiguous()
    groups = torch.arange(K) // qt.group_size if zero else None

    res = torch.as_tensor(qt.dequantize()).to(f32) - w32  # fma in float32, as the kernels
    HR = res @ cv.H32  # [N, K]: the error and the next round's gradient
    err = (HR * res).sum(1, dtype=torch.float64)
    before = float(err.sum())
    rows = torch.arange(N)  # the rows still improving
    rounds = 0
    for _ in range(iters):
        rounds += 1
        c, sc = codes[rows], scales[rows]
        hr = HR[rows]
        theta0 = torch.cat([lut[rows], sc[..., 1]], 1) if zero else lut[rows]
        if steps == 0:
            step = newton_rows(c, sc, hr, L, qt.group_size, zero, cv.d, cv.U, cv.diag, damp)
        else:
            M, grad, kcurv = normal_rows(c, sc, hr, L, qt.group_size, zero, cv.d, cv.U, cv.diag)
            # ridge towards the current values, relative to each unknown's k-means curvature
            # (an unused table entry, with none, stays where it is)
            ridge = damp * kcurv + 1e-9 * kcurv[:, :L].mean(1, keepdim=True) + 1e-300
            s = sc[..., 0].repeat_interleave(qt.group_size, dim=1)[:, :K].contiguous()
            design = _Design(c.long(), s, L, groups)
            step = solve_rows(design, grad, cv.H32, M + torch.diag_embed(ridge), ridge, steps)
        theta = theta0.double() + step
        new_lut, _ = torch.sort(theta[:, :L].to(dtype).to(f32), dim=1)
        new_sc = sc.clone()
        if zero:
            new_sc[..., 1] = theta[:, L : L + G].to(dtype).to(f32)
        new_codes = c.clone()
        new_res = assign_rows(w32[rows], new_lut.contiguous(), new_sc, new_codes, qt.group_size)
        new_hr = new_res @ cv.H32
        new_err = (new_hr * new_res).sum(1, dtype=torch.float64)
        better = new_err < (1 - _ACCEPT) * err[rows]
        if not bool(better.any()):
            break
        gain = float((err[rows] - new_err)[better].sum())
        keep = rows[better]
        codes[keep] = new_codes[better]
        lut[keep] = new_lut[better]
        scales[keep] = new_sc[better]
        HR[keep] = new_hr[better]
        err[keep] = new_err[better]
        rows = keep
        if gain <= 1e-4 * float(err.sum()):
            break
    changed = int((lut != qt.lut.cpu().to(f32)).any(1).sum())
    out = QuantizedTensor(
        packed=pack(codes, qt.bits).to(qt.packed.device),
        lut=lut.to(dtype).contiguous().to(qt.lut.device),
        scales=scales.to(qt.scales.dtype).contiguous().to(qt.scales.device),
        shape=qt.shape,
        fmt=qt.fmt,
        group_size=qt.group_size,
    )
    return out, {
        "before": before,
        "after": float(err.sum()),
        "rows_changed": changed,
        "rounds": rounds,
    }


__all__ = [
    "Covariance",
    "CovarianceCache",
    "Curvature",
    "assign_rows",
    "newton_rows",
    "normal_rows",
    "DEFAULT_REFIT",
    "REFITS",
    "curvature",
    "expand_scales",
    "low_rank",
    "output_error",
    "refit_layer",
    "refit_table",
    "solve_rows",
]
