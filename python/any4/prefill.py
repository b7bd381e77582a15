"""Prefill on CPU: any4.gemm for large batches as bounded weight panels times torch's matmul.

For a large batch (a prompt, an evaluation window) the fused kernels of ``any4.gemm`` are
compute-bound, and PyTorch's dense matmul (MKL / oneDNN: AVX-512 or AMX tiles where present) is
faster. Then the weight is decoded in row panels of at most ``PANEL_BYTES`` into one reused
scratch buffer (``C.dequantize_rows``: the same fp32 fused multiply-add as the kernels, rounded
once to the compute dtype) and each panel is multiplied with ``torch.mm``: no full float copy of
the weight is made. ``impl="panels"`` forces this path; ``impl="auto"`` takes it from the batch
size ``min_batch`` on.

The threshold and the compute dtype are kept per instruction set, measured with
``python bench/prefill_cpu.py`` (which prints the crossover); an instruction set without a
measurement keeps the fused kernels at every batch size. ``ANY4_PREFILL_MIN_M=<M>`` overrides the
threshold (``0`` turns the panel path off).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from . import _tensor as T
from ._core import C

PANEL_BYTES = 8 << 20  # largest decoded panel (float weights of one panel of rows)

# x dtype -> (smallest batch M that takes the panel path, compute dtype of the panel and the
# matmul), per instruction set (the best one any4 detected). Measured by bench/prefill_cpu.py,
# bench/results/prefill_cpu.md: AVX2 on an AMD EPYC (Zen 3), where PyTorch's dense bf16 matmul
# is several times slower than its fp32 one, so bf16 x is multiplied in fp32. AVX-512, AVX512-BF16
# and AMX have not been measured yet: the fused kernels stay in use there.
MIN_BATCH: dict = {
    "avx2": {"float32": (1024, "float32"), "bfloat16": (1024, "float32")},
}


def isa() -> str:
    """The instruction set the thresholds are keyed by: amx_bf16, avx512bf16, avx512, avx2 or
    portable (what this processor and operating system allow, checked at run time)."""
    f = C.cpu_features()
    for name in ("amx_bf16", "avx512bf16", "avx512", "avx2"):
        if f[name]:
            return name
    return "portable"


_ISA: Optional[str] = None


def plan(x_dtype: str) -> Optional[tuple]:
    """(smallest M, compute dtype) of the panel path for x of this dtype here, or None (fused
    kernels at every M)."""
    global _ISA
    if _ISA is None:
        _ISA = isa()
    entry = MIN_BATCH.get(_ISA, {}).get(x_dtype)
    override = os.environ.get("ANY4_PREFILL_MIN_M")
    if override is not None and override.strip():
        m = int(override)
        if m <= 0:
            return None
        return (m, entry[1] if entry else "float32")
    return entry


_MIN_BATCH_CACHE: dict = {}


def min_batch(x_dtype: str) -> int:
    """Smallest M for which ``impl="auto"`` takes the panel path (a huge number: never);
    computed once per x dtype."""
    m = _MIN_BATCH_CACHE.get(x_dtype)
    if m is None:
        entry = plan(x_dtype)
        m = _MIN_BATCH_CACHE[x_dtype] = entry[0] if entry else 1 << 62
    return m


def compute_dtype(x_dtype: str) -> str:
    """The dtype panels are decoded to and multiplied in for x of x_dtype: float32 unless the
    instruction set's measured entry says otherwise. (Float32, like the fused kernels: weights
    rounded to a 16-bit panel lose up to half an ulp each, and on a short row with cancelling
    terms that exceeded the 16-bit output tolerances.)"""
    entry = plan(x_dtype)
    return entry[1] if entry else "float32"


def gemm_panels(x2: Any, packed: Any, lut: Any, scales: Any, group_size: int, y: Any) -> Any:
    """y [M, N] = x2 [M, K] @ dequant(W)^T with W decoded in bounded row panels.

    x2: contiguous CPU torch tensor [M, K] (float32 / float16 / bfloat16); packed uint8 [N,
    ceil(K/2)], lut [1 or N, L], scales [N, ceil(K/G), 2] (contiguous, checked by the caller);
    y: contiguous [M, N] in x2's dtype, fully overwritten and returned.
    """
    torch = T._torch()
    M, K = (int(s) for s in x2.shape)
    N = int(packed.shape[0])
    cdt_name = compute_dtype(T.dtype_name(x2))
    cdt = getattr(torch, cdt_name)
    xc = x2 if x2.dtype == cdt else x2.to(cdt)
    rows = max(1, min(N, PANEL_BYTES // (K * torch.empty((), dtype=cdt).element_size())))
    panel = torch.empty(rows, K, dtype=cdt)
    direct = rows == N and y.dtype == cdt  # one panel straight into y
    prod = None if direct else torch.empty(M, rows, dtype=cdt)
    lut_rows, lut_len = (
        (1, int(lut.shape[0])) if lut.dim() == 1 else (int(lut.shape[0]), int(lut.shape[1]))
    )
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        C.dequantize_rows(packed.data_ptr(), N, K, lut.data_ptr(), lut_rows, lut_len, scales.data_ptr(),
                          int(scales.shape[1]), int(group_size), T.DTYPE_CODE[T.dtype_name(lut)], n0, n1,
                          panel.data_ptr(), T.DTYPE_CODE[cdt_name], -1)  # fmt: skip
        w = panel[: n1 - n0]
        if direct:
            torch.mm(xc, w.t(), out=y)
        else:
            out = prod if n1 - n0 == rows else torch.empty(M, n1 - n0, dtype=cdt)
            torch.mm(xc, w.t(), out=out)
            y[:, n0:n1].copy_(out)
    return y
