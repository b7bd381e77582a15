"""Time the any4 CUDA gemm kernels against torch bf16 ``x @ W.T`` (cuBLAS) and torch's int4
tinygemm (``torch._weight_int4pack_mm``), same run, same device (SPEC §7). Every kernel
instance is timed: int4 (arithmetic conversion) and any4 (per-row tables) weights, the three
dequantizers, one B tile (M <= 8) and two (M = 16), bf16 and (at M = 1, 16) fp16.

Shapes N x K: Llama-3-8B 4096x4096, 1024x4096, 14336x4096, 4096x14336; Llama-3-70B 8192x8192,
28672x8192, 8192x28672; batch M in {1, 2, 4, 8, 16}; group size 128; bf16 activations.

Method: each kernel call is captured ``reps`` times into a CUDA graph, cycling through enough
copies of the weight (and x) that one cycle is larger than 2x the L2 cache, so every call reads
its weight from DRAM; the graph is replayed after warm-up and each replay is timed with CUDA
events; the reported time per call is the median over replays / reps. Weights are random bytes
laid out directly in each kernel's format (timing does not depend on the values; correctness is
tested in tests/test_gemm_cuda.py).

    python bench/gemm_cuda_bench.py --out DIR [--quick] [--budget-s 200]

Writes DIR/gemm_cuda_bench.json (one record per kernel x shape x M) and DIR/gemm_cuda_bench.md
(time per call in µs and speed-up over bf16 cuBLAS = bf16 time / kernel time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from functools import partial

import torch

import any4
from any4._core import C
from any4.cuda import gemm_gpu
from any4.pack_gpu import GpuWeight, gpu_layout_sizes

SHAPES = [
    ("L3-8B qkv/o", 4096, 4096),
    ("L3-8B kv", 1024, 4096),
    ("L3-8B up", 14336, 4096),
    ("L3-8B down", 4096, 14336),
    ("L3-70B o", 8192, 8192),
    ("L3-70B up", 28672, 8192),
    ("L3-70B down", 8192, 28672),
]
BATCHES = [1, 2, 4, 8, 16]
G = 128


_STREAM = None


def time_graph(fn_list, warmup=3, replays=15):
    """Median time (µs) of one call, from a CUDA graph of all calls in fn_list (replayed
    ``replays`` times after ``warmup``; fewer when one replay is slower than 20 ms)."""
    global _STREAM
    if _STREAM is None:
        _STREAM = torch.cuda.Stream()
    stream = _STREAM
    with torch.cuda.stream(stream):
        for fn in fn_list:  # warm-up outside capture (allocations, split-K scratch, plans)
            fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for fn in fn_list:
            fn()
    t0 = time.perf_counter()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    if (time.perf_counter() - t0) / warmup > 0.02:
        replays = 3
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fn_list))
    del graph
    return statistics.median(times)


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, -(-2 * l2 // max(nbytes, 1)))


def random_gpu_weight(N, K, lut_shared, arith_neg2, dev):
    sizes = gpu_layout_sizes(N, K, G)
    codes = torch.randint(
        0, 256, (sizes["n_tiles"], sizes["k_chunks"], 32, 16), dtype=torch.uint8, device=dev
    )
    scales = (
        torch.rand(sizes["n_tiles"], sizes["n_groups_pad"], 8, 4, device=dev) * 0.02
    ).bfloat16()
    lut = torch.randint(0, 256, (sizes["N_pad"], 32), dtype=torch.uint8, device=dev)
    lut[:, 16:] = 0x3F  # keep table values finite and O(1) (high byte of bf16 ~ 0.5..1)
    return GpuWeight(codes, scales, lut, (N, K), G, 16, lut_shared, arith_neg2)


def int4_neg2() -> int:
    table = torch.arange(16, dtype=torch.float32) - 7.5
    return int(C.gpu_arith_constant(table.data_ptr(), 1, 16, 0, 2))


def bench_shape(name, N, K, batches, l2, dev, records, deadline):
    bf16_bytes = N * K * 2
    q_bytes = N * K // 2 + N * (K // G) * 4 + N * 32
    n_bf16 = copies_for(bf16_bytes, l2)
    n_q = copies_for(q_bytes, l2)
    torch.manual_seed(0)
    W = [torch.randn(N, K, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(n_bf16)]
    neg2 = int4_neg2()
    w_int4 = [random_gpu_weight(N, K, True, neg2, dev) for _ in range(n_q)]
    w_any4 = [random_gpu_weight(N, K, False, -1, dev) for _ in range(n_q)]
    packed = [torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev) for _ in range(n_q)]
    lut_rows = torch.randn(N, 16, dtype=torch.bfloat16, device=dev)
    scales_st = torch.rand(N, K // G, 2, device=dev).bfloat16()
    tiny = None
    try:
        tiny = [torch.ops.aten._convert_weight_to_int4pack(p, 8) for p in packed]
        tiny_sz = (torch.rand(K // G, N, 2, device=dev) * 0.02).bfloat16()
    except Exception as e:  # noqa: BLE001 - record and go on without this baseline
        print(f"torch int4 tinygemm unavailable: {e!r}", file=sys.stderr)

    for M in batches:
        if time.time() > deadline:
            print("time budget reached; stopping", file=sys.stderr)
            return False
        nx = max(n_bf16, n_q)
        xs = [torch.randn(M, K, dtype=torch.bfloat16, device=dev) for _ in range(nx)]
        reps = max(nx, 20)
        kernels = {
            "bf16 cuBLAS": [
                partial(torch.nn.functional.linear, xs[i % nx], W[i % n_bf16]) for i in range(reps)
            ],
        }
        if tiny is not None:
            kernels["torch int4 tinygemm"] = [
                partial(torch.ops.aten._weight_int4pack_mm, xs[i % nx], tiny[i % n_q], G, tiny_sz)
                for i in range(reps)
            ]
        for dq in ("arith", "lut_reg", "lut_smem"):
            kernels[f"any4 int4 {dq}"] = [
                partial(gemm_gpu, xs[i % nx], w_int4[i % n_q], dequant=dq) for i in range(reps)
            ]
        for dq in ("lut_reg", "lut_smem"):
            kernels[f"any4 any4 {dq}"] = [
                partial(gemm_gpu, xs[i % nx], w_any4[i % n_q], dequant=dq) for i in range(reps)
            ]
        if M == 1:
            kernels["any4 storage-layout (no tensor cores)"] = [
                partial(any4.gemm, xs[i % nx], packed[i % n_q], lut_rows, scales_st, G)
                for i in range(reps)
            ]
        if M in (1, 16):
            # fp16 instances of the kernel (same weights, scales read as fp16, fp16 activations)
            xs16 = [x.half() for x in xs]
            for wname, ws, dqs in (
                ("int4", w_int4, ("arith",)),
                ("any4", w_any4, ("lut_reg", "lut_smem")),
            ):
                ws16 = [replace(w, scales=w.scales.view(torch.float16)) for w in ws]
                for dq in dqs:
                    kernels[f"any4 {wname} {dq} fp16"] = [
                        partial(gemm_gpu, xs16[i % nx], ws16[i % n_q], dequant=dq)
                        for i in range(reps)
                    ]
        base = None
        for kname, fns in kernels.items():
            rec = {"shape": name, "N": N, "K": K, "M": M, "kernel": kname}
            try:
                us = time_graph(fns)
                rec["us"] = us
                moved = (
                    (bf16_bytes if kname.startswith("bf16") else q_bytes) + M * K * 2 + M * N * 2
                )
                rec["GBps"] = moved / (us * 1e-6) / 1e9
                if kname == "bf16 cuBLAS":
                    base = us
                rec["speedup_vs_bf16"] = base / us if base else None
            except Exception as e:  # noqa: BLE001 - one failing kernel must not stop the run
                rec["error"] = repr(e)
                traceback.print_exc()
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return True


def write(records, info, out):
    with open(os.path.join(out, "gemm_cuda_bench.json"), "w") as f:
        json.dump({"info": info, "records": records}, f, indent=1)
    kernels = []
    for r in records:
        if r["kernel"] not in kernels:
            kernels.append(r["kernel"])
    lines = [
        f"# any4 CUDA gemm benchmark ({info.get('device')}, torch {info.get('torch')})",
        "",
        "Time per call in µs (median, CUDA graph, weights rotated > 2x L2), and in parentheses the "
        "speed-up over bf16 cuBLAS x @ W.T measured in the same run. Group size 128, bf16.",
        "",
        "| shape (N x K) | M | " + " | ".join(kernels) + " |",
        "|---|---|" + "---|" * len(kernels),
    ]
    rows = {}
    for r in records:
        rows.setdefault((r["shape"], r["N"], r["K"], r["M"]), {})[r["kernel"]] = r
    for (shape, N, K, M), ks in rows.items():
        cells = []
        for k in kernels:
            r = ks.get(k)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("error")
            else:
                sp = r.get("speedup_vs_bf16")
                cells.append(f"{r['us']:.1f} ({sp:.2f}x)" if sp else f"{r['us']:.1f}")
        lines.append(f"| {shape} {N}x{K} | {M} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "gemm_cuda_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16}")
    ap.add_argument(
        "--budget-s", type=float, default=240.0, help="stop starting new work after this"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not any4.cuda_available():
        print("no CUDA device / CUDA build", file=sys.stderr)
        return 2
    deadline = time.time() + args.budget_s
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    info = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "l2_bytes": l2,
        "torch": torch.__version__,
        "any4": any4.build_info(),
        "group_size": G,
    }
    shapes = SHAPES[:2] if args.quick else SHAPES
    batches = [1, 16] if args.quick else BATCHES
    records: list = []
    try:
        for name, N, K in shapes:
            done = bench_shape(name, N, K, batches, l2, dev, records, deadline)
            torch.cuda.empty_cache()  # the shape's weights are gone with bench_shape's frame
            write(records, info, args.out)
            if not done:
                break
    finally:
        write(records, info, args.out)
    return 0 if records and not any("error" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
