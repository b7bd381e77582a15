"""Perplexity of the built-in model with any3 / any2 codes in the dense layouts vs in nibbles.

The dense 3- and 2-bit layouts (SPEC §4) change how codes are stored, not which codes: the
model must score the same. Quantizes the built-in model (SmolLM2-135M-Instruct) once per format
(G = 128), evaluates perplexity through any4.gemm with the dense codes, then with the same codes
repacked into nibbles (the format-version-1 storage, 4-bit rows with the 8- or 4-entry tables),
on the same windows of held-out text. Only fp32 summation order may differ between the two.

    python bench/perplexity_layouts.py [--windows 2] [--formats any3,any2] [--keep]

Writes bench/results/perplexity_layouts.json and .md. ``--keep`` keeps the rows of other
formats already in that file (same text and windows), so that each format can run on its own
(about 10 minutes per format on 2 loaded cores); the table names the command of every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import any4
from any4.builtin import heldout_description, heldout_text, load_builtin
from any4.eval import make_windows, perplexity, token_ids
from any4.formats import get_format
from any4.nn import QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"


def to_nibbles(model: torch.nn.Module) -> int:
    """Repack every 3/2-bit QuantLinear's codes into nibbles in place; returns how many."""
    n = 0
    for m in model.modules():
        bits = get_format(m.fmt).bits if isinstance(m, QuantLinear) else 4
        if bits != 4:
            m.packed = any4.pack(any4.unpack(m.packed, m.in_features, bits)).contiguous()
            n += 1
    return n


def markdown(info: dict) -> str:
    """The results table."""
    lines = [
        "# Perplexity: dense 3/2-bit layouts vs the same codes in nibbles",
        "",
        f"Built-in model, G = 128, {info['windows']} x 1024 tokens of {info['text']}, "
        "any4.gemm (CPU).",
        "",
        "| format | layers | ppl dense | ppl nibbles | relative difference | command |",
        "|---|---|---|---|---|---|",
    ]
    for r in info["rows"]:
        lines.append(
            f"| {r['fmt']} | {r['layers']} | {r['ppl_dense']:.6f} | {r['ppl_nibbles']:.6f} | "
            f"{r['rel_diff']:.2e} | `{r.get('command', '')}` |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=2, help="1024-token windows")
    ap.add_argument("--formats", default="any3,any2")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep other formats' rows in --out")
    args = ap.parse_args()
    model, tok = load_builtin()
    windows = make_windows(token_ids(heldout_text(), tok), 1024, 1024 * args.windows)
    command = " ".join(["python", "bench/perplexity_layouts.py", *sys.argv[1:]])
    formats = args.formats.split(",")
    info = {"text": heldout_description(), "windows": int(windows.shape[0]), "rows": []}
    old_file = args.out / "perplexity_layouts.json"
    if args.keep and old_file.exists():
        old = json.loads(old_file.read_text())
        if (old.get("text"), old.get("windows")) == (info["text"], info["windows"]):
            info["rows"] = [r for r in old["rows"] if r["fmt"] not in formats]
    for fmt in formats:
        m = copy.deepcopy(model)
        any4.quantize_model(m, fmt, 128, tokenizer=tok, progress=False)
        t = time.perf_counter()
        dense = perplexity(m, windows, progress=False)["ppl"]
        dense_s = time.perf_counter() - t
        layers = to_nibbles(m)
        nibbles = perplexity(m, windows, progress=False)["ppl"]
        row = {
            "fmt": fmt,
            "layers": layers,
            "ppl_dense": dense,
            "ppl_nibbles": nibbles,
            "rel_diff": abs(dense - nibbles) / nibbles,
            "dense_seconds": dense_s,
            "command": command,
        }
        info["rows"].append(row)
        print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perplexity_layouts.json").write_text(json.dumps(info, indent=2))
    (args.out / "perplexity_layouts.md").write_text(markdown(info))
    print(markdown(info))


if __name__ == "__main__":
    main()
