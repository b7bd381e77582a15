"""Where any4's CPU kernels run their threads: on PyTorch's OpenMP team when torch is in use.

PyTorch runs its CPU ops on an OpenMP team whose workers, by default, keep spinning on the
cores for a while after each op. any4's own thread pool would then compete with them for the
same cores (on 2 cores, any4's second thread got little time: a Llama-3-8B-shaped decode step
ran its any4 layers up to 1.8x slower than with ``OMP_WAIT_POLICY=PASSIVE``). So once any4 sees
that torch is imported (the first any4 call with torch tensors), and torch was built with OpenMP,
any4's parallel loops run on the very OpenMP runtime torch loaded: the spinning workers are the
ones that pick up any4's chunks. The C++ core does not link torch or OpenMP: it finds the runtime
among the libraries already loaded in the process (``cpp/parallel.h``).

Thread count: ``any4.set_num_threads`` (or ``ANY4_NUM_THREADS``) if used, otherwise the OpenMP
runtime's own setting, i.e. ``torch.set_num_threads``. any4 keeps its own pool when
``OMP_WAIT_POLICY=PASSIVE`` (torch's workers then sleep right after each op, so they take no
cores, and waking them would only add latency to every any4 call) or ``ANY4_PARALLEL=pool``.

    any4.threads.parallel_backend()    # "pool" or "openmp:/.../torch/lib/libgomp.so.1"
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ._core import C


def parallel_backend() -> str:
    """``"pool"`` (any4's own threads) or ``"openmp:<library path>"`` (a shared OpenMP team)."""
    return str(C.parallel_backend())


def use_torch_openmp(torch: Optional[Any] = None) -> bool:
    """Run any4's parallel loops on the OpenMP runtime that torch loaded.

    Returns True when any4 now uses it; False (nothing changed) when torch is not imported, was
    built without OpenMP, or its runtime is not found among the loaded libraries.
    """
    if torch is None:
        import sys

        torch = sys.modules.get("torch")
    try:
        if torch is None or not bool(torch._C.has_openmp):
            return False
        torch_dir = os.path.dirname(torch.__file__)
    except (AttributeError, TypeError):  # a torch that is half imported or unusual
        return False
    # The loader records the path it opened the library by (symbolic links kept or resolved).
    dirs = dict.fromkeys((torch_dir, os.path.realpath(torch_dir)))
    return any(C.use_openmp_runtime(d + os.sep) for d in dirs)


def use_thread_pool() -> None:
    """Run any4's parallel loops on its own thread pool (the default without torch)."""
    C.use_thread_pool()


def on_torch_seen(torch: Any) -> None:
    """Called once when any4 first sees torch imported: shares torch's OpenMP team unless
    ``ANY4_PARALLEL=pool`` or ``OMP_WAIT_POLICY=PASSIVE``."""
    if os.environ.get("ANY4_PARALLEL", "").strip().lower() == "pool":
        return
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return
    use_torch_openmp(torch)
