"""Split-K scratch of the tensor-core gemm (python/any4/cuda.py SplitKScratch), without a GPU.

The scratch is allocated on CPU tensors here: what is tested is the policy -- one allocation per
(device, stream) at the bound, outside CUDA-graph capture, never reallocated (a captured graph
keeps its raw pointers), zeroed counters, per-call allocation for forced splits, and clear
errors -- and that the bound really covers every automatic plan (cuda/layout.cuh).
"""

import random

import pytest
import torch

from any4.cuda import SplitKScratch
from any4.pack_gpu import tc_plan, tc_scratch_bound

BOUND = (10_000, 300)


def get(scratch, key=(0, 7), floats=100, counters=10, **kw):
    args = dict(forced=False, capturing=False, bound=lambda: BOUND)
    args.update(kw)
    return scratch.get(key, "cpu", floats, counters, **args)


def test_allocated_once_at_the_bound_and_never_regrown():
    s = SplitKScratch()
    syncs = []
    ws, ctr = get(s, synchronize=lambda: syncs.append(1))
    assert ws.numel() == BOUND[0] and ctr.numel() == BOUND[1] and ws.dtype == torch.float32
    assert ctr.dtype == torch.int32 and not ctr.any() and syncs == [1]
    ptrs = (ws.data_ptr(), ctr.data_ptr())
    for floats, counters in ((1, 1), (BOUND[0], BOUND[1]), (5000, 299)):  # a larger call
        ws2, ctr2 = get(s, floats=floats, counters=counters, synchronize=lambda: syncs.append(1))
        assert (ws2.data_ptr(), ctr2.data_ptr()) == ptrs
    assert syncs == [1]  # zeroed and synchronised once


def test_capture_reuses_scratch_made_before_it():
    s = SplitKScratch()
    ws, ctr = get(s)
    ws2, ctr2 = get(s, capturing=True, floats=BOUND[0])
    assert ws2 is ws and ctr2 is ctr


def test_capture_without_scratch_raises_clearly():
    s = SplitKScratch()
    get(s, key=(0, 1))  # another stream's scratch does not count
    with pytest.raises(RuntimeError, match="capture.*reserve_scratch"):
        get(s, key=(0, 2), capturing=True)
    with pytest.raises(RuntimeError, match="capture"):
        get(s, key=(1, 1), capturing=True)  # same stream handle, other device


def test_streams_and_devices_get_their_own_scratch():
    s = SplitKScratch()
    a = get(s, key=(0, 1))
    b = get(s, key=(0, 2))
    c = get(s, key=(1, 1))
    ptrs = {t[0].data_ptr() for t in (a, b, c)}
    assert len(ptrs) == 3


def test_forced_splits_get_a_fresh_pair_sized_to_the_plan():
    s = SplitKScratch()
    shared = get(s)
    for capturing in (False, True):
        ws, ctr = get(s, floats=123_456, counters=4567, forced=True, capturing=capturing)
        assert ws.numel() == 123_456 and ctr.numel() == 4567 and not ctr.any()
        assert ws.data_ptr() != shared[0].data_ptr()


def test_plan_above_the_bound_is_an_error():
    s = SplitKScratch()
    with pytest.raises(RuntimeError, match="bound"):
        get(s, floats=BOUND[0] + 1)
    with pytest.raises(RuntimeError, match="bound"):
        get(s, counters=BOUND[1] + 1)


def test_clear_drops_every_stream():
    s = SplitKScratch()
    get(s)
    s.clear()
    with pytest.raises(RuntimeError, match="capture"):
        get(s, capturing=True)


@pytest.mark.parametrize("num_sms,bps", [(108, 3), (132, 2), (132, 6), (16, 1), (1, 1)])
def test_bound_covers_every_automatic_plan(num_sms, bps):
    """Random shapes: the automatic split-K plan (any waves, any blocks_per_sm up to the bound's)
    never needs more scratch than tc_scratch_bound."""
    floats_bound, counters_bound = tc_scratch_bound(num_sms, bps)
    r = random.Random(num_sms * 100 + bps)
    shapes = [(1, 16, 64), (16, 16, 64 * 4096), (9, 64, 8192), (64, 4096, 4096)]
    shapes += [(r.randint(1, 80), r.randint(1, 5000), r.randint(1, 40000)) for _ in range(300)]
    for M, N, K in shapes:
        for plan_bps in range(1, bps + 1):
            for waves in (1, 2):
                p = tc_plan(M, N, K, num_sms, plan_bps, 0, waves)
                assert p["workspace_floats"] <= floats_bound, (M, N, K, plan_bps, waves)
                assert p["counters"] <= counters_bound, (M, N, K, plan_bps, waves)
    # forced splits may exceed it (they are allocated per call)
    assert tc_plan(1, 64, 64 * 4096, num_sms, bps, 4096)["workspace_floats"] > floats_bound
