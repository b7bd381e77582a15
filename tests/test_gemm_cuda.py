"""CUDA gemm kernels against float64 references (skipped without a GPU and a CUDA build).

Tensor-core kernel (GPU layout, any4.pack_for_gpu): every format x dtype x group size x batch
size x shape, every dequantizer, automatic and forced split-K, exact identity, agreement with the
CPU emulation of the kernel and with the CPU any4.gemm. Storage-layout kernel: any x / table
dtype and group size. Outputs are poisoned with NaN first; streams and device mixes are checked.
"""

import numpy as np
import pytest
import torch

import any4
from any4.cuda import gemm_gpu
from any4.pack_gpu import emulate_gpu_gemm
from conftest import TOL, dequant_ref, rel_err, stable_seed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not any4.cuda_available(), reason="needs a CUDA device and a CUDA build"),
]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("int4", "int3", "int2", "nf4", "fp4", "any4", "any3", "any2")
BATCHES = (1, 3, 5, 8, 13, 16, 33)
# N, K: odd multiples of the 16 x 64 tile, then sizes that are not multiples at all
SHAPES = ((48, 192), (80, 320), (45, 333))


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """Every test starts from a seed of its own name: a failure replays with the same data."""
    torch.manual_seed(stable_seed(request.node.name))


def dequants(w):
    return (["arith"] if w.arith else []) + ["lut_reg", "lut_smem"]


def poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("G", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_core_kernel(fmt, dtype, G):
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(stable_seed(fmt, dtype, G))
    for N, K in SHAPES:
        qt = any4.quantize(torch.randn(N, K, generator=gen), fmt, group_size=min(G, K), dtype=dtype)
        if qt.group_size != G:
            continue
        w = any4.pack_for_gpu(qt).cuda()
        wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, G)
        for M in BATCHES:
            x = torch.randn(M, K, generator=gen).to(dt)
            ref = x.double().numpy() @ wref.T
            y_cpu = any4.gemm(x, qt.packed, qt.lut, qt.scales)  # the CPU twin
            xc = x.cuda()
            for dq in dequants(w):
                for splits in (0, 3):
                    y = poisoned(M, N, dt)
                    gemm_gpu(xc, w, dequant=dq, splits=splits, out=y)
                    torch.cuda.synchronize()
                    err = rel_err(y, ref)
                    assert err < TOL[dtype], (N, K, M, dq, splits, err)
                    assert rel_err(y, y_cpu) < TOL[dtype], (N, K, M, dq, splits)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_exact_identity(dtype):
    """w = [I 0] with int (arithmetic) and per-row tables: y is exactly x[:, :N]."""
    rng = np.random.default_rng(3)
    N, K, G = 40, 200, 64
    dt = DTYPES[dtype]
    codes = np.zeros((N, K), np.uint8)
    codes[np.arange(N), np.arange(N)] = 1
    packed = any4.pack(torch.from_numpy(codes))
    scales = torch.zeros(N, -(-K // G), 2, dtype=dt)
    scales[..., 0] = 1.0
    per_row = torch.from_numpy(rng.normal(size=(N, 16))).to(dt)
    per_row[:, 0], per_row[:, 1] = 0.0, 1.0
    for lut in (torch.arange(16.0, dtype=dt)[None], per_row):
        w = any4.pack_for_gpu(packed, lut, scales, K, G).cuda()
        for M in BATCHES:
            x = torch.randn(M, K, dtype=dt, device="cuda")
            for dq in dequants(w):
                for splits in (0, 2):
                    y = poisoned(M, N, dt)
                    gemm_gpu(x, w, dequant=dq, splits=splits, out=y)
                    assert torch.equal(y, x[:, :N]), (M, dq, splits)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "any4"])
def test_matches_cpu_emulation(fmt):
    """The GPU and its CPU emulation differ only in the mma's fp32 summation order."""
    N, K, G = 72, 640, 128
    qt = any4.quantize(torch.randn(N, K), fmt, group_size=G, dtype="bfloat16")
    w = any4.pack_for_gpu(qt)
    wc = w.cuda()
    for M in (1, 8, 16, 33):
        x = torch.randn(M, K).bfloat16()
        for dq in dequants(w):
            y_emu = emulate_gpu_gemm(x, w, dequant=dq, splits=4)
            y = gemm_gpu(x.cuda(), wc, dequant=dq, splits=4).cpu()
            assert rel_err(y, y_emu) < TOL["bfloat16"], (M, dq)


def test_large_batch_and_shapes():
    for N, K, M in ((1000, 1000, 257), (4096, 512, 100), (17, 4160, 2)):
        qt = any4.quantize(torch.randn(N, K), "nf4", group_size=128, dtype="bfloat16")
        w = any4.pack_for_gpu(qt).cuda()
        x = torch.randn(M, K).bfloat16()
        ref = x.double().numpy() @ dequant_ref(qt.packed, qt.lut, qt.scales, K, 128).T
        y = poisoned(M, N, torch.bfloat16)
        any4.gemm(x.cuda(), w)  # the default entry point
        gemm_gpu(x.cuda(), w, out=y)
        assert rel_err(y, ref) < TOL["bfloat16"], (N, K, M)


@pytest.mark.parametrize("x_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("table_dtype", ["float32", "bfloat16"])
def test_storage_layout_kernel(x_dtype, table_dtype):
    """any4.gemm on CUDA tensors of the storage layout: any dtype, any group size, odd K."""
    for fmt, N, K, G in (
        ("any4", 37, 301, 64),
        ("int4", 20, 200, 24),
        ("nf4", 9, 577, 128),
        ("any2", 64, 96, 96),
    ):
        qt = any4.quantize(torch.randn(N, K), fmt, group_size=G, dtype=table_dtype)
        x = torch.randn(5, K).to(getattr(torch, x_dtype))
        ref = x.double().numpy() @ dequant_ref(qt.packed, qt.lut, qt.scales, K, G).T
        y = any4.gemm(x.cuda(), qt.packed.cuda(), qt.lut.cuda(), qt.scales.cuda())
        assert y.device.type == "cuda" and y.dtype == x.dtype and y.shape == (5, N)
        assert rel_err(y, ref) < TOL[x_dtype], (fmt, G)
        y_cpu = any4.gemm(x, qt.packed, qt.lut, qt.scales)
        assert rel_err(y, y_cpu) < TOL[x_dtype]


def test_runs_on_the_current_stream():
    """The kernels are queued on torch's current stream: a sleep + copy queued before them on a
    side stream must be waited for (wrong results if they ran on another stream)."""
    N, K = 300, 1024
    qt = any4.quantize(torch.randn(N, K), "any4", group_size=128, dtype="bfloat16")
    w = any4.pack_for_gpu(qt).cuda()
    wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, 128)
    x_new = torch.randn(4, K, dtype=torch.bfloat16)
    x_pinned = x_new.pin_memory()
    side = torch.cuda.Stream()
    for use_tc in (True, False):
        x = torch.zeros(4, K, dtype=torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
            x.copy_(x_pinned, non_blocking=True)
            if use_tc:
                y = any4.gemm(x, w)
            else:
                y = any4.gemm(x, qt.packed.cuda(), qt.lut.cuda(), qt.scales.cuda())
        side.synchronize()
        assert rel_err(y, x_new.double().numpy() @ wref.T) < TOL["bfloat16"], use_tc


def test_errors():
    qt = any4.quantize(torch.randn(32, 128), "int4", group_size=64, dtype="bfloat16")
    w = any4.pack_for_gpu(qt)
    wc = w.cuda()
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="device"):
        any4.gemm(x, wc)  # CPU x, CUDA weight
    with pytest.raises(ValueError, match="device"):
        gemm_gpu(x.cuda(), w)  # CUDA x, CPU weight
    with pytest.raises(ValueError, match="one device"):
        any4.gemm(x.cuda(), qt.packed, qt.lut, qt.scales)  # storage layout, mixed devices
    with pytest.raises(TypeError, match="packed for bfloat16"):
        any4.gemm(x.cuda().half(), wc)
    with pytest.raises(ValueError, match="K="):
        any4.gemm(torch.randn(2, 100, dtype=torch.bfloat16, device="cuda"), wc)
    assert any4.gemm(torch.zeros(0, 128, dtype=torch.bfloat16, device="cuda"), wc).shape == (0, 32)


def test_non_contiguous_and_batched_x():
    qt = any4.quantize(torch.randn(24, 256), "any4", group_size=64, dtype="float16")
    w = any4.pack_for_gpu(qt).cuda()
    x = torch.randn(256, 6, dtype=torch.float16, device="cuda").T  # a transposed view
    y = any4.gemm(x, w)
    assert torch.equal(y, any4.gemm(x.contiguous(), w))
    xb = torch.randn(2, 3, 256, dtype=torch.float16, device="cuda")
    assert any4.gemm(xb, w).shape == (2, 3, 24)


def test_cuda_graph_replay():
    """Captured once, replayed on new inputs: split-K counters reset themselves each replay."""
    N, K = 64, 2048
    qt = any4.quantize(torch.randn(N, K), "any4", group_size=128, dtype="bfloat16")
    w = any4.pack_for_gpu(qt).cuda()
    wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, 128)
    x = torch.zeros(3, K, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gemm_gpu(x, w, splits=4)  # warm-up: plan and split-K scratch of this stream
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = gemm_gpu(x, w, splits=4)
    for _ in range(3):
        x_new = torch.randn(3, K, dtype=torch.bfloat16)
        x.copy_(x_new)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, x_new.double().numpy() @ wref.T) < TOL["bfloat16"]


def test_tensor_level_entry_point():
    from any4.cuda import gemm_gpu_tensors

    qt = any4.quantize(torch.randn(40, 300), "int4", group_size=64, dtype="bfloat16")
    w = any4.pack_for_gpu(qt).cuda()
    x = torch.randn(7, 300, dtype=torch.bfloat16, device="cuda")
    y = gemm_gpu_tensors(x, w.codes, w.scales, w.lut, 40, 300, 64, w.lut_len, w.arith_neg2)
    assert torch.equal(y, gemm_gpu(x, w))


def split_k_weight(seed, N=64, K=4096, fmt="any4"):
    """A small-N, long-K weight: the automatic plan splits K on any GPU."""
    gen = torch.Generator().manual_seed(seed)
    qt = any4.quantize(torch.randn(N, K, generator=gen), fmt, group_size=128, dtype="bfloat16")
    return qt, any4.pack_for_gpu(qt).cuda(), dequant_ref(qt.packed, qt.lut, qt.scales, K, 128)


def test_automatic_plan_splits_and_uses_the_stream_scratch():
    from any4.cuda import SCRATCH

    qt, w, wref = split_k_weight(1)
    floats, counters, n_splits = any4._core.C.cuda_gemm_tc_scratch(3, 64, 4096, 2, 1, 0, 0, 2, 2, 4)
    assert n_splits > 1
    bound = any4._core.C.cuda_gemm_tc_scratch_bound(0)
    assert floats <= bound[0] and counters <= bound[1]
    x = torch.randn(3, 4096, dtype=torch.bfloat16, device="cuda")
    gemm_gpu(x, w)
    key = (0, int(torch.cuda.current_stream().cuda_stream))
    assert SCRATCH._by_key[key][0].numel() == bound[0]


def test_graph_replay_after_a_larger_call():
    """A graph captured after a small split-K call stays correct after a larger split-K call on
    the same stream (the scratch is never reallocated under the graph)."""
    from any4.cuda import SCRATCH

    _, w_small, wref_small = split_k_weight(2, N=64, K=2048)
    _, w_big, wref_big = split_k_weight(3, N=200, K=8192)
    stream = torch.cuda.Stream()
    x = torch.zeros(3, 2048, dtype=torch.bfloat16, device="cuda")
    with torch.cuda.stream(stream):
        gemm_gpu(x, w_small)  # warm-up
    stream.synchronize()
    key = (0, int(stream.cuda_stream))
    ptr = SCRATCH._by_key[key][0].data_ptr()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = gemm_gpu(x, w_small)
    with torch.cuda.stream(stream):
        xb = torch.randn(16, 8192, dtype=torch.bfloat16, device="cuda")
        yb = gemm_gpu(xb, w_big)  # larger plan, same stream
    stream.synchronize()
    assert SCRATCH._by_key[key][0].data_ptr() == ptr
    assert rel_err(yb, xb.double().cpu().numpy() @ wref_big.T) < TOL["bfloat16"]
    for _ in range(3):
        x_new = torch.randn(3, 2048, dtype=torch.bfloat16)
        x.copy_(x_new)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, x_new.double().numpy() @ wref_small.T) < TOL["bfloat16"]


def test_capture_without_scratch_raises_and_reserve_fixes_it():
    from any4.cuda import SCRATCH, reserve_scratch

    _, w, wref = split_k_weight(4)
    stream, stream2 = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (stream, stream2):  # torch recycles stream handles from a pool: start without scratch
        SCRATCH._by_key.pop((0, int(s.cuda_stream)), None)
    x = torch.randn(2, 4096, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="reserve_scratch"):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            x.add(1)  # (the graph is not empty)
            gemm_gpu(x, w)
    torch.cuda.synchronize()
    reserve_scratch(stream2)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream2):
        y = gemm_gpu(x, w)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, x.double().cpu().numpy() @ wref.T) < TOL["bfloat16"]


def test_second_graph_on_the_same_stream():
    """Two graphs captured on one stream (the second never preceded by an eager call), replayed
    in either order: the counters are zero for each (the kernel resets them)."""
    _, w1, wref1 = split_k_weight(5)
    _, w2, wref2 = split_k_weight(6, N=48, K=3072)
    stream = torch.cuda.Stream()
    x1 = torch.zeros(5, 4096, dtype=torch.bfloat16, device="cuda")
    x2 = torch.zeros(9, 3072, dtype=torch.bfloat16, device="cuda")
    with torch.cuda.stream(stream):
        gemm_gpu(x1, w1)
    stream.synchronize()
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1, stream=stream):
        y1 = gemm_gpu(x1, w1)
    with torch.cuda.graph(g2, stream=stream):
        y2 = gemm_gpu(x2, w2)
    for order in ((g2, g1), (g1, g2), (g2, g2, g1)):
        a, b = torch.randn(5, 4096).bfloat16(), torch.randn(9, 3072).bfloat16()
        x1.copy_(a)
        x2.copy_(b)
        for g in order:
            g.replay()
        torch.cuda.synchronize()
        assert rel_err(y1, a.double().numpy() @ wref1.T) < TOL["bfloat16"]
        assert rel_err(y2, b.double().numpy() @ wref2.T) < TOL["bfloat16"]


def test_two_streams_run_split_k_at_once():
    """Split-K gemms queued on two streams without synchronisation between them (each stream
    has its own scratch); a sleep on one stream makes them overlap."""
    _, w1, wref1 = split_k_weight(7)
    _, w2, wref2 = split_k_weight(8)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    xs1 = [torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda") for _ in range(6)]
    xs2 = [torch.randn(12, 4096, dtype=torch.bfloat16, device="cuda") for _ in range(6)]
    torch.cuda.synchronize()
    ys1, ys2 = [], []
    with torch.cuda.stream(s1):
        torch.cuda._sleep(1_000_000)
    for a, b in zip(xs1, xs2):
        with torch.cuda.stream(s1):
            ys1.append(gemm_gpu(a, w1))
        with torch.cuda.stream(s2):
            ys2.append(gemm_gpu(b, w2))
    torch.cuda.synchronize()
    for a, y in zip(xs1, ys1):
        assert rel_err(y, a.double().cpu().numpy() @ wref1.T) < TOL["bfloat16"]
    for b, y in zip(xs2, ys2):
        assert rel_err(y, b.double().cpu().numpy() @ wref2.T) < TOL["bfloat16"]


@pytest.mark.parametrize("fmt", ["int4", "any4"])
def test_bitwise_repeatable(fmt):
    """The same inputs give the same bits on every call: split-K reduces in split order."""
    _, w, _ = split_k_weight(9, N=80, K=4096, fmt=fmt)
    x = torch.randn(13, 4096, dtype=torch.bfloat16, device="cuda")
    for dq in dequants(w):
        for splits in (0, 1, 5):
            first = gemm_gpu(x, w, dequant=dq, splits=splits)
            for _ in range(4):
                assert torch.equal(gemm_gpu(x, w, dequant=dq, splits=splits), first), (dq, splits)


@pytest.mark.parametrize("stage_chunks", [2, 4])
@pytest.mark.parametrize("split_waves", [1, 2])
def test_kernel_variants(stage_chunks, split_waves):
    """Every (pipeline depth, split-K waves) variant against float64, for every dequantizer."""
    gen = torch.Generator().manual_seed(stable_seed("variants", stage_chunks, split_waves))
    for fmt, N, K in (("int4", 45, 333), ("any4", 72, 4096), ("nf4", 16, 1000)):
        qt = any4.quantize(torch.randn(N, K, generator=gen), fmt, group_size=64, dtype="bfloat16")
        w = any4.pack_for_gpu(qt).cuda()
        wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, 64)
        for M in (1, 16, 33):
            x = torch.randn(M, K, generator=gen).bfloat16()
            ref = x.double().numpy() @ wref.T
            for dq in dequants(w):
                for splits in (0, 3):
                    y = poisoned(M, N, torch.bfloat16)
                    gemm_gpu(x.cuda(), w, dequant=dq, splits=splits, out=y,
                             stage_chunks=stage_chunks, split_waves=split_waves)  # fmt: skip
                    assert rel_err(y, ref) < TOL["bfloat16"], (fmt, M, dq, splits)
                    y_emu = emulate_gpu_gemm(x, w.cpu(), dequant=dq, splits=splits,
                                             stage_chunks=stage_chunks)  # fmt: skip
                    assert rel_err(y, y_emu) < TOL["bfloat16"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_large_batch_dequant_matmul_path(dtype):
    """M > 64: W dequantized once (checked against its CPU emulation) and a dense matmul; the
    path is forced with impl= and chosen by impl='auto' above TENSOR_CORE_MAX_M rows."""
    from any4.cuda import TENSOR_CORE_MAX_M
    from any4.pack_gpu import emulate_gpu_dequant

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(stable_seed("dequant_matmul", dtype))
    for fmt, N, K in (("int4", 45, 333), ("nf4", 16, 64), ("any4", 130, 1000)):
        qt = any4.quantize(torch.randn(N, K, generator=gen), fmt, group_size=64, dtype=dtype)
        w = any4.pack_for_gpu(qt).cuda()
        wref = dequant_ref(qt.packed, qt.lut, qt.scales, K, 64)
        for M in (1, 17, TENSOR_CORE_MAX_M + 1, 300):
            x = torch.randn(2, M, K, generator=gen).to(dt)
            ref = x.double().numpy().reshape(-1, K) @ wref.T
            for impl in ("dequant_matmul", "auto", "tensor_core"):
                y = torch.full((2, M, N), float("nan"), dtype=dt, device="cuda")
                gemm_gpu(x.cuda(), w, impl=impl, out=y)
                assert rel_err(y.reshape(-1, N), ref) < TOL[dtype], (fmt, M, impl)
    with pytest.raises(ValueError, match="impl"):
        gemm_gpu(x.cuda(), w, impl="cublas")
    # the GPU dequantize kernel against its emulation (one fma rounding vs two: not bit-exact)
    C = any4._core.C
    for dq in dequants(w):
        K_pad = 64 * -(-K // 64)
        wd = torch.full((N, K_pad), float("nan"), dtype=dt, device="cuda")
        code = any4.pack_gpu.DEQUANTIZERS[dq]
        C.cuda_gemm_tc_dequant(
            any4._tensor.DTYPE_CODE[dtype], N, K, 64, w.codes.data_ptr(), w.scales.data_ptr(),
            w.lut.data_ptr(), code, max(w.arith_neg2, 0), w.bits, wd.data_ptr(), 0,
            int(torch.cuda.current_stream().cuda_stream),
        )  # fmt: skip
        emu = emulate_gpu_dequant(w.cpu(), dequant=dq)  # [N, K]; columns >= K are padding
        assert torch.isfinite(wd[:, :K]).all()
        assert rel_err(wd[:, :K].cpu(), emu) < TOL[dtype], dq


# ---------------------------------------------------------------- 3- and 2-bit dense layouts


def low_bit_weight(rng, N, K, G, bits, table, dtype):
    """Random bits-bit codes stored densely, a per-row ("rows"), shared random ("shared") or int
    table ("int": c - (L-1)/2, the arithmetic dequantizer), and scales; torch CPU tensors."""
    L = 1 << bits
    packed = any4.pack(torch.from_numpy(rng.integers(0, L, size=(N, K), dtype=np.uint8)), bits)
    if table == "int":
        lut = (torch.arange(L, dtype=torch.float64) - (L - 1) / 2)[None]
    else:
        lut = torch.from_numpy(np.sort(rng.normal(size=(N if table == "rows" else 1, L)), axis=1))
    scales = torch.from_numpy(rng.uniform(0.5, 1.5, size=(N, -(-K // G), 2)))
    scales[..., 1] -= 1.0
    return packed, lut.to(dtype), scales.to(dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [3, 2])
def test_low_bit_kernels(bits, dtype):
    """The 3/2-bit kernels on the dense layout: float64, the CPU emulation of the same grid, and
    bit for bit the 4-bit kernel on the same codes (splits=1: the same mma sequence); odd N and
    K (half-filled last unit), G variants, every dequantizer, forced odd splits, both depths."""
    dt = DTYPES[dtype]
    rng = np.random.default_rng(stable_seed("low-bit", bits, dtype))
    for N, K, G, tables in (
        (45, 333, 64, ("rows", "shared", "int")),
        (16, 200, 32, ("rows", "int")),
        (72, 4096, 128, ("rows",)),
    ):
        for table in tables:
            packed, lut, scales = low_bit_weight(rng, N, K, G, bits, table, dt)
            w = any4.pack_for_gpu(packed, lut, scales, K, G)
            assert w.bits == bits and w.arith == (table == "int")
            w4 = any4.pack_for_gpu(packed, lut, scales, K, G, bits=4)
            wc, w4c = w.cuda(), w4.cuda()
            wref = dequant_ref(packed, lut, scales, K, G)
            for M in (1, 13, 33):
                x = torch.from_numpy(rng.normal(size=(M, K))).to(dt)
                ref = x.double().numpy() @ wref.T
                xc = x.cuda()
                for dq in dequants(w):
                    for splits, sc in ((0, 2), (1, 4), (3, 4), (5, 2)):
                        y = poisoned(M, N, dt)
                        gemm_gpu(xc, wc, dequant=dq, splits=splits, stage_chunks=sc, out=y)
                        torch.cuda.synchronize()
                        what = (N, K, table, M, dq, splits, sc)
                        assert rel_err(y, ref) < TOL[dtype], what
                        y_emu = emulate_gpu_gemm(x, w, dequant=dq, splits=splits, stage_chunks=sc)
                        assert rel_err(y, y_emu) < TOL[dtype], what
                        if splits == 1:
                            y4 = gemm_gpu(xc, w4c, dequant=dq, splits=1, stage_chunks=sc)
                            assert torch.equal(y, y4), what


@pytest.mark.parametrize("bits", [3, 2])
def test_low_bit_exact_identity_and_large_batch(bits):
    """w = [I 0] in 3/2-bit codes: exactly x[:, :N] on every path (tensor core, every
    dequantizer and split; dequantize + matmul); and the GPU dequantize kernel against its
    emulation on a random weight."""
    rng = np.random.default_rng(bits)
    N, K, G = 40, 200, 64
    codes = np.zeros((N, K), np.uint8)
    codes[np.arange(N), np.arange(N)] = 1
    packed = any4.pack(torch.from_numpy(codes), bits)
    scales = torch.zeros(N, -(-K // G), 2, dtype=torch.bfloat16)
    scales[..., 0] = 1.0
    L = 1 << bits
    per_row = torch.from_numpy(rng.normal(size=(N, L))).bfloat16()
    per_row[:, 0], per_row[:, 1] = 0.0, 1.0
    for lut in (torch.arange(float(L))[None].bfloat16(), per_row):
        w = any4.pack_for_gpu(packed, lut, scales, K, G).cuda()
        assert w.bits == bits
        for M in (1, 16, 80):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            for dq in dequants(w):
                for splits in (0, 3):
                    y = poisoned(M, N, torch.bfloat16)
                    gemm_gpu(x, w, dequant=dq, splits=splits, out=y, impl="tensor_core")
                    assert torch.equal(y, x[:, :N]), (M, dq, splits)
                y = poisoned(M, N, torch.bfloat16)
                gemm_gpu(x, w, dequant=dq, out=y, impl="dequant_matmul")
                assert torch.equal(y, x[:, :N]), (M, dq, "dequant_matmul")
    from any4.pack_gpu import emulate_gpu_dequant

    packed, lut, scales = low_bit_weight(rng, 45, 333, 64, bits, "rows", torch.float16)
    w = any4.pack_for_gpu(packed, lut, scales, 333, 64)
    wc = w.cuda()
    K_pad = 64 * -(-333 // 64)
    wd = torch.full((45, K_pad), float("nan"), dtype=torch.float16, device="cuda")
    any4._core.C.cuda_gemm_tc_dequant(
        1, 45, 333, 64, wc.codes.data_ptr(), wc.scales.data_ptr(), wc.lut.data_ptr(), 1, 0,
        bits, wd.data_ptr(), 0, int(torch.cuda.current_stream().cuda_stream),
    )  # fmt: skip
    torch.cuda.synchronize()
    emu = emulate_gpu_dequant(w)
    assert torch.isfinite(wd[:, :333]).all()
    assert rel_err(wd[:, :333].cpu(), emu) < TOL["float16"]


@pytest.mark.parametrize("fmt", ["any3", "any2", "int3"])
def test_low_bit_quant_linear_on_the_gpu(fmt):
    """QuantLinear of a 3/2-bit format on CUDA holds the dense GPU layout (bits/weight from the
    bytes stored), and its forward matches float64 (tensor core and the large-batch path)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 96, bias=True)
    q = any4.QuantLinear.from_linear(lin, fmt, group_size=128).cuda()
    bits = {"any3": 3, "any2": 2, "int3": 3}[fmt]
    ks = q.kernel_state
    assert ks is not None and ks.bits == bits
    stored = sum(t.numel() * t.element_size() for t in (q.gpu_codes, q.gpu_scales, q.gpu_lut))
    assert ks.bits_per_weight == 8 * stored / (96 * 512)
    assert 8 * q.gpu_codes.numel() / (96 * 512) == bits  # dense codes (no padding at this size)
    qt = q.quantized_tensor()
    wref = dequant_ref(qt.packed.cpu(), qt.lut.cpu(), qt.scales.cpu(), 512, 128)
    for M in (1, 7, 100):
        x = torch.randn(M, 512, dtype=torch.bfloat16)
        ref = x.double().numpy() @ wref.T + lin.bias.detach().double().numpy()
        y = q(x.cuda())
        assert rel_err(y, ref) < TOL["bfloat16"], M
