"""``any4.gemm``: y = x @ dequant(W)^T on quantized weights (SPEC §5)."""

from __future__ import annotations

from typing import Any, Optional

from . import _tensor as T
from ._core import C

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
CPU_IMPLS = {"auto": -1, "portable": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}


def infer_group_size(K: int, n_groups: int) -> int:
    """Group size from K and the number of scale groups.

    K divisible by n_groups gives K / n_groups. Otherwise the last group is short and several
    multiples of 8 may fit (K=576 with 5 groups: 120, 128 or 136); the power of two among them
    is taken when there is exactly one, else pass ``group_size=`` explicitly.
    """
    if n_groups < 1:
        raise ValueError("scales must have at least one group")
    if K % n_groups == 0 and (K // n_groups) % 8 == 0:
        return K // n_groups
    candidates = [g for g in range(8, K + 8, 8) if -(-K // g) == n_groups]
    pow2 = [g for g in candidates if g & (g - 1) == 0]
    if len(candidates) == 1:
        return candidates[0]
    if len(pow2) == 1:
        return pow2[0]
    raise ValueError(
        f"cannot infer the group size from K={K} and {n_groups} scale groups; pass group_size="
    )


def check_operands(x: Any, packed_w: Any, lut: Any, scales: Any, group_size: Optional[int]):
    """Validate shapes/dtypes/devices; returns (K, N, lut_rows, lut_len, n_groups, group_size)."""
    for name, t in (("x", x), ("packed_w", packed_w), ("lut", lut), ("scales", scales)):
        T.check_array(t, name)
    xd = T.dtype_name(x)
    if xd not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {xd}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    K = int(x.shape[-1])
    if T.dtype_name(packed_w) != "uint8" or packed_w.ndim != 2:
        raise TypeError(
            f"packed_w must be uint8 [N, ceil(K/2)], got {T.dtype_name(packed_w)} {tuple(packed_w.shape)}"
        )
    N = int(packed_w.shape[0])
    if int(packed_w.shape[1]) != (K + 1) // 2:
        raise ValueError(
            f"packed_w has {packed_w.shape[1]} bytes per row; x's K={K} needs {(K + 1) // 2}"
        )
    ld = T.dtype_name(lut)
    if ld not in FLOAT_DTYPES:
        raise TypeError(f"lut must be float32, float16 or bfloat16, got {ld}")
    if T.dtype_name(scales) != ld:
        raise TypeError(f"scales must have lut's dtype {ld}, got {T.dtype_name(scales)}")
    if lut.ndim == 1:
        lut_rows, lut_len = 1, int(lut.shape[0])
    elif lut.ndim == 2:
        lut_rows, lut_len = int(lut.shape[0]), int(lut.shape[1])
    else:
        raise ValueError(f"lut must be [L], [1, L] or [N, L], got shape {tuple(lut.shape)}")
    if lut_rows not in (1, N) or not 1 <= lut_len <= 16:
        raise ValueError(
            f"lut must be [1, L] or [N={N}, L] with L <= 16, got shape {tuple(lut.shape)}"
        )
    if scales.ndim != 3 or int(scales.shape[0]) != N or int(scales.shape[2]) != 2:
        raise ValueError(f"scales must be [N={N}, groups, 2], got shape {tuple(scales.shape)}")
    n_groups = int(scales.shape[1])
    if group_size is None:
        group_size = infer_group_size(K, n_groups)
    elif group_size <= 0 or -(-K // group_size) != n_groups:
        raise ValueError(
            f"group_size={group_size} gives {-(-K // max(group_size, 1))} groups for K={K}, scales have {n_groups}"
        )
    devs = {T.device_of(t) for t in (x, packed_w, lut, scales)}
    if len(devs) != 1:
        raise ValueError(f"x, packed_w, lut and scales must be on one device, got {sorted(devs)}")
    return K, N, lut_rows, lut_len, n_groups, int(group_size)


def check_out(out: Any, x: Any, shape: tuple) -> None:
    """``out=`` of gemm: y's shape, x's dtype, framework and device, contiguous."""
    T.check_array(out, "out")
    if T.is_torch(out) != T.is_torch(x):
        raise TypeError("out must be of x's framework (torch tensor or numpy array)")
    if tuple(int(s) for s in out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if T.dtype_name(out) != T.dtype_name(x):
        raise TypeError(f"out must have x's dtype {T.dtype_name(x)}, got {T.dtype_name(out)}")
    if T.device_of(out) != T.device_of(x):
        raise ValueError(f"out must be on x's device {T.device_of(x)}, got {T.device_of(out)}")
    contiguous = out.is_contiguous() if T.is_torch(out) else out.flags["C_CONTIGUOUS"]
    if not contiguous:
        raise ValueError("out must be contiguous")


def gemm(
    x: Any,
    packed_w: Any,
    lut: Any,
    scales: Any,
    group_size: Optional[int] = None,
    *,
    impl: str = "auto",
    out: Optional[Any] = None,
) -> Any:
    """y = x @ dequant(W)^T with fp32 accumulation.

    Args:
        x: [..., K] float32 / float16 / bfloat16 (torch or numpy; CPU, or CUDA when built with it).
        packed_w: uint8 [N, ceil(K/2)] codes, two per byte (``QuantizedTensor.packed``).
        lut: [N, L] per-row or [1, L] / [L] shared table, L <= 16 (float32/16, bfloat16).
        scales: [N, ceil(K/G), 2] (scale, zero), lut's dtype.
        group_size: G; inferred from K and scales.shape[1] when omitted (see infer_group_size).
        impl: CPU implementation: "auto" (the best this processor supports), "portable", "avx2",
            "avx512" or "avx512bf16" (AVX-512 with bf16 dot products for bf16 x and tables).
        out: optional preallocated y [..., N] (x's dtype, framework and device, contiguous);
            every element is overwritten and it is returned.
    Returns:
        y [..., N] in x's dtype, framework and device.
    """
    K, N, lut_rows, lut_len, n_groups, group_size = check_operands(
        x, packed_w, lut, scales, group_size
    )
    lead = tuple(x.shape[:-1])
    if out is not None:
        check_out(out, x, lead + (N,))
    if T.device_of(x) != "cpu":
        from .cuda import gemm_cuda

        y = gemm_cuda(x, packed_w, lut, scales, group_size)
        if out is None:
            return y
        out.copy_(y)
        return out
    if impl not in CPU_IMPLS:
        raise ValueError(f"impl must be one of {tuple(CPU_IMPLS)}, got {impl!r}")
    if not C.cpu_impl_supported(CPU_IMPLS[impl]):
        raise RuntimeError(f"CPU implementation {impl!r} is not supported on this processor/build")
    x2 = x.reshape(-1, K)
    x2 = (
        x2.contiguous()
        if T.is_torch(x2)
        else x2.copy(order="C")
        if not x2.flags["C_CONTIGUOUS"]
        else x2
    )
    M = int(x2.shape[0])
    xb = T.buffer(x2, "x")
    pb = T.buffer(packed_w, "packed_w")
    lb = T.buffer(lut, "lut")
    sb = T.buffer(scales, "scales")
    y = T.empty_like_framework(x, (M, N), xb.dtype) if out is None else out.reshape(M, N)
    if M:
        C.gemm_cpu(
            xb.ptr,
            xb.code,
            M,
            K,
            pb.ptr,
            N,
            lb.ptr,
            lut_rows,
            lut_len,
            sb.ptr,
            n_groups,
            group_size,
            lb.code,
            T.buffer(y, "y").ptr,
            CPU_IMPLS[impl],
        )
    return y.reshape(lead + (N,)) if out is None else out
