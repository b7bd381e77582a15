"""Tensor interop: torch tensors and numpy arrays cross into the C++ core as raw addresses.

The C++ core never sees Python objects: this module checks dtype, shape, contiguity and device,
and hands over ``data_ptr()`` (torch) or ``ctypes.data`` (numpy). Outputs are allocated here, in
the caller's framework, so results come back as the caller's type with no copies.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

# Codes shared with cpp/common.h (enum class DType).
DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


_TORCH = None  # the torch module once the caller has imported it (torch is optional)
_TORCH_DTYPE_NAMES: dict = {}


def _torch():
    global _TORCH
    if _TORCH is None:
        _TORCH = sys.modules.get("torch")
        if _TORCH is not None:
            from .threads import on_torch_seen

            on_torch_seen(_TORCH)  # ANY4_PARALLEL=openmp: any4's threads on torch's team
    return _TORCH


def is_torch(t: Any) -> bool:
    torch = _TORCH if _TORCH is not None else _torch()
    return torch is not None and isinstance(t, torch.Tensor)


def dtype_name(t: Any) -> str:
    """'float32', 'bfloat16', 'uint8', ... for a torch tensor or numpy array."""
    if is_torch(t):
        name = _TORCH_DTYPE_NAMES.get(t.dtype)
        if name is None:
            name = _TORCH_DTYPE_NAMES[t.dtype] = str(t.dtype).replace("torch.", "")
        return name
    return np.dtype(t.dtype).name


def device_of(t: Any) -> str:
    """'cpu' or 'cuda:i'."""
    if is_torch(t):
        d = t.device
        if d.type == "cuda":
            return f"cuda:{d.index if d.index is not None else 0}"
        return d.type
    return "cpu"


def check_array(t: Any, name: str) -> None:
    if not (is_torch(t) or isinstance(t, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(t).__name__}")


@dataclass
class Buffer:
    """A checked, contiguous tensor ready for the C++ core (keeps the tensor alive)."""

    obj: Any
    ptr: int
    shape: tuple
    dtype: str
    device: str

    @property
    def code(self) -> int:
        return DTYPE_CODE[self.dtype]


def buffer(
    t: Any,
    name: str,
    *,
    dtypes: Optional[Sequence[str]] = None,
    ndim: Optional[int] = None,
    device: Optional[str] = None,
) -> Buffer:
    """Check ``t`` and return a Buffer; raises TypeError/ValueError that say what was expected."""
    check_array(t, name)
    dt = dtype_name(t)
    if dtypes is not None and dt not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(dtypes)}, got {dt}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    dev = device_of(t)
    if device is not None and dev != device:
        raise ValueError(f"{name} must be on {device}, got {dev}")
    if is_torch(t):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
        ptr = t.data_ptr()
    else:
        if not t.flags["C_CONTIGUOUS"]:
            raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
        ptr = t.ctypes.data
    return Buffer(t, ptr, tuple(int(s) for s in t.shape), dt, dev)


def empty_like_framework(
    ref: Any, shape: Sequence[int], dtype: str, device: Optional[str] = None
) -> Any:
    """Uninitialised array of ``dtype`` in ref's framework (and device, for torch)."""
    if is_torch(ref):
        torch = _torch()
        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=device or ref.device)
    if dtype == "bfloat16":
        raise TypeError("numpy has no bfloat16: pass torch tensors for bfloat16")
    return np.empty(tuple(shape), dtype=dtype)


def to_float32_contiguous(t: Any, name: str) -> Any:
    """Float32 C-contiguous CPU copy (or the tensor itself when already so), same framework."""
    check_array(t, name)
    check_real(t, name)
    if is_torch(t):
        return t.detach().to(device="cpu", dtype=_torch().float32).contiguous()
    return np.ascontiguousarray(t, dtype=np.float32)


def check_real(t: Any, name: str) -> None:
    """Refuse complex input (converting it to float would drop the imaginary part)."""
    if is_torch(t):
        if t.is_complex():
            raise TypeError(f"{name} must be real, got {dtype_name(t)}")
    elif np.iscomplexobj(t):
        raise TypeError(f"{name} must be real, got {np.asarray(t).dtype}")


def to_numpy(t: Any, name: str = "input") -> np.ndarray:
    """numpy view/copy of a real tensor or array (bfloat16 as float32); complex is refused."""
    check_real(t, name)
    if is_torch(t):
        torch = _torch()
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def from_numpy_like(ref: Any, a: np.ndarray, dtype: Optional[str] = None) -> Any:
    """numpy array -> ref's framework (torch tensors keep ref's device), optionally cast."""
    if is_torch(ref):
        torch = _torch()
        out = torch.from_numpy(np.ascontiguousarray(a))
        if dtype is not None:
            out = out.to(getattr(torch, dtype))
        return out.to(ref.device) if ref.device.type != "cpu" else out
    if dtype is not None and dtype != "bfloat16":
        return a.astype(dtype)
    return a


def nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if is_torch(t) else int(t.nbytes)
