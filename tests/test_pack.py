import numpy as np
import pytest
import torch

import any4
from conftest import unpack_ref


@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (5, 8), (17, 129), (64, 576)])
def test_pack_unpack_exact(N, K, rng):
    codes = rng.integers(0, 16, size=(N, K), dtype=np.uint8)
    packed = any4.pack(codes)
    assert packed.shape == (N, (K + 1) // 2) and packed.dtype == np.uint8
    # layout: k = 2j low nibble, 2j+1 high nibble
    np.testing.assert_array_equal(packed[:, 0] & 0xF, codes[:, 0])
    if K > 1:
        np.testing.assert_array_equal(packed[:, 0] >> 4, codes[:, 1])
    if K % 2:
        assert (packed[:, -1] >> 4 == 0).all()
    np.testing.assert_array_equal(unpack_ref(packed, K), codes)
    np.testing.assert_array_equal(any4.unpack(packed, K), codes)


def test_pack_torch_roundtrip():
    codes = torch.randint(0, 16, (9, 33), dtype=torch.uint8)
    packed = any4.pack(codes)
    assert isinstance(packed, torch.Tensor)
    assert torch.equal(any4.unpack(packed, 33), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="< 16"):
        any4.pack(np.full((2, 4), 16, np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        any4.pack(np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        any4.pack(np.zeros((4,), np.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        any4.pack(np.zeros((4, 6), np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="does not hold"):
        any4.unpack(np.zeros((2, 4), np.uint8), 9)
    with pytest.raises(TypeError):
        any4.pack([[1, 2]])
