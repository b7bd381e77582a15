"""``any4.gemm``: y = x @ dequant(W)^T on quantized weights (SPEC §5)."""

from __future__ import annotations

from typing import Any, Optional

from . import _tensor as T
from . import validate as V
from ._core import C
from .cuda import gemm_cuda, gemm_gpu
from .pack import code_bits, to_nibbles_torch
from .pack_gpu import GpuWeight, unpack_from_gpu
from .prefill import gemm_panels, min_batch
from .validate import infer_group_size

__all__ = ["check_operands", "check_out", "gemm", "infer_group_size"]

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
CPU_IMPLS = {"auto": -1, "portable": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}
PANELS = "panels"  # CPU prefill path (any4.prefill): torch tensors only


def check_operands(
    x: Any,
    packed_w: Any,
    lut: Any,
    scales: Any,
    group_size: Optional[int],
    bits: Optional[int] = None,
):
    """Validate shapes/dtypes/devices; returns (K, N, bits, lut_rows, lut_len, n_groups, group_size)."""
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
            f"packed_w must be uint8 [N, ceil(bits*K/8)], got {T.dtype_name(packed_w)} "
            f"{tuple(packed_w.shape)}"
        )
    N = int(packed_w.shape[0])
    lut_rows, lut_len, n_groups = V.table_operands(lut, scales, N)
    bits = code_bits(K, int(packed_w.shape[1]), lut_len, bits)
    if group_size is None:
        group_size = infer_group_size(K, n_groups)
    group_size = V.group_size(group_size, K, n_groups)
    operands = (x, packed_w, lut, scales)
    if all(T.is_torch(t) and t.is_cpu for t in operands):
        devs = {"cpu"}  # (the common case, without building device objects)
    else:
        devs = {T.device_of(t) for t in operands}
    if len(devs) != 1:
        raise ValueError(f"x, packed_w, lut and scales must be on one device, got {sorted(devs)}")
    if V.codes_need_check(K, lut_len, bits):
        V.check_codes_once(packed_w, K, lut_len, bits)  # a code could be out of range: check once
    return K, N, bits, lut_rows, lut_len, n_groups, int(group_size)


_TORCH_FLOAT_CODES: dict = {}  # torch dtype -> DType code, filled on first use


def _gemm_torch_cpu_fast(x, packed_w, lut, scales, group_size, impl, out, bits):
    """The common case in few Python operations: contiguous CPU torch tensors of the usual ranks,
    valid shapes, impl "auto" and no out=. Returns y, or None for anything else (the general path
    then checks everything and raises the errors)."""
    torch = T._torch()
    if torch is None or out is not None or impl != "auto" or bits is not None:
        return None
    Tensor = torch.Tensor
    if not (
        isinstance(x, Tensor)
        and isinstance(packed_w, Tensor)
        and isinstance(lut, Tensor)
        and isinstance(scales, Tensor)
    ):
        return None
    if not _TORCH_FLOAT_CODES:
        _TORCH_FLOAT_CODES.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2})
    x_code = _TORCH_FLOAT_CODES.get(x.dtype)
    table_code = _TORCH_FLOAT_CODES.get(lut.dtype)
    if (
        x_code is None
        or table_code is None
        or scales.dtype != lut.dtype
        or packed_w.dtype != torch.uint8
    ):
        return None
    if not (x.is_cpu and packed_w.is_cpu and lut.is_cpu and scales.is_cpu) or x.dim() < 1:
        return None
    if packed_w.dim() != 2 or lut.dim() != 2 or scales.dim() != 3:
        return None
    if not (
        x.is_contiguous()
        and packed_w.is_contiguous()
        and lut.is_contiguous()
        and scales.is_contiguous()
    ):
        return None
    K = x.shape[-1]
    if K == 0:
        return None
    N, P = packed_w.shape
    lut_rows, lut_len = lut.shape
    n_groups = scales.shape[1]
    b = 4 if lut_len > 8 else 3 if lut_len > 4 else 2
    if P != (K * b + 7) // 8:
        return None  # (nibble-packed 3/2-bit codes, or a bad shape: the general path)
    if lut_rows not in (1, N) or not 1 <= lut_len <= 16 or scales.shape[0] != N:
        return None
    if scales.shape[2] != 2 or n_groups < 1:
        return None
    if group_size is None:
        if K % n_groups or (K // n_groups) % 8:
            return None
        group_size = K // n_groups
    elif (
        type(group_size) is not int
        or group_size <= 0
        or group_size % 8
        or group_size > K
        or -(-K // group_size) != n_groups
    ):
        return None
    if lut_len < 1 << b or (K * b) & 7:
        V.check_codes_once(packed_w, K, lut_len, b)
    M = x.numel() // K
    y = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype)
    if M >= 16 and M >= min_batch(T.dtype_name(x)):
        codes = to_nibbles_torch(packed_w, K, b)  # the panel decoder reads nibbles
        return gemm_panels(x.view(M, K), codes, lut, scales, group_size, y.view(M, N)).view(y.shape)
    if M:
        C.gemm_cpu(x.data_ptr(), x_code, M, K, packed_w.data_ptr(), b, N, lut.data_ptr(), lut_rows,
                   lut_len, scales.data_ptr(), n_groups, int(group_size), table_code, y.data_ptr(),
                   -1)  # fmt: skip
    return y


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
    lut: Any = None,
    scales: Any = None,
    group_size: Optional[int] = None,
    *,
    impl: str = "auto",
    out: Optional[Any] = None,
    bits: Optional[int] = None,
) -> Any:
    """y = x @ dequant(W)^T with fp32 accumulation.

    Args:
        x: [..., K] float32 / float16 / bfloat16 (torch or numpy; CPU, or CUDA when built with it).
        packed_w: uint8 [N, ceil(bits*K/8)] packed codes (``QuantizedTensor.packed``, any4.pack), or a
            ``GpuWeight`` (``any4.pack_for_gpu``; then lut and scales are not passed): the fast
            tensor-core path for CUDA x (see any4.cuda).
        lut: [N, L] per-row or [1, L] / [L] shared table, L <= 2^bits (float32/16, bfloat16).
        scales: [N, ceil(K/G), 2] (scale, zero), lut's dtype.
        group_size: G; inferred from K and scales.shape[1] when omitted (see infer_group_size).
        impl: CPU implementation: "auto" (the best this processor supports; for large batches of
            torch x, the prefill path where measured faster, see any4.prefill), "portable",
            "avx2", "avx512", "avx512bf16" (AVX-512 with bf16 dot products for bf16 x and
            tables) or "panels" (the prefill path: bounded decoded weight panels times
            torch.mm; torch tensors only).
        out: optional preallocated y [..., N] (x's dtype, framework and device, contiguous);
            every element is overwritten and it is returned.
        bits: code width of packed_w (4, 3 or 2); by default inferred from the table length and
            the row width (see any4.pack.code_bits): 3/2-bit tables over nibble rows are 4-bit.
    Returns:
        y [..., N] in x's dtype, framework and device.
    """
    if isinstance(packed_w, GpuWeight):
        if lut is not None or scales is not None:
            raise TypeError("a GpuWeight carries its own lut and scales: call gemm(x, w)")
        if T.is_torch(x) and x.device.type == "cuda":
            return gemm_gpu(x, packed_w, out=out)
        if T.device_of(packed_w.codes) != T.device_of(x):
            raise ValueError(
                f"x and the GPU weight must be on one device, got x on {T.device_of(x)} and the "
                f"weight on {T.device_of(packed_w.codes)}"
            )
        group_size = packed_w.group_size
        packed_w, lut, scales = unpack_from_gpu(packed_w)  # CPU x: the storage layout
    if lut is None or scales is None:
        raise TypeError("gemm(x, packed_w, lut, scales): lut and scales are required")
    y = _gemm_torch_cpu_fast(x, packed_w, lut, scales, group_size, impl, out, bits)
    if y is not None:
        return y
    K, N, bits, lut_rows, lut_len, n_groups, group_size = check_operands(
        x, packed_w, lut, scales, group_size, bits
    )
    lead = tuple(x.shape[:-1])
    if out is not None:
        check_out(out, x, lead + (N,))
    if T.device_of(x) != "cpu":
        if bits != 4:  # the CUDA storage-layout kernel reads nibbles: repack on the device
            packed_w = to_nibbles_torch(packed_w, K, bits)
        y = gemm_cuda(x, packed_w, lut, scales, group_size)
        if out is None:
            return y
        out.copy_(y)
        return out
    if impl not in CPU_IMPLS and impl != PANELS:
        raise ValueError(f"impl must be one of {(*CPU_IMPLS, PANELS)}, got {impl!r}")
    if impl == PANELS and not all(T.is_torch(t) for t in (x, packed_w, lut, scales)):
        raise TypeError('impl="panels" needs torch tensors (it multiplies with torch.mm)')
    if impl != PANELS and not C.cpu_impl_supported(CPU_IMPLS[impl]):
        raise RuntimeError(f"CPU implementation {impl!r} is not supported on this processor/build")
    x2 = x.reshape(-1, K)
    M = int(x2.shape[0])
    if all(T.is_torch(t) for t in (x2, packed_w, lut, scales)):
        # Direct path for torch tensors: the checks of T.buffer without its per-call overhead.
        x2 = x2.contiguous()
        for name, t in (("packed_w", packed_w), ("lut", lut), ("scales", scales)):
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
        y = x2.new_empty((M, N)) if out is None else out.view(M, N)
        if M and (
            impl == PANELS or (impl == "auto" and M >= 16 and M >= min_batch(T.dtype_name(x2)))
        ):
            # the panel decoder reads nibbles: 3/2-bit codes are widened first (4-bit-sized copy)
            gemm_panels(x2, to_nibbles_torch(packed_w, K, bits), lut, scales, group_size, y)
        elif M:
            C.gemm_cpu(x2.data_ptr(), T.DTYPE_CODE[T.dtype_name(x2)], M, K, packed_w.data_ptr(), bits, N,
                       lut.data_ptr(), lut_rows, lut_len, scales.data_ptr(), n_groups, group_size,
                       T.DTYPE_CODE[T.dtype_name(lut)], y.data_ptr(), CPU_IMPLS[impl])  # fmt: skip
        return y.view(lead + (N,)) if out is None else out
    if not x2.flags["C_CONTIGUOUS"]:
        x2 = x2.copy(order="C")
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
            bits,
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
