"""GPU weight layout and the CPU emulation of the tensor-core kernel (no GPU needed).

The emulation runs every lane of the kernel's grid with the kernel's own index math and
dequantization (cuda/layout.cuh) and executes each mma.m16n8k16 from the PTX fragment layouts,
so a layout bug fails here. The layout itself is also checked against an independent numpy
implementation of its documented formula.
"""

import numpy as np
import pytest
import torch

import any4
from any4.pack_gpu import (
    emulate_gpu_dequant,
    emulate_gpu_gemm,
    gpu_layout_sizes,
    tc_plan,
    tc_scratch_bound,
)
from conftest import TOL, dequant_ref, rel_err, stable_seed

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("int4", "int3", "int2", "nf4", "fp4", "any4", "any3", "any2")


def random_operands(rng, N, K, G, L, shared, dtype):
    """Random codes < L, table [1 or N, L] and scales [N, ceil(K/G), 2] in dtype (torch)."""
    codes = rng.integers(0, L, size=(N, K), dtype=np.uint8)
    packed = any4.pack(torch.from_numpy(codes))
    lut = torch.from_numpy(np.sort(rng.normal(size=(1 if shared else N, L)), axis=1)).to(dtype)
    scales = torch.from_numpy(rng.uniform(0.5, 1.5, size=(N, -(-K // G), 2))).to(dtype)
    scales[..., 1] -= 1.0
    return codes, packed, lut, scales


def layout_reference(codes, lut, scales, G, dtype):
    """numpy implementation of the documented GPU layout (independent of the C++ packer)."""
    N, K = codes.shape
    n_tiles, k_chunks = -(-N // 16), -(-K // 64)
    lane = np.arange(32)[:, None, None]
    j = np.arange(4)[None, :, None]
    i = np.arange(8)[None, None, :]
    row = lane // 4 + 8 * (i // 4)  # [32, 1, 8]
    kk = 16 * (lane % 4) + 4 * j + (i % 4)  # [32, 4, 8]
    padded = np.zeros((n_tiles * 16, k_chunks * 64), np.uint32)
    padded[:N, :K] = codes
    tiles = padded.reshape(n_tiles, 16, k_chunks, 64)
    nib = tiles[:, row, :, kk]  # advanced indices first: [32, 4, 8, n_tiles, k_chunks]
    words = (nib << (4 * np.arange(8, dtype=np.uint32))[None, None, :, None, None]).sum(axis=2)
    words = np.ascontiguousarray(words.astype(np.uint32).transpose(2, 3, 0, 1))  # [nt, kc, 32, 4]
    ref_codes = words.view(np.uint8).reshape(n_tiles, k_chunks, 32, 16)

    n_groups = -(-K // G)
    n_groups_pad = -(-(k_chunks * 64) // G)
    sc = scales.to(dtype).view(torch.int16).numpy().astype(np.uint16)
    ref_scales = np.zeros((n_tiles, n_groups_pad, 8, 4), np.uint16)
    for n in range(N):
        h = (n % 16) // 8
        ref_scales[n // 16, :n_groups, n % 8, 2 * h : 2 * h + 2] = sc[n]

    lb = lut.to(dtype).view(torch.int16).numpy().astype(np.uint16)
    lb = np.broadcast_to(lb, (N, lb.shape[1]))
    ref_lut = np.zeros((n_tiles * 16, 32), np.uint8)
    ref_lut[:N, : lb.shape[1]] = lb & 0xFF
    ref_lut[:N, 16 : 16 + lb.shape[1]] = lb >> 8
    return ref_codes, ref_scales, ref_lut


@pytest.mark.parametrize("N,K,G", [(37, 150, 32), (16, 64, 64), (5, 7, 16), (70, 333, 128)])
def test_pack_matches_documented_layout(rng, N, K, G):
    codes, packed, lut, scales = random_operands(rng, N, K, G, 16, False, torch.bfloat16)
    w = any4.pack_for_gpu(packed, lut, scales, K, G)
    ref_codes, ref_scales, ref_lut = layout_reference(codes, lut, scales, G, torch.bfloat16)
    assert np.array_equal(w.codes.numpy(), ref_codes)
    assert np.array_equal(w.scales.view(torch.int16).numpy().astype(np.uint16), ref_scales)
    assert np.array_equal(w.lut.numpy(), ref_lut)
    sizes = gpu_layout_sizes(N, K, G)
    assert w.codes.numel() == sizes["code_bytes"] and w.lut.numel() == sizes["lut_bytes"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("L,shared", [(16, False), (16, True), (8, False), (4, True)])
@pytest.mark.parametrize("N,K,G", [(1, 1, 16), (17, 65, 32), (33, 257, 64), (48, 200, 256)])
def test_round_trip_is_exact(rng, dtype, L, shared, N, K, G):
    dt = DTYPES[dtype]
    codes, packed, lut, scales = random_operands(rng, N, K, G, L, shared, dt)
    w = any4.pack_for_gpu(packed, lut, scales, K, G)
    assert w.dtype == dtype and w.lut_shared == (shared or N == 1) and w.lut_len == L
    p2, l2, s2 = any4.unpack_from_gpu(w)
    assert torch.equal(p2, packed)
    assert torch.equal(l2.view(torch.int16), lut.view(torch.int16))
    assert torch.equal(s2.view(torch.int16), scales.view(torch.int16))


def test_tables_in_another_dtype_are_rounded_once(rng):
    codes, packed, lut, scales = random_operands(rng, 20, 100, 32, 16, False, torch.float32)
    w = any4.pack_for_gpu(packed, lut, scales, 100, 32, dtype="bfloat16")
    _, l2, s2 = any4.unpack_from_gpu(w)
    assert torch.equal(l2, lut.to(torch.bfloat16)) and torch.equal(s2, scales.to(torch.bfloat16))


def test_quantized_tensor_in_and_arith_detection():
    w = torch.randn(24, 128)
    for fmt, arith in (
        ("int4", True),
        ("int3", True),
        ("int2", True),
        ("nf4", False),
        ("any4", False),
    ):
        qt = any4.quantize(w, fmt, group_size=64, dtype="bfloat16")
        gw = any4.pack_for_gpu(qt)
        assert gw.arith == arith, fmt
        assert gw.shape == (24, 128) and gw.group_size == 64
    # an uncentred int table 0..15 and a shifted one are arithmetic too; a scaled one is not
    packed = any4.pack(torch.zeros(16, 64, dtype=torch.uint8))
    scales = torch.ones(16, 1, 2, dtype=torch.float16)
    for table, arith in (
        (torch.arange(16.0), True),
        (torch.arange(16.0) - 3, True),
        (torch.arange(16.0) * 2, False),
    ):
        gw = any4.pack_for_gpu(packed, table[None].half(), scales, 64, 64)
        assert gw.arith == arith


def test_bad_inputs(rng):
    codes, packed, lut, scales = random_operands(rng, 8, 96, 32, 8, False, torch.bfloat16)
    with pytest.raises(ValueError, match="power-of-two group size"):
        any4.pack_for_gpu(
            packed, lut, any4.quantize(torch.randn(8, 96), "int4", 24).scales.bfloat16(), 96, 24
        )
    with pytest.raises(ValueError, match="past the table"):
        bad = any4.pack(torch.full((8, 96), 9, dtype=torch.uint8))  # code 9 >= L = 8
        any4.pack_for_gpu(bad, lut, scales, 96, 32)
    with pytest.raises(ValueError, match="ceil"):
        any4.pack_for_gpu(packed, lut, scales, 100, 32)
    with pytest.raises(TypeError):
        any4.pack_for_gpu(packed.numpy(), lut, scales, 96, 32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        any4.pack_for_gpu(packed, lut, scales, 96, 32, dtype="float32")
    w = any4.pack_for_gpu(packed, lut, scales, 96, 32)
    with pytest.raises(TypeError, match="dtype"):
        emulate_gpu_gemm(torch.randn(2, 96), w)
    with pytest.raises(ValueError, match="arith"):
        emulate_gpu_gemm(torch.randn(2, 96).bfloat16(), w, dequant="arith")


def dequants(w):
    return (["arith"] if w.arith else []) + ["lut_reg", "lut_smem"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_emulation_every_format(dtype, fmt):
    N, K, G, M = 37, 200, 64, 5
    gen = torch.Generator().manual_seed(stable_seed(dtype, fmt))
    qt = any4.quantize(torch.randn(N, K, generator=gen), fmt, group_size=G, dtype=dtype)
    w = any4.pack_for_gpu(qt)
    x = torch.randn(M, K, generator=gen).to(DTYPES[dtype])
    ref = x.double().numpy() @ dequant_ref(qt.packed, qt.lut, qt.scales, K, G).T
    for dq in dequants(w):
        y = emulate_gpu_gemm(x, w, dequant=dq)
        assert y.shape == (M, N) and y.dtype == x.dtype
        assert rel_err(y, ref) < TOL[dtype], (fmt, dq)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("G", [32, 64, 128, 256])
def test_emulation_batch_sizes_and_groups(rng, dtype, G):
    # N and K odd, not multiples of the 16 x 64 tile; K not a multiple of G (short last group)
    N, K = 45, 333
    dt = DTYPES[dtype]
    for L, shared in ((16, False), (16, True)):
        codes, packed, lut, scales = random_operands(rng, N, K, G, L, shared, dt)
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        wref = dequant_ref(packed, lut, scales, K, G)
        for M in (1, 3, 5, 8, 13, 16, 33):
            x = torch.from_numpy(rng.normal(size=(M, K))).to(dt)
            y = emulate_gpu_gemm(x, w, dequant="lut_reg" if M % 2 else "lut_smem")
            assert rel_err(y, x.double().numpy() @ wref.T) < TOL[dtype], (L, shared, M)


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_emulation_arith_batch_sizes(fmt):
    N, K, G = 21, 130, 32
    qt = any4.quantize(torch.randn(N, K), fmt, group_size=G, dtype="float16")
    w = any4.pack_for_gpu(qt)
    wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, G)
    for M in (1, 3, 5, 8, 13, 16, 33):
        x = torch.randn(M, K).half()
        y = emulate_gpu_gemm(x, w, dequant="arith")
        assert rel_err(y, x.double().numpy() @ wref.T) < TOL["float16"], M


def test_emulation_split_k(rng):
    N, K, G = 40, 64 * 13 + 5, 64
    codes, packed, lut, scales = random_operands(rng, N, K, G, 16, False, torch.bfloat16)
    w = any4.pack_for_gpu(packed, lut, scales, K, G)
    wref = dequant_ref(packed, lut, scales, K, G)
    x = torch.from_numpy(rng.normal(size=(11, K))).bfloat16()
    ref = x.double().numpy() @ wref.T
    k_chunks = -(-K // 64)
    for splits in (1, 2, 3, 5, k_chunks):
        plan = tc_plan(11, N, K, 108, 4, splits)
        assert plan["splits"] * plan["chunks_per_split"] >= k_chunks
        assert (plan["splits"] - 1) * plan["chunks_per_split"] < k_chunks  # no empty split
        y = emulate_gpu_gemm(x, w, splits=splits)
        assert rel_err(y, ref) < TOL["bfloat16"], splits
    # small N on a large GPU: the plan splits K by itself, within one (or two) waves of blocks
    for waves in (1, 2):
        plan = tc_plan(1, N, K, 132, 4, 0, waves)
        assert plan["splits"] > 1 and plan["grid_x"] * plan["splits"] <= waves * 132 * 4
        y = emulate_gpu_gemm(x, w, num_sms=132, split_waves=waves)
        assert rel_err(y, ref) < TOL["bfloat16"]
    for N2, K2 in ((4096, 4096), (1024, 4096), (28672, 8192)):
        for waves in (1, 2):
            p = tc_plan(16, N2, K2, 132, 4, 0, waves)
            blocks = p["grid_x"] * p["splits"]
            assert blocks <= max(waves * 132 * 4, p["grid_x"]) and p["chunks_per_split"] >= 4


def plan_cost(p, target):
    """The plan's modelled time: waves of blocks x chunks per split (cuda/layout.cuh)."""
    blocks = p["grid_x"] * p["m_tiles"]
    return -(-blocks * p["splits"] // target) * p["chunks_per_split"]


def test_split_plan_over_two_waves():
    """M=16, N=14336, K=4096 on 132 SMs x 3 blocks: one wave gives 224 of 396 slots (no split);
    two waves allow 3 splits (672 blocks in 2 waves of 22 chunks instead of 1 wave of 64),
    modelled 1.45x faster."""
    one = tc_plan(16, 14336, 4096, 132, 3, 0, 1)
    two = tc_plan(16, 14336, 4096, 132, 3, 0, 2)
    assert one["splits"] == 1 and one["grid_x"] == 224
    assert two["splits"] == 3 and two["chunks_per_split"] == 22
    assert plan_cost(two, 396) == 44 and plan_cost(one, 396) == 64
    # the two-wave plan is never modelled slower than the one-wave plan, never above 2 waves,
    # and every split keeps >= 4 chunks
    r = np.random.default_rng(5)
    for _ in range(400):
        M, N, K = int(r.integers(1, 70)), int(r.integers(1, 30000)), int(r.integers(64, 40000))
        sms, bps = int(r.choice([16, 108, 132])), int(r.integers(1, 7))
        p1, p2 = (tc_plan(M, N, K, sms, bps, 0, w) for w in (1, 2))
        assert plan_cost(p2, sms * bps) <= plan_cost(p1, sms * bps), (M, N, K, sms, bps)
        blocks = p2["grid_x"] * p2["m_tiles"]
        if p2["splits"] > 1:
            assert blocks * p2["splits"] <= 2 * sms * bps and p2["chunks_per_split"] >= 4
    with pytest.raises(ValueError, match="split_waves"):
        tc_plan(1, 64, 4096, 132, 3, 0, 3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_emulation_deep_pipeline_variant(rng, dtype):
    """stage_chunks=4 (the deeper register pipeline) computes the same chunks in the same order:
    bit-identical to the default variant, for every chunk count 1..13, with and without split-K."""
    dt = DTYPES[dtype]
    N, G = 37, 64
    for k_chunks in range(1, 14):
        K = 64 * k_chunks - 5
        codes, packed, lut, scales = random_operands(rng, N, K, G, 16, False, dt)
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        ref = None
        for M in (3, 13):
            x = torch.from_numpy(rng.normal(size=(M, K))).to(dt)
            ref = x.double().numpy() @ dequant_ref(packed, lut, scales, K, G).T
            for splits in (0, 1, 3):
                y2 = emulate_gpu_gemm(x, w, splits=splits, stage_chunks=2)
                y4 = emulate_gpu_gemm(x, w, splits=splits, stage_chunks=4)
                assert torch.equal(y2, y4), (k_chunks, M, splits)
                assert rel_err(y4, ref) < TOL[dtype], (k_chunks, M, splits)
    with pytest.raises(ValueError, match="stage_chunks"):
        emulate_gpu_gemm(x, w, stage_chunks=3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", ["int4", "int2", "nf4", "any4", "any3"])
def test_emulated_dequantize_kernel(dtype, fmt):
    """The large-batch path's dequantize kernel (emulated): W equals the float64 dequantization
    up to the compute dtype's rounding; every dequantizer gives the same bits; x @ W^T matches."""
    N, K, G = 45, 333, 64
    gen = torch.Generator().manual_seed(stable_seed("dequant", dtype, fmt))
    qt = any4.quantize(torch.randn(N, K, generator=gen), fmt, group_size=G, dtype=dtype)
    w = any4.pack_for_gpu(qt)
    wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, G)
    outs = [emulate_gpu_dequant(w, dequant=dq) for dq in dequants(w)]
    for wd in outs:
        assert wd.shape == (N, K) and wd.dtype == DTYPES[dtype]
        assert torch.equal(wd, outs[0])
    err = np.abs(outs[0].double().numpy() - wref).max() / np.abs(wref).max()
    assert err < (2**-7 if dtype == "bfloat16" else 2**-10), err
    x = torch.randn(70, K, generator=gen).to(DTYPES[dtype])
    y = (x.double() @ outs[0].double().T).numpy()
    assert rel_err(y, x.double().numpy() @ wref.T) < TOL[dtype]


def test_emulated_dequantize_exact_identity():
    N, K, G = 40, 70, 32
    codes = np.zeros((N, K), np.uint8)
    codes[np.arange(N), np.arange(N)] = 1
    packed = any4.pack(torch.from_numpy(codes))
    scales = torch.zeros(N, -(-K // G), 2, dtype=torch.bfloat16)
    scales[..., 0] = 1.0
    for lut in (torch.arange(16.0)[None].bfloat16(), torch.randn(N, 16).bfloat16()):
        lut[:, 0], lut[:, 1] = 0.0, 1.0
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        eye = torch.eye(N, K, dtype=torch.bfloat16)
        for dq in dequants(w):
            assert torch.equal(emulate_gpu_dequant(w, dequant=dq), eye), dq


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_emulation_exact_identity(rng, dtype):
    """w = [I 0]: y must be exactly x[:, :N], for every dequantizer, batch size and split."""
    N, K, G = 40, 70, 32
    dt = DTYPES[dtype]
    codes = np.zeros((N, K), np.uint8)
    codes[np.arange(N), np.arange(N)] = 1
    packed = any4.pack(torch.from_numpy(codes))
    scales = torch.zeros(N, -(-K // G), 2, dtype=dt)
    scales[..., 0] = 1.0
    tables = {
        "int (arith)": torch.arange(16.0, dtype=dt)[None],  # w = code
        "per-row": torch.from_numpy(rng.normal(size=(N, 16))).to(dt),
    }
    tables["per-row"][:, 0], tables["per-row"][:, 1] = 0.0, 1.0
    for name, lut in tables.items():
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        for M in (1, 5, 16, 33):
            x = torch.from_numpy(rng.normal(size=(M, K))).to(dt)
            for dq in dequants(w):
                for splits in (0, 2):
                    y = emulate_gpu_gemm(x, w, dequant=dq, splits=splits)
                    assert torch.equal(y, x[:, :N]), (name, M, dq, splits)


def test_gemm_accepts_gpu_weight_on_cpu(rng):
    qt = any4.quantize(torch.randn(30, 96), "any4", group_size=32, dtype="bfloat16")
    w = any4.pack_for_gpu(qt)
    x = torch.randn(3, 96).bfloat16()
    assert torch.equal(any4.gemm(x, w), any4.gemm(x, qt.packed, qt.lut, qt.scales))
    with pytest.raises(TypeError, match="own lut"):
        any4.gemm(x, w, qt.lut, qt.scales)


# ---------------------------------------------------------------- 3- and 2-bit GPU layouts


def random_low_bit(rng, N, K, G, bits, shared, dtype, storage_bits=None):
    """Random codes < 2^bits in the storage layout of storage_bits (default bits), a table
    [1 or N, 2^bits] and scales, as torch tensors."""
    L = 1 << bits
    codes = rng.integers(0, L, size=(N, K), dtype=np.uint8)
    packed = any4.pack(torch.from_numpy(codes), storage_bits or bits)
    lut = torch.from_numpy(np.sort(rng.normal(size=(1 if shared else N, L)), axis=1)).to(dtype)
    scales = torch.from_numpy(rng.uniform(0.5, 1.5, size=(N, -(-K // G), 2))).to(dtype)
    scales[..., 1] -= 1.0
    return codes, packed, lut, scales


def low_bit_layout_reference(codes, bits):
    """numpy implementation of the documented 3/2-bit GPU code layout (cuda/layout.cuh),
    independent of the C++ packer: uint8 [n_tiles, n_units, 48 or 32, 16]."""
    N, K = codes.shape
    n_tiles, k_chunks = -(-N // 16), -(-K // 64)
    n_units = -(-k_chunks // 2)
    lane = np.arange(32)[:, None, None]
    j = np.arange(4)[None, :, None]
    i = np.arange(8)[None, None, :]
    row = lane // 4 + 8 * (i // 4)
    kk = 16 * (lane % 4) + 4 * j + (i % 4)
    padded = np.zeros((n_tiles * 16, n_units * 128), np.uint32)
    padded[:N, :K] = codes
    tiles = padded.reshape(n_tiles, 16, 2 * n_units, 64)
    nib = tiles[:, row, :, kk].transpose(3, 4, 0, 1, 2)  # [nt, chunks, 32 lanes, 4 j, 8 i]
    nib = nib.reshape(n_tiles, n_units, 2, 32, 4, 8)  # chunk = 2 * unit + half
    shift = 4 * np.arange(8, dtype=np.uint32)
    # lo word w = 2 * half + p: k-tile 2p at bits 4i..4i+1, k-tile 2p+1 at bits 4i+2..4i+3
    lo = ((nib[..., 0::2, :] & 3) << shift) | ((nib[..., 1::2, :] & 3) << (shift + 2))
    lo = lo.sum(axis=-1, dtype=np.uint64).astype(np.uint32)  # [nt, nu, half, 32, p]
    lo = lo.transpose(0, 1, 3, 2, 4).reshape(n_tiles, n_units, 32, 4)
    planes = [np.ascontiguousarray(lo).view(np.uint8).reshape(n_tiles, n_units, 32 * 16)]
    if bits == 3:  # hi word v = half: bit 4i + j is bit 2 of code i of k-tile j
        hb = ((nib >> 2) & 1) << (shift[None, :] + np.arange(4, dtype=np.uint32)[:, None])
        hi = hb.sum(axis=(-2, -1), dtype=np.uint64).astype(np.uint32)  # [nt, nu, half, 32]
        hi = np.ascontiguousarray(hi.transpose(0, 1, 3, 2))
        planes.append(hi.view(np.uint8).reshape(n_tiles, n_units, 32 * 8))
    return np.concatenate(planes, axis=-1).reshape(n_tiles, n_units, -1, 16)


@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize(
    "N,K,G", [(37, 150, 32), (16, 64, 64), (5, 7, 16), (70, 333, 128), (20, 256, 64)]
)
def test_low_bit_pack_matches_documented_layout(rng, bits, N, K, G):
    codes, packed, lut, scales = random_low_bit(rng, N, K, G, bits, False, torch.bfloat16)
    w = any4.pack_for_gpu(packed, lut, scales, K, G)
    assert w.bits == bits and w.storage_bits == bits
    ref = low_bit_layout_reference(codes, bits)
    assert w.codes.shape == ref.shape and np.array_equal(w.codes.numpy(), ref)
    sizes = gpu_layout_sizes(N, K, G, bits)
    assert w.codes.numel() == sizes["code_bytes"] == ref.size
    assert sizes["unit_bytes"] == (768 if bits == 3 else 512)
    # scales and tables are laid out as for 4-bit codes
    _, ref_scales, ref_lut = layout_reference(codes, lut, scales, G, torch.bfloat16)
    assert np.array_equal(w.scales.view(torch.int16).numpy().astype(np.uint16), ref_scales)
    assert np.array_equal(w.lut.numpy(), ref_lut)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits,storage_bits", [(3, 3), (3, 4), (2, 2), (2, 4)])
@pytest.mark.parametrize(
    "N,K,G", [(1, 1, 16), (17, 65, 32), (33, 257, 64), (48, 200, 256), (9, 640, 128)]
)
def test_low_bit_round_trip_is_exact(rng, dtype, bits, storage_bits, N, K, G):
    """Dense or nibble storage -> dense GPU layout -> back, in the storage layout it came in."""
    dt = DTYPES[dtype]
    for shared in (False, True):
        codes, packed, lut, scales = random_low_bit(rng, N, K, G, bits, shared, dt, storage_bits)
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        same_bytes = any4.packed_bytes(K, bits) == any4.packed_bytes(K, 4)  # K=1: ambiguous
        assert w.bits == bits and (w.storage_bits == storage_bits or same_bytes)
        assert w.codes.shape == any4.pack_gpu.gpu_codes_shape(N, K, bits)
        p2, l2, s2 = any4.unpack_from_gpu(w)
        assert torch.equal(p2, packed)
        assert torch.equal(l2.view(torch.int16), lut.view(torch.int16))
        assert torch.equal(s2.view(torch.int16), scales.view(torch.int16))
        # the same codes in the 4-bit GPU layout (bits=4) come back the same too
        w4 = any4.pack_for_gpu(packed, lut, scales, K, G, bits=4)
        assert w4.bits == 4 and torch.equal(any4.unpack_from_gpu(w4)[0], packed)


def test_gpu_bits_choice_and_errors(rng):
    _, packed, lut, scales = random_low_bit(rng, 8, 96, 32, 3, False, torch.bfloat16)
    with pytest.raises(ValueError, match="hold the 8-entry table"):
        any4.pack_for_gpu(packed, lut, scales, 96, 32, bits=2)
    with pytest.raises(ValueError, match="bits must be"):
        any4.pack_for_gpu(packed, lut, scales, 96, 32, bits=5)
    w = any4.pack_for_gpu(packed, lut, scales, 96, 32)
    bad = any4.GpuWeight(w.codes, w.scales, w.lut, w.shape, 32, 8, False, -1, 3, bits=2)
    with pytest.raises(ValueError, match="8-entry table with 2-bit codes"):
        emulate_gpu_gemm(torch.randn(2, 96).bfloat16(), bad)
    bad = any4.GpuWeight(w.codes[:, :, :32], w.scales, w.lut, w.shape, 32, 8, False, -1, 3, bits=3)
    with pytest.raises(ValueError, match="do not match"):
        emulate_gpu_gemm(torch.randn(2, 96).bfloat16(), bad)
    with pytest.raises(ValueError, match="do not match"):
        any4.unpack_from_gpu(bad)
    with pytest.raises(ValueError, match="past the table"):  # code 5 with a 5-entry table
        _, p5, _, _ = random_low_bit(np.random.default_rng(0), 8, 96, 32, 3, False, torch.bfloat16)
        any4.pack_for_gpu(
            any4.pack(torch.full((8, 96), 5, dtype=torch.uint8), 3), lut[:, :5], scales, 96, 32
        )


@pytest.mark.parametrize("fmt", ["any3", "any2", "int3", "int2"])
def test_dense_low_bit_codes_stay_dense_on_the_gpu(fmt):
    """3/2-bit weights use the dense GPU layout whether stored densely or in nibbles (files of
    format version 1); both give the same GPU weight and come back in their own layout."""
    qt = any4.quantize(torch.randn(21, 200), fmt, group_size=64, dtype="bfloat16")
    bits = qt.bits
    w = any4.pack_for_gpu(qt)
    nibbles = any4.pack(any4.unpack(qt.packed, 200, bits))
    w2 = any4.pack_for_gpu(nibbles, qt.lut, qt.scales, 200, 64)
    assert w.storage_bits == bits and w2.storage_bits == 4 and w.bits == w2.bits == bits
    assert torch.equal(w.codes, w2.codes)
    packed, lut, scales = any4.unpack_from_gpu(w)
    assert torch.equal(packed, qt.packed) and torch.equal(any4.unpack_from_gpu(w2)[0], nibbles)


@pytest.mark.parametrize("fmt,bits,most", [("any4", 4, 4.32), ("any3", 3, 3.32), ("any2", 2, 2.32)])
def test_gpu_bits_per_weight_from_the_bytes_stored(fmt, bits, most):
    """bits/weight of the GPU layout: codes (3 or 2 bits dense) + bf16 scale/zero per 128 + a
    32-byte table row, padding included, from the tensors' bytes."""
    N, K = 64, 4096
    qt = any4.quantize(torch.randn(N, K), fmt, group_size=128, dtype="bfloat16")
    w = any4.pack_for_gpu(qt)
    stored = sum(t.numel() * t.element_size() for t in (w.codes, w.scales, w.lut))
    assert w.bits == bits and w.bits_per_weight == 8 * stored / (N * K)
    codes_only = 8 * w.codes.numel() / (N * K)
    assert codes_only == bits  # dense: no padding at these sizes
    assert bits + 0.25 < w.bits_per_weight < most, w.bits_per_weight
    # the production shape, from the layout sizes alone
    z = gpu_layout_sizes(4096, 14336, 128, bits)
    b = 8 * (z["code_bytes"] + 2 * z["scale_elems"] + z["lut_bytes"]) / (4096 * 14336)
    assert bits + 0.25 < b < bits + 0.27, b


def low_bit_dequants(w):
    return (["arith"] if w.arith else []) + ["lut_reg", "lut_smem"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [3, 2])
@pytest.mark.parametrize("G", [16, 32, 64, 128, 256])
def test_low_bit_emulation_batch_sizes_and_groups(rng, dtype, bits, G):
    """The 3/2-bit kernels (emulated) against float64, odd N and K (odd k_chunks: a half-filled
    last unit), short last group, every batch size and dequantizer; and bit-identical to the same
    codes run through the 4-bit layout and kernel."""
    N, K = 45, 333
    dt = DTYPES[dtype]
    for shared, arith in ((False, False), (True, False), (True, True)):
        codes, packed, lut, scales = random_low_bit(rng, N, K, G, bits, shared, dt)
        if arith:  # an int table c - (L-1)/2: the arithmetic dequantizer
            lut = (torch.arange(1 << bits, dtype=torch.float64) - ((1 << bits) - 1) / 2)[None].to(
                dt
            )
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        w4 = any4.pack_for_gpu(packed, lut, scales, K, G, bits=4)
        assert w.bits == bits and w.arith == arith
        wref = dequant_ref(packed, lut, scales, K, G)
        for M in (1, 3, 5, 8, 13, 16, 33):
            x = torch.from_numpy(rng.normal(size=(M, K))).to(dt)
            ref = x.double().numpy() @ wref.T
            for dq in low_bit_dequants(w):
                y = emulate_gpu_gemm(x, w, dequant=dq)
                assert y.shape == (M, N) and rel_err(y, ref) < TOL[dtype], (shared, M, dq)
                assert torch.equal(y, emulate_gpu_gemm(x, w4, dequant=dq)), (shared, M, dq)


@pytest.mark.parametrize("bits", [3, 2])
def test_low_bit_split_k_starts_on_whole_units(rng, bits):
    """3/2-bit code vectors cover two chunks: every K split starts on an even chunk (forced odd
    splits and automatic plans), no split is empty, and the result is right."""
    N, K, G = 40, 64 * 13 + 5, 64  # 14 chunks: 7 units
    codes, packed, lut, scales = random_low_bit(rng, N, K, G, bits, False, torch.bfloat16)
    w = any4.pack_for_gpu(packed, lut, scales, K, G)
    wref = dequant_ref(packed, lut, scales, K, G)
    x = torch.from_numpy(rng.normal(size=(11, K))).bfloat16()
    ref = x.double().numpy() @ wref.T
    k_chunks = -(-K // 64)
    for splits in (1, 2, 3, 5, 7, k_chunks):
        plan = tc_plan(11, N, K, 108, 4, splits, bits=bits)
        assert plan["chunks_per_split"] % 2 == 0, (splits, plan)
        assert plan["splits"] * plan["chunks_per_split"] >= k_chunks
        assert (plan["splits"] - 1) * plan["chunks_per_split"] < k_chunks  # no empty split
        for sc in (2, 4):
            y = emulate_gpu_gemm(x, w, splits=splits, stage_chunks=sc)
            assert rel_err(y, ref) < TOL["bfloat16"], (splits, sc)
    for waves in (1, 2):
        plan = tc_plan(1, N, K, 132, 4, 0, waves, bits=bits)
        assert plan["splits"] > 1 and plan["chunks_per_split"] % 2 == 0
        y = emulate_gpu_gemm(x, w, num_sms=132, split_waves=waves)
        assert rel_err(y, ref) < TOL["bfloat16"]
    r = np.random.default_rng(7)
    for _ in range(300):
        M, N2, K2 = int(r.integers(1, 70)), int(r.integers(1, 30000)), int(r.integers(1, 40000))
        sms, bps, forced = (
            int(r.choice([16, 108, 132])),
            int(r.integers(1, 7)),
            int(r.integers(0, 9)),
        )
        p = tc_plan(M, N2, K2, sms, bps, forced, 2, bits=bits)
        kc = -(-K2 // 64)
        assert p["chunks_per_split"] % 2 == 0 and (p["splits"] - 1) * p["chunks_per_split"] < kc
        blocks = p["grid_x"] * p["m_tiles"]
        if p["splits"] > 1 and not forced:
            assert blocks * p["splits"] <= 2 * sms * bps and p["chunks_per_split"] >= 4
            wf, ctr = tc_scratch_bound(sms, bps)
            assert p["workspace_floats"] <= wf and p["counters"] <= ctr
    with pytest.raises(ValueError, match="bits"):
        tc_plan(1, 64, 4096, 132, 3, 0, 2, bits=5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [3, 2])
def test_low_bit_deep_pipeline_variant(rng, dtype, bits):
    """stage_chunks=4 on 3/2-bit codes: bit-identical to stage_chunks=2 for every chunk count
    1..9 (odd counts end on a half unit), with and without split-K."""
    dt = DTYPES[dtype]
    N, G = 21, 64
    for k_chunks in range(1, 10):
        K = 64 * k_chunks - 5
        codes, packed, lut, scales = random_low_bit(rng, N, K, G, bits, False, dt)
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        ref_w = dequant_ref(packed, lut, scales, K, G)
        for M in (3, 13):
            x = torch.from_numpy(rng.normal(size=(M, K))).to(dt)
            ref = x.double().numpy() @ ref_w.T
            for splits in (0, 1, 3):
                y2 = emulate_gpu_gemm(x, w, splits=splits, stage_chunks=2)
                y4 = emulate_gpu_gemm(x, w, splits=splits, stage_chunks=4)
                assert torch.equal(y2, y4), (k_chunks, M, splits)
                assert rel_err(y4, ref) < TOL[dtype], (k_chunks, M, splits)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", ["int3", "int2", "any3", "any2"])
def test_low_bit_emulated_dequantize_kernel(dtype, fmt):
    """The large-batch dequantize kernel on the 3/2-bit layouts (emulated): the same bits as on
    the 4-bit layout of the same codes, within the dtype's rounding of float64."""
    N, K, G = 45, 333, 64
    gen = torch.Generator().manual_seed(stable_seed("lowbit-dequant", dtype, fmt))
    qt = any4.quantize(torch.randn(N, K, generator=gen), fmt, group_size=G, dtype=dtype)
    w = any4.pack_for_gpu(qt)
    w4 = any4.pack_for_gpu(qt, bits=4)
    assert w.bits == qt.bits
    wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, G)
    for dq in dequants(w):
        wd = emulate_gpu_dequant(w, dequant=dq)
        assert torch.equal(wd, emulate_gpu_dequant(w4, dequant=dq)), dq
        err = np.abs(wd.double().numpy() - wref).max() / np.abs(wref).max()
        assert err < (2**-7 if dtype == "bfloat16" else 2**-10), (dq, err)


@pytest.mark.parametrize("bits", [3, 2])
def test_low_bit_exact_identity(rng, bits):
    """w = [I 0] in 3/2-bit codes: y is exactly x[:, :N] (every dequantizer, batch, split), and
    the dequantize kernel gives exactly the identity."""
    N, K, G = 40, 200, 32
    codes = np.zeros((N, K), np.uint8)
    codes[np.arange(N), np.arange(N)] = 1
    packed = any4.pack(torch.from_numpy(codes), bits)
    scales = torch.zeros(N, -(-K // G), 2, dtype=torch.bfloat16)
    scales[..., 0] = 1.0
    L = 1 << bits
    per_row = torch.from_numpy(rng.normal(size=(N, L))).bfloat16()
    per_row[:, 0], per_row[:, 1] = 0.0, 1.0
    for lut in (torch.arange(float(L))[None].bfloat16(), per_row):
        w = any4.pack_for_gpu(packed, lut, scales, K, G)
        assert w.bits == bits
        for dq in dequants(w):
            assert torch.equal(
                emulate_gpu_dequant(w, dequant=dq), torch.eye(N, K, dtype=torch.bfloat16)
            )
            for M in (1, 5, 16, 33):
                x = torch.from_numpy(rng.normal(size=(M, K))).bfloat16()
                for splits in (0, 3):
                    y = emulate_gpu_gemm(x, w, dequant=dq, splits=splits)
                    assert torch.equal(y, x[:, :N]), (M, dq, splits)
