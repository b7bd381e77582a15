"""Per-input-channel activation statistics and the sample weights built from them (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ._tensor import check_real, to_numpy

# name -> (statistic, power of the group scale): element weight = statistic[k] * scale**power
WEIGHTINGS = ("mse", "abs_mean", "mean_abs", "rms", "none")
DEFAULT_WEIGHTING = "mse"
CHUNK_ELEMENTS = 1 << 16  # activations per float64 chunk in ChannelStats.update (512 KiB)


@dataclass
class ChannelStats:
    """Running float64 sums over activations x[..., K] seen by one Linear layer."""

    count: int = 0
    sum: Optional[np.ndarray] = None
    sum_abs: Optional[np.ndarray] = None
    sum_sq: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    def update(self, x: Any) -> None:
        """Accumulate a batch of activations [..., K] (torch or numpy; real, finite).

        Raises ValueError naming the first channel when the batch holds NaN/Inf (or values
        whose square overflows float64): such statistics would silently poison the weights.
        Same as ``add_sums(*batch_sums(x))``.
        """
        self.add_sums(*batch_sums(x))

    def add_sums(self, s: np.ndarray, sa: np.ndarray, sq: np.ndarray, n: int) -> None:
        """Accumulate the float64 sums of a batch of ``n`` activations (from ``batch_sums``;
        the arrays are not kept, so one batch's sums can feed several layers' statistics)."""
        finite = np.isfinite(s) & np.isfinite(sa) & np.isfinite(sq)
        if not finite.all():
            k = int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"activations of channel {k} hold NaN or Inf (or overflow float64 when squared)"
            )
        if self.sum is None:
            self.sum, self.sum_abs, self.sum_sq = s.copy(), sa.copy(), sq.copy()
        else:
            if s.shape != self.sum.shape:
                raise ValueError(f"channel count changed: {self.sum.shape[0]} -> {s.shape[0]}")
            self.sum += s
            self.sum_abs += sa
            self.sum_sq += sq
        self.count += n

    def _checked(self) -> None:
        if self.count == 0 or self.sum is None:
            raise ValueError("no activations were recorded for this layer")

    @property
    def mean(self) -> np.ndarray:
        self._checked()
        return self.sum / self.count

    @property
    def mean_abs(self) -> np.ndarray:
        self._checked()
        return self.sum_abs / self.count

    @property
    def mean_sq(self) -> np.ndarray:
        self._checked()
        return self.sum_sq / self.count


def batch_sums(x: Any) -> tuple:
    """(sum, sum of |x|, sum of x^2, n): float64 [K] sums over the ``n`` rows of activations
    x[..., K] (torch or numpy; real), for ``ChannelStats.add_sums``.

    The sums are taken over chunks of rows (about CHUNK_ELEMENTS values each), so the float64
    temporaries stay small whatever the batch: whole-activation float64 copies made the heap of
    a quantize_model run grow to ~4 GB on the built-in model."""
    check_real(x, "activations")
    if hasattr(x, "detach"):  # torch: reduce on the tensor's device, in float64
        import torch

        xf = x.detach().reshape(-1, x.shape[-1])
        n, k = xf.shape
        s, sa, sq = (torch.zeros(k, dtype=torch.float64, device=xf.device) for _ in range(3))
        step = max(1, CHUNK_ELEMENTS // max(k, 1))
        for i in range(0, n, step):
            c = xf[i : i + step].double()
            s += c.sum(0)
            sa += c.abs().sum(0)
            sq += (c * c).sum(0)
        s, sa, sq = (t.cpu().numpy() for t in (s, sa, sq))
    else:
        xd = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
        s, sa, sq, n = xd.sum(0), np.abs(xd).sum(0), (xd * xd).sum(0), xd.shape[0]
    return s, sa, sq, int(n)


def channel_weight(stats: ChannelStats, weighting: str = DEFAULT_WEIGHTING) -> tuple:
    """(per-channel float32 weight [K] or None, scale power) for a weighting name.

    - ``mse``: E[x_k^2] * scale^2, which makes the k-means objective the expected squared
      output error; ``abs_mean``: |E[x_k]| * scale; ``mean_abs``: E|x_k| * scale;
      ``rms``: sqrt(E[x_k^2]) * scale; ``none``: all ones.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return None, 0
    if weighting == "mse":
        return stats.mean_sq.astype(np.float32), 2
    if weighting == "abs_mean":
        return np.abs(stats.mean).astype(np.float32), 1
    if weighting == "mean_abs":
        return stats.mean_abs.astype(np.float32), 1
    return np.sqrt(stats.mean_sq).astype(np.float32), 1


def as_numpy_weight(w: Any) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(w), dtype=np.float32)
