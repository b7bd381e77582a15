"""any4: learned 4-bit (and 3-, 2-bit) per-row number formats for LLM weights.

Core API (tensors in, tensors out; torch tensors or numpy arrays):

    qt = any4.quantize(w, fmt="any4", group_size=128, stats=...)   # -> QuantizedTensor
    w_hat = any4.dequantize(qt)
    y = any4.gemm(x, qt.packed, qt.lut, qt.scales)                # y = x @ w_hat.T
    centroids, codes = any4.kmeans(values, weights, k=16)
"""

from __future__ import annotations

from ._core import C as _C
from .cuda import cuda_available, cuda_compiled
from .formats import FORMATS, Format, get_format
from .gemm import gemm
from .kmeans import kmeans
from .pack import pack, unpack
from .quantize import QuantizedTensor, dequantize, quantize
from .stats import ChannelStats, channel_weight

__version__ = "0.1.0"


def get_num_threads() -> int:
    """Threads used by the C++ core (default: all cores, or ANY4_NUM_THREADS)."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads used by the C++ core (>= 1)."""
    if int(n) < 1:
        raise ValueError("number of threads must be >= 1")
    _C.set_num_threads(int(n))


def build_info() -> dict:
    """How this wheel was built: version, CUDA kernels and architectures, CPU kernel paths."""
    impls = {
        name: bool(_C.cpu_impl_supported(code))
        for name, code in (("portable", 0), ("avx2", 1), ("avx512", 2), ("avx512bf16", 3))
    }
    return {
        "version": __version__,
        "cuda_compiled": cuda_compiled(),
        "cuda_archs": _C.cuda_archs,
        "cuda_available": cuda_available(),
        "cpu_impls": impls,
        "num_threads": get_num_threads(),
    }


__all__ = [
    "FORMATS", "ChannelStats", "Format", "QuantizedTensor", "build_info", "channel_weight",
    "cuda_available", "cuda_compiled", "dequantize", "gemm", "get_format", "get_num_threads",
    "kmeans", "pack", "quantize", "set_num_threads", "unpack",
]  # fmt: skip
