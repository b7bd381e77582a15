"""CUDA side of the package: availability checks and the GPU gemm dispatch."""

from __future__ import annotations

from typing import Any

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


def gemm_cuda(x: Any, packed_w: Any, lut: Any, scales: Any, group_size: int) -> Any:
    require_cuda(x.device.index or 0)
    raise NotImplementedError("the CUDA gemm kernels are not built yet")
