"""Reading safetensors headers and writing safetensors files one tensor at a time.

The streaming quantizer (``any4.checkpoint``) never holds a whole checkpoint: it reads one
tensor (or a row range of one) at a time and writes output files tensor by tensor, copying the
bytes of unquantized tensors straight from the source file. File layout (the safetensors
format)::

    u64 little-endian header length H | H bytes of JSON header (space padded to 8 bytes) | data

The header maps each key to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets into
the data section) plus ``"__metadata__"`` (str -> str). Written files list their tensors in the
order given (callers sort them), so the same tensors give the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from . import atomic

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
MAX_HEADER = 100 * 2**20
COPY_CHUNK = 16 * 2**20
DIGEST_PLACEHOLDER = "0" * 64


class CheckpointError(ValueError):
    """A checkpoint directory or file cannot be used (missing, corrupt, or inconsistent); the
    message names the file and, where it applies, the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    key: str
    file: str  # path
    dtype: str  # safetensors dtype name ("BF16", ...)
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> tuple:
    """({key: TensorInfo}, metadata dict) of a safetensors file, checked against its size.

    Raises CheckpointError naming the file (and tensor) when the header is unreadable or a
    tensor's bytes lie outside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (header length {hlen}, file {size} bytes)"
                )
            raw = f.read(hlen)
    except FileNotFoundError as e:
        raise CheckpointError(f"missing checkpoint file {path}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    out = {}
    for key, entry in header.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}") from e
        n = 1
        for s in shape:
            n *= s
        if dtype not in ITEM_SIZE:
            raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {dtype}")
        if start < 0 or end < start or end - start != n * ITEM_SIZE[dtype]:
            raise CheckpointError(
                f"{path}: tensor {key!r} has inconsistent offsets {start}..{end} for {dtype} {list(shape)}"
            )
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {key!r} needs bytes up to {base + end}, the file has {size}"
            )
        out[key] = TensorInfo(key, path, dtype, shape, base + start, base + end)
    return out, meta


def iter_bytes(info: TensorInfo, chunk: int = COPY_CHUNK) -> Iterator[bytes]:
    """The raw bytes of one tensor, in chunks."""
    try:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            left = info.nbytes
            while left:
                b = f.read(min(chunk, left))
                if not b:
                    raise CheckpointError(f"{info.file}: tensor {info.key!r} is truncated")
                left -= len(b)
                yield b
    except OSError as e:
        raise CheckpointError(f"cannot read tensor {info.key!r} from {info.file}: {e}") from e


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (contiguous, little-endian as stored by torch)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


@dataclass
class Entry:
    """A tensor to write: its key, safetensors dtype, shape and bytes (a tensor, or a TensorInfo
    whose bytes are copied from its file)."""

    key: str
    dtype: str
    shape: tuple
    source: Union[torch.Tensor, TensorInfo]

    @classmethod
    def of(cls, key: str, source: Union[torch.Tensor, TensorInfo]) -> Entry:
        if isinstance(source, TensorInfo):
            return cls(key, source.dtype, tuple(source.shape), source)
        if source.dtype not in ST_DTYPES:
            raise TypeError(f"{key}: cannot store dtype {source.dtype} in safetensors")
        return cls(key, ST_DTYPES[source.dtype], tuple(source.shape), source)

    @property
    def nbytes(self) -> int:
        n = ITEM_SIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    def chunks(self) -> Iterator[Any]:
        if isinstance(self.source, TensorInfo):
            yield from iter_bytes(self.source)
        else:
            yield tensor_bytes(self.source)


def _header(entries: list, metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.key] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_file(
    path: str,
    entries: list,
    metadata: Optional[dict] = None,
    finish_metadata: Optional[Callable[[dict, dict], dict]] = None,
) -> dict:
    """Write a safetensors file at ``path`` (directly: callers write into a temporary directory
    and rename) from ``entries`` in order; fsync. Returns {key: sha256 hex of its bytes}.

    ``finish_metadata(metadata, digests)`` may return the final header metadata once the digests
    are known; its JSON must have the same length as with every digest replaced by 64 zeros
    (fixed-width placeholders reserve the header), e.g. a dict holding the digests."""
    metadata = dict(metadata or {})
    seen = set()
    for e in entries:
        if e.key in seen:
            raise ValueError(f"tensor {e.key!r} is listed twice for {path}")
        seen.add(e.key)
    placeholder = {e.key: DIGEST_PLACEHOLDER for e in entries}
    first = finish_metadata(metadata, placeholder) if finish_metadata else metadata
    head = _header(entries, first)
    digests = {}
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for e in entries:
                h = hashlib.sha256()
                written = 0
                for chunk in e.chunks():
                    h.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
                if written != e.nbytes:
                    raise CheckpointError(
                        f"{path}: tensor {e.key!r} has {written} bytes, expected {e.nbytes}"
                    )
                digests[e.key] = h.hexdigest()
            if finish_metadata:
                final = _header(entries, finish_metadata(metadata, digests))
                if len(final) != len(head):
                    raise RuntimeError("finish_metadata changed the header length")
                f.seek(8)
                f.write(final)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(path)  # no partial file left behind
        raise
    return digests


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (any4.atomic; keys in insertion order); a full disk is an OSError
    naming the file."""
    try:
        atomic.write_json(path, obj, sort_keys=False)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"disk full while writing {path}: {e.strerror}") from e
        raise


__all__ = ["CheckpointError", "Entry", "TensorInfo", "read_header", "write_file", "write_json"]
