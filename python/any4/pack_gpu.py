"""GPU weight layout (SPEC §4): repack once into tensor-core fragment order, and back.

``any4.pack_for_gpu`` turns the storage layout (``packed`` uint8 [N, ceil(bits*K/8)], ``lut``,
``scales``) into a :class:`GpuWeight`: three tensors in the order in which the CUDA kernel's
``mma.sync.m16n8k16`` instructions consume them (layout documented in ``cuda/layout.cuh``)::

    codes   uint8 [n_tiles, k_chunks, 32, 16]      4-bit: 16-row x 64-k tiles, one 16-byte vector
                                                   per lane
            uint8 [n_tiles, n_units, 32, 16]       2-bit: one 16-byte vector per lane per 128 k
            uint8 [n_tiles, n_units, 48, 16]       3-bit: the same (2-bit plane) + an 8-byte
                                                   high-bit plane per lane
    scales  dtype [n_tiles, n_groups_pad, 8, 4]    (scale, zero) of rows g and g+8, per group
    lut     uint8 [N_pad, 32]                      16 table entries per row: low bytes, high bytes

with n_tiles = ceil(N/16), k_chunks = ceil(K/64), n_units = ceil(k_chunks/2), N_pad = 16 n_tiles;
rows and k past the matrix are padding (code 0, scale and zero 0). 3- and 2-bit codes are dense
on the GPU too (3 and 2 bits per weight plus scales and tables: :attr:`GpuWeight.bits_per_weight`). ``dtype`` is the compute dtype of the kernel
(bfloat16 or float16) and must be the activations' dtype; tables given in another dtype are
rounded to it once, here. The repacking runs in C++ on the CPU; ``unpack_from_gpu`` is its
exact inverse. ``emulate_gpu_gemm`` runs the kernel's lanes on the CPU (tests, no GPU needed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from . import _tensor as T
from ._core import C
from .pack import code_bits, packed_bytes
from .quantize import QuantizedTensor
from .validate import check_values, infer_group_size
from .validate import group_size as checked_group_size

DEQUANTIZERS = {"arith": 0, "lut_reg": 1, "lut_smem": 2}
# Table lookup used when none is named, per table length L (16: 4-bit, 8: 3-bit, 4: 2-bit
# tables); the other one is kept selectable for measurements (bench/gemm_cuda_bench.py times
# both): set an entry to whichever the benchmark shows faster for that format.
DEFAULT_LUT_DEQUANT = {16: "lut_reg", 8: "lut_reg", 4: "lut_reg"}
COMPUTE_DTYPES = ("bfloat16", "float16")
# Kernel variants (cuda/gemm_tc.cu): chunks per register pipeline stage, and how many waves of
# blocks the automatic split-K plan may fill (cuda/layout.cuh make_tc_plan).
STAGE_CHUNKS = (2, 4)
DEFAULT_STAGE_CHUNKS = 2
SPLIT_WAVES = (1, 2)
DEFAULT_SPLIT_WAVES = 2


def _torch():
    import torch

    return torch


@dataclass
class GpuWeight:
    """A quantized [N, K] weight in the GPU layout (see the module docstring)."""

    codes: Any  # uint8, gpu_codes_shape(N, K, bits): [n_tiles, k_chunks or n_units, 32 or 48, 16]
    scales: Any  # dtype [n_tiles, n_groups_pad, 8, 4]
    lut: Any  # uint8 [N_pad, 32]
    shape: tuple  # (N, K)
    group_size: int
    lut_len: int  # L = 2^bits entries used per row
    lut_shared: bool  # the table was one row for all (fixed formats)
    arith_neg2: int  # >= 0: the table is c + offset (int formats), the kernel's Arith constant
    storage_bits: int = 4  # code width of the storage layout it was packed from (pack.py)
    bits: int = 4  # code width of the GPU layout (4, 3 or 2; cuda/layout.cuh)

    @property
    def dtype(self) -> str:
        return T.dtype_name(self.scales)

    @property
    def arith(self) -> bool:
        """True when the codes may be converted arithmetically (table c + offset, shared)."""
        return self.arith_neg2 >= 0

    @property
    def device(self) -> Any:
        return self.codes.device

    def to(self, device: Any) -> GpuWeight:
        """The same weight on another device (tensors copied)."""
        return replace(
            self,
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            lut=self.lut.to(device),
        )

    def cuda(self, device: Any = None) -> GpuWeight:
        return self.to(_torch().device("cuda") if device is None else device)

    def cpu(self) -> GpuWeight:
        return self.to("cpu")

    def nbytes(self) -> int:
        """Bytes stored on the device: codes, scales and tables (padding included)."""
        return sum(T.nbytes(t) for t in (self.codes, self.scales, self.lut))

    @property
    def bits_per_weight(self) -> float:
        """Bits stored per weight in the GPU layout: 8 * nbytes() / (N * K)."""
        N, K = self.shape
        return 8 * self.nbytes() / (N * K)

    def default_dequant(self) -> str:
        """The dequantizer used when none is named: arith for int tables, else the table
        lookup of DEFAULT_LUT_DEQUANT for this table length."""
        return "arith" if self.arith else DEFAULT_LUT_DEQUANT.get(self.lut_len, "lut_reg")


def _lut_2d(lut: Any) -> Any:
    return lut.reshape(1, -1) if lut.ndim == 1 else lut


def natural_bits(lut_len: int) -> int:
    """The narrowest GPU code width that holds a table of lut_len entries: 2, 3 or 4."""
    return 2 if lut_len <= 4 else 3 if lut_len <= 8 else 4


def gpu_codes_shape(N: int, K: int, bits: int = 4) -> tuple:
    """Shape of the ``codes`` tensor of the GPU layout of ``bits``-bit codes for an [N, K] weight."""
    n_tiles, k_chunks = -(-int(N) // 16), -(-int(K) // 64)
    if bits == 4:
        return (n_tiles, k_chunks, 32, 16)
    if bits not in (2, 3):
        raise ValueError(f"the GPU layout holds 2-, 3- or 4-bit codes, got bits={bits!r}")
    return (n_tiles, -(-k_chunks // 2), 48 if bits == 3 else 32, 16)


def pack_for_gpu(
    packed: Any,
    lut: Any = None,
    scales: Any = None,
    K: Optional[int] = None,
    group_size: Optional[int] = None,
    *,
    dtype: Optional[str] = None,
    bits: Optional[int] = None,
) -> GpuWeight:
    """Repack a quantized weight into the GPU layout (done once, at load time).

    Args:
        packed: uint8 [N, ceil(bits*K/8)] codes (torch tensor, CPU or CUDA), or a
            QuantizedTensor (then lut, scales, K and group_size come from it). Any storage
            width (4, 3 or 2 bits, or 3/2-bit codes in nibbles: any4.pack).
        lut: [N, L] or [1, L] / [L] table, L <= 16 (float32, float16 or bfloat16).
        scales: [N, ceil(K/G), 2] (scale, zero), lut's dtype.
        K: number of input features (needed: an odd K and K+1 pack to the same bytes).
        group_size: G, a power of two >= 16 (32, 64, 128, 256 are the usual ones); inferred
            from K and scales when omitted.
        dtype: compute dtype, "bfloat16" or "float16" (the activations' dtype); default: the
            table's dtype when it is 16-bit, else bfloat16.
        bits: code width of the GPU layout (4, 3 or 2); default: the narrowest that holds the
            table (L <= 4: 2, L <= 8: 3, else 4), which is what QuantLinear uses. A wider one
            (e.g. 4 for a 3-bit weight) runs the same codes through the wider kernel.
    Returns:
        GpuWeight on the device of ``packed``.
    """
    torch = _torch()
    if isinstance(packed, QuantizedTensor):
        qt = packed
        if lut is not None or scales is not None:
            raise TypeError("pass either a QuantizedTensor or packed, lut and scales")
        packed, lut, scales, K, group_size = (
            qt.packed,
            qt.lut,
            qt.scales,
            qt.shape[1],
            qt.group_size,
        )
    if lut is None or scales is None or K is None:
        raise TypeError("pack_for_gpu needs packed, lut, scales and K (or a QuantizedTensor)")
    for name, t in (("packed", packed), ("lut", lut), ("scales", scales)):
        if not T.is_torch(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = packed.device
    K = int(K)
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(
            f"packed must be uint8 [N, ceil(bits*K/8)], got {packed.dtype} {tuple(packed.shape)}"
        )
    N = int(packed.shape[0])
    lut2 = _lut_2d(lut)
    if lut2.ndim != 2:
        raise ValueError(f"lut must be [L], [1, L] or [N, L], got {tuple(lut.shape)}")
    lut_rows, lut_len = (int(s) for s in lut2.shape)
    if lut_rows not in (1, N) or not 1 <= lut_len <= 16:
        raise ValueError(f"lut must be [1, L] or [N={N}, L] with L <= 16, got {tuple(lut.shape)}")
    storage_bits = code_bits(K, int(packed.shape[1]), lut_len, name="packed")
    table_dtype = T.dtype_name(lut2)
    if table_dtype not in T.DTYPE_CODE or T.dtype_name(scales) != table_dtype:
        raise TypeError(
            f"lut and scales must share a float dtype, got {table_dtype} and {T.dtype_name(scales)}"
        )
    if scales.ndim != 3 or int(scales.shape[0]) != N or int(scales.shape[2]) != 2:
        raise ValueError(f"scales must be [N={N}, groups, 2], got {tuple(scales.shape)}")
    n_groups = int(scales.shape[1])
    if group_size is None:
        group_size = infer_group_size(K, n_groups)
    group_size = checked_group_size(group_size, K, n_groups)
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(
            f"the GPU layout needs a power-of-two group size >= 16, got {group_size}; "
            "any4.gemm on the storage layout handles other group sizes (slower)"
        )
    if -(-K // group_size) != n_groups:
        raise ValueError(
            f"group_size={group_size} and K={K} need {-(-K // group_size)} groups, scales have {n_groups}"
        )
    if dtype is None:
        dtype = table_dtype if table_dtype in COMPUTE_DTYPES else "bfloat16"
    dtype = str(dtype).replace("torch.", "")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be bfloat16 or float16, got {dtype}")

    gpu_bits = natural_bits(lut_len) if bits is None else bits
    if isinstance(gpu_bits, bool) or gpu_bits not in (2, 3, 4) or lut_len > 1 << gpu_bits:
        raise ValueError(
            f"bits must be 2, 3 or 4 and hold the {lut_len}-entry table (>= "
            f"{natural_bits(lut_len)}), got {bits!r}"
        )
    sizes = C.gpu_pack_sizes(N, K, group_size, gpu_bits)
    p_cpu = packed.detach().to("cpu").contiguous()
    l_cpu = lut2.detach().to("cpu").contiguous()
    s_cpu = scales.detach().to("cpu").contiguous()
    check_values(
        p_cpu, l_cpu, s_cpu, K, storage_bits
    )  # once, at load time: codes < L, pads 0, finite
    codes = torch.empty(gpu_codes_shape(N, K, gpu_bits), dtype=torch.uint8)
    sc = torch.empty(sizes["n_tiles"], sizes["n_groups_pad"], 8, 4, dtype=getattr(torch, dtype))
    lt = torch.empty(sizes["N_pad"], 32, dtype=torch.uint8)
    C.pack_for_gpu(
        p_cpu.data_ptr(), storage_bits, N, K, l_cpu.data_ptr(), lut_rows, lut_len,
        s_cpu.data_ptr(), n_groups, group_size, T.DTYPE_CODE[table_dtype], T.DTYPE_CODE[dtype],
        gpu_bits, codes.data_ptr(), sc.data_ptr(), lt.data_ptr(),
    )  # fmt: skip
    neg2 = C.gpu_arith_constant(
        l_cpu.data_ptr(), lut_rows, lut_len, T.DTYPE_CODE[table_dtype], T.DTYPE_CODE[dtype]
    )
    w = GpuWeight(
        codes, sc, lt, (N, K), group_size, lut_len, lut_rows == 1, int(neg2), storage_bits, gpu_bits
    )
    return w if device.type == "cpu" else w.to(device)


def unpack_from_gpu(w: GpuWeight) -> tuple:
    """Exact inverse of :func:`pack_for_gpu`: (packed uint8 [N, ceil(bits*K/8)], lut [1 or N, L],
    scales [N, ceil(K/G), 2]) as CPU tensors, tables in the GPU weight's dtype; the codes in the
    storage layout they were packed from (``w.storage_bits``)."""
    torch = _torch()
    N, K = w.shape
    sizes = check_gpu_weight(w)
    codes, sc, lt = (t.detach().to("cpu").contiguous() for t in (w.codes, w.scales, w.lut))
    dt = getattr(torch, w.dtype)
    lut_rows = 1 if w.lut_shared else N
    packed = torch.empty(N, packed_bytes(K, w.storage_bits), dtype=torch.uint8)
    scales = torch.empty(N, sizes["n_groups"], 2, dtype=dt)
    lut = torch.empty(lut_rows, w.lut_len, dtype=dt)
    C.unpack_from_gpu(
        codes.data_ptr(), sc.data_ptr(), lt.data_ptr(), N, K, w.group_size, w.bits, lut_rows,
        w.lut_len, w.storage_bits, packed.data_ptr(), scales.data_ptr(), lut.data_ptr(),
    )  # fmt: skip
    return packed, lut, scales


def check_gpu_weight(w: GpuWeight) -> dict:
    """Raise ValueError unless w's tensors have the GPU layout's shapes and dtypes for its shape,
    group size and code width (the kernels and the emulation read them by these sizes); returns
    the layout sizes (:func:`gpu_layout_sizes`)."""
    N, K = w.shape
    if w.bits not in (2, 3, 4) or not 1 <= w.lut_len <= 1 << w.bits:
        raise ValueError(f"GpuWeight: {w.lut_len}-entry table with {w.bits}-bit codes")
    sizes = C.gpu_pack_sizes(N, K, w.group_size, w.bits)
    torch = _torch()
    ok = (
        tuple(w.codes.shape) == gpu_codes_shape(N, K, w.bits)
        and w.codes.dtype == torch.uint8
        and tuple(w.scales.shape) == (sizes["n_tiles"], sizes["n_groups_pad"], 8, 4)
        and T.dtype_name(w.scales) in COMPUTE_DTYPES
        and tuple(w.lut.shape) == (sizes["N_pad"], 32)
        and w.lut.dtype == torch.uint8
    )
    if not ok:
        raise ValueError(
            f"GpuWeight tensors do not match its shape {tuple(w.shape)}, group size "
            f"{w.group_size} and {w.bits}-bit codes: codes {tuple(w.codes.shape)} (expected "
            f"{gpu_codes_shape(N, K, w.bits)}), scales {tuple(w.scales.shape)}, lut {tuple(w.lut.shape)}"
        )
    return sizes


def dequant_code(w: GpuWeight, dequant: Optional[str]) -> int:
    """Kernel code of a dequantizer name ("arith", "lut_reg", "lut_smem"; None = default)."""
    name = w.default_dequant() if dequant is None else dequant
    if name not in DEQUANTIZERS:
        raise ValueError(f"dequant must be one of {tuple(DEQUANTIZERS)}, got {name!r}")
    if name == "arith" and not w.arith:
        raise ValueError("dequant='arith' needs a shared table c + offset (int formats)")
    return DEQUANTIZERS[name]


def emulate_gpu_gemm(
    x: Any,
    w: GpuWeight,
    *,
    dequant: Optional[str] = None,
    num_sms: int = 108,
    blocks_per_sm: int = 4,
    splits: int = 0,
    split_waves: int = DEFAULT_SPLIT_WAVES,
    stage_chunks: int = DEFAULT_STAGE_CHUNKS,
) -> Any:
    """Run the tensor-core kernel's lanes on the CPU (slow; for tests): y = x @ dequant(W)^T.

    x: [..., K] CPU tensor in the weight's dtype. ``num_sms`` and ``blocks_per_sm`` drive the
    kernel's split-K plan (``split_waves``: 1 or 2 waves of blocks), ``splits`` > 0 forces a
    number of K splits, ``stage_chunks`` (2 or 4) is the pipeline variant. Returns y [..., N]
    in x's dtype.
    """
    torch = _torch()
    N, K = w.shape
    if not T.is_torch(x) or x.device.type != "cpu":
        raise TypeError("emulate_gpu_gemm takes a CPU torch tensor x")
    if T.dtype_name(x) != w.dtype:
        raise TypeError(f"x must have the GPU weight's dtype {w.dtype}, got {T.dtype_name(x)}")
    if x.ndim < 1 or int(x.shape[-1]) != K:
        raise ValueError(f"x must be [..., K={K}], got {tuple(x.shape)}")
    code = dequant_code(w, dequant)
    check_variant(stage_chunks, split_waves)
    check_gpu_weight(w)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, K).contiguous()
    M = int(x2.shape[0])
    y = torch.full((M, N), float("nan"), dtype=x.dtype)
    if M:
        wc = w.cpu()
        C.emulate_gpu_gemm(
            x2.data_ptr(), T.DTYPE_CODE[w.dtype], M, K, N, w.group_size, wc.codes.data_ptr(),
            wc.scales.data_ptr(), wc.lut.data_ptr(), code, max(w.arith_neg2, 0), int(num_sms),
            int(blocks_per_sm), int(splits), int(split_waves), int(stage_chunks), w.bits,
            y.data_ptr(),
        )  # fmt: skip
    return y.reshape(lead + (N,))


def emulate_gpu_dequant(w: GpuWeight, *, dequant: Optional[str] = None) -> Any:
    """Run the dequantize kernel of the large-batch path on the CPU (tests): W [N, K] in the
    weight's dtype, as the GPU writes it before its dense matmul (the storage-layout weight
    dequantized with the kernel's own lookups and one packed fma per value)."""
    torch = _torch()
    N, K = w.shape
    code = dequant_code(w, dequant)
    sizes = check_gpu_weight(w)
    out = torch.empty(N, sizes["K_pad"], dtype=getattr(torch, w.dtype))
    wc = w.cpu()
    C.emulate_gpu_dequant(
        T.DTYPE_CODE[w.dtype], K, N, w.group_size, wc.codes.data_ptr(), wc.scales.data_ptr(),
        wc.lut.data_ptr(), code, max(w.arith_neg2, 0), w.bits, out.data_ptr(),
    )  # fmt: skip
    return out[:, :K]


def check_variant(stage_chunks: int, split_waves: int) -> None:
    """Raise ValueError unless (stage_chunks, split_waves) names a kernel variant."""
    if stage_chunks not in STAGE_CHUNKS:
        raise ValueError(f"stage_chunks must be one of {STAGE_CHUNKS}, got {stage_chunks!r}")
    if split_waves not in SPLIT_WAVES:
        raise ValueError(f"split_waves must be one of {SPLIT_WAVES}, got {split_waves!r}")


def tc_plan(
    M: int,
    N: int,
    K: int,
    num_sms: int,
    blocks_per_sm: int = 4,
    splits: int = 0,
    split_waves: int = DEFAULT_SPLIT_WAVES,
    bits: int = 4,
) -> dict:
    """The kernel's grid plan (B tiles per mma, m-tiles, blocks, K splits, scratch sizes) for a
    shape on a GPU with num_sms multiprocessors holding blocks_per_sm blocks each; the automatic
    split-K (splits=0) fills at most ``split_waves`` waves; ``bits``-bit codes (3/2-bit splits
    start on even chunks)."""
    args = (M, N, K, num_sms, blocks_per_sm, splits, split_waves, bits)
    return dict(C.tc_plan(*(int(a) for a in args)))


def tc_scratch_bound(num_sms: int, blocks_per_sm: int) -> tuple:
    """(workspace floats, counters) that cover the split-K scratch of every automatic plan on a
    GPU with num_sms multiprocessors holding at most blocks_per_sm blocks of any kernel."""
    return tuple(int(v) for v in C.tc_scratch_bound(int(num_sms), int(blocks_per_sm)))


def gpu_layout_sizes(N: int, K: int, group_size: int, bits: int = 4) -> dict:
    """Tile counts and tensor sizes of the GPU layout of an [N, K] weight of ``bits``-bit codes."""
    return dict(C.gpu_pack_sizes(int(N), int(K), int(group_size), int(bits)))


__all__ = [
    "DEQUANTIZERS", "GpuWeight", "emulate_gpu_dequant", "emulate_gpu_gemm", "gpu_codes_shape",
    "gpu_layout_sizes", "natural_bits", "pack_for_gpu", "tc_plan", "tc_scratch_bound",
    "unpack_from_gpu",
]  # fmt: skip
