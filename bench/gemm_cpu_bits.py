"""any3 / any2 against any4 on the CPU: the dense 3- and 2-bit layouts, measured in one run.

Per thread count (1 and 2 by default), shape N x K (4096 x 14336 and 14336 x 4096, SPEC §7),
batch M (1 and 16) and group size 128, any4.gemm on bf16 activations with per-row bf16 tables
(what ``any4 quantize`` produces) for any4 (nibbles), any3 (8 codes in 3 bytes) and any2 (4
codes per byte), and torch's dense bf16 ``x @ W.T`` for context. The weights rotate over
copies totalling 3x the last-level cache (bench/machine.py, from sysfs), so every call reads
its weights from DRAM as a layer of a real model does. The candidates take turns
(bench/gemm_cpu_vs_torch.py's round robin: steady state, median), so load changes on a shared
machine hit all alike; the load average is recorded before and after. Figures: time per call,
GB/s of weight bytes read, and the speed-ups over any4 in the same round robin. The memory
read and copy bandwidth (torch, 256 MiB) is measured at each thread count in the same run: a
kernel whose weight GB/s is near the read bandwidth is bound by DRAM, one well below it by
its instructions.

Also recorded: the stored bits per weight of each format at K = 4096 and K = 14336 (packed
codes + table + scales bytes, times 8, over N * K), as QuantizedTensor.bits_per_weight computes it.

    python bench/gemm_cpu_bits.py [--threads 1,2] [--rounds 8]
    python bench/gemm_cpu_bits.py --compute-only

Writes bench/results/gemm_cpu_bits.json and bench/results/gemm_cpu_bits.md.

``--compute-only`` measures what the decode costs instead of what memory allows: the CPU time
of the calling thread (time.thread_time, one any4 thread, so time spent descheduled on a loaded
machine does not count) per call on a cache-resident 1024 x 4096 weight, the minimum over
rounds. Where a kernel is compute-bound (a machine whose DRAM outruns its cores), this ratio,
not the ratio of bytes, bounds any3/any2's speed-up over any4. Writes
bench/results/gemm_cpu_bits_compute.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import any4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_cpu_vs_torch import memory_bandwidth, time_round_robin  # noqa: E402
from machine import cpu_model, describe, header, load_average, rotation_bytes  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096)]
BATCHES = [1, 16]
GROUP = 128
FORMATS = {"any4": 4, "any3": 3, "any2": 2}
TARGETS = {(1, "any3"): 1.25, (1, "any2"): 1.6, (16, "any3"): 1.0, (16, "any2"): 1.0}
RESULTS = Path(__file__).resolve().parent / "results"


def operands(bits: int, N: int, K: int, gen: torch.Generator) -> tuple:
    """Random packed codes, a per-row bf16 table of 2^bits entries and bf16 scales."""
    L = 1 << bits
    packed = torch.randint(
        0, 256, (N, any4.packed_bytes(K, bits)), dtype=torch.uint8, generator=gen
    )
    lut = (torch.arange(L, dtype=torch.float32) - (L - 1) / 2).repeat(N, 1)
    lut = (lut + 0.1 * torch.randn(N, L, generator=gen)).to(torch.bfloat16)
    ng = -(-K // GROUP)
    scales = torch.stack(
        [0.01 + 0.001 * torch.rand(N, ng, generator=gen), 0.01 * torch.randn(N, ng, generator=gen)],
        -1,
    ).to(torch.bfloat16)
    return packed, lut, scales


DENSE = "torch bf16"  # dense x @ W.T for context


def candidates(N: int, K: int, gen: torch.Generator, rotate_bytes: int) -> dict:
    """name -> (weight operand tuples to rotate over, fn(x, operands), weight bytes)."""
    out = {}
    for fmt, bits in FORMATS.items():
        one = operands(bits, N, K, gen)
        nbytes = sum(t.numel() * t.element_size() for t in one)
        copies = max(1, -(-rotate_bytes // nbytes))
        ops = [one] + [operands(bits, N, K, gen) for _ in range(copies - 1)]
        out[fmt] = (ops, lambda x, o: any4.gemm(x, *o, GROUP), nbytes)
    nbytes = 2 * N * K
    ops = [
        (torch.randn(N, K, generator=gen).to(torch.bfloat16),)
        for _ in range(max(1, -(-rotate_bytes // nbytes)))
    ]
    out[DENSE] = (ops, lambda x, o: x @ o[0].T, nbytes)
    return out


def stored_bits(K: int) -> dict:
    """Stored bits per weight of a real quantized [64, K] weight (bf16 tables) per format."""
    w = torch.randn(64, K, generator=torch.Generator().manual_seed(0))
    out = {}
    for fmt in ("any4", "any3", "any2", "int4", "int3", "int2"):
        qt = any4.quantize(w, fmt, group_size=GROUP, dtype="bfloat16", method="lloyd", n_init=1)
        out[fmt] = qt.bits_per_weight
    return out


def compute_cost(rounds: int, calls: int = 5) -> dict:
    """Minimum thread CPU seconds per call, one any4 thread, cache-resident 1024 x 4096 weights:
    {M: {fmt: seconds}}."""
    any4.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    N, K = 1024, 4096
    ops = {fmt: operands(bits, N, K, gen) for fmt, bits in FORMATS.items()}
    out = {}
    for M in BATCHES:
        x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
        best = dict.fromkeys(ops, float("inf"))
        for _ in range(rounds):
            for fmt, o in ops.items():
                for _ in range(2):
                    any4.gemm(x, *o, GROUP)
                t = time.thread_time()
                for _ in range(calls):
                    any4.gemm(x, *o, GROUP)
                best[fmt] = min(best[fmt], (time.thread_time() - t) / calls)
        out[M] = best
    return out


def compute_only(args) -> None:
    info = {
        "cpu": cpu_model(),
        "any4": any4.__version__,
        "any4_cpu_impls": any4.build_info()["cpu_impls"],
        "load_average_before": load_average(),
        "command": " ".join(["python", "bench/gemm_cpu_bits.py", *sys.argv[1:]]),
        "cpu_seconds": compute_cost(args.rounds),
    }
    info["load_average_after"] = load_average()
    lines = [
        "# any3 / any2 vs any4: CPU time of the kernel (compute cost, not memory)",
        "",
        f"`{info['command']}` on {info['cpu']}: thread CPU time per call, 1 thread, bf16 x and "
        f"tables, G = {GROUP}, 1024 x 4096 weights (cache-resident), minimum of {args.rounds} "
        f"rounds. Load average before {info['load_average_before']}, after "
        f"{info['load_average_after']}.",
        "",
        "| M | any4 us | any3 us | any2 us | any4 / any3 | any4 / any2 |",
        "|---|---|---|---|---|---|",
    ]
    for M, t in info["cpu_seconds"].items():
        lines.append(
            f"| {M} | {t['any4'] * 1e6:.0f} | {t['any3'] * 1e6:.0f} | {t['any2'] * 1e6:.0f} | "
            f"{t['any4'] / t['any3']:.2f}x | {t['any4'] / t['any2']:.2f}x |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_cpu_bits_compute.json").write_text(json.dumps(info, indent=2))
    (args.out / "gemm_cpu_bits_compute.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--compute-only", action="store_true", help="the kernels' CPU time only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.compute_only:
        return compute_only(args)
    rotate = rotation_bytes()  # 3x the last-level cache
    info = {
        "machine": describe(),
        "threads": [int(t) for t in args.threads.split(",")],
        "group_size": GROUP,
        "rotate_bytes": rotate,
        "command": " ".join(["python", "bench/gemm_cpu_bits.py", *sys.argv[1:]]),
        "stored_bits_per_weight": {K: stored_bits(K) for K in (4096, 14336)},
        "bandwidth": {},
        "results": [],
    }
    print(header(info["machine"]), flush=True)
    gen = torch.Generator().manual_seed(0)
    for threads in info["threads"]:
        any4.set_num_threads(threads)
        torch.set_num_threads(threads)
        bw = info["bandwidth"][threads] = memory_bandwidth()
        print(
            f"{threads} threads: memory read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s"
        )
        for N, K in SHAPES:
            cands = candidates(N, K, gen, rotate)
            for M in BATCHES:
                x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
                med, best = time_round_robin(cands, x, args.rounds, 4.0 * args.rounds)
                for name in cands:
                    nbytes = cands[name][2]
                    row = {
                        "threads": threads,
                        "N": N,
                        "K": K,
                        "M": M,
                        "fmt": name,
                        "median_s": med[name],
                        "min_s": best[name],
                        "weight_bytes": nbytes,
                        "weight_gbps": nbytes / med[name] / 1e9,
                        "speedup_vs_any4": med["any4"] / med[name],
                        "speedup_vs_any4_min": best["any4"] / best[name],
                    }
                    info["results"].append(row)
                    print(
                        f"{threads}t {N}x{K} M={M} {name}: {med[name] * 1e3:.3f} ms, "
                        f"{row['weight_gbps']:.1f} GB/s, {row['speedup_vs_any4']:.2f}x any4 "
                        f"(minima {row['speedup_vs_any4_min']:.2f}x)",
                        flush=True,
                    )
            del cands
    info["load_average_after"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_cpu_bits.json").write_text(json.dumps(info, indent=2))
    (args.out / "gemm_cpu_bits.md").write_text(markdown(info))
    print(markdown(info))


def markdown(info: dict) -> str:
    m = info["machine"]
    lines = [
        "# any3 / any2 vs any4, CPU, weights from DRAM",
        "",
        f"`{info['command']}`, group size {info['group_size']}, bf16 x and tables. Machine: "
        f"{header(m)} (before); load average after {info['load_average_after']}.",
        "",
        "Memory bandwidth in the same run (torch, 256 MiB): "
        + "; ".join(
            f"{t} threads read {b['read_gbps']:.1f} GB/s, copy {b['copy_gbps']:.1f} GB/s"
            for t, b in info["bandwidth"].items()
        )
        + ".",
        "",
        "Speed-ups are ratios of the medians in the same round robin; the ratio of the minima "
        "(the least disturbed calls, which matter on a loaded machine) is given beside them, "
        "the target judged on the median.",
        "",
        "| threads | N x K | M | format | ms / call | weight GB/s | speed-up vs any4 | "
        "(minima) | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in info["results"]:
        t = TARGETS.get((r["M"], r["fmt"]))
        goal = (
            "" if t is None else f">= {t:.2f}x: {'met' if r['speedup_vs_any4'] >= t else 'NOT met'}"
        )
        lines.append(
            f"| {r['threads']} | {r['N']}x{r['K']} | {r['M']} | {r['fmt']} | "
            f"{r['median_s'] * 1e3:.3f} | {r['weight_gbps']:.1f} | {r['speedup_vs_any4']:.2f}x | "
            f"{r['speedup_vs_any4_min']:.2f}x | {goal} |"
        )
    lines += ["", "Stored bits per weight (codes + per-row bf16 table + bf16 scales, G = 128):", ""]
    lines += ["| K | " + " | ".join(info["stored_bits_per_weight"][4096]) + " |"]
    lines += ["|---|" + "---|" * len(info["stored_bits_per_weight"][4096])]
    for K, bits in info["stored_bits_per_weight"].items():
        lines.append(f"| {K} | " + " | ".join(f"{v:.3f}" for v in bits.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
