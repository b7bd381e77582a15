"""Perplexity evaluation of quantized causal LMs (SPEC §7).

Protocol: the held-out text is tokenized once, cut into non-overlapping windows of ``seq_len``
tokens (a shorter tail is dropped; ``max_tokens`` keeps the first windows), and every format is
scored on exactly those windows: perplexity = exp(mean negative log-likelihood of each window's
tokens 2..seq_len given the ones before). lm_head and embeddings stay in float.

Kernels: ``kernel="gemm"`` (default) runs the QuantLinear modules, i.e. any4.gemm on CPU or
CUDA; ``kernel="dequant"`` first replaces them by nn.Linear holding the dequantized weight: the
same function through the framework's dense matmul (perplexities agree to ~1e-6 relative; on the
2-core CPU a 1024-token window runs ~0.8x as fast through any4.gemm as through dense fp32 BLAS).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .metrics import DEFAULT_TOP_K, Reference, compare
from .model import quantize_model, quantized_layers
from .nn import dequantize_model

ALL_FORMATS = ("fp", "int4", "fp4", "nf4", "any4", "any3", "any2")
KERNELS = ("gemm", "dequant")


def token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """int64 [T] token ids of a text (no special tokens added)."""
    if not text:
        raise ValueError("the evaluation text is empty")
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except TypeError:
        ids = tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def make_windows(
    ids: torch.Tensor, seq_len: int = 1024, max_tokens: Optional[int] = None
) -> torch.Tensor:
    """The first ``max_tokens // seq_len`` (or all) non-overlapping windows, int64 [W, seq_len]."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = ids.reshape(-1)
    n = ids.numel() // seq_len
    if max_tokens is not None:
        n = min(n, int(max_tokens) // seq_len)
    if n < 1:
        raise ValueError(
            f"the text has {ids.numel()} tokens: not enough for one window of {seq_len} "
            f"(max_tokens={max_tokens}); use a longer text or a smaller seq_len"
        )
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
    reference: Optional[Reference] = None,
    record: Optional[Reference] = None,
) -> dict:
    """Perplexity of ``model`` over ``windows`` [W, T] (each window scored independently).

    ``record``: an (empty) :class:`any4.metrics.Reference` to fill with this model's next-token
    distributions (top-k + tail per position; the float model's, normally). ``reference``: one
    recorded on the same windows; the result then also has the mean KL divergence from it and
    the top-1 agreement with it (see any4.metrics).

    Returns {"ppl", "nll" (mean, nats/token), "tokens" (scored), "seconds", "tokens_per_s"}
    (+ "kld", "top1" with a reference); tokens_per_s counts every token that went through the
    model (W * T).
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [W, T>=2], got {tuple(windows.shape)}")
    if reference is not None and reference is not record and len(reference) != windows.shape[0]:
        raise ValueError(
            f"the reference covers {len(reference)} windows, the evaluation has {windows.shape[0]}"
        )
    if record is not None and len(record):
        raise ValueError("record must be an empty Reference")
    kld_sum = 0.0
    agree = 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    total = 0.0
    count = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(
            range(0, windows.shape[0], batch_size),
            desc=desc,
            unit="win",
            disable=not progress,
            leave=False,
        ):
            batch = windows[i : i + batch_size].to(device)
            out = model(input_ids=batch, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            logits = logits[:, :-1].float()
            target = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += target.numel()
            for j in range(batch.shape[0]):
                if record is not None:
                    record.add(logits[j])
                if reference is not None:
                    w = i + j
                    kld, same = compare(logits[j], *reference.window(w))
                    kld_sum += float(kld.sum())
                    agree += int(same.sum())
    seconds = time.perf_counter() - start
    mean = total / count
    out = {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "seconds": seconds,
        "tokens_per_s": windows.numel() / seconds if seconds > 0 else float("nan"),
    }
    if reference is not None:
        out["kld"] = kld_sum / count
        out["top1"] = agree / count
    return out


def resolve_kernel(kernel: str, model: nn.Module) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def mean_bits_per_weight(model: nn.Module) -> Optional[float]:
    """Average stored bits per weight over a model's QuantLinear layers (codes + table + scales)."""
    layers = quantized_layers(model)
    if not layers:
        return None
    bits = sum(m.bits_per_weight * m.in_features * m.out_features for m in layers.values())
    return bits / sum(m.in_features * m.out_features for m in layers.values())


def evaluate_formats(
    base_model: nn.Module,
    windows: torch.Tensor,
    formats: Sequence[str] = ALL_FORMATS,
    group_sizes: Sequence[int] = (128,),
    *,
    tokenizer: Any = None,
    calibration: Any = "default",
    kernel: str = "gemm",
    progress: bool = True,
    quantize_options: Optional[dict] = None,
    variants: Optional[Sequence[dict]] = None,
    on_row: Optional[Callable[[dict], None]] = None,
    kld_top_k: Optional[int] = DEFAULT_TOP_K,
    reference: Optional[Reference] = None,
) -> list:
    """Quantize a copy of ``base_model`` per (format, group size[, variant]) and score it.

    ``variants``: extra quantize_model options to try for each learned format (ablations), e.g.
    ``[{"weighting": "rms"}, {"method": "lloyd"}]``; each row records its options.
    ``kld_top_k``: every row also gets the mean KL divergence from the float model's next-token
    distribution and the top-1 agreement with it ("kld", "top1"), the float model's
    distributions being kept as top-k + tail per position (see any4.metrics); the float model
    is scored first (as the "fp" row if requested, else once without a row). None: perplexity
    only. ``reference``: a Reference already recorded on these windows (reused, e.g. across
    calls; with ``kld_top_k`` and an empty one, it is filled).
    Returns a list of rows {"fmt", "group_size", "ppl", "nll", "kld", "top1", "tokens",
    "quant_seconds", "eval_seconds", "tokens_per_s", "bits_per_weight", "kernel", options...}.
    """
    rows = []
    base_options = dict(quantize_options or {})
    formats = list(formats)
    if reference is None and kld_top_k is not None:
        reference = Reference(int(kld_top_k))
    if reference is not None and len(reference) == 0:
        if "fp" in formats:  # the fp row records the reference (and is compared with it)
            formats = ["fp"] + [f for f in formats if f != "fp"]
        else:
            perplexity(
                base_model, windows, progress=progress, desc="fp (reference)", record=reference
            )
    for fmt in formats:
        learned = fmt.startswith("any")
        sizes = [None] if fmt == "fp" else list(group_sizes)
        for G in sizes:
            for variant in (variants or [{}]) if learned else [{}]:
                options = {**base_options, **variant}
                model = copy.deepcopy(base_model)
                start = time.perf_counter()
                if fmt != "fp":
                    quantize_model(
                        model,
                        fmt,
                        G,
                        calibration,
                        tokenizer=tokenizer,
                        progress=progress,
                        **options,
                    )
                quant_seconds = time.perf_counter() - start
                bits = mean_bits_per_weight(model)
                used = resolve_kernel(kernel, model)
                if used == "dequant":
                    dequantize_model(model)
                label = fmt if G is None else f"{fmt} G={G}"
                if variant:
                    label += " " + ",".join(f"{k}={v}" for k, v in variant.items())
                recording = reference is not None and len(reference) == 0
                result = perplexity(
                    model,
                    windows,
                    progress=progress,
                    desc=label,
                    reference=reference,
                    record=reference if recording else None,
                )
                row = {
                    "fmt": fmt,
                    "group_size": G,
                    **(
                        {k: options.get(k) for k in ("weighting", "method", "mode", "refit")}
                        if learned
                        else {}
                    ),
                    "ppl": result["ppl"],
                    "nll": result["nll"],
                    "kld": result.get("kld"),
                    "top1": result.get("top1"),
                    "tokens": result["tokens"],
                    "quant_seconds": quant_seconds,
                    "eval_seconds": result["seconds"],
                    "tokens_per_s": result["tokens_per_s"],
                    "bits_per_weight": bits,
                    "kernel": used if fmt != "fp" else "dense",
                    "variant": dict(variant),
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                del model
    return rows


def environment() -> dict:
    """Versions and machine facts recorded with results."""
    from . import __version__

    return {
        "any4": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "",
        "torch_threads": torch.get_num_threads(),
        "platform": sys.platform,
    }


def markdown_table(rows: Sequence[dict], title: str = "") -> str:
    """Perplexity table: one line per format, one column per group size (plus tokens/s)."""
    sizes = sorted({r["group_size"] for r in rows if r["group_size"] is not None})
    keyed: dict = {}
    order: list = []
    for r in rows:
        extra = ",".join(f"{k}={v}" for k, v in (r.get("variant") or {}).items())
        key = (r["fmt"], extra)
        if key not in keyed:
            keyed[key] = {}
            order.append(key)
        keyed[key][r["group_size"]] = r
    lines = [f"### {title}", ""] if title else []
    metrics = [("ppl", "ppl", "{:.3f}")]
    if any(r.get("kld") is not None for r in rows):
        metrics += [("kld", "KLD", "{:.4f}"), ("top1", "top-1", "{:.3f}")]
    cols = sizes or [None]
    head = ["format", "options"]
    head += [f"{label} G={g}" if g else label for _, label, _ in metrics for g in cols]
    head += ["bits/weight", "eval tokens/s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")

    def cell(r: Optional[dict], key: str, form: str) -> str:
        return "" if r is None or r.get(key) is None else form.format(r[key])

    for key in order:
        by_g = keyed[key]
        if None in by_g:  # fp: same value in every column
            r = by_g[None]
            cells = [cell(r, m, form) for m, _, form in metrics for _ in cols]
            bits, tps = "16/32 (float)", f"{r['tokens_per_s']:.0f}"
        else:
            cells = [cell(by_g.get(g), m, form) for m, _, form in metrics for g in cols]
            bits = " / ".join(f"{by_g[g]['bits_per_weight']:.2f}" for g in sizes if g in by_g)
            tps = " / ".join(f"{by_g[g]['tokens_per_s']:.0f}" for g in sizes if g in by_g)
        lines.append("| " + " | ".join([key[0], key[1] or "-"] + cells + [bits, tps]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """Bar charts by format (one bar per group size): perplexity (fp as a dashed line) and,
    when the rows have them, mean KL divergence from fp and top-1 agreement with fp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = [r["ppl"] for r in rows if r["fmt"] == "fp"]
    quant = [r for r in rows if r["fmt"] != "fp" and not _is_variant(r)]
    fmts = list(dict.fromkeys(r["fmt"] for r in quant))
    sizes = sorted({r["group_size"] for r in quant})
    panels = [("ppl", "perplexity (lower is better)")]
    if any(r.get("kld") is not None for r in quant):
        panels += [
            ("kld", "mean KLD from fp (lower is better)"),
            ("top1", "top-1 agreement with fp"),
        ]
    width = 0.8 / max(1, len(sizes))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * max(5.0, 1.1 * len(fmts) + 2), 3.6), dpi=120
    )
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (key, ylabel) in zip(axes, panels):
        # Linear scale; bars far above the reference (e.g. 2-bit) are cut at `cap` and labelled.
        if key == "ppl":
            ref = fp[0] if fp else min((r["ppl"] for r in quant), default=1.0)
            cap, form = 2.0 * ref, "{:.2f}"
        elif key == "kld":
            vals = sorted(r["kld"] for r in quant if r.get("kld") is not None)
            cap, form = 3.0 * vals[len(vals) // 2] if vals else 1.0, "{:.3f}"
        else:
            cap, form = 1.0, "{:.3f}"
        for j, g in enumerate(sizes):
            xs, ys, labels = [], [], []
            for i, f in enumerate(fmts):
                r = next((r for r in quant if r["fmt"] == f and r["group_size"] == g), None)
                if r is not None and r.get(key) is not None:
                    v = r[key]
                    xs.append(i + (j - (len(sizes) - 1) / 2) * width)
                    ys.append(min(v, cap))
                    labels.append(f"{v:.3g}\n(cut)" if v > cap else form.format(v))
            bars = ax.bar(xs, ys, width=width, label=f"G={g}")
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
        if key == "ppl" and fp:
            ax.axhline(fp[0], color="k", linestyle="--", linewidth=1, label=f"fp {fp[0]:.2f}")
        ax.set_xticks(range(len(fmts)))
        ax.set_xticklabels(fmts)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, cap * 1.08)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _is_variant(r: dict) -> bool:
    return bool(r.get("variant"))


def write_results(rows: Sequence[dict], prefix: str, info: dict, title: str = "") -> list:
    """Write ``prefix``.md, ``prefix``.json and ``prefix``.png; returns the paths."""
    md = markdown_table(rows, title)
    details = "\n".join(f"- {k}: {v}" for k, v in info.items() if not isinstance(v, (dict, list)))
    paths = [prefix + ".md", prefix + ".json", prefix + ".png"]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(md + "\n" + details + "\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump({"info": info, "rows": list(rows)}, f, indent=2)
    plot(rows, paths[2], title)
    return paths


__all__ = [
    "ALL_FORMATS", "evaluate_formats", "make_windows", "markdown_table", "perplexity", "plot",
    "token_ids", "write_results",
]  # fmt: skip
