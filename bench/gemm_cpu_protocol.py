"""Why bench/gemm_cpu_vs_torch.py warms each candidate up for 40 ms before timing it.

Two effects, both measured here on the weights-from-memory case (4096 x 4096, bf16 x, M = 1,
group size 128, the weights rotating over copies larger than the last-level cache):

1. Idle gaps. After the process has been idle for `gap` seconds, the calls that follow run
   slower until the machine has warmed up again. Each trial sleeps `gap`, makes two untimed
   calls, then times four (the protocol the benchmark used before). A DRAM-bound kernel
   (any4.gemm at batch 1) suffers more than a compute-bound one (PyTorch's int4 kernel).
2. PyTorch's OpenMP workers keep spinning on the cores for a while after each parallel
   region. Right after a turn of PyTorch calls, any4.gemm's second thread shares its core
   with a spinning OpenMP worker. The time of back-to-back any4.gemm calls is binned by the
   time since the last PyTorch call.

A decode loop calls its matmuls back to back, so neither effect is part of what a user sees:
the benchmark times steady state.

    python bench/gemm_cpu_protocol.py [--threads 2]

Writes bench/results/gemm_cpu_protocol.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import any4

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemm_cpu_vs_torch as bench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def after_gaps(fn, ops, x, gaps, trials: int) -> dict:
    """gap (s) -> median seconds per timed call (two untimed calls after the gap, four timed)."""
    out = {}
    i = 0
    for gap in gaps:
        ts = []
        for _ in range(trials):
            time.sleep(gap)
            for _ in range(2):
                fn(x, ops[i % len(ops)])
                i += 1
            for _ in range(4):
                t = time.perf_counter()
                fn(x, ops[i % len(ops)])
                ts.append(time.perf_counter() - t)
                i += 1
        out[gap] = statistics.median(ts)
    return out


def after_torch(fa, oa, ft, ot, x, trials: int, window: float = 0.1, bin_s: float = 0.01) -> dict:
    """Bin start (s after the last torch call) -> median any4.gemm seconds per call."""
    bins: dict = {}
    i = 0
    for _ in range(trials):
        for _ in range(20):
            ft(x, ot[i % len(ot)])
            i += 1
        t0 = time.perf_counter()
        while (t := time.perf_counter()) - t0 < window:
            fa(x, oa[i % len(oa)])
            i += 1
            bins.setdefault(round((t - t0) // bin_s * bin_s, 3), []).append(time.perf_counter() - t)
    return {b: statistics.median(v) for b, v in sorted(bins.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    any4.set_num_threads(args.threads)
    N = K = 4096
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, K, generator=gen).to(torch.bfloat16)
    cands = bench.candidates(N, K, torch.bfloat16, gen, rotate=True)
    oa, fa, _ = cands["any4.gemm any4"]
    ot, ft, _ = cands["torch int4"]
    for o in oa:
        fa(x, o)
    for o in ot:
        ft(x, o)
    gaps = [0.0, 0.002, 0.02, 0.1]
    info = {
        "cpu": bench.cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "shape": [N, K],
        "load_average_before": bench.load_average(),
        "after_gap_ms": {
            "any4.gemm any4": {
                g: t * 1e3 for g, t in after_gaps(fa, oa, x, gaps, args.trials).items()
            },
            "torch int4": {g: t * 1e3 for g, t in after_gaps(ft, ot, x, gaps, args.trials).items()},
        },
        "any4_after_torch_ms": {
            b: t * 1e3 for b, t in after_torch(fa, oa, ft, ot, x, args.trials).items()
        },
    }
    info["load_average_after"] = bench.load_average()
    g = info["after_gap_ms"]
    lines = [
        "# CPU gemm benchmark protocol: idle gaps and OpenMP spinning",
        "",
        f"CPU: {info['cpu']}; {args.threads} threads (torch and any4); torch {info['torch']}; "
        f"4096x4096, bf16 x, M = 1, G = 128, weights from memory. Load average before / after: "
        f"{info['load_average_before']} / {info['load_average_after']}.",
        f"Command: `python bench/gemm_cpu_protocol.py --threads {args.threads}`.",
        "",
        "## 1. Per-call time after an idle gap (sleep, 2 untimed calls, 4 timed; median ms)",
        "",
        "| gap | any4.gemm any4 | torch int4 | torch / any4 |",
        "|---|---|---|---|",
    ]
    for gap in gaps:
        a, t = g["any4.gemm any4"][gap], g["torch int4"][gap]
        lines.append(f"| {gap * 1e3:g} ms | {a:.3f} | {t:.3f} | {t / a:.2f}x |")
    lines += [
        "",
        "## 2. any4.gemm back to back, by time since the last torch call (median ms)",
        "",
        "| ms after torch | any4.gemm any4 |",
        "|---|---|",
    ]
    for b, t in info["any4_after_torch_ms"].items():
        lines.append(f"| {b * 1e3:.0f}-{(b + 0.01) * 1e3:.0f} | {t:.3f} |")
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_cpu_protocol.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    (args.out / "gemm_cpu_protocol.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
