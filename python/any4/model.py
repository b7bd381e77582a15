"""``any4.quantize_model``: replace a model's ``nn.Linear`` layers by ``QuantLinear`` (SPEC §3, §6)."""

from __future__ import annotations

import fnmatch
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import validate as V
from .calibration import DEFAULT_MAX_TOKENS, ActivationRecorder, Calibration, calibration_runner
from .formats import get_format
from .gptq import GPTQ, gptq_layer, prepare
from .kmeans import DEFAULT_METHOD, DEFAULT_N_INIT, METHODS
from .nn import QuantLinear, dense_features, is_conv1d, set_submodule
from .refine import DEFAULT_REFINE, check_refine
from .refit import DEFAULT_REFIT, REFITS, CovarianceCache, refit_layer
from .stats import DEFAULT_WEIGHTING, WEIGHTINGS, ChannelStats

FLOAT_FORMATS = ("fp", "none")  # "quantize" to nothing: the model is returned unchanged
MODES = ("one-pass", "sequential")
SETTINGS_ATTR = "any4_settings"
# Functions called with each model quantize_model returns (any4.hf adds one that makes a
# transformers model save_pretrained-able as an any4 checkpoint).
POST_QUANTIZE_HOOKS: list = []


def matches_skip(name: str, skip: Sequence[str]) -> bool:
    """A layer is skipped when a pattern equals its dotted name, a dotted suffix of it
    ("lm_head", "mlp.down_proj"), or matches it as a glob ("model.layers.0.*")."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in skip)


def eligible_layers(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict:
    """{name: nn.Linear or GPT-2 Conv1D} that quantize_model would replace, in module order."""
    out = {}
    for name, module in model.named_modules():
        if dense_features(module) is not None and name and not matches_skip(name, skip):
            out[name] = module
    return out


def expert_parameters(model: nn.Module) -> dict:
    """{name: parameter} of float weights with 3 or more dimensions outside Linear/Conv1D layers:
    MoE experts stored as one [E, N, K] tensor (Mixtral, Qwen-MoE in transformers 5), which
    quantize_model does not quantize yet."""
    out = {}
    for mod_name, module in model.named_modules():
        if dense_features(module) is not None or isinstance(module, QuantLinear):
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.ndim >= 3 and p.is_floating_point():
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return out


def parameter_count(model: nn.Module) -> int:
    """Parameters of a model, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def quantize_summary(settings: dict) -> str:
    """One line: format, layers and the fraction of parameters quantized (from any4_settings)."""
    frac = settings.get("quantized_fraction")
    text = f"{settings.get('fmt')} G={settings.get('group_size')}: {settings.get('layers')} layers"
    if frac is not None:
        text += (
            f", {100 * frac:.1f}% of the {settings.get('total_params'):,} parameters quantized "
            f"({100 * (1 - frac):.1f}% left in float: embeddings, skipped layers, norms"
        )
        if settings.get("expert_params"):
            text += ", 3-D MoE experts"
        text += ")"
    return text


def layer_quantize_kwargs(
    fmt: str,
    stats: Optional[ChannelStats] = None,
    *,
    weighting: str = DEFAULT_WEIGHTING,
    method: str = DEFAULT_METHOD,
    n_init: int = DEFAULT_N_INIT,
    seed: int = 0,
    refine: int = DEFAULT_REFINE,
) -> dict:
    """The ``any4.quantize`` keyword arguments quantize_model uses for one layer: learned formats
    get the k-means options and the statistics' sample weights when ``stats`` saw inputs (else
    weighting "none"); fixed formats get nothing."""
    kw: dict = {}
    if get_format(fmt).learned:
        kw = dict(weighting=weighting, method=method, n_init=n_init, seed=seed, refine=refine)
        if weighting != "none" and stats is not None and stats.count > 0:
            kw["stats"] = stats
        else:
            kw["weighting"] = "none"
    return kw


def quantize_layer(
    layer: nn.Module,
    fmt: str,
    group_size: int,
    stats: Optional[ChannelStats] = None,
    *,
    table_dtype: Optional[torch.dtype] = None,
    weighting: str = DEFAULT_WEIGHTING,
    method: str = DEFAULT_METHOD,
    n_init: int = DEFAULT_N_INIT,
    seed: int = 0,
    refine: int = DEFAULT_REFINE,
) -> QuantLinear:
    """One layer as quantize_model quantizes it (the same call, so both agree bit for bit):
    learned formats use the statistics' sample weights when ``stats`` saw inputs, else none."""
    f = get_format(fmt)
    kw = layer_quantize_kwargs(
        f.name, stats, weighting=weighting, method=method, n_init=n_init, seed=seed, refine=refine
    )
    return QuantLinear.from_linear(layer, f.name, group_size, table_dtype=table_dtype, **kw)


def check_settings(fmt: str, group_size: int, mode: str, weighting: str, method: str) -> Any:
    """The Format for ``fmt`` after checking quantize_model's settings (clear ValueErrors)."""
    f = get_format(fmt)
    V.group_size_setting(group_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    return f


def plan_layers(model: nn.Module, group_size: int, skip: Sequence[str]) -> tuple:
    """({name: layer}, {name: group size}) of the layers quantize_model replaces (a layer with
    in_features < 8 is left in float, with a warning). Works on a meta-device skeleton."""
    layers = eligible_layers(model, skip)
    group_sizes = {}
    for name, lin in list(layers.items()):
        in_features = dense_features(lin)[1]
        g = layer_group_size(group_size, in_features)
        if g is None:
            warnings.warn(
                f"any4: {name} has in_features={in_features} < 8; left in float", stacklevel=3
            )
            del layers[name]
        else:
            group_sizes[name] = g
    if not layers:
        warnings.warn(
            "any4: the model has no eligible nn.Linear layer; nothing was quantized", stacklevel=3
        )
    return layers, group_sizes


def layer_group_size(group_size: int, in_features: int) -> Optional[int]:
    """The group size used for a layer: ``group_size``, or, when the layer's K is smaller, the
    largest multiple of 8 <= K (a whole row, up to a short tail). None when K < 8."""
    if in_features < 8:
        return None
    return group_size if group_size <= in_features else in_features - in_features % 8


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
    refit: str = DEFAULT_REFIT,
    gptq: Union[None, bool, GPTQ] = None,
    refine: int = DEFAULT_REFINE,
) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` (in place) by a ``QuantLinear``.

    Args:
        model: a torch model (e.g. a Hugging Face causal LM). Embeddings are never touched.
        fmt: "any4", "any3", "any2", "int4", "nf4", "fp4" (also "int3", "int2"); "fp" or "none"
            returns the model unchanged.
        group_size: G, a positive multiple of 8. A layer with in_features < G uses the largest
            multiple of 8 <= in_features instead; a layer with in_features < 8 is left in float.
        calibration: the sample whose activation statistics weight the k-means of learned
            formats: "default" (the shipped samples, 3 rows of 400 tokens:
            any4.calibration.default_ids), a text, a list of texts, or token ids [T] / [B, T]; for any module, example inputs: a float tensor (``model(x)``), a dict of
            forward kwargs (``model(**d)``), a list of those (one forward each), or a callable
            ``fn(model)`` that runs it. Unused by fixed formats (int4, nf4, fp4) and by
            ``weighting="none"``.
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
        refit: learned formats only: "none" (default), "lut" or "lut+zero": after k-means,
            refit each row's table (and group zeros) to the output error with the full input
            covariance of the calibration sample (any4.refit). Each layer's covariance is
            built from its input when the layer is reached and dropped once it is quantized;
            like sequential mode, this uses the layer's first call of the calibration run.
        refine: learned formats: rounds of least-squares refinement of each row's table and
            group (scale, zero) on k-means' own weighted error (any4.refine; default
            DEFAULT_REFINE); 0: the tables and codes of k-means alone.
        gptq: error feedback (any4.gptq, any format): None/False (default) rounds each weight to
            its nearest table entry; True or a :class:`any4.gptq.GPTQ` (damp, column order)
            re-assigns the codes GPTQ-style with the layer input's full covariance (after the
            refit, if any), which is built and dropped as for the refit. With
            ``mode="sequential"`` each covariance comes from the partly quantized model.
    Returns:
        ``model`` itself; ``model.any4_settings`` records the settings, the number of layers and
        the fraction of parameters quantized (``quantized_fraction``, also printed with
        ``progress``). MoE experts stored as 3-D tensors stay in float, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a format name, got {type(fmt).__name__}")
    if fmt.lower() in FLOAT_FORMATS:
        return model
    f = check_settings(fmt, group_size, mode, weighting, method)
    refine = check_refine(refine)
    if refit not in REFITS:
        raise ValueError(f"refit must be one of {REFITS}, got {refit!r}")
    if isinstance(skip, str):
        skip = (skip,)
    if gptq is True:
        gptq = GPTQ()
    elif gptq is False:
        gptq = None
    if gptq is not None and not isinstance(gptq, GPTQ):
        raise TypeError(
            f"gptq must be None, a bool or an any4.gptq.GPTQ, got {type(gptq).__name__}"
        )
    refit = refit if f.learned else "none"

    total_params = parameter_count(model)
    experts = expert_parameters(model)
    expert_params = sum(p.numel() for p in experts.values())
    if experts:
        warnings.warn(
            f"any4: {len(experts)} MoE expert weight(s) stored as 3-D tensors (e.g. {next(iter(experts))}) "
            f"are not quantized yet: {expert_params:,} parameters, "
            f"{100 * expert_params / max(total_params, 1):.1f}% of the model, stay in float",
            stacklevel=2,
        )
    layers, group_sizes = plan_layers(model, group_size, skip)

    needs_x = refit != "none" or gptq is not None  # the layer's input, for its covariance
    needs_stats = (f.learned and weighting != "none") or needs_x
    in_hook = mode == "sequential" or needs_x
    options = dict(weighting=weighting, method=method, n_init=n_init, seed=seed, refine=refine)

    def make(
        name: str, lin: nn.Module, stats: Optional[ChannelStats], x: Optional[torch.Tensor] = None
    ) -> QuantLinear:
        q = quantize_layer(
            lin, f.name, group_sizes[name], stats, table_dtype=table_dtype, **options
        )
        if x is not None and refit != "none":
            q = refit_layer(q, lin, refit_cache(x), zero=refit == "lut+zero")
        if x is not None and gptq is not None:
            prepared = refit_cache.derived(x, gptq, lambda H: prepare(H, gptq))
            q = gptq_layer(q, lin, refit_cache.covariance(x), gptq, prepared)
        return q

    refit_cache = CovarianceCache()

    start = time.perf_counter()
    bar = tqdm(
        total=len(layers), desc=f"any4: {f.name} G={group_size}", unit="layer", disable=not progress
    )
    done: dict = {}
    n_tokens = 0
    if needs_stats and layers:
        seq_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        run, n_tokens = calibration_runner(calibration, tokenizer, max_calibration_tokens, seq_len)

        def quantize_now(name: str, module: nn.Module, x: torch.Tensor) -> None:
            if not in_hook or name in done:
                return
            q = make(name, module, recorder.stats[name], x if needs_x else None)
            if mode == "sequential":
                with torch.no_grad():  # the rest of this pass sees the quantized layer
                    w = q.dequantize(module.weight.dtype)  # [N, K]; a Conv1D stores [K, N]
                    module.weight.data = (w.t() if is_conv1d(module) else w).to(
                        module.weight.device
                    )
            done[name] = q
            bar.update(1)

        with ActivationRecorder(layers, on_input=quantize_now) as recorder:
            was_training = model.training
            model.eval()
            try:
                run(model)
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
    quantized_params = 0
    for name, lin in layers.items():
        if name not in done:
            done[name] = make(name, lin, stats.get(name))
            bar.update(1)
        quantized_params += done[name].out_features * done[name].in_features
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
        "refit": refit if f.learned else None,
        "gptq": None if gptq is None else {"damp": gptq.damp, "order": gptq.order},
        "table_dtype": None if table_dtype is None else str(table_dtype).replace("torch.", ""),
        "calibration_tokens": n_tokens,
        "layers": len(layers),
        "quantized_params": quantized_params,
        "total_params": total_params,
        "quantized_fraction": round(quantized_params / max(total_params, 1), 6),
        "expert_params": expert_params,
        "seconds": round(time.perf_counter() - start, 3),
    }
    try:
        setattr(model, SETTINGS_ATTR, settings)
    except (AttributeError, TypeError):
        pass
    if progress:
        tqdm.write("any4: " + quantize_summary(settings))
    for hook in POST_QUANTIZE_HOOKS:
        hook(model)
    return model


def quantized_layers(model: nn.Module) -> dict:
    """{name: QuantLinear} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


__all__ = [
    "check_settings", "eligible_layers", "expert_parameters", "layer_quantize_kwargs",
    "matches_skip", "plan_layers", "quantize_layer", "quantize_model", "quantize_summary",
    "quantized_layers",
]  # fmt: skip
