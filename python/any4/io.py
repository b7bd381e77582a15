"""``any4.save`` / ``any4.load``: quantized models in safetensors with JSON metadata.

Checkpoint format version 2. A directory (``any4.save(model, DIR)``, ``model.save_pretrained``
on an any4 model, ``any4 quantize --out DIR``) holds:

- ``config.json``: the Hugging Face config plus ``"quantization_config"``::

      {"quant_method": "any4", "format_version": 2, "fmt", "group_size", "weighting", "method",
       "mode", "table_dtype", "modules_to_not_convert": [...], "guard": KEY,
       "layers": {module: {"fmt", "group_size", "shape": [N, K], "bias", "table_dtype",
                           "code_layout"}}}

  which ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` reads after ``import any4``.
- the weights: ``model.safetensors``, or shards ``model-00001-of-0000N.safetensors`` with
  ``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``), as
  ``from_pretrained`` reads them. Tensor keys are the quantized model's state dict: each quantized
  layer ``name`` as ``name.packed`` (uint8), ``name.lut``, ``name.scales`` (and ``name.bias``),
  every other tensor under its own name and dtype; tensors shared by several names (tied
  embeddings) are stored once. The *guard* ``KEY`` is ``<first quantized layer>.weight`` stored as
  an empty uint8 tensor: without any4 registered, transformers 5 only warns about the unknown
  ``quant_method``, and this size mismatch makes it refuse the checkpoint instead of loading random
  weights. any4's readers drop it.
- each safetensors header: ``"format": "pt"`` and ``"any4"``: a JSON document
  ``{"format": "any4-safetensors", "format_version": 2, "any4_version", "layers": {layers stored in
  this file}, "tied": {alias: stored}, "settings", "extra", "guard", "digest": "sha256:<hex>"}``.
  The file is sealed (``any4.integrity``): ``digest`` is one sha256 over every byte of the file
  (header: names, dtypes, shapes, offsets, layer settings; and tensor data), so ``load`` refuses
  any changed byte with :class:`Any4FormatError`; every metadata field is also checked against
  the tensors (``any4.validate``), and config.json's layers and any4.json against the files.
  A digest inside a file detects accidents, not a forger: pin the hash ``any4 verify DIR``
  prints (:func:`verify`). Every file is written atomically (``any4.atomic``).
- ``any4.json`` (the same metadata, readable, with ``"files": {name: digest}``), the tokenizer
  files and ``generation_config.json`` when available.

A single ``.safetensors`` file (``any4.save(model, "m.safetensors")``) is one such file.
Format-version-1 files and directories (one file, no quantization_config, per-tensor ``sha256``
digests of the data only) still load.

``code_layout`` says how ``name.packed`` holds the codes (any4.pack): ``"dense"``, one bit stream
per row at the format's width (uint8 [N, ceil(bits*K/8)]: 3-bit codes eight per three bytes,
2-bit four per byte), or ``"nibble"``, two codes per byte whatever the width ([N, ceil(K/2)]; the
two are the same for 4-bit codes). A layer without it holds nibbles: that is how format-version-1
files and the first format-version-2 writers stored 3/2-bit codes; ``load`` repacks them densely
(the same codes, so the same outputs).

Loading::

    model = any4.load(DIR)                 # or a hub repo id (huggingface_hub cache)
    any4.load(DIR, model=fresh_or_float)   # swaps in QuantLinear, loads tensors
    # or, after import any4: AutoModelForCausalLM.from_pretrained(DIR)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from . import atomic, integrity
from . import validate as V
from .formats import get_format
from .integrity import Any4FormatError
from .nn import QuantLinear, dense_features, set_submodule
from .pack import code_layout, repack
from .quantize import QuantizedTensor

FILE_FORMAT = "any4-safetensors"
FORMAT_VERSION = 2
QUANT_METHOD = "any4"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
METADATA_NAME = "any4.json"
CONFIG_NAME = "config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _any4_version() -> str:
    from . import __version__

    return __version__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def layer_info(module: QuantLinear) -> dict:
    """The per-layer metadata of a QuantLinear (``fmt``, ``group_size``, ``shape``, ``bias``,
    ``table_dtype``, ``code_layout``)."""
    return {
        "fmt": module.fmt,
        "group_size": module.group_size,
        "shape": [module.out_features, module.in_features],
        "bias": module.bias is not None,
        "table_dtype": _dtype_name(module.lut.dtype),
        "code_layout": code_layout(get_format(module.fmt).bits),
    }


def _collect(obj: Any) -> tuple:
    """(tensors {key: tensor}, layers {name: info}, settings) from a model or a dict."""
    tensors: dict = {}
    layers: dict = {}
    settings: dict = {}
    if isinstance(obj, nn.Module):
        for name, m in obj.named_modules():
            if isinstance(m, QuantLinear):
                layers[name] = layer_info(m)
        tensors = dict(obj.state_dict())
        settings = dict(getattr(obj, "any4_settings", None) or {})
        dtype = _main_float_dtype(obj)
        if dtype is not None:
            settings["model_dtype"] = _dtype_name(dtype)
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
                    "table_dtype": _dtype_name(value.lut.dtype),
                    "code_layout": code_layout(value.bits),
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


def _dedupe(tensors: dict) -> tuple:
    """({key: cpu tensor} with shared tensors stored once, {alias: stored key})."""
    stored: dict = {}
    tied: dict = {}
    seen: dict = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"{key} is on the meta device (not loaded); nothing to save")
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(),
                 tuple(t.shape), tuple(t.stride()), t.dtype)  # fmt: skip
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        stored[key] = t.detach().to("cpu").contiguous()
    return stored, tied


def parse_size(size: Union[int, str]) -> int:
    """Bytes of a shard size: an int, or digits and a unit ("500MB", "2GB", "1GiB")."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
        if m is None:
            raise ValueError(f"max_shard_size must be bytes or like '500MB' / '2GB', got {size!r}")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise TypeError(f"max_shard_size must be an int or a str, got {type(size).__name__}")
    if n < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def split_shards(stored: dict, layers: dict, max_shard_size: Optional[Union[int, str]]) -> list:
    """Lists of keys, one per shard, in state-dict order; a quantized layer's tensors stay in one
    shard; a shard exceeds ``max_shard_size`` only when one layer or tensor alone does."""
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    units: list = []  # [keys of one layer or one tensor]
    owner_index: dict = {}
    for key in stored:
        owner = key.rpartition(".")[0]
        if owner in layers:
            if owner not in owner_index:
                owner_index[owner] = len(units)
                units.append([])
            units[owner_index[owner]].append(key)
        else:
            units.append([key])
    shards: list = []
    size = 0
    for keys in units:
        n = sum(_nbytes(stored[k]) for k in keys)
        if not shards or (limit is not None and size + n > limit and size > 0):
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += n
    return shards or [[]]


def _write_text(path: str, text: str) -> None:
    atomic.write_text(path, text)


def _write_json(path: str, obj: Any) -> None:
    atomic.write_json(path, obj)


def quantization_config(layers: dict, settings: dict, guard: Optional[str] = None) -> dict:
    """The ``quantization_config`` entry of config.json for a checkpoint (format version 2).
    Per-layer fields are passed through as they are."""

    def most_common(field: str) -> Any:
        values = [info.get(field) for info in layers.values()]
        return max(set(values), key=values.count) if values else None

    qc = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "fmt": settings.get("fmt") or most_common("fmt"),
        "group_size": settings.get("group_size") or most_common("group_size"),
        "weighting": settings.get("weighting"),
        "method": settings.get("method"),
        "mode": settings.get("mode"),
        "table_dtype": settings.get("table_dtype") or most_common("table_dtype"),
        "modules_to_not_convert": list(settings.get("skip") or []),
        "layers": {name: dict(info) for name, info in layers.items()},
    }
    if guard is not None:
        qc["guard"] = guard
    return qc


def _hf_config_dict(config: Any, qc: dict) -> str:
    """config.json text: the model's Hugging Face config with any4's quantization_config (the
    source's own quantization settings, e.g. GGUF, dropped)."""
    import copy

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(cfg, "quantization_config")
    data = json.loads(cfg.to_json_string(use_diff=True))
    data["quantization_config"] = qc
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def save(
    model_or_state: Union[nn.Module, dict],
    path: Union[str, os.PathLike],
    *,
    extra: Optional[dict] = None,
    max_shard_size: Optional[Union[int, str]] = None,
    tokenizer: Any = None,
) -> str:
    """Save a quantized model (its state dict) or a dict {name: QuantizedTensor | Tensor}.

    Args:
        model_or_state: a model holding QuantLinear layers (any other parameters and persistent
            buffers are saved as they are), or a dict of QuantizedTensor / torch tensors.
        path: a ``.safetensors`` file, or a directory (created): weights, ``any4.json``, and,
            for a Hugging Face model, ``config.json`` with ``quantization_config`` and
            ``generation_config.json`` (see the module docstring).
        extra: JSON-serialisable user metadata stored alongside.
        max_shard_size: for a directory, the largest weight file (bytes, or "500MB", "2GB");
            larger checkpoints are sharded with an index. Default: one file.
        tokenizer: saved into the directory too (``tokenizer.save_pretrained``).
    Returns:
        the path of the (first) .safetensors file written.
    """
    tensors, layers, settings = _collect(model_or_state)
    path = os.fspath(path)
    is_dir = not path.endswith(".safetensors")
    stored, tied = _dedupe(tensors)
    if layers and "table_dtype" not in settings:
        settings["table_dtype"] = quantization_config(layers, {})["table_dtype"]
    config = getattr(model_or_state, "config", None) if is_dir else None
    hf_config = config is not None and hasattr(config, "to_json_string")
    guard = None
    if hf_config and layers:
        guard = f"{next(iter(layers))}.weight"
        if guard in stored:
            raise ValueError(f"{guard} is both a quantized layer's weight and a tensor")
        stored[guard] = torch.zeros(0, dtype=torch.uint8)
    base = {"format": FILE_FORMAT, "format_version": FORMAT_VERSION,
            "any4_version": _any4_version()}  # fmt: skip
    shards = split_shards(stored, layers, max_shard_size if is_dir else None)
    if is_dir:
        os.makedirs(path, exist_ok=True)
        names = (
            [WEIGHTS_NAME]
            if len(shards) == 1
            else [SHARD_NAME.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
        )
        files = [os.path.join(path, n) for n in names]
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        names, files = [os.path.basename(path)], [path]
    file_digests: dict = {}
    for name, file, keys in zip(names, files, shards):
        part = {k: stored[k] for k in keys}
        owners = {k.rpartition(".")[0] for k in keys}
        meta = dict(base, layers={n: i for n, i in layers.items() if n in owners}, tied=tied,
                    settings=settings, extra=extra or {})  # fmt: skip
        if guard is not None:
            meta["guard"] = guard
        json.dumps(meta)  # TypeError now (before a file is written) for non-JSON extra/settings
        file_digests[name] = integrity.write_file(file, part, meta)
    if not is_dir:
        return files[0]
    index_file = os.path.join(path, INDEX_NAME)
    if len(shards) > 1:
        weight_map = {k: n for n, keys in zip(names, shards) for k in keys}
        total = sum(_nbytes(t) for t in stored.values())
        _write_json(index_file, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _remove_stale_weights(path, set(names))
    summary = dict(base, layers=layers, tied=tied, settings=settings, extra=extra or {},
                   files=file_digests)  # fmt: skip
    if guard is not None:
        summary["guard"] = guard
    _write_json(os.path.join(path, METADATA_NAME), summary)
    if hf_config:
        qc = quantization_config(layers, settings, guard)
        _write_text(os.path.join(path, CONFIG_NAME), _hf_config_dict(config, qc))
        generation = getattr(model_or_state, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string"):
            _write_text(
                os.path.join(path, "generation_config.json"),
                generation.to_json_string(use_diff=True),
            )
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)
    return files[0]


def _remove_stale_weights(directory: str, keep: set) -> None:
    """Drop weight files of an earlier save into the same directory that this one replaced."""
    for name in os.listdir(directory):
        stale = name == WEIGHTS_NAME or _SHARD_RE.fullmatch(name) is not None
        if stale and name not in keep:
            os.unlink(os.path.join(directory, name))
    if len(keep) == 1 and os.path.isfile(os.path.join(directory, INDEX_NAME)):
        os.unlink(os.path.join(directory, INDEX_NAME))


def save_tokenizer(tokenizer: Any, directory: str) -> list:
    """``tokenizer.save_pretrained(directory)``, each file published atomically; returns the
    file names written."""
    with atomic.scratch_directory(directory) as scratch:
        tokenizer.save_pretrained(scratch)
        return atomic.publish_files(scratch, directory)


def save_hf_config(config: Any, directory: str) -> None:
    """Write a Hugging Face config without the source's quantization settings (e.g. GGUF),
    atomically."""
    import copy

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    _write_text(os.path.join(directory, CONFIG_NAME), cfg.to_json_string(use_diff=True))


# ---- reading ----------------------------------------------------------------------------------


def resolve(
    path: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
) -> str:
    """A local file or directory for ``path``: itself when it exists, else a Hugging Face hub
    repo id resolved through huggingface_hub's cache (downloading unless ``local_files_only`` or
    ``HF_HUB_OFFLINE=1``)."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if path.endswith(".safetensors") or path.count("/") > 1 or path.startswith((".", os.sep)):
        raise FileNotFoundError(f"no any4 file at {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            f"no any4 file or directory at {path} (and huggingface_hub is not installed to "
            "resolve it as a hub repo id)"
        ) from e
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return snapshot_download(
            path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=patterns,
        )  # fmt: skip
    except Exception as e:  # hub errors: not found, offline without a cached copy, ...
        raise FileNotFoundError(
            f"no any4 file or directory at {path}, and not found as a hub repo ({e})"
        ) from e


def checkpoint_files(directory: str) -> list:
    """The weight files of a checkpoint directory (from the index when sharded)."""
    weight_map = index_weight_map(directory)
    if weight_map is not None:
        return [os.path.join(directory, n) for n in sorted(set(weight_map.values()))]
    file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{directory} is not an any4 checkpoint (no {WEIGHTS_NAME} or {INDEX_NAME}); a float "
            "model is loaded with transformers (from_pretrained), not any4.load"
        )
    return [file]


def index_weight_map(directory: str) -> Optional[dict]:
    """The checked ``weight_map`` {tensor: shard file name} of a sharded checkpoint's index
    (None without an index): a non-empty object of names to existing ``.safetensors`` files of
    the directory."""
    index = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise Any4FormatError(f"{index}: not a readable safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise Any4FormatError(f"{index}: weight_map must be a non-empty object")
    for key, name in weight_map.items():
        if (
            not isinstance(name, str)
            or os.path.basename(name) != name
            or not name.endswith(".safetensors")
        ):
            raise Any4FormatError(f"{index}: {key!r} maps to {name!r}, not a shard file name")
        if not os.path.isfile(os.path.join(directory, name)):
            raise Any4FormatError(f"{index}: shard {name!r} (of {key!r}) is missing")
    return weight_map


def _hf_quantization_config(directory: str) -> Optional[dict]:
    file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as fh:
            qc = json.load(fh).get("quantization_config")
    except (ValueError, AttributeError) as e:
        raise Any4FormatError(f"{file}: not a readable JSON config ({e})") from e
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def _file_metadata(file: str) -> Optional[dict]:
    """The any4 header entry of one safetensors file (None when it has none)."""
    from safetensors import safe_open

    if not os.path.isfile(file):
        raise FileNotFoundError(f"no any4 file at {file}")
    try:
        with safe_open(file, framework="pt") as f:
            raw = (f.metadata() or {}).get("any4")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise Any4FormatError(f"{file}: not a readable safetensors file ({e})") from e
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise Any4FormatError(f"{file}: corrupt any4 metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise Any4FormatError(f"{file}: metadata format is not {FILE_FORMAT!r}")
    _check_version(file, meta.get("format_version"), meta.get("any4_version"))
    for field in ("layers", "tied", "settings", "extra"):
        if not isinstance(meta.get(field, {}), dict):
            raise Any4FormatError(f"{file}: metadata {field!r} must be an object")
    if not isinstance(meta.get("guard", ""), str):
        raise Any4FormatError(f"{file}: metadata 'guard' must be a tensor name")
    return meta


def _check_version(where: str, version: Any, writer: Any = None) -> None:
    if not isinstance(version, int) or isinstance(version, bool):
        raise Any4FormatError(f"{where}: metadata has no integer format_version")
    if version > FORMAT_VERSION:
        raise Any4FormatError(
            f"{where}: written with any4 file format version {version} (any4 {writer or '?'}); "
            f"this any4 {_any4_version()} reads versions up to {FORMAT_VERSION}: upgrade any4"
        )
    if version < 1:
        raise Any4FormatError(f"{where}: unknown any4 file format version {version}")


_NO_ANY4_METADATA = "__no_any4_metadata__"  # marks a weight file without an any4 header entry
_LAYER_FIELDS = {"fmt": str, "group_size": int, "shape": list, "bias": bool, "table_dtype": str}


def _check_config_layers(directory: str, qc: dict, per_file: dict, file_layers: dict) -> None:
    """config.json's quantization_config must agree with the weight files' own metadata."""
    where = os.path.join(directory, CONFIG_NAME)
    layers = qc.get("layers") or {}
    if not isinstance(layers, dict):
        raise Any4FormatError(f"{where}: quantization_config.layers must be an object")
    every_file_described = not any(m.get(_NO_ANY4_METADATA) for m in per_file.values())
    guards = {m.get("guard") for m in per_file.values() if not m.get(_NO_ANY4_METADATA)}
    if "guard" in qc and guards and guards != {qc["guard"]}:
        raise Any4FormatError(
            f"{where}: quantization_config.guard {qc['guard']!r} is not the weights' {sorted(map(str, guards))}"
        )
    for name, info in layers.items():
        if not isinstance(info, dict):
            raise Any4FormatError(f"{where}: quantization_config layer {name!r} is not an object")
        stored = file_layers.get(name)
        if stored is None:
            if every_file_described:
                raise Any4FormatError(
                    f"{where}: quantization_config lists layer {name!r}, the weights do not"
                )
            continue
        for field in _LAYER_FIELDS:
            if info.get(field) != stored.get(field):
                raise Any4FormatError(
                    f"{where}: layer {name!r} has {field}={info.get(field)!r}, the weights "
                    f"{stored.get(field)!r} (mixed or edited checkpoint)"
                )
    if every_file_described:
        extra = sorted(set(file_layers) - set(layers))
        if extra:
            raise Any4FormatError(
                f"{where}: quantization_config does not list the stored layers {extra[:3]}"
            )


def read_metadata(path: Union[str, os.PathLike]) -> dict:
    """The any4 metadata of a file or checkpoint directory (checks format names and versions).

    Returns the header entry of a single file; for a directory, the entries of all its weight
    files merged (``layers`` of every file, ``files``: {path: that file's entry}), with the
    per-layer settings of config.json's quantization_config where a file lacks them."""
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else None
    files = checkpoint_files(path) if directory else [path]
    qc = _hf_quantization_config(directory) if directory else None
    if qc is not None:
        _check_version(os.path.join(directory, CONFIG_NAME), qc.get("format_version"))
    per_file: dict = {}
    for file in files:
        meta = _file_metadata(file)
        if meta is None:
            if qc is None:
                raise Any4FormatError(f"{file}: no any4 metadata (not written by any4.save)")
            meta = {"format": FILE_FORMAT, "format_version": qc["format_version"], "layers": {},
                    _NO_ANY4_METADATA: True}  # fmt: skip
        per_file[file] = meta
    first = per_file[files[0]]
    merged = {k: v for k, v in first.items() if k not in ("layers", "sha256")}
    merged["layers"] = {}
    for meta in per_file.values():
        merged["layers"].update(meta.get("layers") or {})
        for key in ("tied", "settings", "extra"):
            if meta.get(key) and not merged.get(key):
                merged[key] = meta[key]
    if qc is not None:
        _check_config_layers(directory, qc, per_file, merged["layers"])
        for name, info in (qc.get("layers") or {}).items():
            merged["layers"].setdefault(name, info)
        if qc.get("guard") and not merged.get("guard"):
            merged["guard"] = qc["guard"]
        merged["quantization_config"] = qc
    if directory is None:
        merged["sha256"] = first.get("sha256", {})
    merged["files"] = per_file
    if directory is not None:
        weight_map = index_weight_map(directory)
        if weight_map is not None:
            merged["weight_map"] = weight_map
    merged.setdefault("tied", {})
    return merged


def _read_tensors(meta: dict, device: Union[str, torch.device], *, keep: bool = True) -> dict:
    """All tensors of the files in ``meta`` (guard dropped, tied aliases restored), each file
    verified (format 2: its whole-file digest; format 1: per-tensor data checksums) and its
    layers checked against their metadata (any4.validate: shapes, group sizes, codes in range,
    finite tables). ``keep=False`` only verifies: one file in memory at a time, meta-device
    tensors returned."""
    from safetensors import safe_open

    guard = meta.get("guard")
    tensors: dict = {}
    described: set = set()
    for file, fmeta in meta["files"].items():
        if fmeta.get(_NO_ANY4_METADATA):
            warnings.warn(
                f"any4: {file} carries no any4 digests (written by transformers' own "
                "save_pretrained?); its tensors are not verified",
                stacklevel=3,
            )
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    part = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:
                raise Any4FormatError(
                    f"{file}: cannot read tensors, the file is truncated or corrupt ({e})"
                ) from e
        elif not keep and "digest" in fmeta:
            part = _verify_streaming(file, fmeta)
            described.update(fmeta.get("layers") or {})
        else:
            part = _verified_tensors(file, fmeta)
            check_metadata(file, fmeta, part)
            described.update(fmeta.get("layers") or {})
        weight_map = meta.get("weight_map")
        if weight_map is not None:
            name = os.path.basename(file)
            indexed = {k for k, n in weight_map.items() if n == name}
            if indexed != set(part):
                raise Any4FormatError(
                    f"{file}: the index maps {sorted(indexed - set(part))[:3]} to it, which it "
                    f"does not hold, and not {sorted(set(part) - indexed)[:3]}"
                )
        if guard is not None and guard in part:
            g = part.pop(guard)
            if g.numel() or g.dtype != torch.uint8:
                raise Any4FormatError(f"{file}: the guard {guard!r} must be an empty uint8 tensor")
        for key, t in part.items():
            if key in tensors:
                raise Any4FormatError(f"{file}: tensor {key!r} is stored twice")
            tensors[key] = t if keep else t.to("meta")
    tied = meta.get("tied", {})
    if not isinstance(tied, dict):
        raise Any4FormatError("metadata 'tied' must be an object")
    for alias, target in tied.items():
        if not isinstance(target, str) or target not in tensors:
            raise Any4FormatError(f"tied tensor {alias!r} points to missing {target!r}")
        if alias in tensors:
            raise Any4FormatError(f"tied tensor {alias!r} is also stored")
        tensors[alias] = tensors[target]
    rest = {n: i for n, i in (meta.get("layers") or {}).items() if n not in described}
    if rest and keep:  # layers known only from config.json (files without any4 metadata)
        check_metadata(next(iter(meta["files"])), dict(meta, layers=rest), tensors)
    _densify_codes(meta.get("layers") or {}, tensors)
    return {k: v.to(device) for k, v in tensors.items()}


def _verify_streaming(file: str, fmeta: dict) -> dict:
    """Verify a sealed file without holding it: the digest streamed, then each layer's tensors
    read and checked one layer at a time. Returns meta-device tensors of the file's shapes."""
    from safetensors import safe_open

    if integrity.verify_file(file) != fmeta:
        raise Any4FormatError(f"{file}: the file changed while it was read")
    info = integrity.tensor_info(file)
    layers = fmeta.get("layers") or {}
    check_metadata(file, dict(fmeta, layers={}), {})
    with safe_open(file, framework="pt", device="cpu") as f:
        for name, layer in layers.items():
            keys = [f"{name}.{p}" for p in ("packed", "lut", "scales", "bias")]
            parts = {k: f.get_tensor(k) for k in keys if k in info}
            check_metadata(file, dict(fmeta, layers={name: layer}), parts)
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in info.items()}


def _verified_tensors(file: str, fmeta: dict) -> dict:
    """The tensors of a file with any4 metadata, verified: format 2 by the whole-file digest
    (any4.integrity), format 1 by its per-tensor checksums of the data."""
    if fmeta.get("format_version", 0) >= 2:
        if "digest" not in fmeta:
            raise Any4FormatError(
                f"{file}: format version {fmeta.get('format_version')} without a digest"
            )
        sealed = integrity.read_file(file)
        if {k: v for k, v in sealed.any4.items()} != fmeta:
            raise Any4FormatError(f"{file}: the file changed while it was read")
        return sealed.tensors
    sealed = integrity.read_file(file, require_digest=False)
    digests = fmeta.get("sha256")
    keys = set(sealed.tensors)
    listed = set(digests) if isinstance(digests, dict) else set()
    if not isinstance(digests, dict) or listed != keys:
        raise Any4FormatError(
            f"{file}: tensors do not match the metadata (missing {sorted(listed - keys)[:3]}, "
            f"unexpected {sorted(keys - listed)[:3]})"
        )
    for key, t in sealed.tensors.items():
        if _digest(t) != digests[key]:
            raise Any4FormatError(
                f"{file}: tensor {key!r} does not match its checksum (the file was modified)"
            )
    return sealed.tensors


def check_metadata(file: str, meta: dict, tensors: dict) -> None:
    """Check every any4 metadata field against the tensors (Any4FormatError naming the field).

    Per layer: fmt known; shape [N, K] positive ints; group_size a valid group size for K
    (any4.validate); table_dtype known and the table's; bias a bool matching a [N] float tensor;
    packed / lut / scales of the shapes and dtypes these imply, codes in range, finite table and
    scales. Also: settings / extra are objects, settings.model_dtype is known.
    """
    for field in ("settings", "extra"):
        if not isinstance(meta.get(field, {}), dict):
            raise Any4FormatError(f"{file}: metadata {field!r} must be an object")
    model_dtype = (meta.get("settings") or {}).get("model_dtype")
    if model_dtype is not None and (not isinstance(model_dtype, str) or model_dtype not in _DTYPES):
        raise Any4FormatError(f"{file}: unknown settings.model_dtype {model_dtype!r}")
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise Any4FormatError(f"{file}: metadata 'layers' must be an object")
    for name, info in layers.items():
        where = f"{file}: layer {name!r}"
        if not isinstance(info, dict):
            raise Any4FormatError(f"{where}: metadata must be an object")
        for field, kind in _LAYER_FIELDS.items():
            value = info.get(field)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise Any4FormatError(
                    f"{where}: metadata field {field!r} must be a {kind.__name__}, got {value!r}"
                )
        try:
            f = get_format(info["fmt"])
        except ValueError as e:
            raise Any4FormatError(f"{where}: {e}") from e
        shape = info["shape"]
        if len(shape) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape
        ):
            raise Any4FormatError(f"{where}: shape must be [N, K] of positive ints, got {shape!r}")
        N, K = shape
        dtype = _DTYPES.get(info["table_dtype"])
        if dtype is None:
            raise Any4FormatError(f"{where}: unknown table_dtype {info['table_dtype']!r}")
        parts = {}
        for part in ("packed", "lut", "scales"):
            t = tensors.get(f"{name}.{part}")
            if t is None:
                raise Any4FormatError(f"{where} has no {part} tensor")
            parts[part] = t
        bias = tensors.get(f"{name}.bias")
        if info["bias"] != (bias is not None):
            raise Any4FormatError(
                f"{where}: metadata says bias={info['bias']}, the file "
                + ("has" if bias is not None else "has no")
                + " bias tensor"
            )
        if bias is not None and (tuple(bias.shape) != (N,) or not bias.is_floating_point()):
            raise Any4FormatError(
                f"{where}: bias is {bias.dtype} {tuple(bias.shape)}, expected a float [{N}]"
            )
        lut = parts["lut"]
        if lut.dtype != dtype:
            raise Any4FormatError(f"{where}: lut is {lut.dtype}, metadata says {dtype}")
        try:
            V.group_size(info["group_size"], K)
            if info["group_size"] > K:
                raise ValueError(f"group_size {info['group_size']} is larger than K={K}")
            layout = _stored_layout(info)
            rows = V.check_parts(
                parts["packed"], lut, parts["scales"], K, info["group_size"], bits=f.bits,
                layout=layout, N=N,
            )[2]  # fmt: skip
            if rows != (N if f.learned else 1):
                raise ValueError(
                    f"lut has {rows} rows, format {f.name} needs {N if f.learned else 1}"
                )
            V.check_values(
                parts["packed"], lut, parts["scales"], K, 4 if layout == "nibble" else f.bits
            )
        except (ValueError, TypeError) as e:
            raise Any4FormatError(f"{where}: {e}") from e


def _stored_layout(info: dict) -> str:
    """A layer's ``code_layout``: "dense" or "nibble" (absent: "nibble", the older files)."""
    layout = info.get("code_layout", "nibble")
    if layout not in ("dense", "nibble"):
        raise ValueError(f"unknown code layout {layout!r}; known: 'dense', 'nibble'")
    return layout


def _densify_codes(layers: dict, tensors: dict) -> None:
    """3/2-bit codes stored in nibbles (layers without a dense code_layout) -> the dense layout,
    in place in ``tensors`` (the same codes; meta tensors just take the dense shape)."""
    for name, info in layers.items():
        bits = get_format(info["fmt"]).bits
        key = f"{name}.packed"
        if bits == 4 or _stored_layout(info) != "nibble" or key not in tensors:
            continue
        t, K = tensors[key], int(info["shape"][1])
        tensors[key] = (
            torch.empty(t.shape[0], V.packed_shape(K, bits), dtype=t.dtype, device="meta")
            if t.device.type == "meta"
            else repack(t, K, 4, bits)
        )


def saved_dtype(meta: dict) -> Optional[torch.dtype]:
    """The float dtype the saved model had (None when not recorded)."""
    return _DTYPES.get((meta.get("settings") or {}).get("model_dtype", ""))


def quant_shell(
    info: dict,
    device: Any = None,
    dtype: Optional[torch.dtype] = None,
    *,
    stored_layout: bool = False,
) -> QuantLinear:
    """An empty QuantLinear for a layer's metadata (``dtype``: the bias dtype). ``stored_layout``:
    its ``packed`` buffer has the file's shape (3/2-bit codes in nibbles for a layer without a
    dense ``code_layout``; ``QuantLinear.densify_codes`` after loading), else the dense one."""
    N, K = (int(s) for s in info["shape"])
    shell = QuantLinear(
        K,
        N,
        bias=bool(info["bias"]),
        fmt=info["fmt"],
        group_size=int(info["group_size"]),
        table_dtype=_DTYPES[info["table_dtype"]],
        device=device,
        dtype=dtype,
    )
    bits = get_format(info["fmt"]).bits
    if stored_layout and bits != 4 and info.get("code_layout", "nibble") == "nibble":
        width = V.packed_shape(K, bits, "nibble")
        shell.packed = torch.zeros(N, width, dtype=torch.uint8, device=device)
    return shell


def load(
    path: Union[str, os.PathLike],
    model: Optional[nn.Module] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
) -> Any:
    """Load what ``any4.save`` (or ``save_pretrained`` on an any4 model) wrote.

    Args:
        path: a .safetensors file, a checkpoint directory (one file or shards with an index), or
            a Hugging Face hub repo id (through huggingface_hub's cache; ``revision``,
            ``cache_dir``, ``local_files_only`` are passed on).
        model: a model of the same architecture (e.g. a fresh ``from_config`` transformers
            model, or the float model): its listed Linear layers are replaced by QuantLinear and
            all tensors loaded (float parameters take the saved dtype). When omitted and the
            checkpoint is a directory with a ``config.json``, the transformers model is built
            from it (format 2: every tensor verified, then ``from_pretrained`` with any4's
            quantizer, on the meta device, no float weights materialised); when omitted
            otherwise, a dict {name: QuantizedTensor | Tensor} is returned.
        device: where the tensors go.
    Returns:
        the model (in eval mode), or the dict.
    Raises:
        Any4FormatError (a ValueError) for a truncated, modified, foreign or too-new file.
    """
    local = resolve(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    meta = read_metadata(local)
    directory = local if os.path.isdir(local) else None
    if directory is not None:
        check_readable_copy(directory, meta)
    if model is None:
        if directory is not None and os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            if "quantization_config" in meta:
                _read_tensors(meta, "meta", keep=False)  # verify every file before transformers
                from .hf import from_pretrained_checkpoint

                return from_pretrained_checkpoint(
                    directory, saved_dtype(meta), device, verified=True
                )
            model = _fresh_hf_model(directory)
        else:
            return _as_state(_read_tensors(meta, device), meta.get("layers", {}))
    tensors = _read_tensors(meta, device)
    layers = meta.get("layers", {})
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
        features = dense_features(current)
        if features is not None:
            if features != (N, K):
                raise ValueError(
                    f"{name}: the model's layer is {features[0]}x{features[1]}, saved {N}x{K}"
                )
        elif not isinstance(current, QuantLinear):
            raise ValueError(
                f"{name}: expected an nn.Linear, Conv1D or QuantLinear in the model, found {type(current).__name__}"
            )
        bias = tensors.get(f"{name}.bias")
        shell = quant_shell(info, device, None if bias is None else bias.dtype)
        set_submodule(model, name, shell)
    # The model takes the saved dtype (non-persistent buffers too, e.g. rotary tables), and each
    # float tensor its saved dtype, so outputs are bit-identical. QuantLinear keeps table dtypes.
    dtype = saved_dtype(meta)
    if dtype is not None and _main_float_dtype(model) != dtype:
        model.to(dtype)
    own = dict(model.state_dict(keep_vars=True))
    for key, t in tensors.items():
        cur = own.get(key)
        if cur is not None and cur.is_floating_point() != t.is_floating_point():
            raise Any4FormatError(
                f"tensor {key!r} is {t.dtype}, the model's is {cur.dtype} (not the same kind)"
            )
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


def check_readable_copy(directory: str, meta: dict) -> None:
    """A directory's any4.json must describe its weight files: the same layers, tied tensors and
    settings, and each file's digest (Any4FormatError otherwise; no any4.json: nothing to do)."""
    copy_path = os.path.join(directory, METADATA_NAME)
    if not os.path.isfile(copy_path):
        return
    try:
        with open(copy_path, encoding="utf-8") as fh:
            readable = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Any4FormatError(f"{copy_path}: not readable JSON ({e})") from e
    if not isinstance(readable, dict):
        raise Any4FormatError(f"{copy_path}: not a JSON object")
    for field in ("format_version", "layers", "tied", "settings"):
        if readable.get(field, {}) != meta.get(field, {}):
            raise Any4FormatError(
                f"{copy_path}: {field!r} differs from the weight files' metadata (mixed or "
                "edited checkpoint)"
            )
    listed = readable.get("files")
    for file, fmeta in meta["files"].items():
        if "digest" not in fmeta:
            continue
        name = os.path.basename(file)
        if not isinstance(listed, dict) or listed.get(name) != fmeta["digest"]:
            raise Any4FormatError(f"{copy_path}: the digest listed for {name} is not the file's")


def is_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is an any4 file or a directory holding an any4 checkpoint (any4.json,
    an any4 quantization_config in config.json, or weights with any4 metadata)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, METADATA_NAME)):
            return True
        try:
            if _hf_quantization_config(path) is not None:
                return True
            files = checkpoint_files(path)
        except (Any4FormatError, FileNotFoundError):
            return False
        path = files[0]
    if not os.path.isfile(path):
        return False
    try:
        return _file_metadata(path) is not None
    except Any4FormatError:
        return True  # any4 metadata that is damaged: still any4's (loading says what is wrong)


def verify_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Verify a checkpoint (file or directory) without loading it: every weight file's digest
    (streamed) or format-1 checksums, every layer's metadata against its tensors (one layer in
    memory at a time), config.json and any4.json against the files. Returns read_metadata's
    result; raises Any4FormatError."""
    path = os.fspath(path)
    meta = read_metadata(path)
    if os.path.isdir(path):
        check_readable_copy(path, meta)
    _read_tensors(meta, "meta", keep=False)
    return meta


def verify(path: Union[str, os.PathLike]) -> dict:
    """Check an any4 checkpoint completely (every weight file's digest, or checksums for
    format 1; all metadata against the tensors; config.json and any4.json against the files)
    and hash it.

    Returns {"sha256": one hex digest of every file of the directory (of the file's bytes for a
    single file) to pin, "files": [(relative path, sha256)], "weights": {file name: its digest,
    or None for format 1}}. Raises Any4FormatError (or FileNotFoundError).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no any4 file or directory at {path}")
    meta = verify_checkpoint(path)
    weights = {os.path.basename(f): m.get("digest") for f, m in meta["files"].items()}
    if os.path.isdir(path):
        digest, manifest = integrity.checkpoint_digest(path)
    else:
        manifest = [(os.path.basename(path), integrity.file_sha256(path))]
        digest = manifest[0][1]
    return {"sha256": digest, "files": manifest, "weights": weights}


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


__all__ = [
    "Any4FormatError", "check_metadata", "check_readable_copy", "is_checkpoint", "load",
    "read_metadata", "save", "save_hf_config", "save_tokenizer", "verify", "verify_checkpoint",
]  # fmt: skip
