"""``torch.ops.any4.gemm``: any4.gemm registered as a torch.library custom op.

Registration is Python-level (the C++ core does not link libtorch). The op has a fake (meta)
implementation, so modules that call it trace under ``torch.compile(fullgraph=True)`` and
``torch.export`` without graph breaks; its output comes from the caching allocator on the current
stream, so it can be captured in CUDA graphs.

    y = torch.ops.any4.gemm(x, packed_w, lut, scales, group_size)   # x [..., K] -> y [..., N]
"""

from __future__ import annotations

import torch

from .gemm import gemm as _gemm


def output_features(packed_w: torch.Tensor) -> int:
    """N, the number of output features, for any packed weight layout accepted by any4.gemm."""
    return int(packed_w.shape[0])


@torch.library.custom_op("any4::gemm", mutates_args=())
def gemm(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(W)^T (see any4.gemm); a new tensor in x's dtype."""
    return _gemm(x, packed_w, lut, scales, group_size)


@gemm.register_fake
def _gemm_fake(x, packed_w, lut, scales, group_size):
    torch._check(x.dim() >= 1, lambda: "x must be [..., K]")
    torch._check(
        packed_w.dtype == torch.uint8, lambda: f"packed_w must be uint8, got {packed_w.dtype}"
    )
    return x.new_empty((*x.shape[:-1], output_features(packed_w)))


@torch.library.custom_op("any4::gemm_gpu", mutates_args=())
def gemm_gpu(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    lut: torch.Tensor,
    N: int,
    K: int,
    group_size: int,
    lut_len: int,
    arith_neg2: int,
) -> torch.Tensor:
    """Tensor-core product on the GPU layout (the fields of an ``any4.GpuWeight``):
    y [..., N] = x [..., K] @ W^T on x's CUDA device and current stream."""
    from .cuda import gemm_gpu_tensors

    return gemm_gpu_tensors(x, codes, scales, lut, N, K, group_size, lut_len, arith_neg2)


@gemm_gpu.register_fake
def _gemm_gpu_fake(x, codes, scales, lut, N, K, group_size, lut_len, arith_neg2):
    torch._check(x.shape[-1] == K, lambda: f"x must be [..., {K}]")
    return x.new_empty((*x.shape[:-1], N))
