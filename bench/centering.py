"""SPEC §2.3: effect of storing the any4 table centred (lut - (2^b-1)/2, zero at the group
midpoint) instead of lut in [0, 2^b-1] with zero = group min, when tables are bf16.

    python bench/centering.py [--rows 1024] [--cols 4096]

Quantizes a weight matrix with fp32 tables (exact), then stores the same codes both ways in
bf16 and reports the relative weight error of the dequantized bf16 weight, against the original
weight and against the exact (fp32-table) reconstruction. Also reports any4.quantize's own bf16
result (centred + codes re-assigned after rounding).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import any4
from any4.demo import builtin_matrix


def deq(codes, lut, sc, zero, G):
    g = np.arange(codes.shape[1]) // G
    vals = np.take_along_axis(lut, codes, axis=1)
    w = vals.astype(np.float32) * sc[:, g] + zero[:, g]  # fp32 fma-like
    return torch.from_numpy(w).bfloat16().double().numpy()  # the bf16 weight the GPU multiplies


def bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().float().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args(argv)
    w, x = builtin_matrix(a.rows, a.cols)
    G = a.group_size
    stats = any4.ChannelStats()
    stats.update(x)
    q32 = any4.quantize(w, "any4", G, stats=stats, dtype="float32")
    codes = q32.codes().astype(np.int64)
    lut, sc = q32.lut, q32.scales
    mid = (lut.shape[1] - 1) / 2
    exact = deq(codes, lut, sc[..., 0], sc[..., 1], G)
    centred = deq(codes, bf16(lut), bf16(sc[..., 0]), bf16(sc[..., 1]), G)
    zero_min = sc[..., 1] - mid * sc[..., 0]
    uncentred = deq(codes, bf16(lut + mid) - 0.0, bf16(sc[..., 0]), bf16(zero_min), G)
    qt = any4.quantize(torch.from_numpy(w), "any4", G, stats=stats, dtype="bfloat16")
    ours = any4.dequantize(qt).bfloat16().double().numpy()

    def rel(u, v):
        return float(np.linalg.norm(u - v) / np.linalg.norm(v))

    print(f"{a.rows}x{a.cols}, G={G}, bf16 tables; relative weight error")
    print("| storage | vs original w | vs exact fp32-table reconstruction |")
    print("|---|---|---|")
    print(f"| exact fp32 tables (reference) | {rel(exact, w):.5f} | 0 |")
    print(
        f"| bf16, uncentred (lut in [0,15], zero=min) | {rel(uncentred, w):.5f} | {rel(uncentred, exact):.5f} |"
    )
    print(
        f"| bf16, centred (lut-7.5, zero=midpoint) | {rel(centred, w):.5f} | {rel(centred, exact):.5f} |"
    )
    print(
        f"| any4.quantize bf16 (centred + re-assigned codes) | {rel(ours, w):.5f} | {rel(ours, exact):.5f} |"
    )


if __name__ == "__main__":
    main()
