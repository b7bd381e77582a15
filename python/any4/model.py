"""``any4.quantize_model``: replace a model's ``nn.Linear`` layers by ``QuantLinear`` (SPEC §3, §6)."""

from __future__ import annotations

import fnmatch
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import (
    DEFAULT_MAX_TOKENS,
    ActivationRecorder,
    Calibration,
    calibration_ids,
    run_model,
)
from .formats import get_format
from .kmeans import DEFAULT_METHOD, DEFAULT_N_INIT, METHODS
from .nn import QuantLinear, set_submodule
from .stats import DEFAULT_WEIGHTING, WEIGHTINGS, ChannelStats

FLOAT_FORMATS = ("fp", "none")  # "quantize" to nothing: the model is returned unchanged
MODES = ("one-pass", "sequential")
SETTINGS_ATTR = "any4_settings"


def matches_skip(name: str, skip: Sequence[str]) -> bool:
    """A layer is skipped when a pattern equals its dotted name, a dotted suffix of it
    ("lm_head", "mlp.down_proj"), or matches it as a glob ("model.layers.0.*")."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in skip)


def eligible_layers(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict:
    """{name: nn.Linear} that quantize_model would replace, in module order."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name and not matches_skip(name, skip):
            out[name] = module
    return out


def layer_group_size(group_size: int, in_features: int) -> Optional[int]:
    """The group size used for a layer: ``group_size``, or, when the layer's K is smaller, the
    largest multiple of 8 <= K (a whole row, up to a short tail). None when K < 8."""
    if in_features < 8:
        return None
    return group_size if group_size <= in_features else in_features - in_features % 8


def check_settings(fmt: str, group_size: int, mode: str, weighting: str, method: str) -> Any:
    """The Format for ``fmt`` after checking quantize_model's settings (clear ValueErrors)."""
    f = get_format(fmt)
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size < 8
        or group_size % 8
    ):
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    return f


def plan_layers(model: nn.Module, group_size: int, skip: Sequence[str]) -> tuple:
    """({name: nn.Linear}, {name: group size}) of the layers quantize_model replaces (a layer
    with in_features < 8 is left in float, with a warning). Works on a meta-device skeleton."""
    layers = eligible_layers(model, skip)
    group_sizes = {}
    for name, lin in list(layers.items()):
        g = layer_group_size(group_size, lin.in_features)
        if g is None:
            warnings.warn(
                f"any4: {name} has in_features={lin.in_features} < 8; left in float", stacklevel=3
            )
            del layers[name]
        else:
            group_sizes[name] = g
    if not layers:
        warnings.warn(
            "any4: the model has no eligible nn.Linear layer; nothing was quantized", stacklevel=3
        )
    return layers, group_sizes


def layer_quantize_kwargs(
    f: Any, stats: Optional[ChannelStats], needs_stats: bool, options: dict
) -> dict:
    """The ``any4.quantize`` keyword arguments for one layer: the k-means ``options`` (weighting,
    method, n_init, seed) for learned formats, with the layer's ``stats`` when it saw
    calibration input (else weighting "none"); nothing for fixed formats."""
    kw = dict(options) if f.learned else {}
    if needs_stats and stats is not None and stats.count > 0:
        kw["stats"] = stats
    elif f.learned:
        kw["weighting"] = "none"
        kw.pop("stats", None)
    return kw


def quantize_model(
    model: nn.Module,
    fmt: str = "any4",
    group_size: int = 128,
    calibration: Calibration = "default",
    *,
    tokenizer: Any = None,
    mode: str = "one-pass",
    weighting: str = DEFAULT_WEIGHTING,
    method: str = DEFAULT_METHOD,
    n_init: int = DEFAULT_N_INIT,
    seed: int = 0,
    table_dtype: Optional[torch.dtype] = None,
    skip: Sequence[str] = ("lm_head",),
    max_calibration_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
    progress: bool = True,
) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` (in place) by a ``QuantLinear``.

    Args:
        model: a torch model (e.g. a Hugging Face causal LM). Embeddings are never touched.
        fmt: "any4", "any3", "any2", "int4", "nf4", "fp4" (also "int3", "int2"); "fp" or "none"
            returns the model unchanged.
        group_size: G, a positive multiple of 8. A layer with in_features < G uses the largest
            multiple of 8 <= in_features instead; a layer with in_features < 8 is left in float.
        calibration: the sample whose activation statistics weight the k-means of learned
            formats: "default" (the shipped text), a text, a list of texts, or token ids [T] /
            [B, T]. Unused by fixed formats (int4, nf4, fp4) and by ``weighting="none"``.
        tokenizer: turns calibration text into ids (a Hugging Face tokenizer).
        mode: "one-pass" (all statistics from the float model in one forward pass) or
            "sequential" (each layer's statistics from the model whose earlier layers are
            already quantized; done within the same single pass, each layer being quantized in
            its forward pre-hook). Both need the calibration to go through one forward call; a
            layer called several times per forward uses its first call in sequential mode.
        weighting: sample weights from the statistics: "mse", "abs_mean", "mean_abs", "rms",
            "none" (see any4.stats.channel_weight).
        method, n_init, seed: k-means options: "optimal" (exact, the default) or "lloyd"
            (n_init restarts from seeded k-means++).
        table_dtype: dtype of the tables and scales (default: float16 for an fp16 layer, else
            bfloat16, i.e. 16-bit scale/zero: 4.25 bits/weight at G=128 for any4).
        skip: layer-name patterns left in float (see matches_skip); default ("lm_head",).
        max_calibration_tokens: the calibration sample is cut to this many tokens.
        progress: show a progress bar.
    Returns:
        ``model`` itself; ``model.any4_settings`` records the settings and per-layer group sizes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a format name, got {type(fmt).__name__}")
    if fmt.lower() in FLOAT_FORMATS:
        return model
    f = check_settings(fmt, group_size, mode, weighting, method)
    if isinstance(skip, str):
        skip = (skip,)
    layers, group_sizes = plan_layers(model, group_size, skip)

    needs_stats = f.learned and weighting != "none"
    options = dict(weighting=weighting, method=method, n_init=n_init, seed=seed)

    def make(name: str, lin: nn.Linear, stats: Optional[ChannelStats]) -> QuantLinear:
        kw = layer_quantize_kwargs(f, stats, needs_stats, options)
        return QuantLinear.from_linear(
            lin, f.name, group_sizes[name], table_dtype=table_dtype, **kw
        )

    start = time.perf_counter()
    bar = tqdm(
        total=len(layers), desc=f"any4: {f.name} G={group_size}", unit="layer", disable=not progress
    )
    done: dict = {}
    n_tokens = 0
    if needs_stats and layers:
        seq_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        ids = calibration_ids(calibration, tokenizer, max_calibration_tokens, seq_len)
        n_tokens = int(ids.numel())

        def quantize_now(name: str, module: nn.Module, x: torch.Tensor) -> None:
            if mode != "sequential" or name in done:
                return
            q = make(name, module, recorder.stats[name])
            with torch.no_grad():  # the rest of this pass sees the quantized layer
                module.weight.data = q.dequantize(module.weight.dtype).to(module.weight.device)
            done[name] = q
            bar.update(1)

        with ActivationRecorder(layers, on_input=quantize_now) as recorder:
            was_training = model.training
            model.eval()
            try:
                run_model(model, ids)
            finally:
                model.train(was_training)
        stats = recorder.stats
        missing = [n for n in layers if stats[n].count == 0]
        if missing:
            warnings.warn(
                f"any4: {len(missing)} layer(s) saw no calibration input (e.g. {missing[0]}); they are "
                "quantized without sample weights",
                stacklevel=2,
            )
    else:
        stats = {}
    for name, lin in layers.items():
        if name not in done:
            done[name] = make(name, lin, stats.get(name))
            bar.update(1)
        set_submodule(model, name, done[name])
    bar.close()

    settings = {
        "fmt": f.name,
        "group_size": group_size,
        "mode": mode,
        "weighting": weighting if f.learned else None,
        "method": method if f.learned else None,
        "n_init": n_init if f.learned and method == "lloyd" else None,
        "seed": seed,
        "skip": list(skip),
        "calibration_tokens": n_tokens,
        "layers": len(layers),
        "seconds": round(time.perf_counter() - start, 3),
    }
    try:
        setattr(model, SETTINGS_ATTR, settings)
    except (AttributeError, TypeError):
        pass
    return model


def quantized_layers(model: nn.Module) -> dict:
    """{name: QuantLinear} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


__all__ = [
    "check_settings",
    "eligible_layers",
    "layer_quantize_kwargs",
    "matches_skip",
    "plan_layers",
    "quantize_model",
    "quantized_layers",
]
