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


def unpack_ref(packed, K: int) -> np.ndarray:
    """Nibble unpacking written independently of the C++ core."""
    p = to_f64(packed).astype(np.uint8) if not isinstance(packed, np.ndarray) else packed
    p = np.asarray(p, dtype=np.uint8)
    lo = p & 0xF
    hi = p >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(p.shape[0], -1)
    return codes[:, :K]


def dequant_ref(packed, lut, scales, K: int, group_size: int) -> np.ndarray:
    """float64 w[n,k] = lut[n, code] * scale[n, k//G] + zero[n, k//G]."""
    codes = unpack_ref(packed.cpu().numpy() if isinstance(packed, torch.Tensor) else packed, K)
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
