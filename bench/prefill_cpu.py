"""Prefill batches on CPU: fused any4 kernel vs decoded panels x torch.mm vs dense matmul.

For each x dtype (fp32, bf16) and batch M, in the same run, round-robin, weights rotating from
DRAM: any4.gemm with the best fused kernel forced (impl=<isa>), any4.gemm with the prefill path
forced (impl="panels", any4.prefill), and PyTorch's dense x @ W.T in bf16 and fp32. Prints the
crossover (the smallest M from which the panel path is faster at every larger M measured): the
entry of any4.prefill.MIN_BATCH for this instruction set.

    python bench/prefill_cpu.py [--shape 4096x4096] [--batches 16,32,64,128,256,512] [--rounds 3]

Writes prefill_cpu.json and prefill_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import describe, header

import any4
from any4 import prefill

GROUP = 128
RESULTS = Path(__file__).resolve().parent / "results"


def best_kernel() -> str:
    impls = any4.build_info()["cpu_impls"]
    return [i for i in ("portable", "avx2", "avx512", "avx512bf16") if impls[i]][-1]


def rotation(make, rotate: int) -> list:
    one = make()
    size = sum(t.numel() * t.element_size() for t in one)
    return [one] + [make() for _ in range(max(1, -(-rotate // size)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--batches", default="16,32,64,128,256,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    N, K = (int(v) for v in args.shape.lower().split("x"))
    batches = [int(m) for m in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    machine = describe()
    print(header(machine), flush=True)
    rotate = machine["rotation_bytes"]
    kernel = best_kernel()

    def any4_weights():
        packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
        lut = (torch.arange(16.0) - 7.5 + 0.1 * torch.randn(N, 16, generator=gen)).bfloat16()
        scales = torch.stack([0.01 + 0.001 * torch.rand(N, K // GROUP, generator=gen),
                              0.01 * torch.randn(N, K // GROUP, generator=gen)], -1).bfloat16()  # fmt: skip
        return packed, lut, scales

    a4 = rotation(any4_weights, rotate)
    dense = {dt: rotation(lambda dt=dt: (torch.randn(N, K, generator=gen).to(dt),), rotate)
             for dt in (torch.bfloat16, torch.float32)}  # fmt: skip
    rows = []
    for x_dtype in (torch.float32, torch.bfloat16):
        for M in batches:
            x = torch.randn(M, K, generator=gen).to(x_dtype)
            cands = {
                f"any4 kernel ({kernel})": (
                    a4,
                    lambda o, x=x: any4.gemm(x, *o, GROUP, impl=kernel),
                ),
                "any4 panels": (a4, lambda o, x=x: any4.gemm(x, *o, GROUP, impl="panels")),
                "torch bf16": (dense[torch.bfloat16], lambda o, x=x: x.bfloat16() @ o[0].T),
                "torch fp32": (dense[torch.float32], lambda o, x=x: x.float() @ o[0].T),
            }
            times = {n: [] for n in cands}
            calls = 0
            for _ in range(args.rounds):
                for name, (ops, fn) in cands.items():
                    fn(ops[calls % len(ops)])  # untimed: warms this candidate's threads
                    for _ in range(2):
                        calls += 1
                        t = time.perf_counter()
                        fn(ops[calls % len(ops)])
                        times[name].append(time.perf_counter() - t)
            ms = {n: statistics.median(v) * 1e3 for n, v in times.items()}
            row = {"x_dtype": str(x_dtype)[6:], "M": M, "ms": ms}
            rows.append(row)
            print(f"x {row['x_dtype']:<8} M={M:<4} " + "  ".join(f"{n} {v:.2f}ms" for n, v in ms.items()),
                  flush=True)  # fmt: skip
    crossover = {}
    for dt in ("float32", "bfloat16"):
        rs = [r for r in rows if r["x_dtype"] == dt]
        faster = [r["ms"]["any4 panels"] < r["ms"][f"any4 kernel ({kernel})"] for r in rs]
        cut = next((i for i in range(len(rs)) if all(faster[i:])), None)
        crossover[dt] = rs[cut]["M"] if cut is not None else None
    machine["load_average_after"] = describe()["load_average"]
    command = " ".join(["python", "bench/prefill_cpu.py", *sys.argv[1:]])
    result = {"machine": machine, "shape": [N, K], "group_size": GROUP, "kernel": kernel,
              "threads": torch.get_num_threads(), "panel_bytes": prefill.PANEL_BYTES,
              "panel_compute_dtype": {dt: prefill.compute_dtype(dt) for dt in ("float32", "bfloat16")},
              "results": rows, "crossover": crossover, "command": command}  # fmt: skip
    print(f"crossover ({machine['isa']}): {crossover}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Prefill batches on CPU: fused kernel vs panels x torch.mm vs dense",
        "",
        f"Command: `{command}`. {header(machine)}; load average after "
        f"{machine['load_average_after']}. {N}x{K}, G={GROUP}, {result['threads']} threads; panels "
        f"of at most {prefill.PANEL_BYTES >> 20} MiB, computed in {result['panel_compute_dtype']}. "
        "Median ms, same run, round-robin; ratios = time / any4 panels time.",
        "",
        "| x | M | kernel | panels | torch bf16 | torch fp32 | panels vs kernel | panels vs torch fp32 "
        "| panels vs torch bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        k, p = ms[f"any4 kernel ({kernel})"], ms["any4 panels"]
        lines.append(
            f"| {r['x_dtype']} | {r['M']} | {k:.2f} | {p:.2f} | {ms['torch bf16']:.2f} | "
            f"{ms['torch fp32']:.2f} | {k / p:.2f}x | {ms['torch fp32'] / p:.2f}x | "
            f"{ms['torch bf16'] / p:.2f}x |"
        )
    lines += [
        "",
        f"Crossover (smallest M from which panels win at every larger M): {crossover}.",
        "",
    ]
    (args.out / "prefill_cpu.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'prefill_cpu.md'}")


if __name__ == "__main__":
    main()
