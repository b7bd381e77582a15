"""Where any4's CPU kernels run their threads: its own pool (default) or PyTorch's OpenMP team.

PyTorch runs its CPU ops on an OpenMP team whose workers, by default, keep spinning on the
cores for a while after each op; any4's own pool then competes with them for the same cores (on
2 cores, a Llama-3-8B-shaped decode step ran its any4 layers up to 1.8x slower than with
``OMP_WAIT_POLICY=PASSIVE``). ``use_torch_openmp()`` (or ``ANY4_PARALLEL=openmp`` in the
environment, applied when any4 first sees torch imported) runs any4's parallel loops on the very
OpenMP runtime torch loaded instead: the spinning workers are then the ones that pick up any4's
chunks. The C++ core does not link torch or OpenMP: it finds the runtime among the libraries
already loaded in the process (``cpp/parallel.h``).

Not the default, by measurement: on an oversubscribed machine (more runnable threads than
cores), an OpenMP region waits at its closing barrier for every team thread, including one the
OS has descheduled, while any4's pool never waits for a worker that has not started. On the
shared 2-core test machine (load average 11-14) a batch-1 4096x4096 any4.gemm right after a
PyTorch op took 5.5 ms on the pool and 44 ms on the OpenMP team, as long as PyTorch's own ops
(bench/results/threads_cpu.md). The gain on an otherwise idle machine is still to be measured
(``python bench/threads_cpu.py``).

Thread count: ``any4.set_num_threads`` (or ``ANY4_NUM_THREADS``) if used, otherwise, on the
OpenMP team, the runtime's own setting, i.e. ``torch.set_num_threads``.

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
    """Called once when any4 first sees torch imported: shares torch's OpenMP team when
    ``ANY4_PARALLEL=openmp`` (and torch's workers are not passive: ``OMP_WAIT_POLICY=PASSIVE``
    makes them sleep right after each op, so they take no cores and waking them would only add
    latency to every any4 call)."""
    if os.environ.get("ANY4_PARALLEL", "").strip().lower() != "openmp":
        return
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return
    use_torch_openmp(torch)
