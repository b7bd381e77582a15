"""Calibration with short samples (SPEC §3): the texts, their token ids, and the hooks that
record per-input-channel activation statistics of Linear layers.

The package ships its own texts, written for this project (``any4/data/*.txt``). The default
calibration is three short samples, each its own row of token ids: the first
``DEFAULT_ROW_TOKENS`` (400) tokens of an English story (``prose``), of an encyclopedia article
(``encyclopedia``) and of a reference manual page (``reference``), 1200 tokens in all. Chosen on
held-out windows of two texts (bench/results/accuracy_notes.md): it beat the previous default,
one ~1.2k-token text mixing seven languages, code, math and tables (``mixed``, still shipped:
``sample_text("mixed")``), on perplexity and KL divergence on both. Users may pass their own
text, a list of texts (e.g. a dataset's "text" column), or token ids.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable
from importlib import resources
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .stats import ChannelStats, batch_sums

DEFAULT_MAX_TOKENS = 4096

Calibration = Union[None, str, Iterable, torch.Tensor, dict, Callable[[nn.Module], Any]]


DEFAULT_SAMPLES = ("prose", "encyclopedia", "reference")
DEFAULT_ROW_TOKENS = 400
SAMPLE_NAMES = DEFAULT_SAMPLES + ("mixed",)


def sample_text(name: str) -> str:
    """One of the texts shipped with the package: "prose", "encyclopedia", "reference" (the
    default samples) or "mixed" (the previous default: seven languages, code, math, tables)."""
    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown calibration sample {name!r}: one of {SAMPLE_NAMES}")
    return resources.files("any4").joinpath(f"data/{name}.txt").read_text(encoding="utf-8")


def default_text() -> str:
    """The default samples' texts, joined with blank lines (the whole texts; the default
    calibration uses the first DEFAULT_ROW_TOKENS tokens of each, see default_ids)."""
    return "\n\n".join(sample_text(n) for n in DEFAULT_SAMPLES)


def default_ids(
    tokenizer: Any, max_tokens: Optional[int] = None, seq_len: Optional[int] = None
) -> torch.Tensor:
    """The default calibration as token ids int64 [3, T]: one row per default sample, its first
    T tokens, T = DEFAULT_ROW_TOKENS or less (the shortest sample, max_tokens // 3, seq_len).
    With max_tokens < 3: one row of the first sample."""
    rows = [list(tokenizer(sample_text(n))["input_ids"]) for n in DEFAULT_SAMPLES]
    n = min([DEFAULT_ROW_TOKENS] + [len(r) for r in rows])
    if seq_len is not None:
        n = min(n, int(seq_len))
    if max_tokens is not None:
        if int(max_tokens) < len(rows):
            rows = rows[:1]
        n = min(n, int(max_tokens) // len(rows))
    n = max(n, 0)
    return torch.tensor([r[:n] for r in rows], dtype=torch.int64).reshape(len(rows), n)


def _all_ints(items: Any) -> bool:
    return all(isinstance(i, int) and not isinstance(i, bool) for i in items)


def is_token_id_list(calibration: Any) -> bool:
    """True for token ids given as a list (or tuple): of ints, or of rows (lists) of ints; such
    a calibration needs no tokenizer."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        return False
    if all(isinstance(r, (list, tuple)) for r in calibration):
        return all(_all_ints(r) for r in calibration)
    return _all_ints(calibration)


def read_text(path: str) -> str:
    """Read a UTF-8 text file with line endings normalised to '\\n'."""
    with open(path, encoding="utf-8", errors="strict") as f:
        text = f.read()
    return text.replace("\r\n", "\n").replace("\r", "\n")


def calibration_ids(
    calibration: Calibration = None,
    tokenizer: Any = None,
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
    seq_len: Optional[int] = None,
) -> torch.Tensor:
    """Token ids int64 [B, T] for a calibration source.

    Args:
        calibration: None or "default" (the shipped samples, one row each: default_ids); a text (str);
            rows of token ids (a list of equal-length lists of ints); an iterable of texts
            (joined with blank lines); or token ids (int tensor [T] or [B, T], or a list of ints).
        tokenizer: a Hugging Face tokenizer (needed for text), called as ``tokenizer(text)``.
        max_tokens: keep at most this many tokens (None: all).
        seq_len: longest row (e.g. the model's context); longer samples are cut into rows of
            seq_len tokens (a shorter remainder is dropped when there are full rows).
    """
    if isinstance(calibration, torch.Tensor):
        if (
            calibration.is_floating_point()
            or calibration.is_complex()
            or calibration.dtype == torch.bool
        ):
            raise TypeError(
                f"calibration token ids must be an integer tensor, got {calibration.dtype}"
            )
        ids = calibration.detach().to(torch.int64).cpu()
        if ids.ndim == 1:
            ids = ids.reshape(1, -1)
        if ids.ndim != 2:
            raise ValueError(
                f"calibration token ids must be [T] or [B, T], got shape {tuple(ids.shape)}"
            )
    elif calibration is None or (isinstance(calibration, str) and calibration == "default"):
        if tokenizer is None:
            raise ValueError(
                "the default calibration needs a tokenizer (pass tokenizer=...) or pass token ids"
            )
        ids = default_ids(tokenizer, max_tokens, seq_len)  # within max_tokens and seq_len
    else:
        if isinstance(calibration, str):
            text = calibration
        elif isinstance(calibration, Iterable):
            items = list(calibration)
            if items and all(isinstance(i, (list, tuple)) for i in items):  # rows of token ids
                if not all(_all_ints(i) for i in items):
                    raise TypeError("calibration rows must hold token ids (int)")
                lengths = sorted({len(i) for i in items})
                if len(lengths) != 1:
                    raise ValueError(
                        f"calibration rows of token ids must have one length, got {lengths}"
                    )
            if is_token_id_list(items):
                return calibration_ids(
                    torch.tensor(items, dtype=torch.int64), tokenizer, max_tokens, seq_len
                )
            if not all(isinstance(i, str) for i in items):
                raise TypeError(
                    "a calibration list must hold texts (str), token ids (int) or rows of token ids"
                )
            text = "\n\n".join(i for i in items if i)
        else:
            raise TypeError(
                f"calibration must be None, a text, a list of texts or token ids, got {type(calibration).__name__}"
            )
        if tokenizer is None:
            raise ValueError(
                "calibration text needs a tokenizer (pass tokenizer=...) or pass token ids"
            )
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64).reshape(1, -1)
    if max_tokens is not None and ids.numel() > max_tokens:
        ids = ids.reshape(-1)[: int(max_tokens)].reshape(1, -1)
    if ids.numel() == 0:
        raise ValueError("the calibration sample is empty")
    if seq_len is not None and ids.shape[1] > seq_len:
        flat = ids.reshape(-1)
        rows = flat.numel() // seq_len
        ids = flat[: rows * seq_len].reshape(rows, seq_len)
    return ids


def run_model(model: nn.Module, ids: torch.Tensor, device: Optional[torch.device] = None) -> Any:
    """One no-grad forward pass of ``model`` on ``ids`` [B, T] (a Hugging Face causal LM is
    called with ``input_ids=``, no cache, and only the last position's logits). ``ids`` go to
    ``device`` (default: the device of the model's first parameter)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = ids.to(device)
    with torch.no_grad():
        if "input_ids" in params:
            kwargs: dict = {"input_ids": ids}
            if "use_cache" in params:
                kwargs["use_cache"] = False
            if "logits_to_keep" in params:
                kwargs["logits_to_keep"] = 1
            return model(**kwargs)
        return model(ids)


def _is_example_input(item: Any) -> bool:
    return isinstance(item, dict) or (isinstance(item, torch.Tensor) and item.is_floating_point())


def calibration_runner(
    calibration: Calibration = None,
    tokenizer: Any = None,
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
    seq_len: Optional[int] = None,
) -> tuple:
    """(run, n_tokens): ``run(model)`` feeds the calibration sample through ``model`` (no grad);
    n_tokens counts the token ids or input rows it uses (0 for a callable).

    Besides what ``calibration_ids`` takes (text, texts, token ids), any module can be calibrated
    with example inputs: a float tensor (``model(x)``), a dict of forward kwargs
    (``model(**d)``), a list or tuple of them (one forward call each), or a callable ``fn(model)``
    that runs the model itself.
    """
    if callable(calibration) and not isinstance(calibration, (torch.Tensor, nn.Module)):
        return (lambda model: calibration(model)), 0
    if isinstance(calibration, nn.Module):
        raise TypeError("calibration must be data or a callable, got an nn.Module")
    examples = None
    if _is_example_input(calibration):
        examples = [calibration]
    elif (
        isinstance(calibration, (list, tuple))
        and calibration
        and all(_is_example_input(i) for i in calibration)
    ):
        examples = list(calibration)
    if examples is None:
        ids = calibration_ids(calibration, tokenizer, max_tokens, seq_len)
        return (lambda model: run_model(model, ids)), int(ids.numel())

    def rows(item: Any) -> int:
        t = (
            item
            if isinstance(item, torch.Tensor)
            else next((v for v in item.values() if isinstance(v, torch.Tensor)), None)
        )
        return int(t.shape[:-1].numel()) if t is not None and t.ndim > 0 else 0

    def run(model: nn.Module) -> None:
        with torch.no_grad():
            for item in examples:
                if isinstance(item, dict):
                    model(**item)
                else:
                    model(item)

    return run, sum(rows(i) for i in examples)


class ActivationRecorder:
    """Forward pre-hooks that feed each named layer's input into a ChannelStats.

    ``on_input(name, module, x)`` (optional) runs after the statistics of that call were added;
    sequential calibration uses it to quantize a layer as soon as its input has been seen.
    Use as a context manager; hooks are removed on exit.

    Layers fed the same tensor one after the other (q/k/v of an attention block, gate/up of an
    MLP) share one reduction: the sums of the last input are reused while it is the very same
    tensor object, unmodified (same in-place version counter).
    """

    def __init__(
        self,
        layers: dict,
        on_input: Optional[Callable[[str, nn.Module, torch.Tensor], None]] = None,
    ):
        self.layers = dict(layers)
        self.stats = {name: ChannelStats() for name in self.layers}
        self.calls = dict.fromkeys(self.layers, 0)
        self.on_input = on_input
        self._handles: list = []
        self._last: Optional[tuple] = None  # (weakref to the input, its version, its sums)

    def __enter__(self) -> ActivationRecorder:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _sums(self, x: torch.Tensor) -> tuple:
        if x.is_inference():  # no version counter: in-place changes cannot be seen
            self._last = None
            return batch_sums(x)
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        sums = batch_sums(x)
        self._last = (weakref.ref(x), x._version, sums)
        return sums

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            self.calls[name] += 1
            self.stats[name].add_sums(*self._sums(x))
            if self.on_input is not None:
                self.on_input(name, module, x)

        return hook


__all__ = [
    "ActivationRecorder", "DEFAULT_ROW_TOKENS", "DEFAULT_SAMPLES", "calibration_ids",
    "calibration_runner", "default_ids", "default_text", "read_text", "run_model", "sample_text",
]  # fmt: skip
