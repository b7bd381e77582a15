"""Run the Google Benchmark binary bench_gemm_cpu and write its GB/s as a markdown table.

    cmake -S . -B build/bench -DANY4_BUILD_BENCH=ON -DANY4_BUILD_PYTHON=OFF -DANY4_CUDA=OFF \\
        -DCMAKE_BUILD_TYPE=Release && cmake --build build/bench -j2
    python bench/gemm_cpu_gbench.py build/bench/bench_gemm_cpu [--min-time 0.3]

Every row: the kernel's effective bandwidth (weights + x + y bytes per second, weights read
from memory) and that figure as a fraction of the memory-copy bandwidth (BM_copy, read + write
bytes per second) measured by the same binary in the same run. Writes
bench/results/gemm_cpu_gbench.json (the raw Google Benchmark output) and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binary", type=Path)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--filter", default="")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cmd = [str(args.binary), f"--benchmark_min_time={args.min_time}", "--benchmark_format=json"]
    if args.filter:
        cmd.append(f"--benchmark_filter={args.filter}")
    raw = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    benches = raw["benchmarks"]
    copy = next(b["GB/s"] for b in benches if b["name"].startswith("BM_copy"))
    ctx = raw["context"]
    threads = os.environ.get("ANY4_NUM_THREADS", str(ctx.get("num_cpus", "?")))
    lines = [
        "# CPU gemm kernels: effective bandwidth (Google Benchmark)",
        "",
        f"Command: `python bench/gemm_cpu_gbench.py {args.binary} --min-time {args.min_time}`; "
        f"{ctx.get('num_cpus')} CPUs at {ctx.get('mhz_per_cpu')} MHz, any4 threads {threads}, "
        f"load average {ctx.get('load_avg')}. Group size 128; weights rotate over > 128 MiB of "
        "copies, so every call reads them from memory.",
        f"Memory copy (BM_copy, read + write bytes) in the same run: **{copy:.1f} GB/s**. "
        "GB/s below counts weights (codes + tables + scales) + x + y bytes per second; a batch-1 "
        "kernel only reads, so it can exceed the copy figure (which moves every byte twice).",
        "",
        "| implementation | table | x | N x K | M | us | GB/s | / copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in benches:
        parts = b["name"].split("/")
        if parts[0] != "BM_gemm":
            continue
        impl, table, x = parts[1], parts[2], parts[3].removeprefix("x_")
        dims = dict(p.split(":") for p in parts[4:7])
        us = b["real_time"] * {"ns": 1e-3, "us": 1.0, "ms": 1e3}[b["time_unit"]]
        lines.append(
            f"| {impl} | {table} | {x} | {dims['N']}x{dims['K']} | {dims['M']} | {us:.1f} | "
            f"{b['GB/s']:.1f} | {b['GB/s'] / copy:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_cpu_gbench.json").write_text(json.dumps(raw, indent=1) + "\n")
    (args.out / "gemm_cpu_gbench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
