"""``any4.save`` / ``any4.load``: quantized models in safetensors with JSON metadata.

Checkpoint format version 2. A directory (``any4.save(model, DIR)``, ``model.save_pretrained``
on an any4 model, ``any4 quantize --out DIR``) holds:

- ``config.json``: the Hugging Face config plus ``"quantization_config"``::

      {"quant_method": "any4", "format_version": 2, "fmt", "group_size", "weighting", "method",
       "mode", "table_dtype", "modules_to_not_convert": [...], "guard": KEY,
       "layers": {module: {"fmt", "group_size", "shape": [N, K], "bias", "table_dtype", ...}}}

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
  this file}, "tied": {alias: stored}, "sha256": {tensor: digest}, "settings", "extra", "guard"}``.
  The digests let ``load`` refuse a file whose tensor bytes were changed.
- ``any4.json`` (the same metadata, readable, with the files and their digests), the tokenizer
  files and ``generation_config.json`` when available.

A single ``.safetensors`` file (``any4.save(model, "m.safetensors")``) is one such file.
Format-version-1 files and directories (one file, no quantization_config) still load.

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
import tempfile
import warnings
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import nn

from .formats import get_format
from .nn import QuantLinear, dense_features, set_submodule
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


class Any4FormatError(ValueError):
    """The file is not a readable any4 file (truncated, tampered with, or a newer version)."""


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
    ``table_dtype``)."""
    return {
        "fmt": module.fmt,
        "group_size": module.group_size,
        "shape": [module.out_features, module.in_features],
        "bias": module.bias is not None,
        "table_dtype": _dtype_name(module.lut.dtype),
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


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file in ``path``'s directory, fsync it, rename it to
    ``path`` (the destination is never seen half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    write_atomic(path, write)


def _write_json(path: str, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
                    sha256={k: _digest(t) for k, t in part.items()}, settings=settings,
                    extra=extra or {})  # fmt: skip
        if guard is not None:
            meta["guard"] = guard
        file_digests[name] = {"sha256": meta["sha256"]}
        _write_safetensors(file, part, {"format": "pt", "any4": json.dumps(meta, sort_keys=True)})
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


def save_tokenizer(tokenizer: Any, directory: str) -> None:
    """``tokenizer.save_pretrained`` into a temporary directory, then each file moved in
    atomically."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            src = os.path.join(tmp, name)
            if os.path.isfile(src):
                with open(src, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(src, os.path.join(directory, name))


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
    index = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Any4FormatError(f"{index}: not a readable safetensors index ({e})") from e
        for n in names:
            if os.path.basename(n) != n:
                raise Any4FormatError(f"{index}: shard {n!r} is not a file name in {directory}")
        return [os.path.join(directory, n) for n in names]
    file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no any4 file at {file}")
    return [file]


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
            meta = {"format": FILE_FORMAT, "format_version": qc["format_version"], "layers": {}}
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
        for name, info in (qc.get("layers") or {}).items():
            merged["layers"].setdefault(name, info)
        if qc.get("guard") and not merged.get("guard"):
            merged["guard"] = qc["guard"]
        merged["quantization_config"] = qc
    if directory is None:
        merged["sha256"] = first.get("sha256", {})
    merged["files"] = per_file
    merged.setdefault("tied", {})
    return merged


def _read_tensors(meta: dict, device: Union[str, torch.device], *, keep: bool = True) -> dict:
    """All tensors of the files in ``meta`` (guard dropped, tied aliases restored), each file's
    tensors checked against its digests and the layers against their metadata. ``keep=False``
    only verifies: one tensor in memory at a time, meta-device tensors returned."""
    from safetensors import safe_open

    guard = meta.get("guard")
    tensors: dict = {}
    for file, fmeta in meta["files"].items():
        digests = fmeta.get("sha256")
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys = set(f.keys()) - {guard}
                if digests is None:
                    warnings.warn(
                        f"any4: {file} carries no any4 digests (written by transformers' own "
                        "save_pretrained?); its tensors are not verified",
                        stacklevel=3,
                    )
                elif keys != set(digests) - {guard}:
                    raise Any4FormatError(
                        f"{file}: tensors do not match the metadata (missing {sorted(set(digests) - keys)[:3]}, "
                        f"unexpected {sorted(keys - set(digests))[:3]})"
                    )
                for key in sorted(keys):
                    if key in tensors:
                        raise Any4FormatError(f"{file}: tensor {key!r} is stored twice")
                    t = f.get_tensor(key)
                    if digests is not None and _digest(t) != digests[key]:
                        raise Any4FormatError(
                            f"{file}: tensor {key!r} does not match its checksum (the file was modified)"
                        )
                    tensors[key] = t if keep else t.to("meta")
        except Any4FormatError:
            raise
        except Exception as e:
            raise Any4FormatError(
                f"{file}: cannot read tensors, the file is truncated or corrupt ({e})"
            ) from e
    for alias, target in meta.get("tied", {}).items():
        if target not in tensors:
            raise Any4FormatError(f"tied tensor {alias!r} points to missing {target!r}")
        tensors[alias] = tensors[target]
    _check_layers(next(iter(meta["files"])), meta, tensors)
    return {k: v.to(device) for k, v in tensors.items()}


def _check_layers(file: str, meta: dict, tensors: dict) -> None:
    for name, info in meta.get("layers", {}).items():
        try:
            f = get_format(info["fmt"])
            N, K = (int(s) for s in info["shape"])
            G = int(info["group_size"])
            dtype = _DTYPES[info["table_dtype"]]
        except (KeyError, ValueError, TypeError) as e:
            raise Any4FormatError(f"{file}: bad metadata for layer {name!r} ({e})") from e
        expected = {
            "packed": ((N, (K + 1) // 2), torch.uint8),
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


def saved_dtype(meta: dict) -> Optional[torch.dtype]:
    """The float dtype the saved model had (None when not recorded)."""
    return _DTYPES.get((meta.get("settings") or {}).get("model_dtype", ""))


def quant_shell(info: dict, device: Any = None, dtype: Optional[torch.dtype] = None) -> QuantLinear:
    """An empty QuantLinear for a layer's metadata (``dtype``: the bias dtype)."""
    N, K = (int(s) for s in info["shape"])
    return QuantLinear(
        K,
        N,
        bias=bool(info["bias"]),
        fmt=info["fmt"],
        group_size=int(info["group_size"]),
        table_dtype=_DTYPES[info["table_dtype"]],
        device=device,
        dtype=dtype,
    )


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
    if model is None:
        if directory is not None and os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            if "quantization_config" in meta:
                _read_tensors(
                    meta, "meta", keep=False
                )  # verify every file before transformers reads it
                from .hf import from_pretrained_checkpoint

                return from_pretrained_checkpoint(directory, saved_dtype(meta), device)
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
