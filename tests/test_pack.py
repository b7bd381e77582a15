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


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (5, 8), (2, 9), (17, 129), (64, 576), (4, 4097)])
def test_pack_bits_exact_inverse(bits, N, K, rng):
    codes = rng.integers(0, 1 << bits, size=(N, K), dtype=np.uint8)
    packed = any4.pack(codes, bits)
    assert packed.shape == (N, -(-bits * K // 8)) == (N, any4.packed_bytes(K, bits))
    np.testing.assert_array_equal(unpack_ref(packed, K, bits), codes)
    np.testing.assert_array_equal(any4.unpack(packed, K, bits), codes)
    # padding bits of the last byte are zero, so pack(unpack(p)) == p too
    used = bits * K - 8 * (packed.shape[1] - 1)
    assert (packed[:, -1] >> used == 0).all()
    np.testing.assert_array_equal(any4.pack(any4.unpack(packed, K, bits), bits), packed)


def test_pack_layouts_spelled_out():
    """2-bit: k = 4j + i in bits 2i of byte j; 3-bit: k = 8j + i in bits 3i of the 24-bit word
    of bytes 3j..3j+2 (little-endian)."""
    codes2 = np.array([[1, 2, 3, 0, 3]], np.uint8)
    np.testing.assert_array_equal(any4.pack(codes2, 2), [[1 | 2 << 2 | 3 << 4, 3]])
    codes3 = np.array([[1, 2, 3, 4, 5, 6, 7, 0, 5]], np.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes3[0, :8]))
    np.testing.assert_array_equal(
        any4.pack(codes3, 3), [[word & 0xFF, (word >> 8) & 0xFF, word >> 16, 5]]
    )


@pytest.mark.parametrize("bits", [2, 3])
def test_pack_torch_helpers_match(bits):
    from any4.pack import to_nibbles_torch, unpack_torch

    codes = torch.randint(0, 1 << bits, (7, 45), dtype=torch.uint8)
    packed = any4.pack(codes, bits)
    assert torch.equal(unpack_torch(packed, 45, bits), codes)
    assert torch.equal(to_nibbles_torch(packed, 45, bits), any4.pack(codes))


def test_pack_bits_rejects_bad_input():
    with pytest.raises(ValueError, match="< 8"):
        any4.pack(np.full((2, 4), 8, np.uint8), 3)
    with pytest.raises(ValueError, match="< 4"):
        any4.pack(np.full((2, 4), 4, np.uint8), 2)
    with pytest.raises(ValueError, match="bits must be"):
        any4.pack(np.zeros((2, 4), np.uint8), 5)
    with pytest.raises(ValueError, match="bits must be"):
        any4.unpack(np.zeros((2, 4), np.uint8), 8, True)
    with pytest.raises(ValueError, match="does not hold"):
        any4.unpack(np.zeros((2, 4), np.uint8), 12, 3)


def test_code_bits_inference():
    from any4.pack import code_bits

    assert code_bits(4096, 1536, 8) == 3 and code_bits(4096, 1024, 4) == 2
    assert code_bits(4096, 2048, 16) == 4
    assert code_bits(4096, 2048, 8) == 4  # 3-bit table over nibbles (format-version 1 files)
    assert code_bits(3, 2, 4) == 4  # nibble-packed 2-bit codes, K=3: not mistaken for 3-bit
    with pytest.raises(ValueError, match="bytes per row"):
        code_bits(4096, 1000, 8)


def test_validate_knows_the_dense_layouts():
    from any4 import validate as V

    assert V.packed_shape(4096, 3) == V.packed_shape(4096, 3, "dense") == 1536
    assert V.packed_shape(4096, 2) == 1024 and V.packed_shape(4097, 4) == 2049
    assert V.packed_shape(4096, 3, "nibble") == 2048
    with pytest.raises(ValueError, match="unknown code layout"):
        V.packed_shape(64, 3, "planes")
    # pad bits past the K codes must be zero (K = 5 3-bit codes use 15 of 16 bits)
    packed = any4.pack(np.full((2, 5), 7, np.uint8), 3)
    V.check_codes(packed, 5, 8, 3)
    bad = packed.copy()
    bad[1, -1] |= 0x80
    with pytest.raises(ValueError, match="row 1: the pad bits"):
        V.check_codes(bad, 5, 8, 3)
    # a table shorter than the width: codes past it are found in the dense layout too
    codes = np.zeros((3, 10), np.uint8)
    codes[2, 7] = 3
    with pytest.raises(ValueError, match="row 2 holds code 3"):
        V.check_codes(any4.pack(codes, 2), 10, 3, 2)
    with pytest.raises(ValueError, match="row 2 holds code 3"):
        V.check_codes(torch.from_numpy(any4.pack(codes, 2)), 10, 3, 2)
    assert not V.codes_need_check(4096, 8, 3) and V.codes_need_check(4095, 8, 3)
    assert V.codes_need_check(4096, 8, 4)  # 3-bit table over nibbles: codes 8..15 possible
