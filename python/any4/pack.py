"""Nibble packing (SPEC §4): codes [N, K] <-> packed uint8 [N, ceil(K/2)].

Element k = 2j goes to the low nibble of byte j, k = 2j+1 to the high nibble; an odd K leaves
the last high nibble zero. This is the storage / interchange layout (save/load, CPU kernels).
"""

from __future__ import annotations

from typing import Any

from . import _tensor as T
from ._core import C


def pack(codes: Any) -> Any:
    """codes: uint8 [N, K] (values < 16) -> packed uint8 [N, ceil(K/2)], same framework."""
    b = T.buffer(codes, "codes", dtypes=("uint8",), ndim=2, device="cpu")
    N, K = b.shape
    out = T.empty_like_framework(codes, (N, (K + 1) // 2), "uint8", device="cpu")
    if N and K:
        C.pack_nibbles(b.ptr, N, K, T.buffer(out, "out").ptr)
    return out


def unpack(packed: Any, K: int) -> Any:
    """packed: uint8 [N, ceil(K/2)] -> codes uint8 [N, K]; exact inverse of :func:`pack`."""
    b = T.buffer(packed, "packed", dtypes=("uint8",), ndim=2, device="cpu")
    N, P = b.shape
    if K < 0 or (K + 1) // 2 != P:
        raise ValueError(f"packed has {P} bytes per row, which does not hold K={K} codes")
    out = T.empty_like_framework(packed, (N, K), "uint8", device="cpu")
    if N and K:
        C.unpack_nibbles(b.ptr, N, K, T.buffer(out, "out").ptr)
    return out
