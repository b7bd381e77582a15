"""Quantize / dequantize weight matrices in any format (SPEC §1, §2).

Every format produces the same three tensors (see :class:`QuantizedTensor`)::

    packed  uint8 [N, ceil(bits*K/8)] codes, one dense bit stream per row (any4.pack):
                                       4-bit two per byte, 3-bit 8 per 3 bytes, 2-bit 4 per byte
    lut     [N, 2^bits] or [1, 2^bits] per-row (learned) or shared (fixed) table
    scales  [N, ceil(K/G), 2]          per-group (scale, zero)

    w[n, k] ~= lut[n, code[n, k]] * scale[n, k // G] + zero[n, k // G]

lut and scales have the activation dtype (bf16 / fp16 / fp32); their values were rounded once
to that dtype and the codes re-assigned to the nearest rounded value (never worse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _tensor as T
from ._core import C
from .formats import Format, get_format
from .kmeans import DEFAULT_METHOD, DEFAULT_N_INIT, METHODS
from .pack import pack, unpack
from .refine import DEFAULT_REFINE, check_refine, refine_rows
from .stats import DEFAULT_WEIGHTING, ChannelStats, channel_weight


@dataclass
class QuantizedTensor:
    """A quantized [N, K] weight: packed codes, table and group affine (CPU or CUDA tensors)."""

    packed: Any  # uint8 [N, ceil(bits*K/8)]
    lut: Any  # [N or 1, 2^bits], dtype
    scales: Any  # [N, ceil(K / group_size), 2], dtype
    shape: tuple  # (N, K)
    fmt: str
    group_size: int

    @property
    def bits(self) -> int:
        return get_format(self.fmt).bits

    @property
    def dtype(self) -> str:
        return T.dtype_name(self.lut)

    def codes(self) -> Any:
        """Unpacked codes, uint8 [N, K]."""
        return unpack(self.packed, self.shape[1], self.bits)

    def dequantize(self) -> Any:
        return dequantize(self)

    def nbytes(self) -> int:
        """Bytes held by packed codes, table and scales."""
        return sum(T.nbytes(t) for t in (self.packed, self.lut, self.scales))

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes, table, scales) per weight: 8 * nbytes() / (N * K)."""
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])


def check_group_size(group_size: int, K: int) -> None:
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")
    if group_size > K:
        raise ValueError(f"group_size {group_size} is larger than the row length K={K}")


def quantize(
    w: Any,
    fmt: str | Format = "any4",
    group_size: int = 128,
    sample_weight: Optional[Any] = None,
    *,
    stats: Optional[ChannelStats] = None,
    weighting: str = DEFAULT_WEIGHTING,
    scale_power: int = 1,
    method: str = DEFAULT_METHOD,
    n_init: int = DEFAULT_N_INIT,
    max_iter: int = 100,
    seed: int = 0,
    dtype: Optional[str] = None,
    refine: int = DEFAULT_REFINE,
) -> QuantizedTensor:
    """Quantize a weight matrix.

    Args:
        w: [N, K] float tensor (torch or numpy; finite). CUDA tensors are quantized on the CPU
            and the result moved back to their device.
        fmt: "any4", "any3", "any2" (learned per-row tables), "int4", "nf4", "fp4" (fixed), ...
        group_size: positive multiple of 8, <= K. A K that is not a multiple gets a short last group.
        sample_weight: k-means sample weights for learned formats: per input channel [K]
            (multiplied by group_scale**scale_power) or per element [N, K] (used as is).
        stats: calibration statistics of this layer's input; with ``weighting`` ("mse",
            "abs_mean", "mean_abs", "rms", "none") they give the sample weights.
        method: "optimal" (exact k-means, the default) or "lloyd"; n_init/max_iter/seed: Lloyd
            restarts/iterations/seed (see any4.kmeans).
        dtype: "bfloat16", "float16" or "float32" for lut and scales; default: w's dtype when it is
            16-bit, else float32.
        refine: learned formats: rounds of least-squares refinement of each row's table and
            group (scale, zero) on k-means' own weighted error after k-means (any4.refine;
            a row keeps it only where that error falls); 0: plain k-means (SPEC §2).
    Returns:
        QuantizedTensor in w's framework and device.
    """
    f = get_format(fmt)
    T.check_array(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    N, K = (int(s) for s in w.shape)
    if N == 0 or K == 0:
        raise ValueError(f"w must be non-empty, got shape {(N, K)}")
    src_dtype = T.dtype_name(w)
    if src_dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise TypeError(f"w must be a floating-point tensor, got {src_dtype}")
    check_group_size(group_size, K)
    if dtype is None:
        dtype = src_dtype if src_dtype in ("float16", "bfloat16") else "float32"
    dtype = str(dtype).replace("torch.", "")
    if dtype not in T.DTYPE_CODE:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if not T.is_torch(w) and dtype == "bfloat16":
        raise TypeError("numpy has no bfloat16: pass a torch tensor or dtype='float16'/'float32'")
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if n_init < 1 or max_iter < 1:
        raise ValueError("n_init and max_iter must be >= 1")
    refine = check_refine(refine)

    w32 = np.ascontiguousarray(T.to_numpy(w), dtype=np.float32)
    chan = elem = None
    power = 0
    if sample_weight is not None and stats is not None:
        raise ValueError("pass either sample_weight or stats, not both")
    if sample_weight is not None:
        T.check_array(sample_weight, "sample_weight")
        sw = np.ascontiguousarray(T.to_numpy(sample_weight, "sample_weight"), dtype=np.float32)
        if sw.shape == (K,):
            chan, power = sw, int(scale_power)
        elif sw.shape == (N, K):
            elem = sw
        else:
            raise ValueError(f"sample_weight must be [K]={K} or [N, K]={(N, K)}, got {sw.shape}")
        if not np.isfinite(sw).all() or (sw < 0).any():
            raise ValueError("sample_weight must be finite and >= 0")
    elif stats is not None:
        chan, power = channel_weight(stats, weighting)
        if chan is not None:
            if chan.shape != (K,):
                raise ValueError(f"stats cover {chan.shape[0]} channels, w has K={K}")
            chan = np.ascontiguousarray(chan)

    L = f.levels
    n_groups = -(-K // group_size)
    codes = np.empty((N, K), np.uint8)
    lut = np.empty((N if f.learned else 1, L), np.float32)
    scales = np.empty((N, n_groups, 2), np.float32)
    table = None if f.learned else np.asarray(f.table, np.float32)
    C.quantize(
        w32.ctypes.data, N, K, f.bits, 0 if table is None else table.ctypes.data, f.absmax,
        int(group_size), T.DTYPE_CODE[dtype], 0 if chan is None else chan.ctypes.data, power,
        0 if elem is None else elem.ctypes.data, METHODS[method], int(max_iter), int(n_init),
        int(seed), codes.ctypes.data, lut.ctypes.data, scales.ctypes.data,
    )  # fmt: skip
    if f.learned and refine:
        refine_rows(
            w32, codes, lut, scales, group_size, dtype, refine, chan=chan, power=power, elem=elem
        )
    _check_representable(w32, lut, scales, dtype, f.learned)
    packed = pack(codes, f.bits)
    return QuantizedTensor(
        packed=T.from_numpy_like(w, packed),
        lut=T.from_numpy_like(w, lut, dtype),
        scales=T.from_numpy_like(w, scales, dtype),
        shape=(N, K),
        fmt=f.name,
        group_size=int(group_size),
    )


def _check_representable(
    w32: np.ndarray, lut: np.ndarray, scales: np.ndarray, dtype: str, learned: bool
) -> None:
    """The table and scales, rounded to ``dtype``, must be finite (fp16 overflows at 65504):
    an error naming the first bad row instead of a NaN product later."""
    for name, t in (("table", lut), ("scales", scales)):
        bad = ~np.isfinite(t.reshape(t.shape[0], -1))
        if bad.any():
            row = int(np.flatnonzero(bad.any(1))[0])
            if name == "table" and not learned:
                row_w = "the fixed table"
            else:
                row_w = f"|w| of row {row} up to {float(np.abs(w32[row]).max()):.4g}"
            raise ValueError(
                f"row {row}: the {name} overflow {dtype} ({row_w}); quantize with "
                "dtype='bfloat16' or 'float32' (table_dtype for QuantLinear), or rescale the weight"
            )


def dequantize(qt: QuantizedTensor, dtype: Optional[str] = None) -> Any:
    """Float weight [N, K] (float32 unless ``dtype``), computed as lut[code] * scale + zero in
    float32 (one fused multiply-add, as the kernels do), in qt's framework and device.

    ``qt`` is fully checked first (any4.validate: shapes, group size, codes in range, finite
    table and scales), so a bad one raises ValueError/TypeError rather than giving garbage."""
    from .validate import check_quantized

    check_quantized(qt)  # (packed holds qt.bits-bit codes in the dense layout, any4.pack)
    N, K = qt.shape
    bits = qt.bits
    packed, lut, scales = (_cpu(t) for t in (qt.packed, qt.lut, qt.scales))
    pb = T.buffer(packed, "packed", dtypes=("uint8",), ndim=2)
    lb = T.buffer(
        lut.reshape(1, -1) if lut.ndim == 1 else lut, "lut", dtypes=tuple(T.DTYPE_CODE), ndim=2
    )
    sb = T.buffer(scales, "scales", dtypes=(lb.dtype,), ndim=3)
    out = np.empty((N, K), np.float32)
    C.dequantize(
        pb.ptr,
        N,
        K,
        bits,
        lb.ptr,
        lb.shape[0],
        lb.shape[1],
        sb.ptr,
        sb.shape[1],
        int(qt.group_size),
        lb.code,
        out.ctypes.data,
    )
    return T.from_numpy_like(qt.lut, out, dtype)


def _cpu(t: Any) -> Any:
    return t.cpu() if T.is_torch(t) else t
