"""GPTQ-style error feedback onto a fixed table (SPEC §2; opt-in, issue 17).

Round-to-nearest assigns each weight the closest table entry on its own. With the input
covariance H = E[x x^T] of the layer ([K, K]), the expected squared output error of a row is
(w - w^) H (w - w^)^T, and GPTQ (Frantar et al., 2022) lowers it greedily: the columns are
quantized one at a time (in a chosen order) and each column's rounding error is spread onto the
columns not yet quantized through the inverse Hessian's Cholesky factor, so later columns
compensate for earlier ones. Here the grid of every element is fixed before it starts: the row's
table (learned by k-means for any4/any3/any2, shared for int4/nf4/fp4) and its group's scale and
zero, exactly as :func:`any4.quantize` rounded them to the table dtype; only the codes change.

All rows of a layer run together (vectorised over N), in blocks of ``block`` columns (the
lazy-batch update of the GPTQ paper). Cost O(N K^2) per layer; memory O(N K + K^2) float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import validate as V
from .pack import pack
from .quantize import QuantizedTensor
from .refit import expand_scales

ORDERS = ("natural", "act")


@dataclass(frozen=True)
class GPTQ:
    """Error-feedback settings.

    damp: added to H's diagonal as a fraction of its mean diagonal (regularises a covariance
        estimated from few tokens; GPTQ's "percdamp").
    order: "act" (columns by decreasing H diagonal, i.e. input energy: GPTQ's act-order) or
        "natural" (0..K-1). The groups' scales stay those of the initial quantization either way.
    block: columns per lazy-batch update (speed only; the result is the same up to rounding).
    """

    damp: float = 0.01
    order: str = "act"
    block: int = 128

    def __post_init__(self) -> None:
        if not (self.damp > 0):
            raise ValueError(f"GPTQ damp must be > 0, got {self.damp}")
        if self.order not in ORDERS:
            raise ValueError(f"GPTQ order must be one of {ORDERS}, got {self.order!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"GPTQ block must be a positive int, got {self.block!r}")


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, float64 [K, K]; channels that
    never saw a non-zero input (diag 0) get a unit diagonal (their error reaches no output)."""
    H = H.clone()
    K = H.shape[0]
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    diag[dead] = 1
    idx = torch.arange(K)
    H[idx, idx] += damp * float(diag.mean())
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def column_order(H: torch.Tensor, order: str) -> torch.Tensor:
    """The order in which GPTQ quantizes the columns, int64 [K]."""
    if order == "act":
        return torch.argsort(torch.diagonal(H), descending=True, stable=True)
    return torch.arange(H.shape[0])


def prepare(H: torch.Tensor, settings: GPTQ = GPTQ()) -> tuple:
    """(column order [K], upper Cholesky factor of the damped inverse in that order [K, K]):
    what every layer fed the same input shares."""
    H = torch.as_tensor(H).detach().double().cpu()
    perm = column_order(H, settings.order)
    return perm, _inverse_factor(H[perm][:, perm], settings.damp)


def gptq_codes(
    w: Any,
    qt: QuantizedTensor,
    H: torch.Tensor,
    settings: GPTQ = GPTQ(),
    prepared: Optional[tuple] = None,
) -> QuantizedTensor:
    """Re-assign the codes of ``qt`` (the quantization of ``w``) by GPTQ error feedback with the
    input covariance ``H``; table and scales are kept.

    Args:
        w: the float weight [N, K] (torch, any float dtype).
        qt: its quantization (any format; torch CPU tensors).
        H: E[x x^T] of the layer's input, float [K, K], symmetric positive semi-definite.
        settings: damp, column order and block size (:class:`GPTQ`).
        prepared: :func:`prepare` (H, settings), when layers sharing an input reuse it.
    Returns:
        a new QuantizedTensor with the same table and scales and new codes.
    """
    N, K = qt.shape
    H = V.covariance(H, K)
    W = torch.as_tensor(w).detach().double().cpu().clone()
    if W.shape != (N, K):
        raise ValueError(f"w must be [N, K] = {(N, K)}, got {tuple(W.shape)}")
    lut = qt.lut.cpu().double().expand(N, -1).contiguous()
    order = torch.argsort(lut, dim=1)  # searchsorted needs each row's table sorted
    lut_sorted = lut.gather(1, order)
    s, z = expand_scales(qt.scales.cpu(), K, qt.group_size)
    perm, U = prepared if prepared is not None else prepare(H, settings)
    W, s, z = W[:, perm], s[:, perm], z[:, perm]
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    mid = (0.5 * (lut_sorted[:, 1:] + lut_sorted[:, :-1])).contiguous()  # [N, L-1] boundaries
    codes = torch.empty((N, K), dtype=torch.long)
    B = settings.block
    for a in range(0, K, B):
        b = min(K, a + B)
        Wb = W[:, a:b].clone()
        Ub = U[a:b, a:b]
        E = torch.empty((N, b - a), dtype=torch.float64)
        for j in range(b - a):
            k = a + j
            col = Wb[:, j]
            # nearest entry of the sorted table (searchsorted on the midpoints, one column)
            c = torch.searchsorted(mid, ((col - z[:, k]) / safe_s[:, k])[:, None], right=True)
            codes[:, k] = c[:, 0]
            q = lut_sorted.gather(1, c)[:, 0] * s[:, k] + z[:, k]
            err = (col - q) / Ub[j, j]
            E[:, j] = err
            Wb[:, j + 1 :].addr_(err, Ub[j, j + 1 :], alpha=-1.0)
        W[:, b:] -= E @ U[a:b, b:]
    # back to the original column order and to the table's own entry order
    out = torch.empty_like(codes)
    out[:, perm] = codes
    out = order.gather(1, out)
    return QuantizedTensor(
        packed=pack(out.to(torch.uint8), qt.bits).to(qt.packed.device),
        lut=qt.lut,
        scales=qt.scales,
        shape=qt.shape,
        fmt=qt.fmt,
        group_size=qt.group_size,
    )


def gptq_layer(
    q: Any,
    linear: torch.nn.Linear,
    H: torch.Tensor,
    settings: GPTQ = GPTQ(),
    prepared: Optional[tuple] = None,
) -> Any:
    """A QuantLinear ``q`` (quantized from ``linear``) with its codes re-assigned by
    :func:`gptq_codes` (H: the layer input's E[x x^T], float64 [K, K]; prepared: its
    :func:`prepare`, optional)."""
    from .nn import QuantLinear, is_conv1d

    qt = QuantizedTensor(
        q.packed, q.lut, q.scales, (q.out_features, q.in_features), q.fmt, q.group_size
    )
    w = linear.weight.detach()
    if is_conv1d(linear):  # GPT-2 Conv1D stores the weight transposed [K, N]
        w = w.t()
    return QuantLinear.from_quantized(gptq_codes(w, qt, H, settings, prepared), linear.bias)


__all__ = ["GPTQ", "ORDERS", "column_order", "gptq_codes", "gptq_layer", "prepare"]
