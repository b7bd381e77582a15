"""``any4.nn.QuantLinear``: a drop-in replacement for ``torch.nn.Linear`` on quantized weights.

The module holds the three tensors of the one representation (SPEC §1) as buffers::

    packed  uint8 [out_features, ceil(bits * in_features / 8)]   codes (any4.pack layout)
    lut     [out_features or 1, 2^bits]                   per-row (learned) or shared table
    scales  [out_features, ceil(in_features / G), 2]      per-group (scale, zero)

and ``forward`` is ``any4.gemm(x, packed, lut, scales, group_size) (+ bias)``, called through its
torch custom-op registration ``torch.ops.any4.gemm`` (same function; lets torch.compile and
torch.export trace the module without graph breaks). On CUDA the weight is also repacked once
into the tensor-core fragment order (see ``prepare_for_device``) and bf16/fp16 inputs go through
``torch.ops.any4.gemm_gpu``: any batch shape
[..., in_features], x in float32 / float16 / bfloat16 (float64 is computed in float32 and cast
back), output in x's dtype. The device follows ``.to()`` / ``.cuda()`` like any module, but the
table *dtype* is fixed at quantization time (the codes were assigned to the rounded table):
``model.half()`` converts activations and bias, not ``lut`` / ``scales``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import ops  # registers torch.ops.any4.gemm (a thin wrapper of any4.gemm)
from . import validate as V
from .formats import get_format
from .pack import packed_bytes, repack
from .quantize import QuantizedTensor, dequantize, quantize

QUANT_BUFFERS = ("packed", "lut", "scales")
GPU_BUFFERS = ("gpu_codes", "gpu_scales", "gpu_lut")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    module.check()  # loaded tensors: shapes, dtypes, codes in range, finite (any4.validate)
    module.prepare_for_device()  # loaded storage buffers: rebuild the device form of the weight


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + bias with W stored in any4's packed representation.

    Build one with :meth:`from_linear` (quantizes an ``nn.Linear``) or :meth:`from_quantized`
    (wraps a :class:`any4.QuantizedTensor`); the constructor makes an *empty shell* of the right
    shapes (zeros), which is what loading a saved model fills (``load_state_dict``).

    Attributes:
        in_features, out_features: K and N.
        fmt: format name ("any4", "nf4", ...); group_size: G (the last group may be shorter).
        packed, lut, scales: buffers, see the module docstring.
        bias: ``nn.Parameter`` [out_features] or None (follows the model's dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: str = "any4",
        group_size: int = 128,
        *,
        table_dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        f = get_format(fmt)
        in_features = V._int(in_features, "in_features")
        out_features = V._int(out_features, "out_features")
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        group_size = V.group_size(group_size, in_features)
        if group_size > in_features:
            raise ValueError(
                f"group_size must be a multiple of 8 in [8, in_features={in_features}], got {group_size}"
            )
        if table_dtype not in _KERNEL_DTYPES:
            raise TypeError(f"table_dtype must be float32, float16 or bfloat16, got {table_dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.fmt = f.name
        self.group_size = int(group_size)
        n_groups = -(-self.in_features // self.group_size)
        lut_rows = self.out_features if f.learned else 1
        self.register_buffer(
            "packed",
            torch.zeros(
                out_features, packed_bytes(in_features, f.bits), dtype=torch.uint8, device=device
            ),
        )
        self.register_buffer(
            "lut", torch.zeros(lut_rows, f.levels, dtype=table_dtype, device=device)
        )
        self.register_buffer(
            "scales", torch.zeros(out_features, n_groups, 2, dtype=table_dtype, device=device)
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, device=device, dtype=dtype or torch.float32)
            )
        else:
            self.register_parameter("bias", None)
        # Device-specific form of the weight (e.g. the GPU fragment-order repack, SPEC §4), built by
        # prepare_for_device() when the module moves; None on CPU.
        self.kernel_state: Any = None
        self.register_load_state_dict_post_hook(_after_load)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # 3/2-bit codes saved in nibbles (state dicts of any4 before the dense layouts) load into
        # the dense layout: the same codes, repacked.
        key = prefix + "packed"
        bits = get_format(self.fmt).bits
        t = state_dict.get(key)
        if (
            bits != 4
            and isinstance(t, torch.Tensor)
            and tuple(t.shape) == (self.out_features, packed_bytes(self.in_features, 4))
            and tuple(t.shape) != tuple(self.packed.shape)
        ):
            nibbles = t.cpu().contiguous()
            V.check_codes(
                nibbles, self.in_features, 1 << bits
            )  # nibbles can hold codes past 2^bits
            state_dict = dict(state_dict)
            state_dict[key] = repack(nibbles, self.in_features, 4, bits).to(t.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None
    ) -> QuantLinear:
        """Wrap a QuantizedTensor (torch tensors) and an optional bias [N] (copied)."""
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be an any4.QuantizedTensor, got {type(qt).__name__}")
        if not all(isinstance(t, torch.Tensor) for t in (qt.packed, qt.lut, qt.scales)):
            raise TypeError("from_quantized needs a QuantizedTensor of torch tensors")
        V.check_quantized(qt)  # shapes, K, group size, codes in range, finite tables/scales
        N, K = qt.shape
        m = cls(
            K,
            N,
            bias=bias is not None,
            fmt=qt.fmt,
            group_size=qt.group_size,
            table_dtype=qt.lut.dtype,
            device=qt.packed.device,
        )
        for name in QUANT_BUFFERS:
            src = getattr(qt, name)
            dst = getattr(m, name)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"QuantizedTensor.{name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                )
            setattr(m, name, src.detach().contiguous())
        if bias is not None:
            if tuple(bias.shape) != (N,):
                raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        m.prepare_for_device()
        return m

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        fmt: str = "any4",
        group_size: int = 128,
        *,
        table_dtype: Optional[torch.dtype] = None,
        **quantize_kwargs: Any,
    ) -> QuantLinear:
        """Quantize an ``nn.Linear``'s weight [N, K] (or a GPT-2-style ``Conv1D``'s, stored
        transposed [K, N]) with ``any4.quantize`` and ``quantize_kwargs``: stats, weighting,
        method, n_init, sample_weight, ... ``table_dtype`` defaults to float16 for an fp16 layer,
        else bfloat16."""
        if dense_features(linear) is None:
            raise TypeError(f"expected torch.nn.Linear or Conv1D, got {type(linear).__name__}")
        w = linear.weight.detach()
        if is_conv1d(linear):
            w = w.t()
        if table_dtype is None:
            table_dtype = torch.float16 if w.dtype == torch.float16 else torch.bfloat16
        dtype_name = str(table_dtype).replace("torch.", "")
        qt = quantize(w, fmt, group_size, dtype=dtype_name, **quantize_kwargs)
        return cls.from_quantized(qt, linear.bias)

    def check(self) -> None:
        """Validate the buffers (any4.validate): shapes and dtypes for this layer's K, N, format
        and group size, codes < the table length, pad bits 0, finite table and scales.
        Run after construction and ``load_state_dict``; raises ValueError / TypeError."""
        f = get_format(self.fmt)
        V.check_parts(
            self.packed, self.lut, self.scales, self.in_features, self.group_size, bits=f.bits,
            N=self.out_features,
        )  # fmt: skip
        if not f.learned and self.lut.shape[0] != 1:
            raise ValueError(f"format {f.name} has a fixed table: lut must be one row")
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ValueError(
                f"bias must have shape ({self.out_features},), got {tuple(self.bias.shape)}"
            )
        if self.packed.device.type != "meta":
            V.check_values(self.packed, self.lut, self.scales, self.in_features, f.bits)

    def densify_codes(self) -> None:
        """3/2-bit codes that were loaded in nibbles (checkpoints written before the dense
        layouts, see any4.io) -> the dense layout: the same codes, repacked (check() after)."""
        bits, K = get_format(self.fmt).bits, self.in_features
        width = int(self.packed.shape[1])
        if bits == 4 or width != packed_bytes(K, 4) or width == packed_bytes(K, bits):
            return
        p = self.packed
        self.packed = repack(p.detach().cpu().contiguous(), K, 4, bits).to(p.device)

    # ---- computation --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantLinear expects a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"QuantLinear expects input [..., {self.in_features}], got {tuple(x.shape)}"
            )
        in_dtype = x.dtype
        if in_dtype not in _KERNEL_DTYPES:
            if not x.is_floating_point():
                raise TypeError(f"QuantLinear expects a floating-point input, got {in_dtype}")
            x = x.to(torch.float32)
        ks = self.kernel_state
        if ks is not None and x.is_cuda and x.dtype == self.gpu_scales.dtype:
            # fast path: tensor-core kernel on the fragment-order repack (SPEC §4)
            y = ops.gemm_gpu(
                x, self.gpu_codes, self.gpu_scales, self.gpu_lut, self.out_features,
                self.in_features, self.group_size, ks.lut_len, ks.arith_neg2,
            )  # fmt: skip
        else:
            y = ops.gemm(x, self.packed, self.lut, self.scales, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def quantized_tensor(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (sharing this module's buffers)."""
        return QuantizedTensor(
            self.packed,
            self.lut,
            self.scales,
            (self.out_features, self.in_features),
            self.fmt,
            self.group_size,
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight [out_features, in_features] that forward multiplies by (float32 unless
        ``dtype``), on this module's device."""
        name = None if dtype is None else str(dtype).replace("torch.", "")
        return dequantize(self.quantized_tensor(), name)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight (float32 unless ``dtype``)."""
        w = self.dequantize(dtype)
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ---- devices ------------------------------------------------------------------------------

    def prepare_for_device(self) -> None:
        """Hook run after construction, after every device move (``.to()``, ``.cuda()``) and after
        ``load_state_dict``.

        On CUDA (bf16/fp16 tables, a power-of-two group size >= 16, kernels built) it repacks the
        weight once into the tensor-core fragment order (``any4.pack_for_gpu``, SPEC §4): the
        non-persistent buffers ``gpu_codes``, ``gpu_scales``, ``gpu_lut`` (not saved; rebuilt from
        the storage buffers), with the GpuWeight in ``self.kernel_state``. ``forward`` uses them
        for CUDA inputs of the table dtype, and the storage-layout kernel otherwise. CPU needs
        nothing.
        """
        self.kernel_state = None
        for name in GPU_BUFFERS:
            self._buffers.pop(name, None)
        if self.packed.device.type != "cuda" or self.lut.dtype not in (
            torch.bfloat16,
            torch.float16,
        ):
            return
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            return
        from .cuda import cuda_compiled
        from .pack_gpu import pack_for_gpu

        if not cuda_compiled():
            return
        w = pack_for_gpu(self.packed, self.lut, self.scales, self.in_features, self.group_size)
        self.register_buffer("gpu_codes", w.codes, persistent=False)
        self.register_buffer("gpu_scales", w.scales, persistent=False)
        self.register_buffer("gpu_lut", w.lut, persistent=False)
        self.kernel_state = w

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Buffers move with the module but keep their dtype: the codes were assigned to the table
        # rounded to that dtype, so converting lut/scales would silently change the weight.
        for name in GPU_BUFFERS:  # derived from the storage buffers; rebuilt below
            self._buffers.pop(name, None)
        quant = {name: self._buffers.pop(name) for name in QUANT_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in quant.items():
                if t is not None:
                    target = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
                    t = t.to(device=target)
                self._buffers[name] = t
        self.prepare_for_device()
        return self

    # ---- reporting ----------------------------------------------------------------------------

    @property
    def bits_per_weight(self) -> float:
        """Bits stored per weight: the bytes of packed codes, table and scales, times 8, over
        out_features * in_features."""
        stored = sum(t.numel() * t.element_size() for t in (self.packed, self.lut, self.scales))
        return 8 * stored / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={self.fmt}, group_size={self.group_size}, table_dtype={str(self.lut.dtype).replace('torch.', '')}"
        )


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every QuantLinear of ``model`` (in place) by an ``nn.Linear`` holding its
    dequantized weight (float32 unless ``dtype``): the same function computed with the framework's
    dense matmul (for export, or for fast evaluation where the any4 kernel is not the point)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_submodule(model, name, module.to_linear(dtype))
    return model


def is_conv1d(module: nn.Module) -> bool:
    """A GPT-2-style ``transformers.pytorch_utils.Conv1D`` (y = x @ W + b, W [in, out]),
    recognised without importing transformers."""
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(w, torch.Tensor)
        and w.ndim == 2
        and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def dense_features(module: nn.Module) -> Optional[tuple]:
    """(out_features, in_features) of a layer QuantLinear can replace (nn.Linear, Conv1D), else
    None."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if is_conv1d(module):
        return (int(module.nf), int(module.nx))
    return None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


__all__ = ["QuantLinear", "dense_features", "dequantize_model", "is_conv1d", "set_submodule"]
