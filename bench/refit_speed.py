"""Speed of the output-error table refit (any4.refit, issue 17) on the built-in model: the wall
time of quantize_model with refit="none" (the default), "lut+zero" and "lut" in one process, same
calibration sample, G=128; optionally the per-layer output-error ratio (after / before the refit,
on the calibration H) of four blocks, next to the previous implementation's ratios measured on the
same layers (bench/results/refit_old_layers.json, from the code at c5fa67f).

    flock -x /work/wt/bench.lock python bench/refit_speed.py --threads 2 --layers
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import any4
import any4.model as model_module
from any4.builtin import load_builtin
from any4.quantize import QuantizedTensor
from any4.refit import refit_table

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = (0, 10, 20, 29)


def timed(model, tok, text, refit: str, skip=("lm_head",)) -> float:
    m = copy.deepcopy(model)
    t = time.perf_counter()
    any4.quantize_model(m, "any4", 128, text, tokenizer=tok, refit=refit, skip=skip, progress=False)
    return time.perf_counter() - t


def layer_ratios(model, tok, text) -> dict:
    """{layer|mode: after/before} of the current refit on the blocks in BLOCKS (the same k-means
    result and H the quantizer hands to the refit)."""
    keep = tuple(f"model.layers.{b}." for b in BLOCKS)
    skip = ["lm_head"] + [
        f"model.layers.{i}.*" for i in range(30) if f"model.layers.{i}." not in keep
    ]
    names = {m: n for n, m in model.named_modules()}
    out = {}
    real = model_module.refit_layer

    def spy(q, linear, H, *, zero=False):
        qt = QuantizedTensor(
            q.packed, q.lut, q.scales, (q.out_features, q.in_features), q.fmt, q.group_size
        )
        for mode, z in (("lut", False), ("lut+zero", True)):
            t = time.perf_counter()
            _, info = refit_table(linear.weight.detach(), qt, H, zero=z)
            out[f"{names[linear]}|{mode}"] = {
                "ratio": info["after"] / info["before"],
                "seconds": time.perf_counter() - t,
            }
        return q

    model_module.refit_layer = spy
    try:
        any4.quantize_model(
            model, "any4", 128, text, tokenizer=tok, refit="lut", skip=skip, progress=False
        )
    finally:
        model_module.refit_layer = real
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", action="store_true", help="also the per-layer error ratios")
    p.add_argument("--out", default=os.path.join(HERE, "results", "refit_speed"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    any4.set_num_threads(args.threads)
    model, tok = load_builtin()
    text = "default"  # the default calibration (any4.calibration.default_ids)
    load = [os.getloadavg()]
    timed(model, tok, text, "none", skip=["lm_head", "model.layers.[1-9]*"])  # warm-up (one block)
    rows = []
    for refit in ("none", "lut+zero", "lut", "none"):
        s = timed(model, tok, text, refit)
        rows.append({"refit": refit, "seconds": round(s, 2), "load_average": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    load.append(os.getloadavg())
    base = sum(r["seconds"] for r in rows if r["refit"] == "none") / 2
    out = {
        "command": "python bench/refit_speed.py "
        + ("--layers " if args.layers else "")
        + f"--threads {args.threads}",
        "threads": args.threads,
        "load_average_start_end": load,
        "rows": rows,
        "default_seconds_mean": base,
    }
    if args.layers:
        out["layers"] = layer_ratios(model, tok, text)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    lines = [
        "### refit speed, built-in model, any4 G=128, default calibration",
        "",
        f"threads {args.threads}; load average start {[round(x, 2) for x in load[0]]}, end "
        f"{[round(x, 2) for x in load[1]]}; `{out['command']}`",
        "",
        "| refit | quantize s | / default (mean of the two default runs) | load |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['refit']} | {r['seconds']:.1f} | {r['seconds'] / base:.2f} | {r['load_average']:.1f} |"
        )
    if args.layers:
        old_path = os.path.join(HERE, "results", "refit_old_layers.json")
        old = json.load(open(old_path, encoding="utf-8")) if os.path.exists(old_path) else {}
        lines += [
            "",
            "Per-layer output error after / before the refit (calibration H; old = the previous "
            "implementation, rank-32 eigh factor, and with the exact H, same layers and k-means result):",
            "",
            "| layer | mode | new | old rank 32 | old exact H | new s | old rank 32 s |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, v in out["layers"].items():
            name, mode = key.split("|")
            o32, oex = old.get(f"{key}|32", {}), old.get(f"{key}|None", {})
            lines.append(
                f"| {name.replace('model.layers.', '')} | {mode} | {v['ratio']:.4f} | "
                f"{o32.get('ratio', float('nan')):.4f} | {oex.get('ratio', float('nan')):.4f} | "
                f"{v['seconds']:.2f} | {o32.get('seconds', float('nan')):.2f} |"
            )
        for mode in ("lut", "lut+zero"):
            new = [v["ratio"] for k, v in out["layers"].items() if k.endswith("|" + mode)]
            o32 = [v["ratio"] for k, v in old.items() if k.endswith(f"|{mode}|32")]
            oex = [v["ratio"] for k, v in old.items() if k.endswith(f"|{mode}|None")]
            mean = lambda x: sum(x) / len(x) if x else float("nan")  # noqa: E731
            lines.append(
                f"| mean | {mode} | {mean(new):.4f} | {mean(o32):.4f} | {mean(oex):.4f} | | |"
            )
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
