"""Quantization wall time of accuracy-study configs on the built-in model, in one run (issue 17's
"quantization time <= 2x today's" target). Run it alone on the machine (exclusive bench lock):

    flock -x /work/wt/bench.lock python bench/quantize_time_configs.py \
        --configs "shipped;all" --repeat 2 --out bench/results/quantize_time_configs

Configs are named as in bench/accuracy_study.py (SAMPLE[,OPTIONS]). The configs are timed in
turn (ABAB...), each on a fresh copy of the float model, with torch's default threads; the
median per config and its ratio to the first config are printed and written to PREFIX.md/json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time

import torch
from accuracy_study import config

from any4.builtin import load_builtin
from any4.eval import environment
from any4.model import quantize_model


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", default="shipped;all", help="; separated, the first is the base")
    p.add_argument("--fmt", default="any4")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="bench/results/quantize_time_configs")
    args = p.parse_args()
    names = [c for c in args.configs.split(";") if c]
    made = {n: config(n) for n in names}
    model, tok = load_builtin()
    seconds: dict = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for rep in range(args.repeat):
        for n in names:
            make, options = made[n]
            q = copy.deepcopy(model)
            start = time.perf_counter()
            quantize_model(
                q,
                args.fmt,
                args.group_size,
                make(tok),
                tokenizer=tok,
                progress=False,
                **options,
            )
            seconds[n].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
            print(f"{rep} {n}: {seconds[n][-1]:.1f} s, load {loads[-1]:.1f}", flush=True)
            del q
    base = statistics.median(seconds[names[0]])
    rows = [
        {
            "config": n,
            "seconds": s,
            "median": statistics.median(s),
            "ratio": statistics.median(s) / base,
        }
        for n, s in seconds.items()
    ]
    out = {
        "info": {
            "command": "python bench/quantize_time_configs.py "
            + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "fmt": args.fmt,
            "group_size": args.group_size,
            "torch_threads": torch.get_num_threads(),
            "load_averages": loads,
            "environment": environment(),
        },
        "rows": rows,
    }
    lines = [
        f"### quantization time, built-in model, {args.fmt} G={args.group_size} "
        f"(torch threads {torch.get_num_threads()}, load average {min(loads):.1f}-{max(loads):.1f})",
        "",
        "| config | seconds (each run) | median | ratio to " + names[0] + " |",
        "|---|---|---|---|",
    ]
    for r in rows:
        each = ", ".join(f"{x:.1f}" for x in r["seconds"])
        lines.append(f"| {r['config']} | {each} | {r['median']:.1f} | {r['ratio']:.2f} |")
    lines += ["", f"- command: {out['info']['command']}"]
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
