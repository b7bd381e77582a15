"""any4.gemm argument handling (the numerics are tested per kernel in test_gemm_cpu.py)."""

import numpy as np
import pytest
import torch

import any4
from any4.gemm import infer_group_size
from conftest import dequant_ref, rel_err


@pytest.fixture
def qt():
    w = torch.randn(24, 200) * 0.05
    return any4.quantize(w, "any4", group_size=64, dtype="bfloat16")


def test_matches_reference_with_batch_dims(qt):
    x = torch.randn(2, 3, 200, dtype=torch.bfloat16)
    y = any4.gemm(x, qt.packed, qt.lut, qt.scales)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    ref = x.double().reshape(-1, 200).numpy() @ dequant_ref(qt.packed, qt.lut, qt.scales, 200, 64).T
    assert rel_err(y.reshape(-1, 24), ref) < 1e-2


def test_numpy_in_numpy_out():
    w = np.random.default_rng(0).normal(size=(10, 96)).astype(np.float32)
    qt = any4.quantize(w, "nf4", group_size=32)
    x = np.random.default_rng(1).normal(size=(3, 96)).astype(np.float32)
    y = any4.gemm(x, qt.packed, qt.lut, qt.scales)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert (
        rel_err(y, x.astype(np.float64) @ dequant_ref(qt.packed, qt.lut, qt.scales, 96, 32).T)
        < 1e-5
    )


def test_non_contiguous_x_is_accepted(qt):
    x = torch.randn(200, 4, dtype=torch.bfloat16).T  # a transposed view
    y = any4.gemm(x, qt.packed, qt.lut, qt.scales)
    y2 = any4.gemm(x.contiguous(), qt.packed, qt.lut, qt.scales)
    assert torch.equal(y, y2)


def test_empty_batch(qt):
    y = any4.gemm(torch.zeros(0, 200, dtype=torch.bfloat16), qt.packed, qt.lut, qt.scales)
    assert y.shape == (0, 24)


def test_infer_group_size():
    assert infer_group_size(4096, 32) == 128
    assert infer_group_size(576, 5) == 128  # short last group: the power of two is taken
    assert infer_group_size(576, 9) == 64
    assert infer_group_size(200, 4) == 64  # 56..64 fit; the power of two is 64
    with pytest.raises(ValueError, match="group_size="):
        infer_group_size(1000, 3)


def test_bad_operands(qt):
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    p, lut, sc = qt.packed, qt.lut, qt.scales
    with pytest.raises(TypeError, match="x must be"):
        any4.gemm(x.int(), p, lut, sc)
    with pytest.raises(ValueError, match="bytes per row"):
        any4.gemm(torch.randn(3, 202, dtype=torch.bfloat16), p, lut, sc)
    with pytest.raises(TypeError, match="packed_w must be uint8"):
        any4.gemm(x, p.int(), lut, sc)
    with pytest.raises(TypeError, match="lut's dtype"):
        any4.gemm(x, p, lut, sc.float())
    with pytest.raises(ValueError, match="lut must be"):
        any4.gemm(x, p, lut[:5], sc)
    with pytest.raises(ValueError, match="lut must be"):
        any4.gemm(x, p, torch.zeros(24, 17, dtype=torch.bfloat16), sc)
    with pytest.raises(ValueError, match="scales must be"):
        any4.gemm(x, p, lut, sc[:3])
    with pytest.raises(ValueError, match="group_size=32 gives"):
        any4.gemm(x, p, lut, sc, group_size=32)
    with pytest.raises(ValueError, match="contiguous"):
        any4.gemm(x, p, lut.T.contiguous().T, sc)
    with pytest.raises(ValueError, match="impl"):
        any4.gemm(x, p, lut, sc, impl="gpu")
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        any4.gemm(x.tolist(), p, lut, sc)


def test_cuda_tensors_without_gpu_raise_clearly(qt):
    if any4.cuda_available():
        pytest.skip("a GPU is present")
    assert any4.build_info()["cuda_available"] is False
    with pytest.raises(RuntimeError):
        any4.cuda.require_cuda()
