"""Perplexity evaluation of quantized causal LMs (SPEC §7).

Protocol: the held-out text is tokenized once, cut into non-overlapping windows of ``seq_len``
tokens (a shorter tail is dropped; ``max_tokens`` keeps the first windows), and every format is
scored on exactly those windows: perplexity = exp(mean negative log-likelihood of each window's
tokens 2..seq_len given the ones before). lm_head and embeddings stay in float.

Kernels: ``kernel="gemm"`` runs the QuantLinear modules (any4.gemm); ``kernel="dequant"`` first
replaces them by nn.Linear holding the dequantized weight (the same function, the framework's
dense matmul). ``"auto"`` picks gemm on CUDA and dequant on CPU, where a 1024-token window is a
large-batch product that dense BLAS does faster than the batch-1..16 any4 kernels.
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

from .model import quantize_model, quantized_layers
from .nn import dequantize_model

ALL_FORMATS = ("fp", "int4", "fp4", "nf4", "any4", "any3", "any2")
KERNELS = ("auto", "gemm", "dequant")


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
) -> dict:
    """Perplexity of ``model`` over ``windows`` [W, T] (each window scored independently).

    Returns {"ppl", "nll" (mean, nats/token), "tokens" (scored), "seconds", "tokens_per_s"};
    tokens_per_s counts every token that went through the model (W * T).
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [W, T>=2], got {tuple(windows.shape)}")
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
    seconds = time.perf_counter() - start
    mean = total / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": count,
        "seconds": seconds,
        "tokens_per_s": windows.numel() / seconds if seconds > 0 else float("nan"),
    }


def resolve_kernel(kernel: str, model: nn.Module) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return "gemm" if device.type == "cuda" else "dequant"


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
    kernel: str = "auto",
    progress: bool = True,
    quantize_options: Optional[dict] = None,
    variants: Optional[Sequence[dict]] = None,
    on_row: Optional[Callable[[dict], None]] = None,
) -> list:
    """Quantize a copy of ``base_model`` per (format, group size[, variant]) and score it.

    ``variants``: extra quantize_model options to try for each learned format (ablations), e.g.
    ``[{"weighting": "rms"}, {"method": "lloyd"}]``; each row records its options.
    Returns a list of rows {"fmt", "group_size", "ppl", "nll", "tokens", "quant_seconds",
    "eval_seconds", "tokens_per_s", "bits_per_weight", "kernel", options...}.
    """
    rows = []
    base_options = dict(quantize_options or {})
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
                result = perplexity(model, windows, progress=progress, desc=label)
                row = {
                    "fmt": fmt,
                    "group_size": G,
                    **(
                        {k: options.get(k) for k in ("weighting", "method", "mode")}
                        if learned
                        else {}
                    ),
                    "ppl": result["ppl"],
                    "nll": result["nll"],
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
    head = ["format", "options"] + [f"ppl G={g}" for g in sizes] + ["bits/weight", "eval tokens/s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for key in order:
        by_g = keyed[key]
        if None in by_g:  # fp: same value in every column
            r = by_g[None]
            cells = [f"{r['ppl']:.3f}"] * max(1, len(sizes))
            bits, tps = "16/32 (float)", f"{r['tokens_per_s']:.0f}"
        else:
            cells = [f"{by_g[g]['ppl']:.3f}" if g in by_g else "" for g in sizes]
            bits = " / ".join(f"{by_g[g]['bits_per_weight']:.2f}" for g in sizes if g in by_g)
            tps = " / ".join(f"{by_g[g]['tokens_per_s']:.0f}" for g in sizes if g in by_g)
        lines.append("| " + " | ".join([key[0], key[1] or "-"] + cells + [bits, tps]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """Bar chart of perplexity by format (one bar per group size; fp as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = [r["ppl"] for r in rows if r["fmt"] == "fp"]
    quant = [r for r in rows if r["fmt"] != "fp" and not _is_variant(r)]
    fmts = list(dict.fromkeys(r["fmt"] for r in quant))
    sizes = sorted({r["group_size"] for r in quant})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(fmts) + 2), 3.6), dpi=120)
    width = 0.8 / max(1, len(sizes))
    for j, g in enumerate(sizes):
        xs, ys = [], []
        for i, f in enumerate(fmts):
            r = next((r for r in quant if r["fmt"] == f and r["group_size"] == g), None)
            if r is not None:
                xs.append(i + (j - (len(sizes) - 1) / 2) * width)
                ys.append(r["ppl"])
        bars = ax.bar(xs, ys, width=width, label=f"G={g}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    if fp:
        ax.axhline(fp[0], color="k", linestyle="--", linewidth=1, label=f"fp {fp[0]:.2f}")
    ax.set_xticks(range(len(fmts)))
    ax.set_xticklabels(fmts)
    ax.set_ylabel("perplexity (lower is better)")
    if quant and max(r["ppl"] for r in quant) > 4 * (fp[0] if fp else min(r["ppl"] for r in quant)):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
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
