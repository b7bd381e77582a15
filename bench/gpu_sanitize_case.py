"""A small run of every CUDA kernel variant, checked against float64, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/gpu_sanitize_case.py

Covers bf16 and fp16, the three dequantizers, one and two B tiles (M = 5, 13), several m-tiles
(M = 33), automatic and forced split-K, N and K not multiples of the tile, and the
storage-layout kernel (fp32 x, odd group size). Exit status 1 on a wrong result.
"""

import sys

import numpy as np
import torch

import any4
from any4.cuda import gemm_gpu


def ref(x, qt, K, G):
    from any4.pack import unpack

    codes = unpack(qt.packed, K).numpy().astype(np.int64)
    lut = qt.lut.double().numpy()
    rows = np.arange(codes.shape[0])[:, None] if lut.shape[0] > 1 else np.zeros_like(codes[:, :1])
    sc = qt.scales.double().numpy()
    g = np.arange(K) // G
    w = lut[rows, codes] * sc[:, g, 0] + sc[:, g, 1]
    return x.double().cpu().numpy() @ w.T


def check(y, r, tol, what):
    y = y.double().cpu().numpy()
    err = np.linalg.norm(y - r) / max(np.linalg.norm(r), 1e-30)
    ok = np.isfinite(y).all() and err < tol
    print(f"{'ok ' if ok else 'BAD'} {what}: rel err {err:.2e}")
    return ok


def main() -> int:
    if not any4.cuda_available():
        print("no CUDA device / CUDA build", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    good = True
    for dtype, tol in (("bfloat16", 1e-2), ("float16", 2e-3)):
        dt = getattr(torch, dtype)
        for fmt in ("int4", "any4"):
            N, K, G = 45, 333, 64
            qt = any4.quantize(torch.randn(N, K), fmt, group_size=G, dtype=dtype)
            w = any4.pack_for_gpu(qt).cuda()
            for M in (5, 13, 33):
                x = torch.randn(M, K).to(dt)
                r = ref(x, qt, K, G)
                for dq in (["arith"] if w.arith else []) + ["lut_reg", "lut_smem"]:
                    for splits in (0, 3):
                        y = gemm_gpu(x.cuda(), w, dequant=dq, splits=splits)
                        good &= check(y, r, tol, f"tc {dtype} {fmt} M={M} {dq} splits={splits}")
    qt = any4.quantize(torch.randn(20, 200), "any4", group_size=24, dtype="float32")
    x = torch.randn(3, 200)
    y = any4.gemm(x.cuda(), qt.packed.cuda(), qt.lut.cuda(), qt.scales.cuda())
    good &= check(y, ref(x, qt, 200, 24), 1e-5, "storage layout fp32 G=24")
    torch.cuda.synchronize()
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
