"""any4's parallel loops on PyTorch's OpenMP team (any4.threads) and on its own pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import any4
from conftest import dequant_ref

needs_openmp = pytest.mark.skipif(
    not bool(getattr(torch._C, "has_openmp", False)), reason="torch built without OpenMP"
)


def run_fresh(code: str, **env) -> dict:
    """JSON printed by `python -c code` in a fresh process (no thread settings inherited)."""
    environ = {
        k: v for k, v in os.environ.items() if k not in ("ANY4_NUM_THREADS", "ANY4_PARALLEL")
    }
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
import torch, any4
b0 = any4.threads.parallel_backend()
torch.set_num_threads(1)
n1 = any4.get_num_threads()
torch.set_num_threads(2)
n2 = any4.get_num_threads()
any4.set_num_threads(3)
n3 = any4.get_num_threads()
torch.set_num_threads(1)
print(json.dumps({"backend": b0, "n1": n1, "n2": n2, "n3": n3, "after": any4.get_num_threads()}))
"""


def test_default_process_keeps_the_pool():
    r = run_fresh(PROBE)
    assert r["backend"] == "pool"
    assert (r["n3"], r["after"]) == (3, 3)


@needs_openmp
def test_env_shares_torch_openmp_team():
    r = run_fresh(PROBE, ANY4_PARALLEL="openmp")
    assert r["backend"].startswith("openmp:"), r
    lib = os.path.basename(r["backend"])
    assert any(lib.startswith(p) for p in ("libgomp", "libiomp", "libomp")), lib
    # Without any4.set_num_threads the count follows torch's; once set, it is any4's own.
    assert (r["n1"], r["n2"], r["n3"], r["after"]) == (1, 2, 3, 3), r


def test_passive_workers_keep_the_pool():
    r = run_fresh(PROBE, ANY4_PARALLEL="openmp", OMP_WAIT_POLICY="passive")
    assert r["backend"] == "pool"


@needs_openmp
def test_torch_imported_after_any4_is_picked_up_on_first_torch_call():
    code = """
import json, any4
b0 = any4.threads.parallel_backend()
import torch
any4.gemm(torch.randn(2, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(1, 16),
          torch.ones(4, 1, 2))
print(json.dumps({"before": b0, "after": any4.threads.parallel_backend()}))
"""
    r = run_fresh(code, ANY4_PARALLEL="openmp")
    assert r["before"] == "pool" and r["after"].startswith("openmp:"), r


def _backends():
    out = ["pool"]
    if any4.threads.use_torch_openmp(torch):
        out.append("openmp")
    return out


def _use(backend: str) -> None:
    if backend == "pool":
        any4.threads.use_thread_pool()
    else:
        assert any4.threads.use_torch_openmp(torch)


@pytest.fixture
def restore_backend():
    before = any4.threads.parallel_backend()
    yield
    if before == "pool":
        any4.threads.use_thread_pool()
    else:
        any4.threads.use_torch_openmp(torch)


@needs_openmp
def test_results_identical_on_both_backends(restore_backend):
    """Same chunks on either backend: bit-identical gemm and quantization, every thread count."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(203, 320, generator=g)
    x = torch.randn(13, 320, generator=g).to(torch.bfloat16)
    results = {}
    threads = any4.get_num_threads()
    try:
        for backend in _backends():
            _use(backend)
            assert any4.threads.parallel_backend().startswith(backend)
            for t in (1, 2, 3):
                any4.set_num_threads(t)
                qt = any4.quantize(w, "any4", group_size=64, n_init=1)
                y = any4.gemm(x, qt.packed, qt.lut, qt.scales)
                results[(backend, t)] = (qt.packed.clone(), qt.lut.clone(), y)
    finally:
        any4.set_num_threads(threads)
    assert len(results) == 6
    ref = results[("pool", 1)]
    ref_w = dequant_ref(ref[0], ref[1], qt.scales, 320, 64)
    assert np.isfinite(ref[2].float().numpy()).all() and ref_w.shape == (203, 320)
    for key, (packed, lut, y) in results.items():
        assert torch.equal(packed, ref[0]) and torch.equal(lut, ref[1]), key
        assert torch.equal(y, ref[2]), key


@needs_openmp
def test_errors_inside_openmp_region_are_raised(restore_backend):
    """A C++ exception thrown by a chunk on an OpenMP worker comes back as a Python error."""
    _use("openmp")
    N, K = 64, 256
    codes = torch.full((N, K), 15, dtype=torch.uint8)  # past a 4-entry table
    qt = any4.QuantizedTensor(
        any4.pack(codes), torch.zeros(1, 4), torch.ones(N, 2, 2), (N, K), "any2", 128
    )
    # The core's own check (codes past the table), raised inside its parallel loop; called
    # directly, below the Python checks that would catch it first.
    from any4._core import C

    lut, scales, w = qt.lut.contiguous(), qt.scales.contiguous(), torch.empty(N, K)
    with pytest.raises(ValueError, match="out of range"):
        C.dequantize(qt.packed.data_ptr(), N, K, lut.data_ptr(), 1, 4, scales.data_ptr(), 2, 128, 0,
                     w.data_ptr())  # fmt: skip
    # The team is still usable afterwards.
    x = torch.randn(3, K)
    good = any4.QuantizedTensor(
        any4.pack(codes), torch.arange(16.0)[None], torch.ones(N, 2, 2), (N, K), "any4", 128
    )
    y = any4.gemm(x, good.packed, good.lut, good.scales)
    torch.testing.assert_close(y, x.sum(-1, keepdim=True).expand(3, N) * 16.0)
