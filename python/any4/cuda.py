"""CUDA side of the package: availability checks and the GPU gemm paths.

Two ways to multiply on the GPU, both on the caller's current stream
(``torch.cuda.current_stream(device)``), on the tensors' device, asynchronous:

* **Fast path, GPU layout** -- ``w = any4.pack_for_gpu(qt)`` (or ``pack_for_gpu(packed, lut,
  scales, K)``) repacks the weight once into tensor-core fragment order (a :class:`GpuWeight`:
  codes, scales, lut tensors; see ``any4.pack_gpu``), ``w = w.cuda()``, then
  ``any4.gemm(x, w)`` (or :func:`gemm_gpu`) runs the ``mma.sync.m16n8k16`` kernel
  (cuda/gemm_tc.cu): bf16/fp16 activations of the weight's dtype, fp32 accumulation, batch
  1-16 fast (up to 64 rows loop over 16-row tiles), split-K for small N, int formats converted
  arithmetically, table formats (nf4, fp4, anyK) through a per-row table in registers or
  shared memory. Batches over 64 rows (prefill) dequantize W once into a temporary and run a
  dense matmul (cuBLAS through torch). This is what a QuantLinear should hold on the GPU.
* **Storage layout** -- ``any4.gemm(x, packed, lut, scales)`` with CUDA tensors runs a plain
  (no tensor core) kernel directly on the storage layout: any x dtype (fp32 included), any
  group size, any table dtype, no repacking and no host round trip; correct but several times
  slower than the fast path. Prefer it only for one-off products.

Both need a device of compute capability 8.0 or newer (checked, with a clear error) and a wheel
built with nvcc (``any4.cuda_compiled()``).

CUDA graphs: the split-K scratch of the fast path is allocated once per (device, stream), sized
for every automatic plan, and never reallocated, so a captured graph's pointers stay valid. Run
one product on the capturing stream before capture (a warm-up; torch's own graph warm-up does
this); capturing on a stream that has none raises a RuntimeError. Graphs captured on one stream
share its scratch: replay them on one stream at a time, or capture them on different streams.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from . import _tensor as T
from ._core import C
from .pack_gpu import (
    DEFAULT_SPLIT_WAVES,
    DEFAULT_STAGE_CHUNKS,
    GpuWeight,
    check_gpu_weight,
    check_variant,
    dequant_code,
    natural_bits,
)

GPU_IMPLS = ("auto", "tensor_core", "dequant_matmul")
# impl="auto": batches of more rows than this dequantize W once and use a dense matmul.
TENSOR_CORE_MAX_M = 64


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


class SplitKScratch:
    """Split-K scratch of the tensor-core kernel: fp32 partial tiles (workspace) and per-tile
    arrival counters. The kernel leaves the counters at zero, so one pair serves every call on
    a stream.

    Automatic plans use one pair per key (device, stream), allocated at its first use -- outside
    CUDA-graph capture -- at the bound that covers every automatic plan on that device
    (cuda/layout.cuh tc_workspace_floats_bound), counters zeroed and the stream synchronised,
    and never reallocated: a captured graph keeps raw pointers to it. Forced splits (tests,
    benchmarks) get a fresh pair sized to their plan on every call (torch's allocator makes that
    safe under capture too: each replay zeroes its own counters first).
    """

    def __init__(self) -> None:
        self._by_key: dict = {}

    def get(
        self,
        key: tuple,
        device: Any,
        floats: int,
        counters: int,
        *,
        forced: bool,
        capturing: bool,
        bound: Callable[[], tuple],
        synchronize: Optional[Callable[[], None]] = None,
    ) -> tuple:
        """(workspace float32 tensor, counters int32 tensor) for one call.

        Args:
            key: (device index, stream handle).
            device: torch device for the tensors.
            floats, counters: what this call's plan needs.
            forced: the plan's splits were forced (per-call allocation).
            capturing: the current stream is capturing a CUDA graph.
            bound: returns (floats, counters) covering every automatic plan on the device.
            synchronize: waits for the current stream (after zeroing the counters).
        Raises:
            RuntimeError: capture on a stream without scratch, or an automatic plan above the
                bound (a bug: the plan and the bound disagree).
        """
        import torch

        if forced:
            return (
                torch.empty(max(int(floats), 1), dtype=torch.float32, device=device),
                torch.zeros(max(int(counters), 1), dtype=torch.int32, device=device),
            )
        pair = self._by_key.get(key)
        if pair is None:
            if capturing:
                raise RuntimeError(
                    "any4 gemm: the capturing stream has no split-K scratch yet, and it cannot be "
                    "allocated during CUDA-graph capture (a graph keeps raw pointers); before "
                    "capturing, call any4.cuda.reserve_scratch(s) for the capture stream s (for "
                    "torch.cuda.graph(g) without stream=, s is torch.cuda.graph."
                    "default_capture_stream), or warm up on s and capture with stream=s"
                )
            bound_floats, bound_counters = (int(v) for v in bound())
            pair = (
                torch.empty(bound_floats, dtype=torch.float32, device=device),
                torch.zeros(bound_counters, dtype=torch.int32, device=device),
            )
            if synchronize is not None:
                synchronize()  # counters are zero before any graph replayed elsewhere reads them
            self._by_key[key] = pair
        ws, ctr = pair
        if int(floats) > ws.numel() or int(counters) > ctr.numel():
            raise RuntimeError(
                f"any4 gemm: split-K plan needs {floats} floats / {counters} counters, above the "
                f"scratch bound {ws.numel()} / {ctr.numel()} (please report this bug)"
            )
        return pair

    def clear(self) -> None:
        """Drop every stream's scratch (only safe when no captured graph uses it any more)."""
        self._by_key.clear()


SCRATCH = SplitKScratch()
_PLAN: dict = {}


def reserve_scratch(stream: Any = None, device: Any = None) -> None:
    """Allocate the split-K scratch of the tensor-core gemm for a stream now (outside CUDA-graph
    capture), e.g. for the stream a graph will be captured on. No-op when it exists.

    Args:
        stream: torch.cuda.Stream (default: the current stream of ``device``).
        device: CUDA device (default: the stream's, else the current device).
    """
    import torch

    if stream is None:
        stream = torch.cuda.current_stream(device)
    dev = stream.device.index if stream.device.index is not None else torch.cuda.current_device()
    require_cuda(dev)
    with torch.cuda.stream(stream):
        SCRATCH.get(
            (dev, int(stream.cuda_stream)), torch.device("cuda", dev), 0, 0, forced=False,
            capturing=_capturing(), bound=lambda: C.cuda_gemm_tc_scratch_bound(dev),
            synchronize=stream.synchronize,
        )  # fmt: skip


def _capturing() -> bool:
    import torch

    return bool(torch.cuda.is_current_stream_capturing())


def gemm_gpu(
    x: Any,
    w: Any,
    *,
    dequant: Optional[str] = None,
    splits: int = 0,
    out: Any = None,
    impl: str = "auto",
    stage_chunks: int = DEFAULT_STAGE_CHUNKS,
    split_waves: int = DEFAULT_SPLIT_WAVES,
) -> Any:
    """y = x @ dequant(W)^T with the tensor-core kernel on a :class:`GpuWeight`.

    Args:
        x: [..., K] CUDA tensor of the weight's dtype (bfloat16 or float16).
        w: GpuWeight on x's device (``any4.pack_for_gpu(...).cuda()``).
        dequant: "arith" (int tables only), "lut_reg" or "lut_smem"; default: arith for int
            formats, else the default table lookup (pack_gpu.DEFAULT_LUT_DEQUANT).
        splits: > 0 forces this many K splits (tests); 0 lets the kernel choose.
        out: optional contiguous [..., N] tensor (x's dtype and device) to write y into.
        impl: "tensor_core" (the mma kernel), "dequant_matmul" (W dequantized once into a
            temporary [N, K] tensor, then torch's dense matmul) or "auto": tensor_core up to
            TENSOR_CORE_MAX_M rows of x, dequant_matmul above.
        stage_chunks: 2 (default) or 4: chunks per register pipeline stage (kernel variant).
        split_waves: 1 or 2 (default): waves of blocks the automatic split-K plan may fill.
    Returns:
        y [..., N] in x's dtype, on x's device, computed on the current stream.
    """
    import torch

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
    check_gpu_weight(w)
    if not all(t.is_contiguous() for t in (w.codes, w.scales, w.lut)):
        raise ValueError("GpuWeight tensors must be contiguous")
    if w.scales.device != x.device or w.lut.device != x.device:
        raise ValueError("the GpuWeight's codes, scales and lut must be on one device")
    if impl not in GPU_IMPLS:
        raise ValueError(f"impl must be one of {GPU_IMPLS}, got {impl!r}")
    check_variant(stage_chunks, split_waves)
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
    stream = _stream(dev)
    dtype_code = T.DTYPE_CODE[w.dtype]
    if impl == "dequant_matmul" or (impl == "auto" and M > TENSOR_CORE_MAX_M):
        K_pad = 64 * -(-K // 64)  # the dequantize kernel writes whole 64-k chunks
        wd = torch.empty((N, K_pad), dtype=x.dtype, device=x.device)
        C.cuda_gemm_tc_dequant(
            dtype_code, N, K, w.group_size, w.codes.data_ptr(), w.scales.data_ptr(),
            w.lut.data_ptr(), code, max(w.arith_neg2, 0), w.bits, wd.data_ptr(), dev, stream,
        )  # fmt: skip
        torch.mm(x2, wd[:, :K].t(), out=y)
        return y.reshape(lead + (N,))
    K_pad = 64 * -(-K // 64)  # x zero-padded to whole 64-k chunks (any code width)
    if K_pad != K or not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = torch.nn.functional.pad(x2, (0, K_pad - K)).contiguous()
    variant = (int(splits), int(stage_chunks), int(split_waves), int(w.bits))
    key = (M, N, K, dtype_code, code, dev) + variant
    plan = _PLAN.get(key)
    if plan is None:
        if len(_PLAN) > 4096:
            _PLAN.clear()
        plan = _PLAN[key] = C.cuda_gemm_tc_scratch(M, N, K, dtype_code, code, dev, *variant)
    floats, counters, n_splits = plan
    ws_ptr = ctr_ptr = 0
    ws_n = ctr_n = 0
    if n_splits > 1:
        ws, ctr = SCRATCH.get(
            (dev, stream), x.device, floats, counters, forced=int(splits) > 0,
            capturing=_capturing(), bound=lambda: C.cuda_gemm_tc_scratch_bound(dev),
            synchronize=lambda: torch.cuda.current_stream(dev).synchronize(),
        )  # fmt: skip
        ws_ptr, ctr_ptr, ws_n, ctr_n = ws.data_ptr(), ctr.data_ptr(), ws.numel(), ctr.numel()
    C.cuda_gemm_tc(
        x2.data_ptr(), dtype_code, M, N, K, w.group_size, w.codes.data_ptr(),
        w.scales.data_ptr(), w.lut.data_ptr(), code, max(w.arith_neg2, 0), y.data_ptr(), ws_ptr,
        ws_n, ctr_ptr, ctr_n, int(splits), int(stage_chunks), int(split_waves), w.bits, dev,
        stream,
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
    bits: Optional[int] = None,
) -> Any:
    """:func:`gemm_gpu` on the GPU layout given as plain tensors and ints (the fields of a
    GpuWeight), e.g. for a torch custom op or module buffers: y [..., N] = x [..., K] @ W^T.
    ``bits``: the layout's code width; default: the narrowest holding ``lut_len`` entries (what
    pack_for_gpu chooses by default)."""
    b = natural_bits(int(lut_len)) if bits is None else int(bits)
    w = GpuWeight(
        codes,
        scales,
        lut,
        (int(N), int(K)),
        int(group_size),
        int(lut_len),
        False,
        int(arith_neg2),
        bits=b,
    )
    return gemm_gpu(x, w, dequant=dequant)
