"""any4: learned 4-bit (and 3-, 2-bit) per-row number formats for LLM weights.

Core API (tensors in, tensors out; torch tensors or numpy arrays):

    qt = any4.quantize(w, fmt="any4", group_size=128, stats=...)   # -> QuantizedTensor
    w_hat = any4.dequantize(qt)
    y = any4.gemm(x, qt.packed, qt.lut, qt.scales)                # y = x @ w_hat.T
    centroids, codes = any4.kmeans(values, weights, k=16)

Models (torch):

    any4.quantize_model(model, fmt="any4", group_size=128, tokenizer=tok)  # nn.Linear -> QuantLinear
    any4.save(model, "out_dir"); model = any4.load("out_dir")

Hugging Face (after ``import any4``; see any4.hf):

    AutoModelForCausalLM.from_pretrained(name, quantization_config=any4.Any4Config(fmt="any4"))
    model.save_pretrained("out_dir"); AutoModelForCausalLM.from_pretrained("out_dir")
"""

from __future__ import annotations

import sys as _sys

from . import threads
from ._core import C as _C
from ._core import check_thread_count
from .cuda import cuda_available, cuda_compiled
from .formats import FORMATS, Format, get_format
from .gemm import gemm
from .kmeans import kmeans
from .pack import pack, packed_bytes, unpack
from .pack_gpu import GpuWeight, pack_for_gpu, unpack_from_gpu
from .quantize import QuantizedTensor, dequantize, quantize
from .stats import ChannelStats, channel_weight

# Model-level API (needs torch): QuantLinear, quantize_model, save/load. Imported lazily so the
# core works with numpy alone.


def __getattr__(name: str):
    import importlib

    lazy = {"nn": ("nn", None), "quantize_model": ("model", "quantize_model"), "save": ("io", "save"),
            "load": ("io", "load"), "QuantLinear": ("nn", "QuantLinear"), "hf": ("hf", None),
            "Any4Config": ("hf", "Any4Config"), "Any4HfQuantizer": ("hf", "Any4HfQuantizer")}  # fmt: skip
    if name in lazy:
        module_name, attr = lazy[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'any4' has no attribute {name!r}")


__version__ = "0.1.0"

# transformers (optional): register quant_method "any4" once its quantizer registry is imported.
from ._hf_hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()

if "torch" in _sys.modules:  # torch already imported: ANY4_PARALLEL=openmp applies now
    from . import _tensor

    _tensor._torch()


def get_num_threads() -> int:
    """Threads used by the C++ core: set_num_threads's value or ANY4_NUM_THREADS; otherwise all
    cores, or, once any4 runs on torch's OpenMP team (any4.threads), torch.get_num_threads()."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads used by the C++ core, 1..1024 (ValueError outside; RuntimeError, with
    one thread kept, when the system cannot start that many)."""
    _C.set_num_threads(check_thread_count(n))


def build_info() -> dict:
    """How this wheel was built and what it runs on: version, CUDA kernels and architectures,
    CPU kernel paths, the processor's features (``cpu_features``: avx2, avx512, avx512bf16,
    amx_bf16, checked at run time), threads and where they run (``parallel_backend``)."""
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
        "cpu_features": dict(_C.cpu_features()),
        "num_threads": get_num_threads(),
        "parallel_backend": str(_C.parallel_backend()),
    }


__all__ = [
    "FORMATS", "Any4Config", "Any4HfQuantizer", "ChannelStats", "Format", "GpuWeight", "QuantLinear", "QuantizedTensor",
    "build_info", "channel_weight", "cuda_available", "cuda_compiled", "dequantize", "gemm",
    "get_format", "get_num_threads", "kmeans", "load", "nn", "pack", "pack_for_gpu", "packed_bytes",
    "quantize", "quantize_model", "save", "set_num_threads", "threads", "unpack", "unpack_from_gpu",
]  # fmt: skip
