"""CPU matmul on quantized weights: any4.gemm against PyTorch, measured in the same run.

Compared, per shape N x K (SPEC §7), batch M and activation dtype (bf16, fp32):
  any4.gemm with the any4 (per-row table), nf4 and int4 (shared table) formats, group size 128;
  torch.ops.aten._weight_int4pack_mm_for_cpu (PyTorch's int4 CPU kernel; weights from
  _convert_weight_to_int4pack_for_cpu, scale/zero [K/G, N, 2] in x's dtype, G = 128);
  torch x @ W.T with a dense W in bf16 and in fp32 (x converted), for every M and x dtype.
Batches M 1, 4, 16 (decode) and 64, 512 (prefill; any4.gemm's impl="auto" takes the prefill path
of any4.prefill where it was measured faster). Both libraries use the same number of threads (torch.set_num_threads == any4.set_num_threads).

Two regimes. "memory": weights rotate over copies totalling 3x the last-level cache (read from
sysfs, all instances; at least 96 MiB: bench/machine.py), so every call reads its weights from DRAM, as a layer of a real model would (a batch-1 kernel is
then bound by memory bandwidth). "cache": one copy reused, for shapes whose weights fit in the
last-level cache; there the kernels' own speed shows.

Candidates are timed round-robin so that load changes on a shared machine hit all of them alike.
Each turn is steady state: 40 ms of untimed back-to-back calls, then timed back-to-back calls
(see time_round_robin for why, and bench/gemm_cpu_protocol.py for the measurements behind it);
the figure is the median. Memory-copy and memory-read bandwidth are measured in the same run.
The kernels' speed does not depend on the values, so the weights are random codes and tables of
the right shapes and dtypes.

    python bench/gemm_cpu_vs_torch.py [--threads 2,1] [--quick] [--memory-only] [--repeat 4]

--threads takes a list: each thread count is measured in the same run (one section each).
--repeat N measures the target cases (weights from memory) N more times after the sweep and
reports, per target, in how many of the runs it was met.

Writes bench/results/gemm_cpu.json and bench/results/gemm_cpu.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import describe, header, load_average, rotation_bytes

import any4

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
BATCHES = [1, 4, 16, 64, 512]
GROUP = 128
ROTATE_BYTES = rotation_bytes()  # 3x this machine's last-level cache (>= 96 MiB)
CACHE_RESIDENT_BYTES = 16 << 20  # "cache" regime only for shapes whose int4 weights fit easily
FORMATS = ("any4", "nf4", "int4")
DTYPES = (torch.bfloat16, torch.float32)
WARM_SECONDS = 0.04  # untimed back-to-back calls per turn (see time_round_robin)
TIMED_SECONDS = 0.02  # timed back-to-back calls per turn ...
TIMED_CALLS = 4  # ... and at least this many
RESULTS = Path(__file__).resolve().parent / "results"


def copies_for(nbytes: int, rotate: bool) -> int:
    return max(1, -(-ROTATE_BYTES // max(1, nbytes))) if rotate else 1


def memory_bandwidth(seconds: float = 1.0) -> dict:
    """Copy (read + write bytes) and read-only (sum) bandwidth of a 256 MiB buffer, GB/s."""
    n = 256 << 20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    words = src.view(torch.int64)

    def rate(fn, bytes_moved):
        fn()
        times = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 5:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return bytes_moved / statistics.median(times) / 1e9

    return {
        "copy_gbps": rate(lambda: dst.copy_(src), 2 * n),
        "read_gbps": rate(lambda: words.sum(), n),
    }


def any4_operands(fmt: str, N: int, K: int, dtype: torch.dtype, gen: torch.Generator):
    packed = torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8, generator=gen)
    rows = N if fmt == "any4" else 1
    lut = (torch.arange(16, dtype=torch.float32) - 7.5).repeat(rows, 1)
    lut = (lut + 0.1 * torch.randn(rows, 16, generator=gen)).to(dtype)
    n_groups = -(-K // GROUP)
    scales = torch.stack(
        [
            0.01 + 0.001 * torch.rand(N, n_groups, generator=gen),
            0.01 * torch.randn(N, n_groups, generator=gen),
        ],
        -1,
    ).to(dtype)
    return packed, lut, scales


def candidates(N: int, K: int, dtype: torch.dtype, gen: torch.Generator, rotate: bool) -> dict:
    """name -> (list of weight operand tuples to rotate over, fn(x, operands), weight bytes)."""
    out = {}
    for fmt in FORMATS:
        one = any4_operands(fmt, N, K, dtype, gen)
        nbytes = sum(t.numel() * t.element_size() for t in one)
        ops = [one] + [
            any4_operands(fmt, N, K, dtype, gen) for _ in range(copies_for(nbytes, rotate) - 1)
        ]
        out[f"any4.gemm {fmt}"] = (ops, lambda x, o: any4.gemm(x, *o, GROUP), nbytes)

    def torch_int4_operands():
        q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=gen)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack(
            [
                0.01 + 0.001 * torch.rand(K // GROUP, N, generator=gen),
                0.01 * torch.randn(K // GROUP, N, generator=gen),
            ],
            -1,
        ).to(dtype)
        return w, sz

    one = torch_int4_operands()
    nbytes = sum(t.numel() * t.element_size() for t in one)
    ops = [one] + [torch_int4_operands() for _ in range(copies_for(nbytes, rotate) - 1)]
    out["torch int4"] = (
        ops,
        lambda x, o: torch.ops.aten._weight_int4pack_mm_for_cpu(x, o[0], GROUP, o[1]),
        nbytes,
    )

    for dense in (torch.bfloat16, torch.float32):
        nbytes = N * K * torch.tensor([], dtype=dense).element_size()
        ops = [
            (torch.randn(N, K, generator=gen).to(dense),) for _ in range(copies_for(nbytes, rotate))
        ]
        out[f"torch x @ W.T ({str(dense).replace('torch.', '')})"] = (
            ops,
            lambda x, o: (x.to(o[0].dtype) @ o[0].T).to(x.dtype),
            nbytes,
        )
    return out


def time_round_robin(cands: dict, x: torch.Tensor, rounds: int, max_seconds: float) -> tuple:
    """Median and minimum seconds per call for each candidate, in steady state.

    Each round gives every candidate a turn (weights rotating across calls, as the layers of a
    model do): WARM_SECONDS of untimed back-to-back calls, then TIMED_SECONDS (at least
    TIMED_CALLS calls) of timed back-to-back calls. The warm-up matters on this kind of machine
    for two reasons, measured by bench/gemm_cpu_protocol.py: after the other library's
    turn, PyTorch's OpenMP workers keep spinning on the cores for about 25 ms and slow down
    whatever runs next; and after an idle gap of 20 ms or more the memory system is cold, so the
    first calls of a DRAM-bound kernel run up to 2x slower (a decode loop calls its matmuls back
    to back and never sees either). A candidate slower than WARM_SECONDS per call (PyTorch's
    fp32 int4 path) gets one timed call per round. Rounds stop after `rounds`, or after three
    once `max_seconds` have passed.
    """
    names = list(cands)
    est = {}
    for name in names:  # first touch: every weight copy once
        ops, fn, _ = cands[name]
        t = time.perf_counter()
        for o in ops:
            fn(x, o)
        est[name] = (time.perf_counter() - t) / len(ops)
    times = {n: [] for n in names}
    calls = dict.fromkeys(names, 0)
    start = time.perf_counter()
    for r in range(rounds):
        for name in names:
            ops, fn, _ = cands[name]
            fast = est[name] < WARM_SECONDS
            t_end = time.perf_counter() + WARM_SECONDS
            while fast and time.perf_counter() < t_end:
                fn(x, ops[calls[name] % len(ops)])
                calls[name] += 1
            t_end = time.perf_counter() + TIMED_SECONDS
            for i in itertools.count():
                if i >= (TIMED_CALLS if fast else 1) and time.perf_counter() >= t_end:
                    break
                o = ops[calls[name] % len(ops)]
                calls[name] += 1
                t = time.perf_counter()
                fn(x, o)
                times[name].append(time.perf_counter() - t)
        if r >= 2 and time.perf_counter() - start >= max_seconds:
            break
    return {n: statistics.median(v) for n, v in times.items()}, {
        n: min(v) for n, v in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=str(os.cpu_count()), help="thread counts, e.g. 2,1")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, fewer rounds")
    ap.add_argument("--memory-only", action="store_true", help="skip the cache-resident regime")
    ap.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="after the sweep, measure the target cases (weights from memory) this many more times",
    )
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes M")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    batches = [int(m) for m in args.batches.split(",")]
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds, max_s = (4, 4.0) if args.quick else (8, 8.0)
    gen = torch.Generator().manual_seed(0)

    machine = describe()
    print(header(machine), flush=True)
    info = {
        "machine": machine,
        "cpu": machine["cpu"],
        "threads": thread_counts,
        "torch": torch.__version__,
        "any4": any4.__version__,
        "any4_cpu_impls": any4.build_info()["cpu_impls"],
        "group_size": GROUP,
        "load_average_before": load_average(),
        "command": " ".join(["python", "bench/gemm_cpu_vs_torch.py", *sys.argv[1:]]),
    }
    info["bandwidth"] = {}
    for t in thread_counts:
        torch.set_num_threads(t)
        bw = info["bandwidth"][str(t)] = memory_bandwidth()
        print(f"{info['cpu']}, {t} threads, torch {torch.__version__}: copy {bw['copy_gbps']:.1f} GB/s, "
              f"read {bw['read_gbps']:.1f} GB/s; load {info['load_average_before']}")  # fmt: skip
    rows = []
    runs = [(N, K, "memory") for N, K in shapes]
    runs += [
        (N, K, "cache")
        for N, K in shapes
        if N * K // 2 <= CACHE_RESIDENT_BYTES and not args.memory_only
    ]
    # The sweep, then (--repeat) the target cases again: on a shared machine the memory
    # bandwidth available to a batch-1 kernel changes from minute to minute, so one figure per
    # target says little about how reliably it is met.
    plan = [(N, K, weights, dtype, batches, -1) for N, K, weights in runs for dtype in DTYPES]
    for rep in range(args.repeat):
        plan += [
            (N, K, "memory", dtype, sorted({M for d, M, *_ in TARGETS if d == str(dtype)[6:]}), rep)
            for N, K in TARGET_SHAPES
            if (N, K) in shapes
            for dtype in DTYPES
        ]
    repeats = []
    for N, K, weights, dtype, batches, rep in plan:
        cands = candidates(N, K, dtype, gen, rotate=weights == "memory")
        for threads, M in ((t, M) for t in thread_counts for M in batches):
            torch.set_num_threads(threads)
            any4.set_num_threads(threads)
            x = torch.randn(M, K, generator=gen).to(dtype)
            med, best = time_round_robin(cands, x, rounds, max_s)
            io = 2 * M * (K + N) * x.element_size()
            row = {"threads": threads, "N": N, "K": K, "M": M, "x_dtype": str(dtype).replace("torch.", ""), "weights": weights,
                   "ms": {n: t * 1e3 for n, t in med.items()},
                "ms_min": {n: t * 1e3 for n, t in best.items()},
                   "gbps": {n: (cands[n][2] + io) / t / 1e9 for n, t in med.items()}}  # fmt: skip
            ti = med["torch int4"]
            dense = f"torch x @ W.T ({row['x_dtype']})"  # dense in x's own dtype
            row["speedup_vs_torch_int4"] = {f: ti / med[f"any4.gemm {f}"] for f in FORMATS}
            row["speedup_vs_torch_dense"] = {f: med[dense] / med[f"any4.gemm {f}"] for f in FORMATS}
            for d in ("bfloat16", "float32"):
                row[f"speedup_vs_torch_{d}"] = {
                    f: med[f"torch x @ W.T ({d})"] / med[f"any4.gemm {f}"] for f in FORMATS
                }
            if rep >= 0:
                row["repeat"] = rep
            (rows if rep < 0 else repeats).append(row)
            print(("" if rep < 0 else f"repeat {rep}: ") + f"t={threads} {weights:<6} {N:>5}x{K:<5} M={M:<2} x={row['x_dtype']:<8} "
                  + "  ".join(f"{n} {t * 1e3:.3f}ms" for n, t in med.items())
                  + "  | any4/int4 vs torch int4: "
                  + " ".join(f"{row['speedup_vs_torch_int4'][f]:.2f}x" for f in ("any4", "int4"))
                  + f"; any4 vs dense bf16 {row['speedup_vs_torch_bfloat16']['any4']:.2f}x"
                  + f", fp32 {row['speedup_vs_torch_float32']['any4']:.2f}x", flush=True)  # fmt: skip
        del cands
    info["load_average_after"] = load_average()
    info["results"] = rows
    info["repeats"] = repeats
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemm_cpu.json").write_text(json.dumps(info, indent=1) + "\n")
    (args.out / "gemm_cpu.md").write_text(markdown(info) + "\n")
    print(f"wrote {args.out / 'gemm_cpu.json'} and {args.out / 'gemm_cpu.md'}")


# The targets: (N, K) shapes, x dtype, M, format, baseline name, required ratio.
TARGETS = [
    ("bfloat16", 1, "any4", "torch int4", 1.0),
    ("bfloat16", 16, "any4", "torch int4", 1.0),
    ("bfloat16", 1, "int4", "torch int4", 1.2),
    ("bfloat16", 16, "int4", "torch int4", 1.2),
    ("float32", 1, "any4", "torch int4", 5.0),
    ("float32", 1, "any4", "torch dense", 4.0),
]
TARGET_SHAPES = [(4096, 4096), (14336, 4096)]


def targets_table(info: dict) -> list:
    """Markdown lines: each target, per thread count and weight regime, for the target shapes."""
    repeats = info.get("repeats", [])
    n_rep = 1 + max((r["repeat"] for r in repeats), default=-1)
    lines = [
        "## Targets (ratio = torch time / any4 time, same run)",
        "",
        "| threads | weights | N x K | x | M | any4.gemm format | vs | ratio | target |"
        + (f" {n_rep} repeats: ratios | met in |" if n_rep else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if n_rep else ""),
    ]

    def same_case(a: dict, b: dict) -> bool:
        keys = ("threads", "weights", "N", "K", "x_dtype", "M")
        return all(a[k] == b[k] for k in keys)

    for r in info["results"]:
        for dtype, M, fmt, base, need in TARGETS:
            if (r["x_dtype"], r["M"]) != (dtype, M) or (r["N"], r["K"]) not in TARGET_SHAPES:
                continue
            key = "speedup_vs_torch_int4" if base == "torch int4" else "speedup_vs_torch_dense"
            ratio = r[key][fmt]
            mark = "met" if ratio >= need else "**not met**"
            line = (
                f"| {r['threads']} | {r['weights']} | {r['N']}x{r['K']} | {dtype} | {M} | {fmt} | {base} | "
                f"{ratio:.2f}x | >= {need:g}x {mark} |"
            )
            again = [q[key][fmt] for q in repeats if same_case(q, r)]
            if n_rep:
                all_runs = [ratio] + again
                met = sum(v >= need for v in all_runs)
                line += f" {', '.join(f'{v:.2f}' for v in again) or '-'} | {met} of {len(all_runs)} runs |"
            lines.append(line)
    return lines + [""]


def markdown(info: dict) -> str:
    lines = [
        "# CPU gemm: any4.gemm vs PyTorch",
        "",
        f"CPU: {info['cpu']}; threads: {info['threads']} (each: the same for torch and any4); torch {info['torch']}; "
        f"group size {info['group_size']}. Command: `{info.get('command', 'python bench/gemm_cpu_vs_torch.py')}`.",
        (f"Machine: {header(info['machine'])}." if "machine" in info else ""),
        f"Weights from **memory**: rotated over copies > {info.get('machine', {}).get('rotation_bytes', 96 << 20) >> 20} "
        "MiB, every call reads them from DRAM "
        "(what a layer of a real model does); weights in **cache**: one copy reused (shapes that "
        "fit in the last-level cache), the kernels' own speed.",
        "Memory bandwidth in the same run: "
        + "; ".join(
            f"{t} threads: copy {b['copy_gbps']:.1f} GB/s (read + write), read {b['read_gbps']:.1f} GB/s"
            for t, b in info["bandwidth"].items()
        )
        + f". Load average (1, 5, 15 min) before / after: {info['load_average_before']} / {info['load_average_after']}.",
        "Times are medians (ms) of back-to-back calls after 40 ms of untimed ones in each turn "
        "(steady state, as in a decode loop; `bench/gemm_cpu_protocol.py` shows why the warm-up "
        "is needed); ratios are torch time / any4 time (> 1: any4 faster); GB/s counts "
        "weights + x + y bytes.",
        "",
    ]
    lines += targets_table(info)
    for threads, weights, dtype in (
        (t, w, d)
        for t in info["threads"]
        for w in ("memory", "cache")
        for d in ("bfloat16", "float32")
    ):
        rows = [
            r
            for r in info["results"]
            if (r["threads"], r["weights"], r["x_dtype"]) == (threads, weights, dtype)
        ]
        if not rows:
            continue
        lines += [
            f"## {threads} thread{'s' if threads > 1 else ''}, weights in {weights}, x {dtype}",
            "",
            "| N x K | M | any4 | nf4 | int4 | torch int4 | torch bf16 | torch fp32 | any4 GB/s | "
            "any4 / torch int4 | int4 / torch int4 | any4 / torch bf16 | any4 / torch fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ms = r["ms"]
            lines.append(
                f"| {r['N']}x{r['K']} | {r['M']} | {ms['any4.gemm any4']:.3f} | {ms['any4.gemm nf4']:.3f} | "
                f"{ms['any4.gemm int4']:.3f} | {ms['torch int4']:.3f} | {ms['torch x @ W.T (bfloat16)']:.3f} | "
                f"{ms['torch x @ W.T (float32)']:.3f} | "
                f"{r['gbps']['any4.gemm any4']:.1f} | {r['speedup_vs_torch_int4']['any4']:.2f}x | "
                f"{r['speedup_vs_torch_int4']['int4']:.2f}x | {r['speedup_vs_torch_bfloat16']['any4']:.2f}x | "
                f"{r['speedup_vs_torch_float32']['any4']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
