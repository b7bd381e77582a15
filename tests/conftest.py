"""Shared test helpers: independent float64 references (numpy only, no any4 code)."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


def to_f64(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def unpack_ref(packed, K: int, bits: int = 4) -> np.ndarray:
    """Bit-stream unpacking written independently of the C++ core: code k of a row is bits
    [bits*k, bits*k + bits) of the row's bytes read least significant bit first."""
    p = to_f64(packed).astype(np.uint8) if not isinstance(packed, np.ndarray) else packed
    p = np.asarray(p, dtype=np.uint8)
    assert p.shape[1] == (bits * K + 7) // 8, (p.shape, K, bits)
    stream = np.unpackbits(p, axis=1, bitorder="little")[:, : bits * K]
    planes = stream.reshape(p.shape[0], K, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=-1)


def ref_bits(packed, lut, K: int) -> int:
    """Code width of a packed weight: the table's natural width (16 entries: 4, 8: 3, 4: 2) if
    the rows have its size, else nibbles."""
    L = int(lut.shape[-1])
    natural = 2 if L <= 4 else 3 if L <= 8 else 4
    return natural if int(packed.shape[1]) == (natural * K + 7) // 8 else 4


def dequant_ref(packed, lut, scales, K: int, group_size: int) -> np.ndarray:
    """float64 w[n,k] = lut[n, code] * scale[n, k//G] + zero[n, k//G]."""
    p = packed.cpu().numpy() if isinstance(packed, torch.Tensor) else packed
    codes = unpack_ref(p, K, ref_bits(p, lut, K))
    lut64 = to_f64(lut)
    if lut64.ndim == 1:
        lut64 = lut64[None]
    sc = to_f64(scales)
    N = codes.shape[0]
    rows = np.arange(N)[:, None] if lut64.shape[0] == N else np.zeros((N, 1), dtype=int)
    vals = lut64[rows, codes]
    g = np.arange(K) // group_size
    return vals * sc[:, g, 0] + sc[:, g, 1]


def rel_err(y, ref) -> float:
    y64, r64 = to_f64(y), to_f64(ref)
    assert np.isfinite(y64).all(), "output contains NaN/Inf"
    den = np.linalg.norm(r64)
    return float(np.linalg.norm(y64 - r64) / (den if den > 0 else 1.0))


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every run (hash() of strings is salted
    per process unless PYTHONHASHSEED is set, so a failure seeded with it cannot be replayed)."""
    return zlib.crc32(repr(parts).encode()) % 2**31


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def output_per_isa(code: str) -> set:
    """Distinct stdout of `python -c code` run once per CPU build (ANY4_KMEANS_ISA caps the
    k-means and re-assignment kernels); one element when every build agrees bit for bit."""
    outputs = set()
    for isa in ("portable", "avx2", "avx512"):
        env = dict(os.environ, ANY4_KMEANS_ISA=isa)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        outputs.add(out.stdout.strip())
    return outputs
