"""Thread sharing with PyTorch: batch-1 matmuls right after a PyTorch op, in a default process.

In a model, every matmul follows PyTorch ops (norms, attention, activations) whose OpenMP workers,
with the default OMP_WAIT_POLICY, keep spinning on the cores afterwards. This measures that
situation directly: each step runs one parallel PyTorch op (an elementwise op over 256K floats)
and then the timed matmul, weights rotating from DRAM (> 2x the last-level cache). Candidates:
any4.gemm (any4 format, G=128) with any4's threads on its own pool ("pool", the default) and
on PyTorch's OpenMP team ("openmp", ANY4_PARALLEL=openmp, any4.threads), torch's int4 CPU kernel
(_weight_int4pack_mm_for_cpu) and dense x @ W.T in bf16 and fp32. Round-robin, median of the
timed matmuls; no environment variables are set (run it without OMP_WAIT_POLICY).

    python bench/threads_cpu.py [--shape 4096x4096] [--rounds 12] [--out bench/results]

Writes threads_cpu.json and threads_cpu.md.
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

GROUP = 128
RESULTS = Path(__file__).resolve().parent / "results"


def any4_weights(N: int, K: int, gen: torch.Generator) -> tuple:
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    lut = (torch.arange(16.0) - 7.5 + 0.1 * torch.randn(N, 16, generator=gen)).to(torch.bfloat16)
    scales = torch.stack([0.01 + 0.001 * torch.rand(N, K // GROUP, generator=gen),
                          0.01 * torch.randn(N, K // GROUP, generator=gen)], -1).to(torch.bfloat16)  # fmt: skip
    return packed, lut, scales


def torch_int4_weights(N: int, K: int, gen: torch.Generator) -> tuple:
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=gen)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([0.01 + 0.001 * torch.rand(K // GROUP, N, generator=gen),
                      0.01 * torch.randn(K // GROUP, N, generator=gen)], -1).to(torch.bfloat16)  # fmt: skip
    return w, sz


def nbytes(ops: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in ops)


def rotation(make, rotate: int) -> list:
    one = make()
    return [one] + [make() for _ in range(max(1, -(-rotate // nbytes(one))) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x4096", help="N x K of the weight")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per candidate per round")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    N, K = (int(v) for v in args.shape.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    machine = describe()
    rotate = machine["rotation_bytes"]
    print(header(machine), flush=True)

    a4 = rotation(lambda: any4_weights(N, K, gen), rotate)
    ti = rotation(lambda: torch_int4_weights(N, K, gen), rotate)
    bf = rotation(lambda: (torch.randn(N, K, generator=gen).to(torch.bfloat16),), rotate)
    f32 = rotation(lambda: (torch.randn(N, K, generator=gen),), rotate)
    xb = torch.randn(1, K, generator=gen).to(torch.bfloat16)
    xf = xb.float()
    act = torch.randn(1 << 18, generator=gen)  # the PyTorch op before each matmul (parallel)
    act_out = torch.empty_like(act)

    def use(backend: str) -> None:
        if backend == "pool":
            any4.threads.use_thread_pool()
        elif not any4.threads.use_torch_openmp(torch):
            sys.exit("torch's OpenMP runtime was not found; nothing to compare")

    cands = {
        "any4 (pool)": ("pool", a4, lambda o: any4.gemm(xb, *o, GROUP)),
        "any4 (openmp)": ("openmp", a4, lambda o: any4.gemm(xb, *o, GROUP)),
        "any4 fp32 x (pool)": ("pool", a4, lambda o: any4.gemm(xf, *o, GROUP)),
        "any4 fp32 x (openmp)": ("openmp", a4, lambda o: any4.gemm(xf, *o, GROUP)),
        "torch int4": ("openmp", ti, lambda o: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, o[0], GROUP, o[1])),
        "torch bf16": ("openmp", bf, lambda o: xb @ o[0].T),
        "torch fp32": ("openmp", f32, lambda o: xf @ o[0].T),
    }  # fmt: skip
    times: dict = {name: [] for name in cands}
    calls = dict.fromkeys(cands, 0)
    for _ in range(args.rounds):
        for name, (backend, ops, fn) in cands.items():
            use(backend)
            for step in range(args.steps + 4):  # 4 untimed steps first
                torch.mul(act, 1.0001, out=act_out)
                o = ops[calls[name] % len(ops)]
                calls[name] += 1
                t = time.perf_counter()
                fn(o)
                if step >= 4:
                    times[name].append(time.perf_counter() - t)
    any4.threads.use_torch_openmp(torch)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    machine["load_average_after"] = describe()["load_average"]
    ratios = {
        f"{a} vs {b}": ms[b] / ms[a]
        for a in ("any4 (pool)", "any4 (openmp)")
        for b in ("torch int4", "torch bf16")
    }
    ratios.update({f"{a} vs torch fp32": ms["torch fp32"] / ms[a]
                   for a in ("any4 fp32 x (pool)", "any4 fp32 x (openmp)")})  # fmt: skip
    command = " ".join(["python", "bench/threads_cpu.py", *sys.argv[1:]])
    result = {"machine": machine, "shape": [N, K], "group_size": GROUP, "M": 1,
              "threads": torch.get_num_threads(), "ms": ms, "ratios": ratios, "command": command}  # fmt: skip
    for name, v in ms.items():
        print(f"{name:<22} {v:.3f} ms")
    for name, v in ratios.items():
        print(f"{name:<34} {v:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Batch-1 matmul right after a PyTorch op (default OpenMP settings)",
        "",
        f"Command: `{command}`. {header(machine)}; load average after "
        f"{machine['load_average_after']}. {N}x{K}, G={GROUP}, M=1, "
        f"{result['threads']} threads. Median ms of the matmul that follows a parallel PyTorch op; "
        "ratio = torch time / any4 time (same run).",
        "",
        "| candidate | ms |",
        "|---|---|",
        *(f"| {n} | {v:.3f} |" for n, v in ms.items()),
        "",
        "| any4 vs | ratio |",
        "|---|---|",
        *(f"| {n} | {v:.2f}x |" for n, v in ratios.items()),
        "",
    ]
    (args.out / "threads_cpu.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'threads_cpu.md'}")


if __name__ == "__main__":
    main()
