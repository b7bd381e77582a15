"""Time the any4 CUDA gemm kernels against torch bf16 ``x @ W.T`` (cuBLAS) and torch's int4
tinygemm (``torch._weight_int4pack_mm``), same run, same device (SPEC §7). Every kernel
instance is timed: int4 (arithmetic conversion) and any4 (per-row tables) weights, the three
dequantizers, one B tile (M <= 8) and two (M = 16), bf16 and (at M = 1, 16) fp16, and the
variants the device session should decide on: the deep register pipeline (stage_chunks=4),
the one-wave split-K plan (split_waves=1, only where it differs from the default two-wave
plan) and, at M = 128, the tensor-core kernel against the dequantize + cuBLAS path. The dense
3- and 2-bit layouts ("any4 any3 ...", "any4 int2 ...": per-row 8/4-entry tables and int tables)
at every M <= 16, to compare with the 4-bit kernels on bytes moved.

Shapes N x K: Llama-3-8B 4096x4096, 1024x4096, 14336x4096, 4096x14336; Llama-3-70B 8192x8192,
28672x8192, 8192x28672; batch M in {1, 2, 4, 8, 16} (+ 128); group size 128; bf16 activations.

Correctness first: for every shape, each any4 kernel's output on the first weight copy is
compared with x @ W^T, W dequantized independently (unpack_from_gpu on the CPU, then float32
torch arithmetic); a shape whose kernels disagree (relative error > 1e-2) is recorded as an
error and not timed.

Method: each kernel call is captured ``reps`` times into a CUDA graph, cycling through enough
copies of the weight (and x) that one cycle is larger than 2x the L2 cache, so every call reads
its weight from DRAM; the graph is replayed after warm-up and each replay is timed with CUDA
events; the reported time per call is the median over replays / reps. Weights are random codes
and scales laid out directly in the GPU format (the int4 weights carry the int4 table, so the
arithmetic and table dequantizers agree).

    python bench/gemm_cuda_bench.py --out DIR [--quick] [--merge] [--budget-s 200]

Writes DIR/gemm_cuda_bench.json (one record per kernel x shape x M) and DIR/gemm_cuda_bench.md
(time per call in µs and speed-up over bf16 cuBLAS = bf16 time / kernel time). ``--merge``
keeps the records already in DIR/gemm_cuda_bench.json and skips what they measured (the full
run after a --quick run continues where it stopped).
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
from any4.pack_gpu import GpuWeight, gpu_codes_shape, gpu_layout_sizes, unpack_from_gpu

SHAPES = [
    ("L3-8B qkv/o", 4096, 4096),
    ("L3-8B kv", 1024, 4096),
    ("L3-8B up", 14336, 4096),
    ("L3-8B down", 4096, 14336),
    ("L3-70B o", 8192, 8192),
    ("L3-70B up", 28672, 8192),
    ("L3-70B down", 8192, 28672),
]
BATCHES = [1, 2, 4, 8, 16, 128]
# --quick: a small and a large shape at M = 1, 16 and 128 -- where the deep pipeline, the
# two-wave split-K plan (14336x4096 at M = 16) and dequantize + cuBLAS (M = 128) are decided.
QUICK_SHAPES = ("L3-8B qkv/o", "L3-8B up")
QUICK_BATCHES = [1, 16, 128]
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


def random_gpu_weight(N, K, int4_table, dev, bits=4):
    """Random codes and (scale, zero) in the GPU layout of ``bits``-bit codes; the int table
    (c - (L-1)/2, so the arithmetic dequantizer applies) or random per-row tables of L = 2^bits
    entries (zero-padded to 16). Stored as if from nibbles (storage_bits=4), so that
    unpack_from_gpu gives 4-bit codes for dequantized()."""
    L = 1 << bits
    sizes = gpu_layout_sizes(N, K, G, bits)
    codes = torch.randint(0, 256, gpu_codes_shape(N, K, bits), dtype=torch.uint8, device=dev)
    scales = (
        torch.rand(sizes["n_tiles"], sizes["n_groups_pad"], 8, 4, device=dev) * 0.02
    ).bfloat16()
    if int4_table:
        table = (torch.arange(L, dtype=torch.float32) - (L - 1) / 2).bfloat16().view(torch.int16)
        entries = table.to(dev).expand(sizes["N_pad"], L)
    else:
        entries = torch.randn(sizes["N_pad"], L, device=dev).bfloat16().view(torch.int16)
    entries = torch.nn.functional.pad(entries, (0, 16 - L))
    lut = torch.cat([(entries & 0xFF), (entries >> 8) & 0xFF], dim=1).to(torch.uint8).contiguous()
    neg2 = int4_neg2(L) if int4_table else -1
    return GpuWeight(codes, scales, lut, (N, K), G, L, int4_table, neg2, 4, bits)


def int4_neg2(L: int = 16) -> int:
    table = torch.arange(L, dtype=torch.float32) - (L - 1) / 2
    return int(C.gpu_arith_constant(table.data_ptr(), 1, L, 0, 2))


def dequantized(w) -> torch.Tensor:
    """W [N, K] float32 on w's device, from the storage layout (independent of the kernels)."""
    packed, lut, scales = unpack_from_gpu(w)
    dev = w.codes.device
    N, K = w.shape
    p = packed.to(dev)
    codes = torch.stack([p & 15, p >> 4], dim=-1).reshape(N, -1)[:, :K].long()
    lut = lut.to(dev).float()
    vals = lut.expand(N, -1).gather(1, codes)
    sc = scales.to(dev).float().repeat_interleave(G, dim=1)[:, :K]
    return vals * sc[..., 0] + sc[..., 1]


def check_kernels(kernels, w_of, x, N, K):
    """Each any4 kernel's output vs x @ W^T in float32 on an independent dequantization.
    Returns {kernel name: relative error}."""
    errs = {}
    refs = {}
    for kname, fns in kernels.items():
        if not kname.startswith("any4") or "storage" in kname:
            continue
        w = w_of[kname]
        if id(w) not in refs:
            refs[id(w)] = x.float() @ dequantized(w).T
        ref = refs[id(w)]
        y = fns[0]().float()
        err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
        errs[kname] = err if torch.isfinite(y).all() else float("inf")
    return errs


def bench_shape(name, N, K, batches, l2, dev, records, deadline, done):
    bf16_bytes = N * K * 2
    q_bytes = N * K // 2 + N * (K // G) * 4 + N * 32
    n_bf16 = copies_for(bf16_bytes, l2)
    n_q = copies_for(q_bytes, l2)
    torch.manual_seed(0)
    W = [torch.randn(N, K, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(n_bf16)]
    w_int4 = [random_gpu_weight(N, K, True, dev) for _ in range(n_q)]
    w_any4 = [random_gpu_weight(N, K, False, dev) for _ in range(n_q)]
    low = {}  # dense 3/2-bit weights, each width with enough copies to leave the L2 behind
    for bits in (3, 2):
        n_b = copies_for(N * K * bits // 8 + N * (K // G) * 4 + N * 32, l2)
        for name, arith in ((f"int{bits}", True), (f"any{bits}", False)):
            low[name] = [random_gpu_weight(N, K, arith, dev, bits) for _ in range(n_b)]
    n_low = max(len(v) for v in low.values())
    packed = [torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev) for _ in range(n_q)]
    lut_rows = torch.randn(N, 16, dtype=torch.bfloat16, device=dev)
    scales_st = torch.rand(N, K // G, 2, device=dev).bfloat16()
    tiny = None
    try:
        tiny = [torch.ops.aten._convert_weight_to_int4pack(p, 8) for p in packed]
        tiny_sz = (torch.rand(K // G, N, 2, device=dev) * 0.02).bfloat16()
    except Exception as e:  # noqa: BLE001 - record and go on without this baseline
        print(f"torch int4 tinygemm unavailable: {e!r}", file=sys.stderr)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    for M in batches:
        if time.time() > deadline:
            print("time budget reached; stopping", file=sys.stderr)
            return False
        nx = max(n_bf16, n_q)
        xs = [torch.randn(M, K, dtype=torch.bfloat16, device=dev) for _ in range(nx)]
        reps = max(nx, n_low, 20)
        kernels = {
            "bf16 cuBLAS": [
                partial(torch.nn.functional.linear, xs[i % nx], W[i % n_bf16]) for i in range(reps)
            ],
        }
        w_of = {}

        add = partial(add_any4_kernel, kernels, w_of, xs, reps)

        if tiny is not None and M <= 64:
            kernels["torch int4 tinygemm"] = [
                partial(torch.ops.aten._weight_int4pack_mm, xs[i % nx], tiny[i % n_q], G, tiny_sz)
                for i in range(reps)
            ]
        if M > 64:  # prefill: the tensor-core kernel against dequantize + cuBLAS
            for impl in ("tensor_core", "dequant_matmul"):
                add(f"any4 any4 lut_reg {impl}", w_any4, impl=impl)
        else:
            for dq in ("arith", "lut_reg", "lut_smem"):
                add(f"any4 int4 {dq}", w_int4, dequant=dq)
            for dq in ("lut_reg", "lut_smem"):
                add(f"any4 any4 {dq}", w_any4, dequant=dq)
            if M in (1, 16):
                add("any4 int4 arith stages=4", w_int4, dequant="arith", stage_chunks=4)
                add("any4 any4 lut_reg stages=4", w_any4, dequant="lut_reg", stage_chunks=4)
                one = C.cuda_gemm_tc_scratch(M, N, K, 2, 1, 0, 0, 2, 1, 4)[2]
                two = C.cuda_gemm_tc_scratch(M, N, K, 2, 1, 0, 0, 2, 2, 4)[2]
                if one != two:  # the split-K plans differ for this shape
                    add("any4 any4 lut_reg waves=1", w_any4, dequant="lut_reg", split_waves=1)
            for bits in (3, 2):  # the dense 3/2-bit layouts
                add(f"any4 int{bits} arith", low[f"int{bits}"], dequant="arith")
                add(f"any4 any{bits} lut_reg", low[f"any{bits}"], dequant="lut_reg")
                if M in (1, 16):
                    add(f"any4 any{bits} lut_smem", low[f"any{bits}"], dequant="lut_smem")
                    add(
                        f"any4 any{bits} lut_reg stages=4",
                        low[f"any{bits}"],
                        dequant="lut_reg",
                        stage_chunks=4,
                    )
        if M == 1:
            kernels["any4 storage-layout (no tensor cores)"] = [
                partial(any4.gemm, xs[i % nx], packed[i % n_q], lut_rows, scales_st, G)
                for i in range(reps)
            ]
        if M in (1, 16):
            # fp16 instances of the kernel (same codes, fp16 scales/tables, fp16 activations)
            xs16 = [x.half() for x in xs]
            for wname, ws, dqs in (
                ("int4", w_int4, ("arith",)),
                ("any4", w_any4, ("lut_reg", "lut_smem")),
            ):
                ws16 = [replace(w, scales=w.scales.half(), lut=fp16_lut(w.lut)) for w in ws[:n_q]]
                if wname == "int4":
                    ws16 = [replace(w, arith_neg2=int4_neg2_fp16()) for w in ws16]
                for dq in dqs:
                    add(f"any4 {wname} {dq} fp16", ws16, x_list=xs16, dequant=dq)
        kernels = {k: v for k, v in kernels.items() if (name, M, k) not in done}
        if not kernels:
            continue
        errs = check_kernels(kernels, w_of, xs[0], N, K)
        bad = {k: e for k, e in errs.items() if not e < 1e-2}
        base = done.get((name, M, "bf16 cuBLAS"), {}).get("us")
        for kname, fns in kernels.items():
            rec = {"shape": name, "N": N, "K": K, "M": M, "kernel": kname, "sms": sms}
            if kname in errs:
                rec["rel_err"] = errs[kname]
            if kname in bad:
                rec["error"] = f"wrong result: rel err {bad[kname]:.3g} vs a dequantized matmul"
                records.append(rec)
                print(json.dumps(rec), flush=True)
                continue
            try:
                us = time_graph(fns)
                rec["us"] = us
                w_bytes = w_of[kname].nbytes() if kname in w_of else None
                if w_bytes is None:
                    w_bytes = bf16_bytes if kname.startswith("bf16") else q_bytes
                moved = w_bytes + M * K * 2 + M * N * 2
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


def add_any4_kernel(kernels, w_of, xs, reps, kname, ws, x_list=None, **kw):
    """kernels[kname] = reps calls of gemm_gpu cycling over x_list (default xs) and ws."""
    x_list = xs if x_list is None else x_list
    kernels[kname] = [
        partial(gemm_gpu, x_list[i % len(x_list)], ws[i % len(ws)], **kw) for i in range(reps)
    ]
    w_of[kname] = ws[0]


def fp16_lut(lut_bf16_bytes: torch.Tensor) -> torch.Tensor:
    """The GPU table bytes of the same entries in fp16 (low bytes 0..15, high bytes 16..31)."""
    lo, hi = lut_bf16_bytes[:, :16].to(torch.int32), lut_bf16_bytes[:, 16:].to(torch.int32)
    bits = lo | (hi << 8)
    bits = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16)
    entries = bits.view(torch.bfloat16).half().view(torch.int16)
    return torch.cat([entries & 0xFF, (entries >> 8) & 0xFF], dim=1).to(torch.uint8).contiguous()


def int4_neg2_fp16() -> int:
    table = torch.arange(16, dtype=torch.float32) - 7.5
    return int(C.gpu_arith_constant(table.data_ptr(), 1, 16, 0, 1))


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
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the shapes and batches that decide the open questions first (QUICK_*)",
    )
    ap.add_argument(
        "--merge", action="store_true", help="keep and skip what OUT/gemm_cuda_bench.json holds"
    )
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
    shapes = [sh for sh in SHAPES if sh[0] in QUICK_SHAPES] if args.quick else SHAPES
    batches = QUICK_BATCHES if args.quick else BATCHES
    records: list = []
    path = os.path.join(args.out, "gemm_cuda_bench.json")
    if args.merge and os.path.exists(path):
        with open(path) as f:
            records = [r for r in json.load(f)["records"] if "error" not in r]
    done = {(r["shape"], r["M"], r["kernel"]): r for r in records}
    try:
        for name, N, K in shapes:
            if all((name, M, "bf16 cuBLAS") in done for M in batches):
                continue  # measured by the run merged in (its any4 kernels too)
            finished = bench_shape(name, N, K, batches, l2, dev, records, deadline, done)
            torch.cuda.empty_cache()  # the shape's weights are gone with bench_shape's frame
            write(records, info, args.out)
            if not finished:
                break
    finally:
        write(records, info, args.out)
    return 0 if records and not any("error" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
