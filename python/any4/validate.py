"""One validation layer for quantized tensors (SPEC §12).

Every quantized weight is checked where it enters any4 (``gemm``, ``dequantize``,
``pack_for_gpu``, ``QuantLinear`` construction and ``load_state_dict``, ``any4.load``):

- shapes: ``packed`` [N, :func:`packed_shape`], ``lut`` [N or 1, L], ``scales`` [N, G_count, 2];
- K: the bits of the last byte past the K codes are 0 (``any4.pack``: an odd K's high nibble for
  4-bit codes); a non-zero pad means the weight has more columns (K and K+1 can pack to the
  same bytes, so this is the only way to tell);
- group size: an int, a positive multiple of 8, at most :func:`max_group_size` (K rounded up
  to a power of two >= 16), giving exactly the number of scale groups (:func:`group_size`);
- table length: a format's 2^bits entries (:func:`table_length`); the kernels take 1..16;
- codes in range: every code < the table length (3- and 2-bit codes stored in nibbles could
  hold 8..15, which no kernel can look up; in their dense layouts every code fits a full table)
  (:func:`check_values`);
- tables and scales finite in their dtype: fp16 overflows at 65504 (:func:`check_finite`,
  the error names the first bad row).

The O(1) checks (shapes, group size, lengths) run on every call. The O(size) checks (codes,
pads, finiteness) run once: at construction and load, and in ``gemm`` only once per tensor
version (:func:`check_codes_once`: a torch tensor's in-place version counter tells when its
content may have changed), so the hot path stays a dictionary look-up, and only for the
3/2-bit tables and odd K where a bad code is possible at all.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional

import numpy as np

from . import _tensor as T
from ._tensor import check_real  # noqa: F401 (part of this layer: complex input is refused)

MAX_LEVELS = 16  # table entries the kernels can look up (4-bit codes)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# None / "dense": one bit stream per row at the format's width (any4.pack); "nibble": two codes
# per byte whatever the width (3/2-bit codes in files written before the dense layouts).
CODE_LAYOUTS = (None, "dense", "nibble")


MAX_REFINE = 100  # rounds of any4.refine


def check_refine(refine: object) -> int:
    """``refine`` as an int in [0, MAX_REFINE], else TypeError/ValueError naming it."""
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)):
        raise TypeError(f"refine must be an int, got {type(refine).__name__}")
    if not 0 <= refine <= MAX_REFINE:
        raise ValueError(f"refine must be in [0, {MAX_REFINE}], got {refine}")
    return int(refine)


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def packed_shape(K: int, bits: int = 4, layout: Optional[str] = None) -> int:
    """Bytes per row of the packed codes of a K-column weight with ``bits``-bit codes.

    ``layout`` None / "dense": ceil(bits * K / 8) (any4.pack); "nibble": two codes per byte
    whatever ``bits`` (ceil(K/2)).
    """
    K = _int(K, "K")
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if layout not in CODE_LAYOUTS:
        raise ValueError(f"unknown code layout {layout!r}; known: {CODE_LAYOUTS[1:]}")
    if _int(bits, "bits") not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    return (K + 1) // 2 if layout == "nibble" else (K * bits + 7) // 8


def max_group_size(K: int) -> int:
    """The largest valid group size for K columns: the smallest power of two >= max(K, 16)
    (any larger one means the same single group; the GPU layout needs powers of two >= 16)."""
    return 1 << (max(K, 16) - 1).bit_length()


def group_size_setting(G: Any) -> int:
    """Check a group-size setting before any weight is seen (quantize_model, Any4Config): an
    int (not bool) that is a positive multiple of 8; a ValueError otherwise."""
    if not isinstance(G, (int, np.integer)) or isinstance(G, bool) or G < 8 or G % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {G!r}")
    return int(G)


def group_size(G: Any, K: int, n_groups: Optional[int] = None) -> int:
    """Check a group size: a positive multiple of 8, <= max_group_size(K), and (when given)
    giving ``n_groups`` groups (ceil(K / G)). Returns it as an int."""
    G = _int(G, "group_size")
    if G <= 0 or G % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {G}")
    if G > max_group_size(K):
        raise ValueError(f"group_size {G} is larger than the row length K={K}")
    if n_groups is not None and -(-K // G) != n_groups:
        raise ValueError(
            f"group_size={G} gives {-(-K // G)} groups for K={K}, the scales have {n_groups}"
        )
    return G


def table_length(L: int, bits: Optional[int] = None) -> int:
    """Check a table length: 1..16, and 2^bits when the format is known."""
    L = _int(L, "table length")
    if bits is not None and L != 1 << bits:
        raise ValueError(f"a {bits}-bit format needs a {1 << bits}-entry table, got {L}")
    if not 1 <= L <= MAX_LEVELS:
        raise ValueError(f"tables must have 1..{MAX_LEVELS} entries, got {L}")
    return L


def table_operands(lut: Any, scales: Any, rows: int) -> tuple:
    """O(1) checks of the table and group-affine tensors of an N-row weight (shared by gemm's
    operand check and :func:`check_parts`).

    Args:
        lut: float32/float16/bfloat16 [L], [1, L] or [rows, L], 1 <= L <= 16;
        scales: lut's dtype, [rows, groups, 2]; rows: N.
    Returns:
        (lut_rows, L, n_groups).
    """
    ld = T.dtype_name(lut)
    if ld not in FLOAT_DTYPES:
        raise TypeError(f"lut must be float32, float16 or bfloat16, got {ld}")
    if T.dtype_name(scales) != ld:
        raise TypeError(f"scales must have lut's dtype {ld}, got {T.dtype_name(scales)}")
    if lut.ndim == 1:
        lut_rows, L = 1, int(lut.shape[0])
    elif lut.ndim == 2:
        lut_rows, L = int(lut.shape[0]), int(lut.shape[1])
    else:
        raise ValueError(f"lut must be [L], [1, L] or [N, L], got shape {tuple(lut.shape)}")
    if lut_rows not in (1, rows) or not 1 <= L <= MAX_LEVELS:
        raise ValueError(
            f"lut must be [1, L] or [N={rows}, L] with 1 <= L <= {MAX_LEVELS}, got shape "
            f"{tuple(lut.shape)}"
        )
    if scales.ndim != 3 or int(scales.shape[0]) != rows or int(scales.shape[2]) != 2:
        raise ValueError(f"scales must be [N={rows}, groups, 2], got shape {tuple(scales.shape)}")
    return lut_rows, L, int(scales.shape[1])


def covariance(H: Any, K: int) -> Any:
    """An input covariance H = E[x x^T] for a K-column weight (refit, GPTQ): checked to be
    [K, K] and finite; returned as a float64 CPU torch tensor."""
    import torch

    H = torch.as_tensor(H).detach().double().cpu()
    if H.shape != (K, K):
        raise ValueError(f"H must be [K, K] = {(K, K)}, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf")
    return H


def check_parts(
    packed: Any,
    lut: Any,
    scales: Any,
    K: int,
    G: Optional[int] = None,
    *,
    bits: Optional[int] = None,
    layout: Optional[str] = None,
    N: Optional[int] = None,
) -> tuple:
    """O(1) checks of the storage-layout tensors of an [N, K] weight.

    Args:
        packed: uint8 [N, packed_shape(K)]; lut: [N or 1, L] (or [L]); scales: [N, groups, 2],
            lut's float dtype; K: columns; G: group size (inferred from the groups if None);
        bits: the format's bits (then L must be 2^bits); N: expected rows.
    Returns:
        (N, K, lut_rows, L, n_groups, G).
    """
    for name, t in (("packed", packed), ("lut", lut), ("scales", scales)):
        T.check_array(t, name)
    K = _int(K, "K")
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    width = packed_shape(K, 4 if bits is None else bits, layout)
    if T.dtype_name(packed) != "uint8" or packed.ndim != 2:
        raise TypeError(
            f"packed must be uint8 [N, {width}], got {T.dtype_name(packed)} {tuple(packed.shape)}"
        )
    rows = int(packed.shape[0])
    if N is not None and rows != N:
        raise ValueError(f"packed has {rows} rows, the weight has N={N}")
    if int(packed.shape[1]) != width:
        raise ValueError(f"packed has {packed.shape[1]} bytes per row; K={K} needs {width}")
    lut_rows, L, n_groups = table_operands(lut, scales, rows)
    table_length(L, bits)
    if G is None:
        G = infer_group_size(K, n_groups)
    G = group_size(G, K, n_groups)
    devices = {T.device_of(t) for t in (packed, lut, scales)}
    if len(devices) != 1:
        raise ValueError(f"packed, lut and scales must be on one device, got {sorted(devices)}")
    return rows, K, lut_rows, L, n_groups, G


def infer_group_size(K: int, n_groups: int) -> int:
    """Group size from K and the number of scale groups.

    K divisible by n_groups gives K / n_groups. Otherwise the last group is short and several
    multiples of 8 may fit (K=576 with 5 groups: 120, 128 or 136); the power of two among them
    is taken when there is exactly one, else pass ``group_size=`` explicitly.
    """
    if n_groups < 1:
        raise ValueError("scales must have at least one group")
    if K % n_groups == 0 and (K // n_groups) % 8 == 0:
        return K // n_groups
    # ceil(K / g) == n_groups  <=>  K / n_groups <= g < K / (n_groups - 1)
    lo = max(8, -(-K // n_groups))
    hi = max_group_size(K) if n_groups == 1 else min(max_group_size(K), -(-K // (n_groups - 1)) - 1)
    candidates = [g for g in range(-(-lo // 8) * 8, hi + 1, 8) if -(-K // g) == n_groups]
    pow2 = [g for g in candidates if g & (g - 1) == 0]
    if len(candidates) == 1:
        return candidates[0]
    if len(pow2) == 1:
        return pow2[0]
    raise ValueError(
        f"cannot infer the group size from K={K} and {n_groups} scale groups; pass group_size="
    )


# ---- O(size) checks ---------------------------------------------------------------------------


def _first_row(bad: Any) -> int:
    """Index of the first True along dim 0 of a 2-D bool array/tensor."""
    if T.is_torch(bad):
        return int(bad.any(1).nonzero()[0, 0])
    return int(np.flatnonzero(bad.any(1))[0])


def check_finite(t: Any, name: str) -> None:
    """Raise ValueError naming the first row of ``t`` (lut or scales) holding NaN/Inf."""
    if T.is_torch(t):
        torch = T._torch()
        finite = torch.isfinite(t)
        if bool(finite.all()):
            return
        bad = ~finite.reshape(t.shape[0] if t.ndim > 1 else 1, -1)
        dtype = str(t.dtype).replace("torch.", "")
    else:
        a = np.asarray(t)
        finite = np.isfinite(a)
        if finite.all():
            return
        bad = ~finite.reshape(a.shape[0] if a.ndim > 1 else 1, -1)
        dtype = a.dtype.name
    row = _first_row(bad)
    raise ValueError(
        f"{name} row {row} holds NaN or Inf ({dtype}"
        + (f", largest finite {_max(dtype):.6g}" if dtype in ("float16", "bfloat16") else "")
        + ")"
    )


def _max(dtype: str) -> float:
    return {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}.get(dtype, math.inf)


def check_codes(packed: Any, K: int, L: int, bits: int = 4) -> None:
    """Every code < L, and the pad bits of the last byte zero (O(N K)); ``packed`` holds
    ``bits``-bit codes in the dense layout (any4.pack; 4: nibbles)."""
    is_t = T.is_torch(packed)
    used = bits * K % 8  # bits of the last byte that hold codes (0: all)
    if used and packed.shape[0] and packed.shape[1]:
        pad = packed[:, -1] >> used
        if bool(pad.any()):
            row = int(pad.nonzero()[0, 0]) if is_t else int(np.flatnonzero(pad)[0])
            what = "pad nibble" if bits == 4 else "pad bits"
            raise ValueError(
                f"packed row {row}: the {what} of the last byte is not 0, so the codes have "
                f"more than K={K} columns (K={K + 1}?)"
            )
    if L >= 1 << bits or packed.shape[0] == 0 or packed.shape[1] == 0:
        return
    if bits == 4:
        lo, hi = packed & 0xF, packed >> 4
        top = max(int(lo.max()), int(hi.max()))
        if top < L:
            return
        bad = (lo >= L) | (hi >= L)
    else:
        from .pack import unpack, unpack_torch

        codes = unpack_torch(packed, K, bits) if is_t else unpack(packed, K, bits)
        top = int(codes.max())
        if top < L:
            return
        bad = codes >= L
    row = _first_row(bad)
    raise ValueError(
        f"packed row {row} holds code {top}, past the table of {L} entries (codes must be < {L})"
    )


def check_values(packed: Any, lut: Any, scales: Any, K: int, bits: int = 4) -> None:
    """The O(size) checks: codes in range, pad bits zero, lut and scales finite (``bits``: the
    width of the dense layout packed holds)."""
    L = int(lut.shape[-1])
    check_codes(packed, K, L, bits)
    check_finite(lut, "lut")
    check_finite(scales, "scales")


def check_quantized(qt: Any, *, values: bool = True) -> tuple:
    """Full check of a QuantizedTensor (shape, format, group size; ``values``: codes and
    finiteness too). Returns check_parts' tuple."""
    from .formats import get_format

    shape = getattr(qt, "shape", None)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"a quantized tensor's shape must be (N, K), got {shape!r}")
    N, K = (_int(s, "shape") for s in shape)
    if N < 1 or K < 1:
        raise ValueError(f"a quantized tensor's shape must be positive, got {(N, K)}")
    f = get_format(qt.fmt)
    lut = qt.lut
    parts = check_parts(qt.packed, lut, qt.scales, K, qt.group_size, bits=f.bits, N=N)
    if not f.learned and parts[2] != 1:
        raise ValueError(f"format {f.name} has a fixed table: lut must be one row")
    if values:
        check_values(qt.packed, lut, qt.scales, K, f.bits)
    return parts


# ---- once per tensor version (gemm's hot path) ------------------------------------------------

_CHECKED: dict = {}  # id(packed) -> (weakref, version, K, L, bits)


def check_codes_once(packed: Any, K: int, L: int, bits: int = 4) -> None:
    """:func:`check_codes`, skipped when this torch tensor (same object, same in-place version)
    already passed for (K, L, bits). Only needed where a bad code is possible (L < 2^bits or pad
    bits in the last byte: see :func:`codes_need_check`)."""
    if not T.is_torch(packed) or packed.device.type == "meta":
        if not T.is_torch(packed):
            check_codes(packed, K, L, bits)
        return
    key = id(packed)
    try:
        version = packed._version
    except RuntimeError:  # inference-mode tensors have no version counter
        version = -1
    entry = _CHECKED.get(key)
    if entry is not None and entry[0]() is packed and entry[1:] == (version, K, L, bits):
        return
    check_codes(packed, K, L, bits)
    try:
        ref = weakref.ref(packed, lambda _, key=key: _CHECKED.pop(key, None))
    except TypeError:  # pragma: no cover - tensors support weak references
        return
    _CHECKED[key] = (ref, version, K, L, bits)


def codes_need_check(K: int, L: int, bits: int = 4) -> bool:
    """Whether ``bits``-bit codes of K columns can be invalid for an L-entry table: a code past
    the table (L < 2^bits) or pad bits in the last byte (bits * K not a multiple of 8)."""
    return L < 1 << bits or bits * K % 8 != 0


__all__ = [
    "check_codes",
    "check_codes_once",
    "check_finite",
    "check_parts",
    "group_size_setting",
    "covariance",
    "table_operands",
    "check_quantized",
    "check_real",
    "check_values",
    "codes_need_check",
    "group_size",
    "infer_group_size",
    "max_group_size",
    "packed_shape",
    "table_length",
]
