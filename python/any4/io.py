"""``any4.save`` / ``any4.load``: quantized models in safetensors with JSON metadata.

File layout: one ``.safetensors`` file whose header metadata holds, under the key ``"any4"``,
a JSON document::

    {"format": "any4-safetensors", "format_version": 2, "any4_version": "0.1.0",
     "layers": {name: {"fmt", "group_size", "shape": [N, K], "bias": bool, "table_dtype"}},
     "tied": {alias: stored_name}, "settings": {...}, "extra": {...},
     "digest": "sha256:<hex>"}

Each quantized layer ``name`` is stored as ``name.packed``, ``name.lut``, ``name.scales`` (and
``name.bias``), the keys of a QuantLinear's state dict, so the file is exactly the quantized
model's state dict; tensors shared by several names (tied embeddings) are stored once.

Integrity (SPEC §12): the file is sealed (``any4.integrity``): ``digest`` is one sha256 over every
byte of the file (header: names, dtypes, shapes, offsets, layer settings; and tensor data), so
``load`` refuses any changed byte with :class:`Any4FormatError`; every metadata field is also
checked against the tensors (``any4.validate``). Format-version 1 files (per-tensor ``sha256``
digests of the data only) still load. A digest inside a file detects accidents, not a forger:
pin the hash ``any4 verify DIR`` prints (:func:`verify`). Every file is written atomically
(``any4.atomic``).

A directory (``any4 quantize --out DIR``) holds ``model.safetensors``, ``any4.json`` (the same
metadata, readable, with ``"files": {name: digest}``), and the Hugging Face ``config.json`` / tokenizer files. Loading into a fresh
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

from . import atomic, integrity
from . import validate as V
from .formats import get_format
from .integrity import Any4FormatError
from .nn import QuantLinear, set_submodule
from .quantize import QuantizedTensor

FILE_FORMAT = "any4-safetensors"
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
METADATA_NAME = "any4.json"
CONFIG_NAME = "config.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        "settings": settings,
        "extra": extra or {},
    }
    json.dumps(meta)  # TypeError now (before any file is written) for non-JSON extra/settings
    digest = integrity.write_file(file, stored, meta)
    if is_dir:
        readable = dict(meta, files={WEIGHTS_NAME: digest})
        atomic.write_json(os.path.join(path, METADATA_NAME), readable)
        config = getattr(model_or_state, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
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
    # What PretrainedConfig.save_pretrained writes, but atomically.
    atomic.write_text(os.path.join(directory, CONFIG_NAME), cfg.to_json_string(use_diff=True))


def save_tokenizer(tokenizer: Any, directory: str) -> list:
    """``tokenizer.save_pretrained(directory)``, each file published atomically; returns the
    file names written."""
    with atomic.scratch_directory(directory) as scratch:
        tokenizer.save_pretrained(scratch)
        return atomic.publish_files(scratch, directory)


def _resolve(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise Any4FormatError(
                f"{path} is not an any4 checkpoint (no {WEIGHTS_NAME}); a float model is loaded "
                "with transformers (from_pretrained), not any4.load"
            )
        return file
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
    return _check_version(file, meta)


def _check_version(file: str, meta: Any) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise Any4FormatError(f"{file}: metadata format is not {FILE_FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise Any4FormatError(f"{file}: metadata has no integer format_version")
    if version > FORMAT_VERSION:
        raise Any4FormatError(
            f"{file}: written with any4 file format version {version} (any4 {meta.get('any4_version', '?')}); "
            f"this any4 {_any4_version()} reads versions up to {FORMAT_VERSION}: upgrade any4"
        )
    if version < 1:
        raise Any4FormatError(f"{file}: unknown any4 file format version {version}")
    return meta


def _read_file(file: str) -> tuple:
    """(metadata, {key: CPU tensor}) of an any4 file: integrity checked (the whole-file digest
    from version 2, per-tensor digests of the data in version 1), tied aliases resolved, every
    metadata field checked against the tensors. Raises Any4FormatError."""
    read_metadata(file)  # a too-new version is reported as such, before its digest is checked
    sealed = integrity.read_file(file, require_digest=False)
    meta = _check_version(file, sealed.any4)
    tensors = sealed.tensors
    if meta["format_version"] >= 2:
        if not sealed.verified:
            raise Any4FormatError(
                f"{file}: format version {meta['format_version']} without a digest"
            )
    else:
        digests = meta.get("sha256")
        if not isinstance(digests, dict) or set(digests) != set(tensors):
            keys, listed = set(tensors), set(digests) if isinstance(digests, dict) else set()
            raise Any4FormatError(
                f"{file}: tensors do not match the metadata (missing {sorted(listed - keys)[:3]}, "
                f"unexpected {sorted(keys - listed)[:3]})"
            )
        for key, t in tensors.items():
            if _digest(t) != digests[key]:
                raise Any4FormatError(
                    f"{file}: tensor {key!r} does not match its checksum (the file was modified)"
                )
    tied = meta.get("tied", {})
    if not isinstance(tied, dict):
        raise Any4FormatError(f"{file}: metadata 'tied' must be an object")
    for alias, target in tied.items():
        if not isinstance(target, str) or target not in sealed.tensors:
            raise Any4FormatError(f"{file}: tied tensor {alias!r} points to missing {target!r}")
        if alias in sealed.tensors:
            raise Any4FormatError(f"{file}: tied tensor {alias!r} is also stored")
    tensors = dict(tensors)
    for alias, target in tied.items():
        tensors[alias] = tensors[target]
    check_metadata(file, meta, tensors)
    return meta, tensors


_LAYER_FIELDS = {"fmt": str, "group_size": int, "shape": list, "bias": bool, "table_dtype": str}


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
            rows = V.check_parts(
                parts["packed"], lut, parts["scales"], K, info["group_size"], bits=f.bits,
                layout=info.get("code_layout"), N=N,
            )[2]  # fmt: skip
            if rows != (N if f.learned else 1):
                raise ValueError(
                    f"lut has {rows} rows, format {f.name} needs {N if f.learned else 1}"
                )
            V.check_values(parts["packed"], lut, parts["scales"], K)
        except (ValueError, TypeError) as e:
            raise Any4FormatError(f"{where}: {e}") from e


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
    meta, tensors = _read_file(file)
    _check_readable_copy(path, meta)
    tensors = {k: v.to(device) for k, v in tensors.items()}
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
    for key, t in tensors.items():
        cur = own.get(key)
        if cur is not None and cur.is_floating_point() != t.is_floating_point():
            raise Any4FormatError(
                f"{file}: tensor {key!r} is {t.dtype}, the model's is {cur.dtype} (not the same kind)"
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


def _check_readable_copy(path: Union[str, os.PathLike], meta: dict) -> None:
    """A directory's any4.json must describe the weights file (same layers, same digest)."""
    directory = os.fspath(path)
    copy_path = os.path.join(directory, METADATA_NAME)
    if not os.path.isdir(directory) or not os.path.isfile(copy_path):
        return
    try:
        with open(copy_path, encoding="utf-8") as fh:
            readable = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Any4FormatError(f"{copy_path}: not readable JSON ({e})") from e
    if not isinstance(readable, dict):
        raise Any4FormatError(f"{copy_path}: not a JSON object")
    for field in ("format_version", "layers", "tied", "settings"):
        if readable.get(field) != meta.get(field):
            raise Any4FormatError(
                f"{copy_path}: {field!r} differs from the weights file's metadata (mixed or "
                "edited checkpoint)"
            )
    if "digest" in meta:
        files = readable.get("files")
        if not isinstance(files, dict) or files.get(WEIGHTS_NAME) != meta["digest"]:
            raise Any4FormatError(
                f"{copy_path}: the digest listed for {WEIGHTS_NAME} is not the file's"
            )


def is_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is an any4 file or a directory holding one (any4 metadata present)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, METADATA_NAME)):
            return True
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return False
    try:
        read_metadata(path)
    except Any4FormatError as e:
        return "no any4 metadata" not in str(e) and "no header metadata" not in str(e)
    return True


def verify(path: Union[str, os.PathLike]) -> dict:
    """Check an any4 checkpoint completely (every safetensors file's digest or checksums, all
    metadata against the tensors, any4.json against the weights) and hash it.

    Returns {"sha256": one hex digest of every file of the directory (or of the file) to pin,
    "files": [(relative path, sha256)], "weights": {file: its embedded digest or None (v1)}}.
    Raises Any4FormatError (or FileNotFoundError) when something is wrong.
    """
    path = os.fspath(path)
    file = _resolve(path)
    meta, _ = _read_file(file)
    _check_readable_copy(path, meta)
    weights = {os.path.basename(file): meta.get("digest")}
    if os.path.isdir(path):
        digest, manifest = integrity.checkpoint_digest(path)
    else:
        manifest = [(os.path.basename(file), integrity.file_sha256(file))]
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
    "Any4FormatError", "check_metadata", "is_checkpoint", "load", "read_metadata", "save",
    "save_hf_config", "save_tokenizer", "verify",
]  # fmt: skip
