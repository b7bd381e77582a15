"""Split quantization work across processes with ``torch.distributed`` (SPEC §11).

Started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, ...)::

    torchrun --nproc_per_node=2 -m any4 quantize SRC --out DST

Multi-node: start the same command on every node with torchrun's rendezvous, e.g. on each of
2 nodes with 8 processes each::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST0:29500 --rdzv-id=any4-job -m any4 quantize SRC --out DST

SRC must be readable at the same path on every node (shared file system); only global rank 0
writes DST. Rank 0 drives the model's calibration forward pass block by block; for each linear
layer the ranks quantize row ranges they claim from a shared counter (``Group.claimer``: a
rank that finishes early takes more; k-means is per row, so the result does not depend on who
quantized what) and the results are gathered on rank 0 (``Group.gather_tensors``), which writes
the files, so the output is byte-identical to one process.

Backends: ``gloo`` on CPU, ``nccl`` when CUDA is used (the default group); the small control
messages and the gathered quantized rows always travel through a gloo group on the CPU, since
the quantizer itself runs on the CPU.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Optional

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # the per-row seed step of the C++ core (cpp/kmeans.cpp)
DEFAULT_TIMEOUT_S = 4 * 3600  # a rank waits this long for the others (a 70B block is slow)


def row_slice_seed(seed: int, row0: int) -> int:
    """The k-means base seed that makes rows ``row0:`` of a matrix, quantized on their own, use
    the same per-row seeds as in the whole matrix (row r's seed mixes ``seed + C*(r+1)``)."""
    return (int(seed) + _GOLDEN * int(row0)) % (1 << 64)


def row_ranges(n_rows: int, world: int) -> list:
    """[(start, stop)] contiguous near-equal row shares of ``n_rows`` for ``world`` ranks."""
    base, extra = divmod(int(n_rows), int(world))
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Group:
    """The processes of one quantization job: rank, world size, and the few collectives the
    streaming quantizer needs (CPU objects through gloo). ``Group.single()`` is one process."""

    def __init__(self, rank: int = 0, world: int = 1, cpu_group: Any = None, owns: bool = False):
        self.rank = int(rank)
        self.world = int(world)
        self._cpu_group = cpu_group
        self._owns = owns

    @classmethod
    def single(cls) -> Group:
        return cls()

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
        """Join the torchrun job (env:// rendezvous), or one process when WORLD_SIZE is unset/1.

        The default group uses nccl when ``device`` is CUDA, else gloo."""
        if env_world_size() <= 1:
            return cls.single()
        try:
            import torch.distributed as dist
        except ImportError as e:  # pragma: no cover - torch builds without distributed
            raise RuntimeError("this torch build has no torch.distributed") from e
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        timeout = datetime.timedelta(seconds=timeout_s)
        owns = False
        if not dist.is_initialized():
            use_nccl = str(device).startswith("cuda") and torch.cuda.is_available()
            if use_nccl:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if use_nccl else "gloo", timeout=timeout)
            owns = True
        cpu_group = None
        if dist.get_backend() != "gloo":
            cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), cpu_group, owns)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._cpu_group)
        return box[0]

    def gather(self, obj: Any) -> Optional[list]:
        """[obj of rank 0, obj of rank 1, ...] on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self._cpu_group)
        return out

    def gather_tensors(self, obj: Any) -> Optional[list]:
        """Like :meth:`gather`, for objects holding large CPU tensors (lists, tuples, dicts of
        them): the tensors travel as one flat byte buffer per rank through a point-to-point
        send (no pickling of tensor data), the rest of the object through :meth:`gather`."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        tensors: list = []
        skeleton = _strip_tensors(obj, tensors)
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // 8) * 8  # 8-byte aligned, so every dtype can view its slice
        heads = self.gather(
            (skeleton, [(tuple(t.shape), t.dtype) for t in tensors], sizes, offsets, total)
        )
        if self.rank != 0:
            buf = torch.empty(total, dtype=torch.uint8)
            for t, off, n in zip(tensors, offsets, sizes):
                if n:
                    buf[off : off + n] = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            if total:
                dist.send(buf, dst=0, group=self._cpu_group)
            return None
        out = [obj]
        for r in range(1, self.world):
            skel, metas, lens, offs, size = heads[r]
            buf = torch.empty(size, dtype=torch.uint8)
            if size:
                dist.recv(buf, src=r, group=self._cpu_group)
            parts = [
                buf[off : off + n].view(dtype).reshape(shape)
                for (shape, dtype), n, off in zip(metas, lens, offs)
            ]
            out.append(_restore_tensors(skel, parts))
        return out

    def claimer(self, n: int, tag: str) -> Callable[[], Optional[int]]:
        """A function that hands this rank the next unclaimed index of ``0..n-1`` (None when all
        are taken), from a counter every rank shares (the torchrun job's store) under ``tag``:
        the same on every rank, never reused in a job (e.g. a uuid sent by rank 0). One
        process: 0, 1, ..., n-1."""
        if self.world == 1:
            it = iter(range(n))
            return lambda: next(it, None)
        store = _job_store()
        if store is None:  # no shared store: a fixed round-robin share
            it = iter(range(self.rank, n, self.world))
            return lambda: next(it, None)
        key = f"any4/claim/{tag}"

        def claim() -> Optional[int]:
            c = store.add(key, 1) - 1
            return c if c < n else None

        return claim

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self._cpu_group)

    def close(self) -> None:
        if self._owns:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns = False


def _job_store() -> Any:
    """The key-value store of the default process group (torchrun's rendezvous), or None."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return None


class _Slot:
    """Where a tensor stood in an object sent by :meth:`Group.gather_tensors`."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _strip_tensors(obj: Any, out: list) -> Any:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return _Slot(len(out) - 1)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip_tensors(o, out) for o in obj)
    if isinstance(obj, dict):
        return {k: _strip_tensors(v, out) for k, v in obj.items()}
    return obj


def _restore_tensors(obj: Any, tensors: list) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_restore_tensors(o, tensors) for o in obj)
    if isinstance(obj, dict):
        return {k: _restore_tensors(v, tensors) for k, v in obj.items()}
    return obj


def local_world_size() -> int:
    """Processes of this job on this node (LOCAL_WORLD_SIZE set by torchrun; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def threads_per_rank() -> int:
    """CPU threads for the C++ quantizer of one rank: this node's cores shared by its ranks."""
    local = local_world_size()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // local)


__all__ = [
    "Group",
    "env_world_size",
    "local_world_size",
    "row_ranges",
    "row_slice_seed",
    "threads_per_rank",
]
