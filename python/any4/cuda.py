"""CUDA side of the package: availability checks and the GPU gemm paths.

Two ways to multiply on the GPU, both on the caller's current stream
(``torch.cuda.current_stream(device)``), on the tensors' device, asynchronous:

* **Fast path, GPU layout** -- ``w = any4.pack_for_gpu(qt)`` (or ``pack_for_gpu(packed, lut,
  scales, K)``) repacks the weight once into tensor-core fragment order (a :class:`GpuWeight`:
  codes, scales, lut tensors; see ``any4.pack_gpu``), ``w = w.cuda()``, then
  ``any4.gemm(x, w)`` (or :func:`gemm_gpu`) runs the ``mma.sync.m16n8k16`` kernel
  (cuda/gemm_tc.cu): bf16/fp16 activations of the weight's dtype, fp32 accumulation, batch
  1-16 fast (larger batches loop over 16-row tiles), split-K for small N, int formats converted
  arithmetically, table formats (nf4, fp4, anyK) through a per-row table in registers or
  shared memory. This is what a QuantLinear should hold once on the GPU.
* **Storage layout** -- ``any4.gemm(x, packed, lut, scales)`` with CUDA tensors runs a plain
  (no tensor core) kernel directly on the storage layout: any x dtype (fp32 included), any
  group size, any table dtype, no repacking and no host round trip; correct but several times
  slower than the fast path. Prefer it only for one-off products.

Both need a device of compute capability 8.0 or newer (checked, with a clear error) and a wheel
built with nvcc (``any4.cuda_compiled()``).
"""

from __future__ import annotations

from typing import Any, Optional

from . import _tensor as T
from ._core import C


def cuda_compiled() -> bool:
    """True when the wheel was built with the CUDA kernels (nvcc was found at build time)."""
    return bool(C.cuda_compiled)


def cuda_available() -> bool:
    """True when the GPU kernels are built *and* a CUDA device is visible (never raises)."""
    return cuda_compiled() and C.cuda_device_count() > 0


def require_cuda(device_index: int = 0) -> None:
    """Raise a clear RuntimeError unless the GPU kernels can run on this device."""
    if not cuda_compiled():
        raise RuntimeError(
            "any4 was built without CUDA kernels (no nvcc at build time); reinstall with nvcc on "
            "PATH (ANY4_CUDA=ON pip install .) to use CUDA tensors"
        )
    if C.cuda_device_count() == 0:
        raise RuntimeError("any4: no CUDA device is visible")
    C.cuda_check_device(int(device_index))


def _device_index(t: Any) -> int:
    import torch

    d = t.device
    return d.index if d.index is not None else torch.cuda.current_device()


def _stream(device_index: int) -> int:
    import torch

    return int(torch.cuda.current_stream(device_index).cuda_stream)


def gemm_cuda(x: Any, packed_w: Any, lut: Any, scales: Any, group_size: int) -> Any:
    """Storage-layout product on CUDA tensors (operands already checked by any4.gemm)."""
    if not T.is_torch(x) or x.device.type != "cuda":
        raise TypeError("gemm_cuda takes CUDA torch tensors")
    dev = _device_index(x)
    require_cuda(dev)
    K = int(x.shape[-1])
    N = int(packed_w.shape[0])
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, K).contiguous()
    M = int(x2.shape[0])
    lut2 = lut.reshape(1, -1) if lut.ndim == 1 else lut
    pb = T.buffer(packed_w, "packed_w")
    lb = T.buffer(lut2, "lut")
    sb = T.buffer(scales, "scales")
    y = T.empty_like_framework(x2, (M, N), T.dtype_name(x2))
    if M:
        C.cuda_gemm_simt(
            x2.data_ptr(), T.DTYPE_CODE[T.dtype_name(x2)], M, K, pb.ptr, N, lb.ptr, lb.shape[0],
            lb.shape[1], sb.ptr, sb.shape[1], int(group_size), lb.code, y.data_ptr(), dev,
            _stream(dev),
        )  # fmt: skip
    return y.reshape(lead + (N,))


# Split-K scratch per (device, stream): fp32 partial tiles and arrival counters. The kernel
# leaves the counters at zero, so the buffers are reused by every call on that stream.
_SCRATCH: dict = {}
_PLAN: dict = {}


def _scratch(dev: int, stream: int, floats: int, counters: int):
    import torch

    key = (dev, stream)
    ws, ctr = _SCRATCH.get(key, (None, None))
    if ws is None or ws.numel() < floats:
        ws = torch.empty(max(floats, 1 << 16), dtype=torch.float32, device=f"cuda:{dev}")
    if ctr is None or ctr.numel() < counters:
        ctr = torch.zeros(max(counters, 1 << 10), dtype=torch.int32, device=f"cuda:{dev}")
    _SCRATCH[key] = (ws, ctr)
    return ws, ctr


def gemm_gpu(
    x: Any, w: Any, *, dequant: Optional[str] = None, splits: int = 0, out: Any = None
) -> Any:
    """y = x @ dequant(W)^T with the tensor-core kernel on a :class:`GpuWeight`.

    Args:
        x: [..., K] CUDA tensor of the weight's dtype (bfloat16 or float16).
        w: GpuWeight on x's device (``any4.pack_for_gpu(...).cuda()``).
        dequant: "arith" (int tables only), "lut_reg" or "lut_smem"; default: arith for int
            formats, else the default table lookup.
        splits: > 0 forces this many K splits (tests); 0 lets the kernel choose.
        out: optional contiguous [..., N] tensor (x's dtype and device) to write y into.
    Returns:
        y [..., N] in x's dtype, on x's device, computed on the current stream.
    """
    import torch

    from .pack_gpu import GpuWeight, dequant_code

    if not isinstance(w, GpuWeight):
        raise TypeError(f"w must be a GpuWeight (any4.pack_for_gpu), got {type(w).__name__}")
    if not T.is_torch(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    N, K = w.shape
    if x.device.type != "cuda" or w.codes.device != x.device:
        raise ValueError(
            f"x and the GPU weight must be on one CUDA device, got x on {T.device_of(x)} and the "
            f"weight on {T.device_of(w.codes)} (move it with w.cuda() / w.to(x.device))"
        )
    if T.dtype_name(x) != w.dtype:
        raise TypeError(
            f"x is {T.dtype_name(x)} but the weight was packed for {w.dtype}: pass x in {w.dtype}, "
            "repack with pack_for_gpu(..., dtype=...), or use any4.gemm on the storage layout"
        )
    if x.ndim < 1 or int(x.shape[-1]) != K:
        raise ValueError(f"x must be [..., K={K}], got shape {tuple(x.shape)}")
    if tuple(w.codes.shape) != (-(-N // 16), -(-K // 64), 32, 16) or not all(
        t.is_contiguous() for t in (w.codes, w.scales, w.lut)
    ):
        raise ValueError("GpuWeight tensors must be contiguous and match its shape")
    code = dequant_code(w, dequant)
    dev = _device_index(x)
    require_cuda(dev)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, K)
    M = int(x2.shape[0])
    if out is None:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        if (
            not T.is_torch(out)
            or tuple(out.shape) != lead + (N,)
            or out.dtype != x.dtype
            or out.device != x.device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous {x.dtype} tensor of shape {lead + (N,)} on {x.device}"
            )
        y = out.view(M, N)
    if M == 0:
        return y.reshape(lead + (N,))
    K_pad = int(w.codes.shape[1]) * 64
    if K_pad != K or not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = torch.nn.functional.pad(x2, (0, K_pad - K)).contiguous()
    stream = _stream(dev)
    dtype_code = T.DTYPE_CODE[w.dtype]
    key = (M, N, K, dtype_code, code, dev, int(splits))
    plan = _PLAN.get(key)
    if plan is None:
        if len(_PLAN) > 4096:
            _PLAN.clear()
        plan = _PLAN[key] = C.cuda_gemm_tc_scratch(M, N, K, dtype_code, code, dev, int(splits))
    floats, counters, n_splits = plan
    ws_ptr = ctr_ptr = 0
    ws_n = ctr_n = 0
    if n_splits > 1:
        ws, ctr = _scratch(dev, stream, floats, counters)
        ws_ptr, ctr_ptr, ws_n, ctr_n = ws.data_ptr(), ctr.data_ptr(), ws.numel(), ctr.numel()
    C.cuda_gemm_tc(
        x2.data_ptr(), dtype_code, M, N, K, w.group_size, w.codes.data_ptr(),
        w.scales.data_ptr(), w.lut.data_ptr(), code, max(w.arith_neg2, 0), y.data_ptr(), ws_ptr,
        ws_n, ctr_ptr, ctr_n,
        int(splits), dev, stream,
    )  # fmt: skip
    return y.reshape(lead + (N,))


def gemm_gpu_tensors(
    x: Any,
    codes: Any,
    scales: Any,
    lut: Any,
    N: int,
    K: int,
    group_size: int,
    lut_len: int = 16,
    arith_neg2: int = -1,
    dequant: Optional[str] = None,
) -> Any:
    """:func:`gemm_gpu` on the GPU layout given as plain tensors and ints (the fields of a
    GpuWeight), e.g. for a torch custom op or module buffers: y [..., N] = x [..., K] @ W^T."""
    from .pack_gpu import GpuWeight

    w = GpuWeight(
        codes, scales, lut, (int(N), int(K)), int(group_size), int(lut_len), False, int(arith_neg2)
    )
    return gemm_gpu(x, w, dequant=dequant)
