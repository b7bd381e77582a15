"""ChannelStats: float64 sums accumulated over row chunks equal the whole-batch float64 sums."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from any4 import stats  # noqa: E402
from any4.stats import ChannelStats, channel_weight  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_sums_match_float64_reference(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    K = 37
    x = (torch.randn(3, 1000, K, generator=g) * torch.linspace(0.01, 30, K)).to(dtype)
    assert 3000 > stats.CHUNK_ELEMENTS // K  # several chunks
    s = ChannelStats()
    s.update(x[:2])
    s.update(x[2:])
    ref = x.double().reshape(-1, K).numpy()
    assert s.count == 3000
    for got, want in ((s.sum, ref.sum(0)), (s.sum_abs, np.abs(ref).sum(0)),
                      (s.sum_sq, (ref * ref).sum(0))):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    for weighting in ("mse", "abs_mean", "mean_abs", "rms"):
        w, _ = channel_weight(s, weighting)
        whole = ChannelStats(count=3000, sum=ref.sum(0), sum_abs=np.abs(ref).sum(0),
                             sum_sq=(ref * ref).sum(0))  # fmt: skip
        w_ref, _ = channel_weight(whole, weighting)
        np.testing.assert_allclose(w, w_ref, rtol=2e-7)
