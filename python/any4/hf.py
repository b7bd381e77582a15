"""Hugging Face transformers integration (SPEC §10): ``Any4Config`` and ``Any4HfQuantizer``.

Registered with transformers' out-of-tree registration when both ``any4`` and transformers'
quantizer registry are imported (``import any4`` arranges it without importing transformers
itself), so that::

    import any4
    from transformers import AutoModelForCausalLM

    # quantize while loading (equals any4.quantize_model with the same settings, bit for bit)
    model = AutoModelForCausalLM.from_pretrained(NAME, quantization_config=any4.Any4Config(
        fmt="any4", group_size=128))
    model.save_pretrained("out", max_shard_size="2GB")     # any4 checkpoint, format version 2
    model = AutoModelForCausalLM.from_pretrained("out")     # pre-quantized: QuantLinear on the
                                                            # meta device, packed tensors loaded

Quantize on load: fixed formats (int4, nf4, fp4, ...) and ``weighting="none"`` quantize each
weight as it is read (the float model is never complete in memory); learned formats with sample
weights need the calibration pass over the whole float model, so the float model is loaded first,
then ``quantize_model`` runs on it with the config's calibration (default: any4's samples and the
checkpoint's own tokenizer).

Pre-quantized loading reads config.json's ``quantization_config`` (written by ``any4.save`` and
``save_pretrained``): every listed layer becomes an empty QuantLinear on the meta device before any
tensor is read, and transformers assigns the stored ``packed`` / ``lut`` / ``scales`` to it.

This module needs transformers; ``import any4`` works without it.
"""

from __future__ import annotations

import contextvars
import os
import re
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import io
from . import validate as V
from .calibration import DEFAULT_MAX_TOKENS
from .formats import get_format
from .kmeans import DEFAULT_METHOD, DEFAULT_N_INIT, METHODS
from .model import (
    MODES,
    POST_QUANTIZE_HOOKS,
    SETTINGS_ATTR,
    eligible_layers,
    layer_group_size,
    parameter_count,
    quantize_layer,
    quantize_model,
    quantize_summary,
)
from .nn import QuantLinear, dense_features, set_submodule
from .refit import DEFAULT_REFIT, REFITS
from .stats import DEFAULT_WEIGHTING, WEIGHTINGS

# The directory any4.load has just verified (every digest and all metadata) before handing it to
# from_pretrained: the quantizer then does not hash every weight file a second time.
_VERIFIED_DIR: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "any4_verified_checkpoint_dir", default=None
)

QUANT_METHOD = io.QUANT_METHOD
DEFAULT_SHARD_SIZE = "50GB"  # transformers' save_pretrained default


class Any4Config(QuantizationConfigMixin):
    """any4 quantization settings for ``from_pretrained(..., quantization_config=...)``.

    Args:
        fmt: "any4", "any3", "any2", "int4", "nf4", "fp4", ... (see ``any4.FORMATS``).
        group_size: G, a positive multiple of 8.
        weighting, method, mode, n_init, seed, refit: as for ``any4.quantize_model``.
        table_dtype: "bfloat16", "float16", "float32" or a torch dtype (default: float16 for an
            fp16 model, else bfloat16).
        modules_to_not_convert: layer-name patterns left in float (``skip`` of quantize_model);
            default ["lm_head"]. ``skip`` is accepted as an alias.
        calibration: the calibration sample of learned formats: None / "default" (any4's samples),
            a text, a list of texts or token ids; tokenized with the checkpoint's tokenizer.
        max_calibration_tokens: cut the calibration sample to this many tokens.
        layers, format_version, guard: written by any4 into a saved checkpoint's config.json
            (per-layer settings); not for users to set.
    """

    def __init__(
        self,
        fmt: str = "any4",
        group_size: int = 128,
        weighting: Optional[str] = DEFAULT_WEIGHTING,
        method: Optional[str] = DEFAULT_METHOD,
        mode: Optional[str] = "one-pass",
        table_dtype: Union[None, str, torch.dtype] = None,
        modules_to_not_convert: Optional[list] = None,
        calibration: Any = None,
        n_init: Optional[int] = DEFAULT_N_INIT,
        seed: int = 0,
        max_calibration_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
        refit: Optional[str] = DEFAULT_REFIT,
        skip: Optional[list] = None,
        layers: Optional[dict] = None,
        format_version: int = io.FORMAT_VERSION,
        guard: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        f = get_format(fmt)
        V.group_size_setting(group_size)
        if weighting is not None and weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if method is not None and method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if refit is not None and refit not in REFITS:
            raise ValueError(f"refit must be one of {REFITS}, got {refit!r}")
        if isinstance(table_dtype, torch.dtype):
            table_dtype = str(table_dtype).replace("torch.", "")
        if table_dtype is not None and table_dtype not in io._DTYPES:
            raise ValueError(f"table_dtype must be one of {tuple(io._DTYPES)}, got {table_dtype!r}")
        if skip is not None and modules_to_not_convert is not None:
            raise ValueError("pass modules_to_not_convert or skip, not both")
        skip = modules_to_not_convert if modules_to_not_convert is not None else skip
        if isinstance(skip, str):
            skip = [skip]
        self.fmt = f.name
        self.group_size = group_size
        self.weighting = weighting if weighting is not None else DEFAULT_WEIGHTING
        self.method = method if method is not None else DEFAULT_METHOD
        self.mode = mode if mode is not None else "one-pass"
        self.table_dtype = table_dtype
        self.modules_to_not_convert = list(skip) if skip is not None else ["lm_head"]
        self.calibration = calibration
        self.n_init = n_init if n_init is not None else DEFAULT_N_INIT
        self.seed = seed
        self.max_calibration_tokens = max_calibration_tokens
        self.refit = refit if refit is not None else DEFAULT_REFIT
        self.layers = dict(layers or {})
        self.format_version = format_version
        self.guard = guard
        for key, value in kwargs.items():  # fields of newer writers are kept, not dropped
            setattr(self, key, value)

    @property
    def needs_calibration(self) -> bool:
        """Learned format with sample weights or a refit: quantized after the whole float model
        loaded (the calibration pass needs it)."""
        return get_format(self.fmt).learned and (self.weighting != "none" or self.refit != "none")

    def quantize_options(self) -> dict:
        """The keyword arguments of ``any4.quantize_model`` these settings stand for."""
        return dict(
            fmt=self.fmt,
            group_size=self.group_size,
            mode=self.mode,
            weighting=self.weighting,
            method=self.method,
            n_init=self.n_init,
            seed=self.seed,
            table_dtype=io._DTYPES[self.table_dtype] if self.table_dtype else None,
            skip=tuple(self.modules_to_not_convert),
            max_calibration_tokens=self.max_calibration_tokens,
            refit=self.refit,
        )

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        cal = out.get("calibration")
        if not (cal is None or isinstance(cal, str) or (isinstance(cal, list) and all(
            isinstance(i, (str, int)) for i in cal
        ))):  # fmt: skip
            out["calibration"] = None  # tensors, callables: not JSON; the run used them
        return out


class Any4HfQuantizer(HfQuantizer):
    """The transformers quantizer of ``quant_method="any4"`` (see the module docstring)."""

    requires_calibration = False
    quantization_config: Any4Config

    def __init__(self, quantization_config: Any4Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.to_quantize: dict = {}  # quantize on load, per weight: {layer name: group size}
        self.checkpoint_dir: Optional[str] = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "any4 models cannot be offloaded to disk; remove 'disk' from device_map"
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        cfg = self.quantization_config
        files = kwargs.get("checkpoint_files") or []
        if files:
            self.checkpoint_dir = os.path.dirname(files[0])
        if self.pre_quantized:
            if not cfg.layers:
                raise ValueError("the checkpoint's any4 quantization_config lists no layers")
            if int(cfg.format_version) > io.FORMAT_VERSION:
                raise io.Any4FormatError(
                    f"checkpoint written with any4 file format version {cfg.format_version}; this any4 "
                    f"reads versions up to {io.FORMAT_VERSION}: upgrade any4"
                )
            if self.checkpoint_dir is not None and _VERIFIED_DIR.get() != os.path.realpath(
                self.checkpoint_dir
            ):
                io.verify_checkpoint(self.checkpoint_dir)  # digests, metadata, before reading
            for name, info in cfg.layers.items():
                try:
                    current = model.get_submodule(name)
                except AttributeError as e:
                    raise ValueError(
                        f"the model has no layer {name!r} (quantization_config.layers)"
                    ) from e
                features = dense_features(current)
                if features is None or features != tuple(info["shape"]):
                    raise ValueError(
                        f"{name}: the model has {type(current).__name__} {features}, the checkpoint a "
                        f"quantized layer of shape {tuple(info['shape'])}"
                    )
                bias = getattr(current, "bias", None)
                shell = io.quant_shell(
                    info, "meta", None if bias is None else bias.dtype, stored_layout=True
                )
                _swap_in(model, name, shell)
            if cfg.guard:
                ignore = set(model._keys_to_ignore_on_load_unexpected or ())
                model._keys_to_ignore_on_load_unexpected = ignore | {re.escape(cfg.guard) + "$"}
            return
        if cfg.needs_calibration:
            return  # quantize_model after loading (it needs the whole float model)
        for name, layer in eligible_layers(model, cfg.modules_to_not_convert).items():
            g = layer_group_size(cfg.group_size, dense_features(layer)[1])
            if g is None:
                warnings.warn(f"any4: {name} has in_features < 8; left in float", stacklevel=2)
            else:
                self.to_quantize[name] = g

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and tensor == "weight" and module_name in self.to_quantize

    def get_quantize_ops(self) -> Any:
        return _quantize_op(self)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        if self.pre_quantized:
            if self.checkpoint_dir is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        settings = io.read_metadata(self.checkpoint_dir).get("settings") or {}
                    except (io.Any4FormatError, FileNotFoundError):
                        settings = {}
                if settings:
                    setattr(model, SETTINGS_ATTR, settings)
        elif cfg.needs_calibration:
            calibration = cfg.calibration if cfg.calibration is not None else "default"
            tokenizer = None
            if isinstance(calibration, str) or (isinstance(calibration, list) and calibration
                                                 and isinstance(calibration[0], str)):  # fmt: skip
                tokenizer = _checkpoint_tokenizer(model)
            options = cfg.quantize_options()
            quantize_model(model, calibration=calibration, tokenizer=tokenizer, **options)
        else:
            self._record_settings(model)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.densify_codes()  # 3/2-bit codes of an older checkpoint, stored in nibbles
                m.check()  # loaded tensors: shapes, codes in range, finite (any4.validate)
                m.prepare_for_device()
        cfg.layers = {
            n: io.layer_info(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)
        }
        attach(model, cfg, self)
        return model

    def _record_settings(self, model: nn.Module) -> None:
        """any4_settings of a model quantized weight by weight while loading (as quantize_model
        records them)."""
        cfg = self.quantization_config
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        learned = get_format(cfg.fmt).learned
        quantized = sum(m.out_features * m.in_features for m in layers)
        total = parameter_count(model) + quantized  # the float model's count, tied weights once
        settings = {
            "fmt": cfg.fmt, "group_size": cfg.group_size, "mode": cfg.mode,
            "weighting": cfg.weighting if learned else None,
            "method": cfg.method if learned else None,
            "n_init": cfg.n_init if learned and cfg.method == "lloyd" else None,
            "seed": cfg.seed, "skip": list(cfg.modules_to_not_convert),
            "refit": cfg.refit if learned else None,
            "table_dtype": cfg.table_dtype, "calibration_tokens": 0, "layers": len(layers),
            "quantized_params": quantized, "total_params": total,
            "quantized_fraction": round(quantized / max(total, 1), 6), "expert_params": 0,
        }  # fmt: skip
        setattr(model, SETTINGS_ATTR, settings)
        print("any4: quantized on load: " + quantize_summary(settings))

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple:
        """For transformers' own save_pretrained (any4 models normally use any4.save): the state
        dict plus the guard tensor, recorded in the quantization_config written after it."""
        layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        if not layers:
            return None, {}
        guard = f"{layers[0]}.weight"
        self.quantization_config.guard = guard
        self.quantization_config.layers = {
            n: io.layer_info(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)
        }
        state = dict(model.state_dict())
        state[guard] = torch.zeros(0, dtype=torch.uint8)
        return state, {}

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _quantize_op(quantizer: Any4HfQuantizer) -> Any:
    from transformers.core_model_loading import ConversionOps

    class Any4Quantize(ConversionOps):
        """Quantizes one Linear / Conv1D weight as it is loaded and swaps in the QuantLinear."""

        def __init__(self, hf_quantizer: Any4HfQuantizer) -> None:
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict: dict, model: Any = None, full_layer_name: Optional[str] = None,
                    missing_keys: Any = None, **kwargs: Any) -> dict:  # fmt: skip
            value = next(iter(input_dict.values()))
            value = value[0] if isinstance(value, list) else value
            name = full_layer_name.rpartition(".")[0]
            current = model.get_submodule(name)
            current._parameters["weight"] = nn.Parameter(value, requires_grad=False)
            cfg = self.hf_quantizer.quantization_config
            options = cfg.quantize_options()
            q = quantize_layer(
                current, cfg.fmt, self.hf_quantizer.to_quantize[name],
                table_dtype=options["table_dtype"], weighting=cfg.weighting, method=cfg.method,
                n_init=cfg.n_init, seed=cfg.seed,
            )  # fmt: skip
            for t in list(q.buffers()) + list(q.parameters()):
                t._is_hf_initialized = True
            _swap_in(model, name, q)
            if missing_keys is not None:
                missing_keys.discard(full_layer_name)
            return {}

    return Any4Quantize(quantizer)


def _swap_in(model: nn.Module, name: str, layer: QuantLinear) -> None:
    """Put ``layer`` at ``name``, marked as initialized for transformers together with its parent:
    weight initialization of missing keys (e.g. a tied lm_head) must not run on it, and some
    parents' schemes read their children's ``.weight`` (GPT-2 scales ``mlp.c_proj.weight``)."""
    set_submodule(model, name, layer)
    layer._is_hf_initialized = True
    parent = name.rpartition(".")[0]
    if parent:
        model.get_submodule(parent)._is_hf_initialized = True


def _checkpoint_tokenizer(model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    source = getattr(getattr(model, "config", None), "name_or_path", None)
    if not source:
        raise ValueError(
            "any4: calibration text needs the checkpoint's tokenizer, but the model records no "
            "name_or_path; pass token ids as Any4Config(calibration=...)"
        )
    return AutoTokenizer.from_pretrained(source)


def attach(model: nn.Module, config: Optional[Any4Config] = None,
           quantizer: Optional[Any4HfQuantizer] = None) -> nn.Module:  # fmt: skip
    """Make a transformers model holding QuantLinear layers an any4 model for transformers:
    ``config.quantization_config``, ``hf_quantizer``, and ``save_pretrained`` writing any4's
    checkpoint (format version 2, sharded with ``max_shard_size``). Runs after every
    ``quantize_model`` on a transformers model; other modules are returned unchanged."""
    if not _is_transformers_model(model):
        return model
    layers = {n: io.layer_info(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return model
    if config is None:
        settings = getattr(model, SETTINGS_ATTR, None) or {}
        qc = io.quantization_config(layers, settings)
        qc.pop("quant_method")
        config = Any4Config(**{k: v for k, v in qc.items() if v is not None})
    config.layers = layers
    model.config.quantization_config = config
    model.hf_quantizer = quantizer or Any4HfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.save_pretrained = _save_pretrained.__get__(model)
    return model


def _save_pretrained(
    self: nn.Module,
    save_directory: Union[str, os.PathLike],
    is_main_process: bool = True,
    state_dict: Optional[dict] = None,
    push_to_hub: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of an any4 model: ``any4.save(self, save_directory, max_shard_size=...)``
    (format version 2: config.json with quantization_config, safetensors shards with an index,
    any4.json, generation_config.json), read back by ``from_pretrained`` and ``any4.load``."""
    if state_dict is not None:
        raise ValueError(
            "save_pretrained of an any4 model saves the model's own state dict; drop state_dict="
        )
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("any4 models are saved as safetensors only")
    if not is_main_process:
        return
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
    io.save(self, os.fspath(save_directory), max_shard_size=max_shard_size)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=kwargs.pop("token", None))
        repo_id = kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
        repo_id = api.create_repo(
            repo_id, exist_ok=True, private=kwargs.pop("private", None)
        ).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=save_directory,
                          commit_message=kwargs.pop("commit_message", None) or "Upload any4 model")  # fmt: skip


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def from_pretrained_checkpoint(directory: str, dtype: Optional[torch.dtype] = None,
                               device: Union[str, torch.device] = "cpu", *,
                               verified: bool = False) -> nn.Module:  # fmt: skip
    """A format-2 any4 directory loaded with ``AutoModelForCausalLM.from_pretrained`` (any4's
    quantizer: meta-device QuantLinear shells, no float weights), in ``dtype``, on ``device``.
    ``verified=True``: the caller has just run ``io.verify_checkpoint(directory)``, so the
    quantizer skips its own (identical) verification."""
    from transformers import AutoModelForCausalLM

    register()
    kwargs: dict = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    token = _VERIFIED_DIR.set(os.path.realpath(directory) if verified else None)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    finally:
        _VERIFIED_DIR.reset(token)
    return model.to(device).eval()


def register() -> None:
    """Register Any4Config / Any4HfQuantizer under ``quant_method="any4"`` (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not Any4Config:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(Any4Config)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not Any4HfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(Any4HfQuantizer)
    if attach not in POST_QUANTIZE_HOOKS:
        POST_QUANTIZE_HOOKS.append(attach)


register()

__all__ = ["Any4Config", "Any4HfQuantizer", "attach", "register"]
