"""Code packing (SPEC §4): codes [N, K] <-> packed uint8 [N, ceil(bits*K/8)].

Each row is one dense little-endian bit stream: code k occupies bits [bits*k, bits*k + bits),
rows are padded to whole bytes with zero bits. So

- 4-bit: two codes per byte, k = 2j in the low nibble of byte j, k = 2j+1 in the high nibble;
- 2-bit: four codes per byte, k = 4j + i in bits 2i..2i+1 of byte j;
- 3-bit: eight codes in three bytes (one 24-bit little-endian word), k = 8j + i in bits 3i..3i+2.

Why 3-bit is a bit stream and not bit planes: the CPU kernels give each 32-bit lane 4
consecutive codes (12 bits, gathered for 8 lanes by one byte shuffle) and the table lookup reads
the low 3 bits directly, so a 2-bit plane + 1-bit plane would only add the instructions that
merge the planes (cpp/pack.h). This is the storage / interchange layout (save/load, CPU kernels);
files record it per layer as ``"code_layout"`` (see :func:`code_layout`).
"""

from __future__ import annotations

from typing import Any, Optional

from . import _tensor as T
from ._core import C

CODE_BITS = (2, 3, 4)

# How a file records a layer's codes ("code_layout", any4.io): "dense" is this module's layout at
# the format's width, "nibble" two codes per byte whatever the width (how 3/2-bit codes were
# stored before the dense layouts; identical to "dense" for 4-bit codes).
DENSE, NIBBLE = "dense", "nibble"


def code_layout(bits: int) -> str:
    """The ``code_layout`` name of ``bits``-bit codes packed by :func:`pack`."""
    return NIBBLE if check_bits(bits) == 4 else DENSE


def packed_bytes(K: int, bits: int = 4) -> int:
    """Bytes per packed row of K codes of ``bits`` bits: ceil(bits * K / 8)."""
    return (int(K) * int(bits) + 7) // 8


def check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in CODE_BITS:
        raise ValueError(f"bits must be 2, 3 or 4, got {bits!r}")
    return bits


def code_bits(
    K: int, row_bytes: int, lut_len: int, bits: Optional[int] = None, name: str = "packed_w"
) -> int:
    """The code width of a packed weight with ``row_bytes`` bytes per row of K codes.

    ``bits`` given: checked against the row width. Otherwise the narrowest width that holds
    ``lut_len`` table entries (16: 4, 8: 3, 4: 2), or else 4 if the rows are nibble-sized (3/2-bit
    codes in nibbles, as format-version 1 stored them). Raises ValueError when neither fits.
    """
    if bits is not None:
        check_bits(bits)
        if packed_bytes(K, bits) != row_bytes or lut_len > 1 << bits:
            raise ValueError(
                f"{name} has {row_bytes} bytes per row and the table {lut_len} entries; {bits}-bit "
                f"codes for K={K} need ceil(bits*K/8)={packed_bytes(K, bits)} bytes and <= "
                f"{1 << bits} entries"
            )
        return bits
    natural = 2 if lut_len <= 4 else 3 if lut_len <= 8 else 4
    if packed_bytes(K, natural) == row_bytes:
        return natural
    if packed_bytes(K, 4) == row_bytes:
        return 4
    need = " or ".join(f"{packed_bytes(K, b)} ({b}-bit)" for b in sorted({natural, 4}))
    raise ValueError(
        f"{name} has {row_bytes} bytes per row; K={K} with a {lut_len}-entry table needs "
        f"ceil(bits*K/8) = {need}"
    )


def pack(codes: Any, bits: int = 4) -> Any:
    """codes: uint8 [N, K] (values < 2^bits) -> packed uint8 [N, ceil(bits*K/8)], same framework."""
    check_bits(bits)
    b = T.buffer(codes, "codes", dtypes=("uint8",), ndim=2, device="cpu")
    N, K = b.shape
    out = T.empty_like_framework(codes, (N, packed_bytes(K, bits)), "uint8", device="cpu")
    if N and K:
        C.pack_codes(b.ptr, N, K, bits, T.buffer(out, "out").ptr)
    return out


def unpack(packed: Any, K: int, bits: int = 4) -> Any:
    """packed: uint8 [N, ceil(bits*K/8)] -> codes uint8 [N, K]; exact inverse of :func:`pack`."""
    check_bits(bits)
    b = T.buffer(packed, "packed", dtypes=("uint8",), ndim=2, device="cpu")
    N, P = b.shape
    if K < 0 or packed_bytes(K, bits) != P:
        raise ValueError(
            f"packed has {P} bytes per row, which does not hold K={K} {bits}-bit codes"
        )
    out = T.empty_like_framework(packed, (N, K), "uint8", device="cpu")
    if N and K:
        C.unpack_codes(b.ptr, N, K, bits, T.buffer(out, "out").ptr)
    return out


def repack(packed: Any, K: int, bits: int, to_bits: int) -> Any:
    """The same codes in another width's layout (e.g. 3-bit codes stored in nibbles -> dense)."""
    if bits == to_bits:
        return packed
    return pack(unpack(packed, K, bits), to_bits)


def unpack_torch(packed: Any, K: int, bits: int) -> Any:
    """:func:`unpack` in torch operations on packed's device (CUDA tensors too): uint8 [N, K]."""
    import torch

    check_bits(bits)
    N, P = (int(s) for s in packed.shape)
    if packed_bytes(K, bits) != P:
        raise ValueError(
            f"packed has {P} bytes per row, which does not hold K={K} {bits}-bit codes"
        )
    pad = torch.zeros((N, 1), dtype=torch.uint8, device=packed.device)
    wide = torch.cat([packed, pad], dim=1).to(torch.int32)
    offset = torch.arange(K, device=packed.device, dtype=torch.int64) * bits
    byte, shift = offset >> 3, (offset & 7).to(torch.int32)
    window = wide[:, byte] | (wide[:, byte + 1] << 8)
    return ((window >> shift) & ((1 << bits) - 1)).to(torch.uint8)


def to_nibbles_torch(packed: Any, K: int, bits: int) -> Any:
    """The codes of packed (``bits``-bit layout) in the 4-bit nibble layout, uint8 [N, ceil(K/2)],
    computed with torch operations on packed's device (the CUDA kernels read nibbles)."""
    import torch

    if bits == 4:
        return packed
    codes = unpack_torch(packed, K, bits)
    if K % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
