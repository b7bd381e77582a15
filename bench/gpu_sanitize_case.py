"""A small run of every CUDA kernel path, checked against float64, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python bench/gpu_sanitize_case.py [--smoke]

Covers the grids production shapes produce, not only toy ones: several blocks with a partly
idle last block (N = 72: 5 tiles in 2 blocks of 4 warps), an automatic split-K plan (N = 64,
K = 4096), forced splits, N and K not multiples of the tile, G = 32 and 128, bf16 and fp16,
every dequantizer, both pipeline depths, one and two B tiles (M = 5, 13), several m-tiles
(M = 33), the large-batch dequantize + matmul path (M = 80), the dense 3- and 2-bit layouts
(odd chunk counts end on a half-filled unit; forced odd splits), and the storage-layout kernel
(fp32 x, odd group size). ``--smoke`` runs a subset (a few seconds without a sanitizer).
Fixed seeds. Exit status 1 on a wrong result, 2 without a CUDA device / CUDA build.
"""

import argparse
import sys

import numpy as np
import torch

import any4
from any4.cuda import gemm_gpu

TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}


def ref(x, qt, K, G):
    from any4.pack import unpack

    codes = unpack(qt.packed, K, qt.bits).numpy().astype(np.int64)
    lut = qt.lut.double().numpy()
    rows = np.arange(codes.shape[0])[:, None] if lut.shape[0] > 1 else np.zeros_like(codes[:, :1])
    sc = qt.scales.double().numpy()
    g = np.arange(K) // G
    w = lut[rows, codes] * sc[:, g, 0] + sc[:, g, 1]
    return x.double().cpu().numpy().reshape(-1, K) @ w.T


def check(y, r, tol, what):
    y = y.double().cpu().numpy().reshape(r.shape)
    err = np.linalg.norm(y - r) / max(np.linalg.norm(r), 1e-30)
    ok = bool(np.isfinite(y).all() and err < tol)
    print(f"{'ok ' if ok else 'BAD'} {what}: rel err {err:.2e}", flush=True)
    return ok


def cases(smoke: bool):
    """(dtype, fmt, N, K, G, batches, stage_chunks, forced splits)"""
    if smoke:
        return [
            ("bfloat16", "any4", 72, 640, 32, (5, 33), (2,), (0,)),
            ("float16", "int4", 64, 4096, 128, (13,), (2,), (0, 3)),
            ("bfloat16", "nf4", 45, 333, 64, (1, 80), (4,), (0,)),
            ("bfloat16", "any3", 45, 333, 64, (5, 80), (4,), (0, 3)),
            ("float16", "int2", 64, 4096, 128, (13,), (2,), (0,)),
        ]
    return [
        ("bfloat16", "any4", 72, 640, 32, (5, 13, 33, 80), (2, 4), (0, 3)),
        ("float16", "any4", 72, 640, 32, (5, 33), (2,), (0,)),
        ("bfloat16", "int4", 64, 4096, 128, (1, 13), (2, 4), (0,)),
        ("float16", "int4", 64, 4096, 128, (5, 80), (2,), (0, 3)),
        ("bfloat16", "nf4", 45, 333, 64, (5, 13), (2, 4), (0, 3)),
        ("float16", "any3", 45, 333, 64, (13,), (2,), (0,)),
        ("bfloat16", "any3", 72, 640, 32, (5, 33, 80), (2, 4), (0, 3)),
        ("float16", "int2", 64, 4096, 128, (1, 13), (2,), (0, 5)),
        ("bfloat16", "any2", 45, 333, 64, (13,), (4,), (0, 3)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a subset (quick)")
    args = ap.parse_args()
    if not any4.cuda_available():
        print("no CUDA device / CUDA build", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    good = True
    for dtype, fmt, N, K, G, batches, stages, forced in cases(args.smoke):
        dt = getattr(torch, dtype)
        qt = any4.quantize(torch.randn(N, K), fmt, group_size=G, dtype=dtype)
        w = any4.pack_for_gpu(qt).cuda()
        dqs = (["arith"] if w.arith else []) + ["lut_reg", "lut_smem"]
        for M in batches:
            x = torch.randn(M, K).to(dt)
            r = ref(x, qt, K, G)
            xc = x.cuda()
            for dq in dqs:
                for sc in stages:
                    for splits in forced:
                        y = torch.full((M, N), float("nan"), dtype=dt, device="cuda")
                        gemm_gpu(xc, w, dequant=dq, splits=splits, stage_chunks=sc, out=y)
                        what = f"tc {dtype} {fmt} ({w.bits}-bit) N={N} K={K} G={G} M={M} {dq} stages={sc} splits={splits}"
                        good &= check(y, r, TOL[dtype], what)
            if M > 64 or args.smoke:
                y = gemm_gpu(xc, w, impl="dequant_matmul")
                good &= check(y, r, TOL[dtype], f"dequant+matmul {dtype} {fmt} N={N} K={K} M={M}")
    qt = any4.quantize(torch.randn(20, 200), "any4", group_size=24, dtype="float32")
    x = torch.randn(3, 200)
    y = any4.gemm(x.cuda(), qt.packed.cuda(), qt.lut.cuda(), qt.scales.cuda())
    good &= check(y, ref(x, qt, 200, 24), TOL["float32"], "storage layout fp32 G=24")
    torch.cuda.synchronize()
    print("all ok" if good else "FAILURES", flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
