"""CPU gemm kernels (portable, AVX2, AVX-512, AVX512-BF16, and the prefill path "panels") against
a float64 reference.

Every implementation this processor supports is run on fresh random data; the output buffer is
filled with NaN first (``out=``) so an element the kernel does not write fails the test.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import any4
from conftest import TOL, dequant_ref, rel_err

IMPLS = ("portable", "avx2", "avx512", "avx512bf16")
SUPPORTED = any4.build_info()["cpu_impls"]
impl_params = pytest.mark.parametrize(
    "impl",
    [
        pytest.param(
            i, marks=pytest.mark.skipif(not SUPPORTED[i], reason=f"{i} not supported here")
        )
        for i in IMPLS
    ]
    + ["panels"],  # decoded weight panels times torch.mm (any4.prefill), on every processor
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def quantized(fmt: str, N: int, K: int, group_size: int, dtype: str, seed: int = 0):
    """Quantized random weight (cached: quantizing is not what is tested here)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05 + 0.01 * torch.randn(N, 1, generator=g)
    qt = any4.quantize(w, fmt, group_size=group_size, dtype=dtype, n_init=1)
    return qt, dequant_ref(qt.packed, qt.lut, qt.scales, K, group_size)


def run_poisoned(x, qt, group_size, impl):
    """any4.gemm into a NaN-filled out= buffer; checks that out is what comes back."""
    N = qt.packed.shape[0]
    out = torch.full(tuple(x.shape[:-1]) + (N,), float("nan"), dtype=x.dtype)
    y = any4.gemm(x, qt.packed, qt.lut, qt.scales, group_size, impl=impl, out=out)
    assert y is out
    return y


def check(x, qt, w_ref, group_size, impl):
    y = run_poisoned(x, qt, group_size, impl)
    K = x.shape[-1]
    ref = x.double().reshape(-1, K).numpy() @ w_ref.T
    err = rel_err(y.reshape(-1, w_ref.shape[0]), ref)
    assert err < TOL[str(x.dtype).replace("torch.", "")], f"relative error {err:.3g}"


@impl_params
@pytest.mark.parametrize("fmt", ["int4", "nf4", "fp4", "any4", "any3", "any2"])
@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16", "float16"])
def test_formats_and_dtypes(impl, fmt, table_dtype):
    N, K, G = 37, 200, 64  # N not a multiple of 8 or 16; K = 3 groups + a short one of 8
    qt, w_ref = quantized(fmt, N, K, G, table_dtype)
    for x_dtype in DTYPES.values():
        for M in (1, 5):
            x = torch.randn(M, K).to(x_dtype)
            check(x, qt, w_ref, G, impl)


@impl_params
@pytest.mark.parametrize(
    "group_size,K",
    [
        (32, 97),
        (64, 256),
        (128, 300),
        (256, 1000),
        (8, 77),
        (16, 100),
        (24, 100),
        (40, 81),
        (96, 300),
        (96, 96),  # a single group
        (40, 40),
    ],
)
def test_group_sizes_short_groups_odd_k(impl, group_size, K):
    N = 29
    for table_dtype, x_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        qt, w_ref = quantized("any4", N, K, group_size, table_dtype)
        for M in (1, 3, 7):
            check(torch.randn(M, K).to(x_dtype), qt, w_ref, group_size, impl)


@impl_params
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 33, 70])
def test_batch_sizes(impl, M):
    N, K, G = 45, 264, 128  # short last group of 8
    for table_dtype, x_dtype in (
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("float32", torch.float32),
    ):
        qt, w_ref = quantized("any4", N, K, G, table_dtype)
        check(torch.randn(M, K).to(x_dtype), qt, w_ref, G, impl)


@impl_params
def test_leading_batch_dims(impl):
    qt, w_ref = quantized("nf4", 19, 128, 32, "bfloat16")
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = run_poisoned(x, qt, 32, impl)
    assert y.shape == (2, 3, 19)
    assert rel_err(y.reshape(6, 19), x.double().reshape(6, 128).numpy() @ w_ref.T) < TOL["bfloat16"]


def exact_operands(rng, N: int, K: int, G: int, L: int, M: int) -> tuple:
    """Random codes [N, K] < L, per-row integer tables in [-8, 8), scale 2 and integer zeros per
    group, and x [M, K] (float32) with 3 small integers per row: every product and sum of the
    gemm is exact, even in bfloat16."""
    codes = torch.from_numpy(rng.integers(0, L, size=(N, K)).astype(np.uint8))
    lut = torch.tensor(rng.integers(-8, 8, size=(N, L)).astype(np.float32))
    zeros = torch.tensor(rng.integers(-3, 4, size=(N, K // G)).astype(np.float32))
    scales = torch.stack([torch.full((N, K // G), 2.0), zeros], -1)
    x = torch.zeros(M, K)
    for m in range(M):
        x[m, rng.choice(K, 3, replace=False)] = torch.tensor(
            rng.integers(-4, 5, size=3).astype(np.float32)
        )
    return codes, lut, scales, x


@impl_params
@pytest.mark.parametrize("x_dtype", list(DTYPES))
def test_exact_identity_like(impl, x_dtype):
    """Integer weights and activations: every product and sum is exact, so y == reference."""
    N, K, G = 40, 96, 32
    rng = np.random.default_rng(3)
    codes = np.full((N, K), 8, np.uint8)
    codes[np.arange(N), np.arange(N)] = 9  # w = code - 8: the identity on the first N inputs
    codes[np.arange(N), N + np.arange(N) % (K - N)] = 6  # and -2 x another input
    lut = torch.tensor([[float(v - 8) for v in range(16)]], dtype=torch.float32)
    scales = torch.zeros(N, K // G, 2)
    scales[..., 0] = 1.0
    x = torch.from_numpy(rng.integers(-64, 64, size=(7, K)).astype(np.float32)).to(DTYPES[x_dtype])
    packed = any4.pack(torch.from_numpy(codes))
    for table_dtype in DTYPES.values():
        qt = any4.QuantizedTensor(
            packed, lut.to(table_dtype), scales.to(table_dtype), (N, K), "int4", G
        )
        y = run_poisoned(x, qt, G, impl)
        expected = x[:, :N].double() - 2 * x[:, N + np.arange(N) % (K - N)].double()
        assert torch.equal(y.double(), expected)
    # Per-row tables, power-of-two scales, integer zeros, random codes; x has 3 small integers
    # per row, so |y| <= 3 * 4 * 19 < 256 is exact even in bfloat16.
    codes, lut_rows, scales, x = exact_operands(rng, N, K, G, 16, 7)
    x = x.to(DTYPES[x_dtype])
    qt = any4.QuantizedTensor(
        any4.pack(codes), lut_rows.to(torch.bfloat16), scales.to(torch.bfloat16), (N, K), "any4", G
    )
    y = run_poisoned(x, qt, G, impl)
    ref = x.double().numpy() @ dequant_ref(qt.packed, lut_rows, scales, K, G).T
    assert np.array_equal(y.double().numpy(), ref)


@impl_params
def test_short_tables_use_only_their_entries(impl):
    """any2-style table of 4 entries: codes < 4 only; the kernel must not read past the table."""
    N, K, G = 21, 130, 64
    rng = np.random.default_rng(5)
    codes = torch.from_numpy(rng.integers(0, 4, size=(N, K)).astype(np.uint8))
    lut = torch.randn(N, 4).to(torch.bfloat16)
    scales = torch.stack([torch.rand(N, 3) + 0.5, torch.randn(N, 3)], -1).to(torch.bfloat16)
    qt = any4.QuantizedTensor(any4.pack(codes), lut, scales, (N, K), "any2", G)
    w_ref = dequant_ref(qt.packed, lut, scales, K, G)
    for x_dtype in DTYPES.values():
        check(torch.randn(6, K).to(x_dtype), qt, w_ref, G, impl)


@impl_params
@pytest.mark.parametrize(
    "N,K,group_size", [(1, 1, 8), (1, 8, 8), (2, 33, 32), (5, 7, 8), (3, 130, 128)]
)
def test_tiny_shapes(impl, N, K, group_size):
    rng = np.random.default_rng(N * 1000 + K)
    codes = torch.from_numpy(rng.integers(0, 16, size=(N, K)).astype(np.uint8))
    n_groups = -(-K // group_size)
    lut = torch.randn(N, 16).to(torch.bfloat16)
    scales = torch.stack([torch.rand(N, n_groups) + 0.5, torch.randn(N, n_groups)], -1).to(
        torch.bfloat16
    )
    qt = any4.QuantizedTensor(any4.pack(codes), lut, scales, (N, K), "any4", group_size)
    w_ref = dequant_ref(qt.packed, lut, scales, K, group_size)
    for x_dtype in DTYPES.values():
        for M in (1, 6, 9):
            check(torch.randn(M, K).to(x_dtype), qt, w_ref, group_size, impl)


@impl_params
def test_thread_count_does_not_change_results(impl):
    qt, _ = quantized("any4", 77, 512, 128, "bfloat16")
    x = torch.randn(9, 512, dtype=torch.bfloat16)
    threads = any4.get_num_threads()
    try:
        any4.set_num_threads(1)
        y1 = any4.gemm(x, qt.packed, qt.lut, qt.scales, impl=impl)
        any4.set_num_threads(3)
        y3 = any4.gemm(x, qt.packed, qt.lut, qt.scales, impl=impl)
    finally:
        any4.set_num_threads(threads)
    assert torch.equal(y1, y3)


def test_out_argument_is_checked():
    qt, _ = quantized("int4", 8, 64, 32, "bfloat16")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="shape"):
        any4.gemm(x, qt.packed, qt.lut, qt.scales, out=torch.empty(3, 9, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        any4.gemm(x, qt.packed, qt.lut, qt.scales, out=torch.empty(3, 8))
    with pytest.raises(ValueError, match="contiguous"):
        any4.gemm(x, qt.packed, qt.lut, qt.scales, out=torch.empty(8, 3, dtype=torch.bfloat16).T)
    with pytest.raises(TypeError, match="framework"):
        any4.gemm(
            x.float(),
            qt.packed,
            qt.lut.float(),
            qt.scales.float(),
            out=np.empty((3, 8), np.float32),
        )


@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 200), (0, 64), (17, 256)])
def test_auto_is_the_best_supported(shape):
    """impl="auto" (the lean torch path in any4.gemm) equals the best implementation called
    explicitly (the general path)."""
    K = shape[-1]
    qt, _ = quantized("any4", 13, K, 64 if K % 64 == 0 else 8 * (K // 8 // 4 or 1), "bfloat16")
    best = [i for i in IMPLS if SUPPORTED[i]][-1]
    for x_dtype in DTYPES.values():
        x = torch.randn(shape).to(x_dtype)
        y_auto = any4.gemm(x, qt.packed, qt.lut, qt.scales, qt.group_size)
        y_best = any4.gemm(x, qt.packed, qt.lut, qt.scales, qt.group_size, impl=best)
        assert y_auto.shape == shape[:-1] + (13,) and y_auto.dtype == x_dtype
        assert torch.equal(y_auto, y_best)
        if K % qt.group_size == 0:  # group size inferred from the scales
            assert torch.equal(any4.gemm(x, qt.packed, qt.lut, qt.scales), y_best)


# ---- 3- and 2-bit codes in their dense layouts (any4.pack(codes, bits)) ----------------------
# On AVX-512 processors impl="avx512"/"avx512bf16" run the AVX2 kernel for these (gemm_cpu.h);
# forcing them still checks that dispatch.

LOW_BIT_FORMATS = ["any3", "any2", "int3", "int2"]


@impl_params
@pytest.mark.parametrize("fmt", LOW_BIT_FORMATS)
@pytest.mark.parametrize(
    "group_size,K",
    [
        (128, 4160),  # K = 32 groups + a short one of 64
        (64, 200),  # short last group of 8
        (32, 97),  # decode blocks of exactly one group, odd K
        (256, 1000),
        (40, 81),  # groups that are not whole blocks (a block spans two groups)
        (96, 300),
        (16, 100),  # groups smaller than a block: the portable path
        (8, 77),
        (96, 96),  # a single group
    ],
)
def test_low_bit_formats_group_sizes(impl, fmt, group_size, K):
    N = 37  # not a multiple of 8 or 16
    for table_dtype, x_dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        qt, w_ref = quantized(fmt, N, K, group_size, table_dtype)
        bits = 3 if fmt.endswith("3") else 2
        assert qt.packed.shape == (N, -(-bits * K // 8))
        for M in (1, 3, 5, 16):  # registers (M <= 4) and the buffered path
            check(torch.randn(M, K).to(x_dtype), qt, w_ref, group_size, impl)


@impl_params
@pytest.mark.parametrize("fmt", ["any3", "any2"])
@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16", "float16"])
def test_low_bit_dtypes_and_batches(impl, fmt, table_dtype):
    N, K, G = 45, 264, 128  # short last group of 8
    qt, w_ref = quantized(fmt, N, K, G, table_dtype)
    for x_dtype in DTYPES.values():
        for M in (1, 2, 4, 8, 13, 17, 70):
            check(torch.randn(M, K).to(x_dtype), qt, w_ref, G, impl)


@impl_params
@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("x_dtype", list(DTYPES))
def test_low_bit_exact(impl, bits, x_dtype):
    """Integer tables, power-of-two scales, integer zeros, random codes and x with 3 small
    integers per row: every product and sum is exact, so y == the float64 reference, and the
    same codes in nibbles give the same y bit for bit."""
    N, K, G = 29, 160, 32
    L = 1 << bits
    rng = np.random.default_rng(bits)
    codes, lut, scales, x = exact_operands(rng, N, K, G, L, 6)
    x = x.to(DTYPES[x_dtype])
    fmt = f"any{bits}"
    for table_dtype in DTYPES.values():
        lt, sc = lut.to(table_dtype), scales.to(table_dtype)
        dense = any4.QuantizedTensor(any4.pack(codes, bits), lt, sc, (N, K), fmt, G)
        nibbles = any4.QuantizedTensor(any4.pack(codes), lt, sc, (N, K), fmt, G)
        y = run_poisoned(x, dense, G, impl)
        ref = x.double().numpy() @ dequant_ref(dense.packed, lut, scales, K, G).T
        assert np.array_equal(y.double().numpy(), ref)
        assert torch.equal(y, run_poisoned(x, nibbles, G, impl))


@impl_params
@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("N,K,group_size", [(1, 1, 8), (1, 8, 8), (2, 33, 32), (5, 7, 8)])
def test_low_bit_tiny_shapes(impl, bits, N, K, group_size):
    rng = np.random.default_rng(N * 1000 + K + bits)
    L = 1 << bits
    codes = torch.from_numpy(rng.integers(0, L, size=(N, K)).astype(np.uint8))
    n_groups = -(-K // group_size)
    lut = torch.randn(N, L).to(torch.bfloat16)
    scales = torch.stack([torch.rand(N, n_groups) + 0.5, torch.randn(N, n_groups)], -1).to(
        torch.bfloat16
    )
    qt = any4.QuantizedTensor(any4.pack(codes, bits), lut, scales, (N, K), f"any{bits}", group_size)
    w_ref = dequant_ref(qt.packed, lut, scales, K, group_size)
    for x_dtype in DTYPES.values():
        for M in (1, 6):
            x = torch.randn(M, K).to(x_dtype)
            y = run_poisoned(x, qt, group_size, impl)
            err = rel_err(y, x.double().numpy() @ w_ref.T)
            assert err < TOL[str(x_dtype).replace("torch.", "")]
            # explicit bits= agrees with the inferred width
            y2 = any4.gemm(x, qt.packed, lut, scales, group_size, impl=impl, bits=bits)
            assert torch.equal(y, y2)


def test_low_bit_layout_errors():
    N, K, G = 6, 64, 32
    qt, _ = quantized("any3", N, K, G, "bfloat16")
    x = torch.randn(2, K, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bytes per row"):
        any4.gemm(x, qt.packed[:, :-1].contiguous(), qt.lut, qt.scales, G)
    with pytest.raises(ValueError, match="4-bit codes"):
        any4.gemm(x, qt.packed, qt.lut, qt.scales, G, bits=4)
    with pytest.raises(ValueError, match="bits must be"):
        any4.gemm(x, qt.packed, qt.lut, qt.scales, G, bits=5)
    lut16 = torch.zeros(N, 16, dtype=torch.bfloat16)  # a 16-entry table over 3-bit rows
    with pytest.raises(ValueError, match="16-entry table"):
        any4.gemm(x, qt.packed, lut16, qt.scales, G)
