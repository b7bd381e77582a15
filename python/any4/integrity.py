"""Sealed safetensors files: each file carries one digest of all its bytes (SPEC §12).

A sealed file is an ordinary safetensors file (``safe_open``, ``from_pretrained`` read it) whose
header metadata holds ``"format": "pt"`` and an ``"any4"`` JSON entry with a ``"digest"`` field:

    digest = "sha256:" + sha256(the whole file, with the digest's 64 hex digits read as zeros)

so the digest covers the 8-byte header length, every header byte (tensor names, dtypes, shapes,
offsets, the any4 metadata: layer settings, format version, ...) and every tensor byte. Any
single-byte change anywhere is refused by :func:`verify_file` / :func:`read_file` with
:class:`Any4FormatError`, and so is any structural damage (truncation, overlapping or missing
offsets, unknown dtypes, sizes that do not match shapes), which is checked first, here, rather
than left to the safetensors reader.

A digest stored inside the file detects accidents (bit rot, truncation, a wrong edit), not a
deliberate forger, who can recompute it: to pin a checkpoint, record the hash printed by
``any4 verify DIR`` (:func:`checkpoint_digest`, computed from the files, not stored in them).

API (the writers of any4: ``io``, the Hugging Face and streaming savers, use these):

- :func:`write_file` (path, tensors, any4 metadata) -> digest: writes a sealed file atomically
  in one pass (hashing while writing, then the digest is patched into its placeholder).
- :func:`seal_file` (path) -> digest: seals a file written by someone else whose any4 metadata
  carries :data:`PLACEHOLDER` as its digest (e.g. ``safetensors.torch.save_file``).
- :func:`verify_file` (path) -> any4 metadata (without reading tensors into memory);
  :func:`read_file` (path) -> :class:`SealedFile` (verified tensors, read in the same pass).
- :func:`tensor_info` (path) -> {name: (dtype, shape)} from the checked header (no data read).
- :func:`checkpoint_digest` (directory) -> (hex digest, [(relative path, sha256)]).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from .atomic import TEMP_SUFFIX, atomic_write

PathLike = Union[str, os.PathLike]
METADATA_KEY = "any4"  # the header metadata entry holding any4's JSON document
DIGEST_FIELD = "digest"  # the field of that document holding the file digest
ALGORITHM = "sha256"
PLACEHOLDER = ALGORITHM + ":" + "0" * 64
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 8 * 2**20


class Any4FormatError(ValueError):
    """The file is not a readable any4 file (truncated, tampered with, or a newer version)."""


# safetensors dtype names <-> torch dtypes (those this torch has)
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _torch():
    import torch

    return torch


def _dtype_tables() -> tuple:
    torch = _torch()
    to_torch = {k: getattr(torch, v) for k, v in _ST_DTYPES.items() if hasattr(torch, v)}
    return to_torch, {v: k for k, v in to_torch.items()}


def _tensor_bytes(t: Any) -> memoryview:
    """The raw bytes of a CPU-contiguous view of ``t`` (no copy when already so)."""
    torch = _torch()
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _header_bytes(header: dict) -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True)
    raw = text.encode("ascii")
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors does


def metadata_text(any4_meta: Mapping) -> str:
    """The ``"any4"`` header entry for ``any4_meta``, its digest set to :data:`PLACEHOLDER`."""
    if not isinstance(any4_meta, Mapping):
        raise TypeError(f"any4 metadata must be a dict, got {type(any4_meta).__name__}")
    doc = dict(any4_meta)
    doc[DIGEST_FIELD] = PLACEHOLDER
    return json.dumps(doc, sort_keys=True, ensure_ascii=True)


def write_file(
    path: PathLike,
    tensors: Mapping[str, Any],
    any4_meta: Mapping,
    *,
    metadata: Optional[Mapping[str, str]] = None,
    durable: bool = True,
) -> str:
    """Write a sealed safetensors file atomically; returns its digest ("sha256:<hex>").

    Args:
        path: destination ``.safetensors`` file (its directory is created).
        tensors: {name: torch tensor} (any device; any dtype safetensors knows). Names must be
            unique strings; shared storage is written once per name (deduplicate beforehand).
        any4_meta: JSON-serialisable dict stored as the ``"any4"`` metadata entry; its
            ``"digest"`` field is set here.
        metadata: further ``str -> str`` header metadata entries (``"format": "pt"`` is always
            written).
        durable: fsync the file and directory (the default).
    The tensors are laid out in a deterministic order (by element size, then name), so equal
    inputs give byte-identical files.
    """
    torch = _torch()
    _, to_st = _dtype_tables()
    entries = []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
        if t.dtype not in to_st:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        entries.append((-t.element_size(), name, t))
    entries.sort(key=lambda e: (e[0], e[1]))
    meta_entries = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("header metadata must map str to str")
        if k == METADATA_KEY:
            raise ValueError(f"header metadata key {METADATA_KEY!r} is reserved")
        meta_entries[k] = v
    meta_entries[METADATA_KEY] = metadata_text(any4_meta)
    header: dict = {"__metadata__": meta_entries}
    offset = 0
    for _, name, t in entries:
        if name == "__metadata__":
            raise ValueError("'__metadata__' cannot be a tensor name")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": to_st[t.dtype],
            "shape": [int(s) for s in t.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = _header_bytes(header)
    prefix = struct.pack("<Q", len(raw))
    where = raw.find(PLACEHOLDER.encode("ascii"))
    if raw.count(PLACEHOLDER.encode("ascii")) != 1:
        raise ValueError(
            f"the digest placeholder {PLACEHOLDER!r} must not appear in names or metadata"
        )
    h = hashlib.sha256(prefix)
    h.update(raw)
    with atomic_write(path, durable=durable) as fh:
        fh.write(prefix)
        fh.write(raw)
        for _, _, t in entries:
            data = _tensor_bytes(t)
            h.update(data)
            fh.write(data)
        digest = ALGORITHM + ":" + h.hexdigest()
        fh.seek(8 + where)
        fh.write(digest.encode("ascii"))
        fh.seek(0, os.SEEK_END)
    return digest


def seal_file(path: PathLike) -> str:
    """Seal, in place, a safetensors file whose any4 metadata digest is :data:`PLACEHOLDER`
    (written, e.g., by ``safetensors.torch.save_file(..., metadata={"any4": metadata_text(m)})``
    to a temporary name); returns the digest. Rename the file into place afterwards."""
    path = os.fspath(path)
    header = _parse_header(path)
    if header.digest != PLACEHOLDER:
        raise ValueError(f"{path}: its any4 digest is not the placeholder (already sealed?)")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    digest = ALGORITHM + ":" + h.hexdigest()
    with open(path, "r+b") as fh:
        fh.seek(8 + header.digest_at)
        fh.write(digest.encode("ascii"))
        fh.flush()
        os.fsync(fh.fileno())
    return digest


@dataclass
class _Header:
    size: int  # header bytes (after the 8-byte length)
    raw: bytes
    metadata: dict  # str -> str header metadata
    any4: dict  # the parsed any4 document
    digest: str
    digest_at: int  # offset of the digest's hex digits in raw
    tensors: list  # [(name, st dtype, shape, begin, end)] sorted by offset
    file_size: int


def _fail(path: str, what: str) -> Any4FormatError:
    return Any4FormatError(f"{path}: {what}")


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_header(path: str) -> _Header:
    """Read and check the header's structure (nothing about the digest's value)."""
    to_torch, _ = _dtype_tables()
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail(path, "not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise _fail(
                    path,
                    f"not a safetensors file or truncated (header length {n}, file {file_size} bytes)",
                )
            raw = fh.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _fail(path, "no header metadata (not written by any4)")
    text = meta.get(METADATA_KEY)
    if text is None:
        raise _fail(path, "no any4 metadata (not written by any4)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"corrupt any4 metadata ({e})") from e
    if not isinstance(doc, dict):
        raise _fail(path, "corrupt any4 metadata (not a JSON object)")
    digest = doc.get(DIGEST_FIELD)
    at = -1
    if digest is not None:
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise _fail(path, f"malformed digest {str(digest)[:80]!r}")
        raw_digest = digest.encode("ascii")
        at = raw.find(raw_digest)
        if at < 0 or raw.find(raw_digest, at + 1) >= 0:
            raise _fail(path, "the digest must appear exactly once in the header")
    tensors = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r}: malformed header entry")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in to_torch:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(_is_size(s) for s in shape):
            raise _fail(path, f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_size(o) for o in offs):
            raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}")
        itemsize = to_torch[dt].itemsize
        if offs[1] - offs[0] != math.prod(shape) * itemsize:
            raise _fail(
                path,
                f"tensor {name!r}: {dt} {shape} needs {math.prod(shape) * itemsize} bytes, "
                f"its offsets span {offs[1] - offs[0]}",
            )
        tensors.append((name, dt, tuple(shape), offs[0], offs[1]))
    tensors.sort(key=lambda e: (e[3], e[4]))
    end = 0
    for name, _, _, b, e in tensors:
        if b != end:
            raise _fail(
                path, f"tensor {name!r}: data starts at {b}, expected {end} (hole or overlap)"
            )
        end = e
    if 8 + n + end != file_size:
        raise _fail(
            path,
            f"the header describes {8 + n + end} bytes, the file has {file_size} "
            + ("(truncated)" if 8 + n + end > file_size else "(trailing bytes)"),
        )
    return _Header(n, raw, meta, doc, digest or "", at, tensors, file_size)


def _hash_header(h: Any, header: _Header) -> None:
    raw = header.raw
    if header.digest_at >= 0:
        raw = (
            raw[: header.digest_at]
            + PLACEHOLDER.encode("ascii")
            + raw[header.digest_at + len(PLACEHOLDER) :]
        )
    h.update(struct.pack("<Q", header.size))
    h.update(raw)


def _check_digest(path: str, header: _Header, h: Any) -> None:
    got = ALGORITHM + ":" + h.hexdigest()
    if got != header.digest:
        raise _fail(
            path,
            "the file does not match its digest (it was modified or damaged after it was "
            f"written: stored {header.digest[:19]}..., computed {got[:19]}...)",
        )


def is_sealed(path: PathLike) -> bool:
    """True when the file's any4 metadata carries a digest (format version 2 and later)."""
    return bool(_parse_header(os.fspath(path)).digest)


def verify_file(path: PathLike) -> dict:
    """Check a sealed file's structure and digest (streaming; tensors are not kept).

    Returns the file's any4 metadata document. Raises :class:`Any4FormatError` naming what is
    wrong (structure, missing digest, digest mismatch).
    """
    path = os.fspath(path)
    header = _parse_header(path)
    if not header.digest:
        raise _fail(path, "no digest in the any4 metadata (not a sealed any4 file)")
    h = hashlib.sha256()
    _hash_header(h, header)
    try:
        with open(path, "rb") as fh:
            fh.seek(8 + header.size)
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as e:
        raise _fail(path, f"cannot read ({e})") from e
    _check_digest(path, header, h)
    return header.any4


def tensor_info(path: PathLike) -> dict:
    """{name: (torch dtype, shape)} of a file's tensors, from its (structurally checked) header;
    no tensor data is read and the digest is not checked (see :func:`verify_file`)."""
    to_torch, _ = _dtype_tables()
    header = _parse_header(os.fspath(path))
    return {name: (to_torch[dt], shape) for name, dt, shape, _, _ in header.tensors}


@dataclass
class SealedFile:
    """What :func:`read_file` returns."""

    tensors: dict  # name -> CPU torch tensor
    any4: dict  # the any4 metadata document (digest included)
    metadata: dict  # all str -> str header metadata entries
    verified: bool  # False only for unsealed files read with require_digest=False


def read_file(path: PathLike, *, require_digest: bool = True) -> SealedFile:
    """Read every tensor of a safetensors file written by any4, verifying it in the same pass.

    Args:
        path: the file.
        require_digest: refuse a file without a digest (format version 1 files have per-tensor
            checksums instead; pass False to read them, and check those).
    Returns:
        :class:`SealedFile` with CPU tensors. Raises :class:`Any4FormatError`.
    """
    torch = _torch()
    to_torch, _ = _dtype_tables()
    path = os.fspath(path)
    header = _parse_header(path)
    if require_digest and not header.digest:
        raise _fail(path, "no digest in the any4 metadata (not a sealed any4 file)")
    h = hashlib.sha256()
    _hash_header(h, header)
    tensors = {}
    try:
        with open(path, "rb") as fh:
            fh.seek(8 + header.size)
            for name, dt, shape, b, e in header.tensors:
                buf = bytearray(e - b)
                if fh.readinto(buf) != e - b:
                    raise _fail(path, f"tensor {name!r}: truncated")
                h.update(buf)
                dtype = to_torch[dt]
                if e == b:
                    tensors[name] = torch.empty(shape, dtype=dtype)
                else:
                    tensors[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
    except OSError as err:
        raise _fail(path, f"cannot read ({err})") from err
    if header.digest:
        _check_digest(path, header, h)
    return SealedFile(tensors, header.any4, header.metadata, bool(header.digest))


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_digest(directory: PathLike) -> tuple:
    """One sha256 for a whole checkpoint directory, to pin (``any4 verify DIR`` prints it).

    It is the sha256 of the ``sha256sum``-style manifest: one line ``"<hex>  <relative path>\\n"``
    per regular file (every file under ``directory``, recursively, sorted by path; any4's
    temporaries of interrupted saves excluded). For a flat directory, the same as
    ``cd DIR && sha256sum $(ls | LC_ALL=C sort) | sha256sum``.

    Returns:
        (hex digest, [(relative path, hex sha256)]).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no directory at {directory}")
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.endswith(TEMP_SUFFIX)]
        for name in names:
            full = os.path.join(root, name)
            if name.endswith(TEMP_SUFFIX) or not os.path.isfile(full):
                continue
            files.append(os.path.relpath(full, directory).replace(os.sep, "/"))
    files.sort(key=lambda p: p.encode("utf-8", "surrogateescape"))
    manifest = [(rel, file_sha256(os.path.join(directory, rel))) for rel in files]
    text = "".join(f"{digest}  {rel}\n" for rel, digest in manifest)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest(), manifest


__all__ = [
    "Any4FormatError",
    "PLACEHOLDER",
    "SealedFile",
    "checkpoint_digest",
    "file_sha256",
    "is_sealed",
    "metadata_text",
    "read_file",
    "seal_file",
    "tensor_info",
    "verify_file",
    "write_file",
]
