"""Distribution metrics against the float model (SPEC §7): mean KL divergence and top-1 agreement.

The reference is the float model's next-token distribution P at every scored position; a
quantized model's distribution is Q. Per position

    KLD = sum_v P(v) (log P(v) - log Q(v))          top-1 agreement = [argmax P == argmax Q]

and the reported figures are their means over all scored positions (the quality metrics of
llama.cpp's perplexity tool).

Memory stays bounded: the reference keeps, per position, only the float model's ``top_k``
most likely tokens (ids and log-probabilities), the log of the probability of all the others
(the tail, P(tail)) and ``tail_samples`` token ids drawn from P restricted to the tail (seeded,
with their log-probabilities). By the chain rule of relative entropy

    KLD = sum_{v in top} P(v) log(P(v)/Q(v)) + P(tail) log(P(tail)/Q(tail))
          + P(tail) * KL(P|tail || Q|tail)

and the last KL is estimated by the mean of log(P|tail(v) / Q|tail(v)) over the stored samples v
(an unbiased Monte-Carlo estimate; averaged over thousands of positions its noise is negligible).
The first two terms are exact; without tail samples their sum is a lower bound of the KLD,
exact when the tail is empty (``top_k >= vocab``) or Q's tail is proportional to P's. Measured
on the built-in model (any4 G=128, 1023-position windows of pydoc), the lower bound alone is
~92% of the exact KLD at top_k=256 and ~97% at 1024, which is why the tail is sampled. With a
49k vocabulary the defaults keep 2 MB per 1024-token window (int32 ids + float32 log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

DEFAULT_TOP_K = 128
DEFAULT_TAIL_SAMPLES = 128


@dataclass
class Reference:
    """The float model's next-token distributions on a set of windows (top-k + tail).

    Per window w (T scored positions): ``indices[w]`` int32 [T, k] token ids sorted by
    decreasing probability (column 0 is the float model's top-1), ``logprobs[w]`` float32 [T, k]
    their log-probabilities, ``log_tail[w]`` float32 [T] log of the remaining probability
    (-inf when k covers the vocabulary), ``tail_ids[w]`` int32 [T, s] / ``tail_logprobs[w]``
    float32 [T, s] tokens drawn from the tail in proportion to P (s = tail_samples; seeded by
    ``seed`` and the window's index, so the same windows give the same reference).
    """

    top_k: int = DEFAULT_TOP_K
    tail_samples: int = DEFAULT_TAIL_SAMPLES
    seed: int = 0
    indices: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    log_tail: list = field(default_factory=list)
    tail_ids: list = field(default_factory=list)
    tail_logprobs: list = field(default_factory=list)

    def add(self, logits: torch.Tensor) -> None:
        """Record one window's float logits [T, V] (any float dtype)."""
        parts = reference_topk(logits, self.top_k, self.tail_samples, self.seed + len(self))
        for store, part in zip(self._stores(), parts):
            store.append(part)

    def window(self, w: int) -> tuple:
        """The arguments of :func:`compare` (after the logits) for window ``w``."""
        return tuple(store[w] for store in self._stores())

    def _stores(self) -> tuple:
        return (self.indices, self.logprobs, self.log_tail, self.tail_ids, self.tail_logprobs)

    def __len__(self) -> int:
        return len(self.indices)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self._stores() for t in store)


def _log_tail(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``idx`` [T, k] for log-probabilities ``logp`` [T, V]."""
    if idx.shape[1] >= logp.shape[1]:
        return torch.full(logp.shape[:1], float("-inf"), dtype=logp.dtype, device=logp.device)
    masked = logp.scatter(1, idx, float("-inf"))
    return torch.logsumexp(masked, dim=1)


def reference_topk(
    logits: torch.Tensor,
    top_k: int = DEFAULT_TOP_K,
    tail_samples: int = DEFAULT_TAIL_SAMPLES,
    seed: int = 0,
) -> tuple:
    """The reference of one window of logits [T, V]: (ids int32 [T, k], log-probs float32
    [T, k], log tail float32 [T], tail sample ids int32 [T, s], their log-probs float32 [T, s]),
    k = min(top_k, V); s = tail_samples, or 0 when the tail is empty. Log-softmax in float64."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(logits.shape)}")
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if int(tail_samples) < 0:
        raise ValueError(f"tail_samples must be >= 0, got {tail_samples}")
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    k = min(int(top_k), logp.shape[1])
    lp, idx = torch.topk(logp, k, dim=1)
    tail = _log_tail(logp, idx)
    T = logp.shape[0]
    s = int(tail_samples) if k < logp.shape[1] else 0
    if s:
        masked = logp.scatter(1, idx, float("-inf")) - tail[:, None]  # log P|tail
        probs = torch.exp(masked).cpu()
        gen = torch.Generator().manual_seed(int(seed))
        # positions whose tail has no mass at all (underflow) sample anything: P(tail) = 0
        dead = ~(probs.sum(1) > 0)
        probs[dead] = 1.0
        sid = torch.multinomial(probs, s, replacement=True, generator=gen).to(logp.device)
        slp = logp.gather(1, sid)
    else:
        sid = torch.zeros((T, 0), dtype=torch.int64)
        slp = torch.zeros((T, 0), dtype=torch.float64)
    return (
        idx.to(torch.int32).cpu(),
        lp.float().cpu(),
        tail.float().cpu(),
        sid.to(torch.int32).cpu(),
        slp.float().cpu(),
    )


def _xlogy_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """exp(logp) * (logp - logq), with 0 where P = 0 (0 log 0 = 0)."""
    p = torch.exp(logp)
    out = p * (logp - logq)
    return torch.where(p > 0, out, torch.zeros_like(out))


def compare(
    logits: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    log_tail: torch.Tensor,
    tail_ids: Optional[torch.Tensor] = None,
    tail_logprobs: Optional[torch.Tensor] = None,
) -> tuple:
    """Per-position (KLD float64 [T], top-1 agreement bool [T]) of logits [T, V] (Q) against a
    reference window (P, from :func:`reference_topk`; without tail samples the KLD is the
    tail-lumped lower bound)."""
    if logits.ndim != 2 or indices.shape != logprobs.shape or indices.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits [T, V] and reference [T, k] do not match: {tuple(logits.shape)} vs "
            f"{tuple(indices.shape)}"
        )
    device = logits.device
    idx = indices.to(device=device, dtype=torch.int64)
    logq = torch.log_softmax(logits.detach().double(), dim=-1)
    logq_top = logq.gather(1, idx)
    logq_tail = _log_tail(logq, idx)
    logp_top = logprobs.to(device=device, dtype=torch.float64)
    logp_tail = log_tail.to(device=device, dtype=torch.float64)
    kld = _xlogy_ratio(logp_top, logq_top).sum(1) + _xlogy_ratio(logp_tail, logq_tail)
    if tail_ids is not None and tail_ids.numel():
        if tail_logprobs is None or tail_ids.shape != tail_logprobs.shape:
            raise ValueError("tail_ids and tail_logprobs must have the same shape")
        sid = tail_ids.to(device=device, dtype=torch.int64)
        slp = tail_logprobs.to(device=device, dtype=torch.float64)
        # log(P|tail(v) / Q|tail(v)) for the sampled v, averaged: estimates KL(P|tail || Q|tail)
        ratio = (slp - logp_tail[:, None]) - (logq.gather(1, sid) - logq_tail[:, None])
        p_tail = torch.exp(logp_tail)
        kld = kld + torch.where(p_tail > 0, p_tail * ratio.mean(1), torch.zeros_like(p_tail))
    agree = logq.argmax(dim=1) == idx[:, 0]
    return kld.cpu(), agree.cpu()


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Exact KL(P || Q) per row of log-probabilities [..., V] (float64): the oracle."""
    logp, logq = logp.double(), logq.double()
    return _xlogy_ratio(logp, logq).sum(-1)


__all__ = [
    "DEFAULT_TAIL_SAMPLES",
    "DEFAULT_TOP_K",
    "Reference",
    "compare",
    "kl_divergence",
    "reference_topk",
]
