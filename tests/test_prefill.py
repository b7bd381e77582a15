"""The CPU prefill path (any4.prefill): row-panel decoding and panels x torch.mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import any4
from any4 import prefill
from any4._core import C
from conftest import TOL, dequant_ref, rel_err

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


def random_weight(N, K, G, table_dtype, lut_rows=None, lut_len=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lut_len, (N, K), generator=g, dtype=torch.uint8)
    lut = torch.randn(lut_rows or N, lut_len, generator=g).to(DTYPES[table_dtype])
    n_groups = -(-K // G)
    scales = torch.stack(
        [torch.rand(N, n_groups, generator=g) + 0.5, torch.randn(N, n_groups, generator=g)], -1
    ).to(DTYPES[table_dtype])
    return any4.pack(codes), lut, scales


DECODE_IMPLS = pytest.mark.parametrize(
    "impl",
    [
        pytest.param(0, id="portable"),
        pytest.param(
            1,
            id="avx2",
            marks=pytest.mark.skipif(
                not any4.build_info()["cpu_impls"]["avx2"], reason="no AVX2 here"
            ),
        ),
    ],
)


def decode(packed, lut, scales, K, G, n0, n1, dtype, impl=-1):
    N = packed.shape[0]
    w = torch.full((n1 - n0, K), float("nan"), dtype=DTYPES[dtype])
    C.dequantize_rows(packed.data_ptr(), N, K, lut.data_ptr(), lut.shape[0], lut.shape[1],
                      scales.data_ptr(), scales.shape[1], G, CODE[str(lut.dtype)[6:]], n0, n1,
                      w.data_ptr(), CODE[dtype], impl)  # fmt: skip
    return w


@DECODE_IMPLS
@pytest.mark.parametrize("table_dtype", list(DTYPES))
@pytest.mark.parametrize("out_dtype", list(DTYPES))
@pytest.mark.parametrize(
    "N,K,G,lut_rows,lut_len",
    [(37, 200, 64, None, 16), (5, 77, 8, 1, 16), (9, 45, 9, None, 16), (6, 1000, 24, None, 7),
     (3, 33, 33, 1, 16), (4, 300, 256, None, 4)],
)  # fmt: skip
def test_dequantize_rows_matches_reference(
    impl, table_dtype, out_dtype, N, K, G, lut_rows, lut_len
):
    """Every row range, odd K, short last group, odd group size (groups starting on a high
    nibble); equal to the float64 reference rounded once to the output dtype."""
    packed, lut, scales = random_weight(N, K, G, table_dtype, lut_rows, lut_len)
    ref = dequant_ref(packed, lut, scales, K, G)
    # The kernels' value is fma(lut, scale, zero) in fp32; the reference is float64, so compare
    # after rounding both to the output dtype, with one fp32 rounding step of slack.
    for n0, n1 in ((0, N), (1, N - 1), (N - 1, N), (2, 2)):
        w = decode(packed, lut, scales, K, G, n0, n1, out_dtype, impl)
        assert w.shape == (n1 - n0, K)
        expect = torch.from_numpy(ref[n0:n1]).to(DTYPES[out_dtype]).double()
        assert not torch.isnan(w).any()
        tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[out_dtype]
        torch.testing.assert_close(w.double(), expect, rtol=tol, atol=tol)


@DECODE_IMPLS
def test_dequantize_rows_is_exactly_the_dequantized_weight(impl):
    for G in (64, 8, 24):
        packed, lut, scales = random_weight(23, 130, G, "bfloat16")
        qt = any4.QuantizedTensor(packed, lut, scales, (23, 130), "any4", G)
        w = decode(packed, lut, scales, 130, G, 0, 23, "float32", impl)
        assert torch.equal(w, any4.dequantize(qt))
        for dt in ("bfloat16", "float16"):  # rounded once: the same as rounding the fp32 value
            w16 = decode(packed, lut, scales, 130, G, 0, 23, dt, impl)
            assert torch.equal(w16, w.to(DTYPES[dt]))


def test_dequantize_rows_checks_its_range():
    packed, lut, scales = random_weight(8, 64, 32, "float32")
    for n0, n1 in ((-1, 3), (3, 2), (0, 9)):
        with pytest.raises(ValueError, match="row range"):
            C.dequantize_rows(packed.data_ptr(), 8, 64, lut.data_ptr(), 8, 16, scales.data_ptr(),
                              2, 32, 0, n0, n1, torch.empty(16, 64).data_ptr(), 0, -1)  # fmt: skip


def best_kernel() -> str:
    impls = any4.build_info()["cpu_impls"]
    return [i for i in ("portable", "avx2", "avx512", "avx512bf16") if impls[i]][-1]


@pytest.fixture
def small_panels(monkeypatch):
    """Panels of a few rows, so that several panels and a short last one are exercised."""
    monkeypatch.setattr(prefill, "PANEL_BYTES", 7 * 128 * 4)


@pytest.mark.parametrize("x_dtype", list(DTYPES))
@pytest.mark.parametrize("M", [1, 3, 16, 70])
def test_panels_several_panels_poisoned_out(small_panels, x_dtype, M):
    N, K, G = 45, 128, 32  # 7-row float32 panels: the last one is short
    packed, lut, scales = random_weight(N, K, G, "bfloat16")
    ref_w = dequant_ref(packed, lut, scales, K, G)
    x = torch.randn(2, M, K).to(DTYPES[x_dtype])
    out = torch.full((2, M, N), float("nan"), dtype=x.dtype)
    y = any4.gemm(x, packed, lut, scales, G, impl="panels", out=out)
    assert y is out
    err = rel_err(y.reshape(-1, N), x.double().reshape(-1, K).numpy() @ ref_w.T)
    assert err < TOL[x_dtype], err


@pytest.mark.parametrize(
    "x_dtype,scale,rounding",
    [("float16", 1.0078125, 2.0**-14), ("bfloat16", 1.5, 2.0**-8)],
)
def test_panels_keep_weights_in_float32_under_cancellation(x_dtype, scale, rounding):
    """y = w0 - w1 with w0 = 1.0078125 * scale (exact in float32, not in x's 16-bit dtype: a
    16-bit panel rounds it by `rounding`) and w1 = 1.0 * scale: y = 2^-7 * scale exactly, and a
    16-bit panel's error is 0.8% (fp16) / 33% (bf16) of it. Float32 panels leave only y's own
    rounding."""
    lut = torch.tensor([[1.0078125, 1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    scales = torch.tensor([[[scale, 0.0]]], dtype=torch.bfloat16)
    codes = torch.tensor([[0, 1, 3, 3, 3, 3, 3, 3]], dtype=torch.uint8)
    packed = any4.pack(codes, bits=2)
    x = torch.tensor([[1.0, -1.0, 0, 0, 0, 0, 0, 0]], dtype=DTYPES[x_dtype])
    w0 = 1.0078125 * scale
    assert abs(float(torch.tensor(w0).to(DTYPES[x_dtype])) - w0) == rounding
    y = any4.gemm(x, packed, lut, scales, 8, impl="panels")
    ref = x.double().numpy() @ dequant_ref(packed, lut, scales, 8, 8).T
    assert ref[0, 0] == 2.0**-7 * scale
    assert rel_err(y, ref) < TOL[x_dtype]
    assert torch.equal(y, any4.gemm(x, packed, lut, scales, 8, impl="portable"))


def test_auto_takes_panels_from_the_threshold(monkeypatch):
    N, K, G = 40, 256, 128
    packed, lut, scales = random_weight(N, K, G, "float32")
    monkeypatch.setitem(prefill._MIN_BATCH_CACHE, "float32", 32)
    calls = []
    real = prefill.gemm_panels

    def spy(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setitem(any4.gemm.__globals__, "gemm_panels", spy)
    for M in (31, 32, 100):
        x = torch.randn(M, K)
        y_auto = any4.gemm(x, packed, lut, scales)  # the lean torch path
        y_general = any4.gemm(x, packed, lut, scales, impl="auto", out=torch.empty(M, N))
        y_panels = real(x, packed, lut, scales, G, torch.empty(M, N))
        y_kernel = any4.gemm(x, packed, lut, scales, impl=best_kernel())
        if M >= 32:
            assert torch.equal(y_auto, y_panels) and torch.equal(y_general, y_panels)
        else:
            assert torch.equal(y_auto, y_kernel)
    assert calls == [32, 32, 100, 100]


def test_env_override(monkeypatch):
    monkeypatch.setattr(prefill, "_MIN_BATCH_CACHE", {})
    monkeypatch.setenv("ANY4_PREFILL_MIN_M", "0")
    assert prefill.min_batch("float32") > 1 << 40
    monkeypatch.setattr(prefill, "_MIN_BATCH_CACHE", {})
    monkeypatch.setenv("ANY4_PREFILL_MIN_M", "48")
    assert prefill.min_batch("bfloat16") == 48


def test_panels_needs_torch():
    packed, lut, scales = random_weight(8, 64, 32, "float32")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(TypeError, match="panels"):
        any4.gemm(x, packed.numpy(), lut.numpy(), scales.numpy(), impl="panels")


def test_isa_is_the_best_detected():
    f = any4.build_info()["cpu_features"]
    assert set(f) == {"avx2", "avx512", "avx512bf16", "amx_bf16"}
    expect = next((k for k in ("amx_bf16", "avx512bf16", "avx512", "avx2") if f[k]), "portable")
    assert prefill.isa() == expect


@pytest.mark.parametrize("bits", [3, 2])
def test_panels_dense_3_and_2_bit_codes(bits):
    """Dense 3/2-bit codes (any4.pack(bits=)) through the panels path, forced and by the auto
    threshold, against the float64 reference; poisoned out= fully overwritten."""
    g = torch.Generator().manual_seed(10 + bits)
    N, K, G, M = 37, 200, 40, 19
    codes = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8)
    lut = torch.randn(N, 1 << bits, generator=g)
    scales = torch.stack(
        [torch.rand(N, K // G, generator=g) + 0.5, torch.randn(N, K // G, generator=g)], -1
    )
    packed = any4.pack(codes, bits=bits)
    x = torch.randn(M, K, generator=g)
    w = (lut.double().gather(1, codes.long()) * scales[..., 0].double().repeat_interleave(G, 1)
         + scales[..., 1].double().repeat_interleave(G, 1))  # fmt: skip
    ref = x.double() @ w.T
    out = torch.full((M, N), float("nan"))
    y = any4.gemm(x, packed, lut, scales, group_size=G, impl="panels", out=out)
    assert y is out and rel_err(y, ref) < 1e-5
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANY4_PREFILL_MIN_M", "16")
        y2 = any4.gemm(x, packed, lut, scales, group_size=G)
    assert rel_err(y2, ref) < 1e-5
