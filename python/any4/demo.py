"""Quantize a built-in weight matrix in every format and print the error table.

    python -m any4.demo [--rows 1024] [--cols 4096] [--group-size 128]

The matrix is synthetic but shaped like an LLM weight (heavy-tailed rows, a few outlier
channels), and the activations used for calibration statistics and output error have uneven
channel scales, as in real models. No network, no data files.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import dequantize, quantize
from .stats import ChannelStats

FORMATS = ("int4", "fp4", "nf4", "any4", "any3", "any2")


def builtin_matrix(rows: int, cols: int, seed: int = 0):
    """(weight [rows, cols] float32, activations [512, cols] float32), deterministic."""
    rng = np.random.default_rng(seed)
    row_scale = np.exp(rng.normal(size=(rows, 1)) * 0.3)
    w = rng.standard_t(df=5, size=(rows, cols)) * 0.02 * row_scale
    w[:, rng.choice(cols, size=max(1, cols // 256), replace=False)] *= 4.0  # outlier channels
    chan = np.exp(rng.normal(size=cols) * 1.0)
    x = rng.normal(size=(512, cols)) * chan
    return w.astype(np.float32), x.astype(np.float32)


def run(rows: int = 1024, cols: int = 4096, group_size: int = 128) -> list:
    w, x = builtin_matrix(rows, cols)
    stats = ChannelStats()
    stats.update(x[:256])
    x_eval = x[256:].astype(np.float64)
    y_ref = x_eval @ w.T.astype(np.float64)
    results = []
    for fmt in FORMATS:
        t0 = time.perf_counter()
        qt = quantize(w, fmt, group_size=group_size, stats=stats, dtype="float16")
        dt = time.perf_counter() - t0
        wh = dequantize(qt).astype(np.float64)
        w_err = np.linalg.norm(wh - w) / np.linalg.norm(w)
        y_err = np.linalg.norm(x_eval @ wh.T - y_ref) / np.linalg.norm(y_ref)
        bits = qt.nbytes() * 8 / (rows * cols)
        results.append((fmt, w_err, y_err, bits, dt))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args(argv)
    res = run(a.rows, a.cols, a.group_size)
    print(
        f"built-in {a.rows}x{a.cols} matrix, group size {a.group_size}, fp16 tables, mse sample weights"
    )
    print("| format | weight rel. error | output rel. error | bits/weight | quantize s |")
    print("|---|---|---|---|---|")
    for fmt, we, ye, bits, dt in res:
        print(f"| {fmt} | {we:.4f} | {ye:.4f} | {bits:.3f} | {dt:.2f} |")


if __name__ == "__main__":
    main()
