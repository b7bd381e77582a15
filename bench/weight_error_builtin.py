"""Why the formats rank as they do on the built-in model: weight and output-weighted errors.

    python bench/weight_error_builtin.py [--out bench/results/weight_error_builtin]

For every quantized Linear of SmolLM2-135M (calibration statistics from the default text):
- relative squared weight error  sum (w_hat - w)^2 / sum w^2;
- the same weighted by E[x_k^2] of the layer's input channel k (the diagonal part of the
  expected squared output error, the objective any4's "mse" weighting minimises);
- the share of that weighted error carried by the 1% of input channels with the largest E[x^2],
  and the mean |w| in those channels relative to the layer's mean |w|.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import any4
from any4.builtin import load_builtin
from any4.calibration import ActivationRecorder, calibration_ids, run_model
from any4.eval import environment
from any4.model import eligible_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-sizes", default="32,64,128")
    ap.add_argument("--formats", default="int4,fp4,nf4,any4")
    ap.add_argument("--out", default="bench/results/weight_error_builtin")
    args = ap.parse_args()

    model, tok = load_builtin()
    layers = eligible_layers(model)
    with ActivationRecorder(layers) as rec:
        run_model(model, calibration_ids("default", tok))
    rows = []
    ratios = []
    for name, lin in layers.items():
        w = lin.weight.detach().abs()
        msq = torch.from_numpy(rec.stats[name].mean_sq)
        top = msq >= torch.quantile(msq, 0.99)
        ratios.append(float(w[:, top].mean() / w.mean()))
    for G in (int(g) for g in args.group_sizes.split(",")):
        for fmt in args.formats.split(","):
            w_err = w_den = o_err = o_den = top_err = 0.0
            for name, lin in layers.items():
                w = lin.weight.detach()
                stats = rec.stats[name]
                msq = torch.from_numpy(stats.mean_sq)
                qt = any4.quantize(w, fmt, min(G, w.shape[1]), stats=stats, dtype="bfloat16")
                d2 = (any4.dequantize(qt) - w).double() ** 2
                w2 = w.double() ** 2
                per_channel = (d2 * msq).sum(0)
                top = msq >= torch.quantile(msq, 0.99)
                w_err += float(d2.sum())
                w_den += float(w2.sum())
                o_err += float(per_channel.sum())
                o_den += float((w2 * msq).sum())
                top_err += float(per_channel[top].sum())
            row = {"fmt": fmt, "group_size": G, "weight_rel_sq_err": w_err / w_den,
                   "ex2_weighted_rel_sq_err": o_err / o_den, "top1pct_channel_share": top_err / o_err}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    ratio = float(np.median(ratios))
    lines = [
        "### Weight errors on the built-in model (all 210 quantized Linear layers, bf16 tables)",
        "",
        "| format | G | rel. sq. weight error | E[x²]-weighted rel. sq. error | share of it in top-1% E[x²] channels |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['fmt']} | {r['group_size']} | {r['weight_rel_sq_err']:.5f} | "
                     f"{r['ex2_weighted_rel_sq_err']:.5f} | {r['top1pct_channel_share']:.3f} |")  # fmt: skip
    lines += ["", f"Median over layers of mean |w| in the top-1% E[x²] input channels / mean |w|: {ratio:.3f}.",
              "", "Command: `python bench/weight_error_builtin.py`"]  # fmt: skip
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(
            {"rows": rows, "top1pct_weight_ratio": ratio, "environment": environment()}, f, indent=2
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
