"""``any4.save`` / ``any4.load``: quantized models in safetensors with JSON metadata.

File layout: one ``.safetensors`` file whose header metadata holds, under the key ``"any4"``,
a JSON document::

    {"format": "any4-safetensors", "format_version": 2, "any4_version": "0.1.0",
     "layers": {name: {"fmt", "group_size", "shape": [N, K], "bias": bool, "table_dtype",
                       "code_layout"}},
     "tied": {alias: stored_name}, "sha256": {tensor: hex digest}, "settings": {...},
     "extra": {...}}

Each quantized layer ``name`` is stored as ``name.packed``, ``name.lut``, ``name.scales`` (and
``name.bias``), the keys of a QuantLinear's state dict, so the file is exactly the quantized
model's state dict; tensors shared by several names (tied embeddings) are stored once. The
digests let ``load`` refuse a file whose tensor bytes were changed.

``code_layout`` names how ``name.packed`` holds the codes (any4.pack): ``"nibbles"`` (4-bit, two
per byte), ``"bits3"`` (3-bit, eight per three bytes) or ``"bits2"`` (2-bit, four per byte).
Format version 2 introduced it and the dense 3/2-bit layouts; a layer without it (every layer of
a version-1 file) holds nibbles, and 3/2-bit codes stored that way are repacked densely on load.

A directory (``any4 quantize --out DIR``) holds ``model.safetensors``, ``any4.json`` (the same
metadata, readable), and the Hugging Face ``config.json`` / tokenizer files. Loading into a fresh
transformers model::

    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(DIR)
    model = AutoModelForCausalLM.from_config(config)      # random weights, same architecture
    any4.load(DIR, model=model)                            # swaps in QuantLinear, loads tensors
    # or simply: model = any4.load(DIR)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Union

import torch
from torch import nn

from .formats import get_format
from .nn import QuantLinear, set_submodule
from .pack import CODE_LAYOUTS, LAYOUT_BITS, packed_bytes, repack
from .quantize import QuantizedTensor

FILE_FORMAT = "any4-safetensors"
FORMAT_VERSION = 2  # 2: dense 3/2-bit codes, per-layer "code_layout"
WEIGHTS_NAME = "model.safetensors"
METADATA_NAME = "any4.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Any4FormatError(ValueError):
    """The file is not a readable any4 file (truncated, tampered with, or a newer version)."""


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _any4_version() -> str:
    from . import __version__

    return __version__


def _collect(obj: Any) -> tuple:
    """(tensors {key: tensor}, layers {name: info}, settings) from a model or a dict."""
    tensors: dict = {}
    layers: dict = {}
    settings: dict = {}
    if isinstance(obj, nn.Module):
        quant = {n: m for n, m in obj.named_modules() if isinstance(m, QuantLinear)}
        for name, m in quant.items():
            layers[name] = {
                "fmt": m.fmt,
                "group_size": m.group_size,
                "shape": [m.out_features, m.in_features],
                "bias": m.bias is not None,
                "table_dtype": str(m.lut.dtype).replace("torch.", ""),
                "code_layout": CODE_LAYOUTS[get_format(m.fmt).bits],
            }
        tensors = dict(obj.state_dict())
        settings = dict(getattr(obj, "any4_settings", None) or {})
        dtype = _main_float_dtype(obj)
        if dtype is not None:
            settings["model_dtype"] = str(dtype).replace("torch.", "")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be str, got {type(key).__name__}")
            if isinstance(value, QuantizedTensor):
                if not isinstance(value.packed, torch.Tensor):
                    raise TypeError(f"{key}: QuantizedTensor parts must be torch tensors to save")
                N, K = value.shape
                layers[key] = {
                    "fmt": value.fmt,
                    "group_size": value.group_size,
                    "shape": [int(N), int(K)],
                    "bias": False,
                    "table_dtype": str(value.lut.dtype).replace("torch.", ""),
                    "code_layout": CODE_LAYOUTS[value.bits],
                }
                for part in ("packed", "lut", "scales"):
                    tensors[f"{key}.{part}"] = getattr(value, part)
            elif isinstance(value, torch.Tensor):
                tensors[key] = value
            else:
                raise TypeError(
                    f"{key}: values must be torch tensors or QuantizedTensor, got {type(value).__name__}"
                )
    else:
        raise TypeError(
            f"save expects a torch.nn.Module or a dict of tensors, got {type(obj).__name__}"
        )
    return tensors, layers, settings


def _main_float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype holding most parameter elements (None without float parameters)."""
    counts: dict = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def save(
    model_or_state: Union[nn.Module, dict],
    path: Union[str, os.PathLike],
    *,
    extra: Optional[dict] = None,
) -> str:
    """Save a quantized model (its state dict) or a dict {name: QuantizedTensor | Tensor}.

    Args:
        model_or_state: a model holding QuantLinear layers (any other parameters and persistent
            buffers are saved as they are), or a dict of QuantizedTensor / torch tensors.
        path: a ``.safetensors`` file, or a directory (created; ``model.safetensors`` plus
            ``any4.json``, and ``config.json`` when the model has a Hugging Face config).
        extra: JSON-serialisable user metadata stored alongside.
    Returns:
        the path of the .safetensors file written.
    """
    from safetensors.torch import save_file

    tensors, layers, settings = _collect(model_or_state)
    path = os.fspath(path)
    is_dir = not path.endswith(".safetensors")
    file = os.path.join(path, WEIGHTS_NAME) if is_dir else path
    # Store shared tensors (tied embeddings) once.
    stored: dict = {}
    tied: dict = {}
    seen: dict = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
        ident = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        stored[key] = t.detach().to("cpu").contiguous()
    meta = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "any4_version": _any4_version(),
        "layers": layers,
        "tied": tied,
        "sha256": {k: _digest(t) for k, t in stored.items()},
        "settings": settings,
        "extra": extra or {},
    }
    text = json.dumps(meta, sort_keys=True)
    if is_dir:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    save_file(stored, file, metadata={"any4": text})
    if is_dir:
        with open(os.path.join(path, METADATA_NAME), "w", encoding="utf-8") as fh:
            json.dump(
                {k: v for k, v in meta.items() if k != "sha256"}, fh, indent=2, sort_keys=True
            )
        config = getattr(model_or_state, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            save_hf_config(config, path)
    return file


def save_hf_config(config: Any, directory: str) -> None:
    """Write a Hugging Face config without the source's quantization settings (e.g. GGUF)."""
    import copy

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    cfg.save_pretrained(directory)


def _resolve(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no any4 file at {path}")
    return path


def read_metadata(path: Union[str, os.PathLike]) -> dict:
    """The any4 metadata of a file or directory (checks format name and version)."""
    from safetensors import safe_open

    file = _resolve(path)
    try:
        with safe_open(file, framework="pt") as f:
            raw = (f.metadata() or {}).get("any4")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise Any4FormatError(f"{file}: not a readable safetensors file ({e})") from e
    if raw is None:
        raise Any4FormatError(f"{file}: no any4 metadata (not written by any4.save)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise Any4FormatError(f"{file}: corrupt any4 metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise Any4FormatError(f"{file}: metadata format is not {FILE_FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise Any4FormatError(f"{file}: metadata has no integer format_version")
    if version > FORMAT_VERSION:
        raise Any4FormatError(
            f"{file}: written with any4 file format version {version} (any4 {meta.get('any4_version', '?')}); "
            f"this any4 {_any4_version()} reads versions up to {FORMAT_VERSION}: upgrade any4"
        )
    if version < 1:
        raise Any4FormatError(f"{file}: unknown any4 file format version {version}")
    return meta


def _read_tensors(file: str, meta: dict, device: Union[str, torch.device]) -> dict:
    from safetensors import safe_open

    digests = meta.get("sha256", {})
    tensors = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(digests):
                raise Any4FormatError(
                    f"{file}: tensors do not match the metadata (missing {sorted(set(digests) - keys)[:3]}, "
                    f"unexpected {sorted(keys - set(digests))[:3]})"
                )
            for key in sorted(keys):
                tensors[key] = f.get_tensor(key)
    except Any4FormatError:
        raise
    except Exception as e:
        raise Any4FormatError(
            f"{file}: cannot read tensors, the file is truncated or corrupt ({e})"
        ) from e
    for key, t in tensors.items():
        if _digest(t) != digests[key]:
            raise Any4FormatError(
                f"{file}: tensor {key!r} does not match its checksum (the file was modified)"
            )
    for alias, target in meta.get("tied", {}).items():
        if target not in tensors:
            raise Any4FormatError(f"{file}: tied tensor {alias!r} points to missing {target!r}")
        tensors[alias] = tensors[target]
    for name, stored_bits in _check_layers(file, meta, tensors).items():
        info = meta["layers"][name]
        bits = get_format(info["fmt"]).bits
        if stored_bits != bits:  # 3/2-bit codes in nibbles (version 1): the dense layout
            key = f"{name}.packed"
            tensors[key] = repack(tensors[key], int(info["shape"][1]), stored_bits, bits)
    return {k: v.to(device) for k, v in tensors.items()}


def _check_layers(file: str, meta: dict, tensors: dict) -> dict:
    """Checks every layer's tensors against its metadata; returns {layer: stored code bits}."""
    stored_bits = {}
    for name, info in meta.get("layers", {}).items():
        try:
            f = get_format(info["fmt"])
            N, K = (int(s) for s in info["shape"])
            G = int(info["group_size"])
            dtype = _DTYPES[info["table_dtype"]]
            layout = info.get("code_layout", CODE_LAYOUTS[4])
            bits = LAYOUT_BITS[layout]
        except (KeyError, ValueError, TypeError) as e:
            raise Any4FormatError(f"{file}: bad metadata for layer {name!r} ({e})") from e
        if bits not in (f.bits, 4):
            raise Any4FormatError(
                f"{file}: layer {name!r} is {f.name} but its codes are stored as {layout!r}"
            )
        stored_bits[name] = bits
        expected = {
            "packed": ((N, packed_bytes(K, bits)), torch.uint8),
            "lut": ((N if f.learned else 1, f.levels), dtype),
            "scales": ((N, -(-K // G), 2), dtype),
        }
        for part, (shape, dt) in expected.items():
            t = tensors.get(f"{name}.{part}")
            if t is None:
                raise Any4FormatError(f"{file}: layer {name!r} has no {part} tensor")
            if tuple(t.shape) != shape or t.dtype != dt:
                raise Any4FormatError(
                    f"{file}: {name}.{part} is {t.dtype} {tuple(t.shape)}, metadata says {dt} {shape}"
                )
    return stored_bits


def load(
    path: Union[str, os.PathLike],
    model: Optional[nn.Module] = None,
    *,
    device: Union[str, torch.device] = "cpu",
) -> Any:
    """Load what ``any4.save`` wrote.

    Args:
        path: a .safetensors file or a directory written by ``any4.save``.
        model: a model of the same architecture (e.g. a fresh ``from_config`` transformers
            model, or the float model): its listed Linear layers are replaced by QuantLinear and
            all tensors loaded (float parameters take the saved dtype). When omitted and ``path``
            is a directory with a ``config.json``, the transformers model is built from it; when
            omitted otherwise, a dict {name: QuantizedTensor | Tensor} is returned.
        device: where the tensors go.
    Returns:
        the model (in eval mode), or the dict.
    Raises:
        Any4FormatError (a ValueError) for a truncated, modified, foreign or too-new file.
    """
    file = _resolve(path)
    meta = read_metadata(file)
    tensors = _read_tensors(file, meta, device)
    layers = meta.get("layers", {})
    if model is None:
        directory = os.fspath(path) if os.path.isdir(os.fspath(path)) else None
        if directory is not None and os.path.isfile(os.path.join(directory, "config.json")):
            model = _fresh_hf_model(directory)
        else:
            return _as_state(tensors, layers)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, info in layers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(
                f"the model has no layer {name!r} (saved from a different architecture?)"
            ) from e
        N, K = info["shape"]
        if isinstance(current, nn.Linear):
            if (current.out_features, current.in_features) != (N, K):
                raise ValueError(
                    f"{name}: the model's Linear is {current.out_features}x{current.in_features}, saved {N}x{K}"
                )
        elif not isinstance(current, QuantLinear):
            raise ValueError(
                f"{name}: expected an nn.Linear or QuantLinear in the model, found {type(current).__name__}"
            )
        bias = tensors.get(f"{name}.bias")
        shell = QuantLinear(
            K,
            N,
            bias=bool(info["bias"]),
            fmt=info["fmt"],
            group_size=int(info["group_size"]),
            table_dtype=_DTYPES[info["table_dtype"]],
            device=device,
            dtype=None if bias is None else bias.dtype,
        )
        set_submodule(model, name, shell)
    # The model takes the saved dtype (non-persistent buffers too, e.g. rotary tables), and each
    # float tensor its saved dtype, so outputs are bit-identical. QuantLinear keeps table dtypes.
    saved_dtype = _DTYPES.get((meta.get("settings") or {}).get("model_dtype", ""))
    if saved_dtype is not None and _main_float_dtype(model) != saved_dtype:
        model.to(saved_dtype)
    own = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for key, t in tensors.items():
            cur = own.get(key)
            if (
                cur is not None
                and cur.dtype != t.dtype
                and cur.is_floating_point()
                and t.is_floating_point()
            ):
                cur.data = cur.data.to(t.dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the file does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.to(device)
    settings = meta.get("settings") or {}
    if settings:
        try:
            model.any4_settings = settings
        except (AttributeError, TypeError):
            pass
    return model.eval()


def _as_state(tensors: dict, layers: dict) -> dict:
    out = dict(tensors)
    for name, info in layers.items():
        parts = {p: out.pop(f"{name}.{p}") for p in ("packed", "lut", "scales")}
        out[name] = QuantizedTensor(
            parts["packed"],
            parts["lut"],
            parts["scales"],
            tuple(info["shape"]),
            info["fmt"],
            int(info["group_size"]),
        )
    return out


def _fresh_hf_model(directory: str) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading a directory without model= needs transformers (pip install 'any4[model]')"
        ) from e
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    return AutoModelForCausalLM.from_config(config)


__all__ = ["Any4FormatError", "load", "read_metadata", "save"]
