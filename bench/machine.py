"""The machine a CPU benchmark ran on, printed and stored next to every result.

Processor model, the instruction sets any4 detected at run time (AMX-BF16, AVX512-BF16, AVX-512,
AVX2), torch's own CPU capability, the last-level cache (read from sysfs, summed over its
instances) and the load average. ``rotation_bytes`` sizes a weight rotation so that every call
reads its weights from DRAM on this machine (more than twice the last-level cache).

    from machine import describe, header, rotation_bytes   # (scripts in bench/)
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import any4

MIN_ROTATION_BYTES = 96 << 20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _size_bytes(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def last_level_cache() -> dict:
    """{"level", "bytes" (all instances), "instances", "bytes_each"} from sysfs; zeros if unknown."""
    best: dict = {}
    root = Path("/sys/devices/system/cpu")
    for cpu in sorted(root.glob("cpu[0-9]*")):
        for idx in (cpu / "cache").glob("index*"):
            try:
                if (idx / "type").read_text().strip() == "Instruction":
                    continue
                level = int((idx / "level").read_text())
                size = _size_bytes((idx / "size").read_text())
                shared = (idx / "shared_cpu_list").read_text().strip()
            except (OSError, ValueError):
                continue
            if level > best.get("level", 0):
                best = {"level": level, "each": size, "instances": {shared}}
            elif level == best["level"]:
                best["instances"].add(shared)
    if not best:
        return {"level": 0, "bytes": 0, "instances": 0, "bytes_each": 0}
    n = len(best["instances"])
    return {
        "level": best["level"],
        "bytes": n * best["each"],
        "instances": n,
        "bytes_each": best["each"],
    }


def rotation_bytes(factor: int = 3) -> int:
    """Bytes of weight copies to rotate over so that every call reads DRAM: factor x the
    last-level cache (all instances), at least MIN_ROTATION_BYTES."""
    return max(MIN_ROTATION_BYTES, factor * last_level_cache()["bytes"])


def isa(features: dict) -> str:
    """The best matmul instruction set any4 detected: AMX-BF16, AVX512-BF16, AVX-512, AVX2."""
    for key, name in (("amx_bf16", "AMX-BF16"), ("avx512bf16", "AVX512-BF16"),
                      ("avx512", "AVX-512"), ("avx2", "AVX2")):  # fmt: skip
        if features.get(key):
            return name
    return "portable"


def load_average() -> list:
    try:
        return [round(float(v), 2) for v in os.getloadavg()]
    except OSError:
        return []


def describe() -> dict:
    import torch

    info = any4.build_info()
    llc = last_level_cache()
    return {
        "cpu": cpu_model(),
        "isa": isa(info["cpu_features"]),
        "cpu_features": info["cpu_features"],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "llc": llc,
        "rotation_bytes": rotation_bytes(),
        "torch": torch.__version__,
        "any4": any4.__version__,
        "parallel_backend": any4.threads.parallel_backend(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": load_average(),
    }


def header(m: dict) -> str:
    """One line: processor, ISA, LLC, rotation, OpenMP wait policy, load average."""
    llc = m["llc"]
    return (
        f"{m['cpu']}; ISA {m['isa']} (torch: {m['torch_cpu_capability']}); L{llc['level']} "
        f"{llc['bytes'] >> 20} MiB ({llc['instances']} x {llc['bytes_each'] >> 20} MiB); weights "
        f"rotate over {m['rotation_bytes'] >> 20} MiB; OMP_WAIT_POLICY "
        f"{m['omp_wait_policy'] or 'not set'}; load average {m['load_average']}"
    )
