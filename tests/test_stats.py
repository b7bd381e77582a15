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


def _assert_same_stats(a: ChannelStats, b: ChannelStats) -> None:
    assert a.count == b.count
    for x, y in ((a.sum, b.sum), (a.sum_abs, b.sum_abs), (a.sum_sq, b.sum_sq)):
        np.testing.assert_array_equal(x, y)


def test_shared_sums_are_copied_not_aliased() -> None:
    """One batch's sums may feed several layers' statistics: later updates of one must not
    change another (add_sums keeps copies), and update == add_sums(*batch_sums(x))."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 9, generator=g), torch.randn(20, 9, generator=g)
    sums = stats.batch_sums(x)
    a, b, ref = ChannelStats(), ChannelStats(), ChannelStats()
    a.add_sums(*sums)
    b.add_sums(*sums)
    ref.update(x)
    _assert_same_stats(a, ref)
    a.update(y)
    _assert_same_stats(b, ref)  # b untouched by a's second batch
    ref.update(y)
    _assert_same_stats(a, ref)
    bad = stats.batch_sums(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="channel 1"):
        ChannelStats().add_sums(*bad)


class _Fan(torch.nn.Module):
    """q/k/v-style fan-out of one input, then a layer fed the same tensor after an in-place
    change (must not reuse the sums), then one fed a copy."""

    def __init__(self, k: int):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(k, 4) for _ in range(3))
        self.after_inplace = torch.nn.Linear(k, 4)
        self.copy = torch.nn.Linear(k, 4)

    def forward(self, x):
        out = self.q(x) + self.k(x) + self.v(x)
        x.mul_(3.0)
        out = out + self.after_inplace(x)
        return out + self.copy(x.clone())


@pytest.mark.parametrize("inference", [False, True])
def test_recorder_shares_one_reduction_per_input_tensor(inference) -> None:
    """Layers fed the very same tensor get bit-identical statistics to reducing it for each
    layer on its own; an in-place change in between, or another tensor, is reduced anew."""
    from any4.calibration import ActivationRecorder

    g = torch.Generator().manual_seed(2)
    K = 23
    model = _Fan(K)
    x = torch.randn(2, 300, K, generator=g)
    layers = dict(model.named_children())
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx, ActivationRecorder(layers) as rec:
        model(x.clone())
    want = ChannelStats()
    want.update(x)
    for name in ("q", "k", "v"):
        _assert_same_stats(rec.stats[name], want)
    tripled = ChannelStats()
    tripled.update(x * 3.0)
    _assert_same_stats(rec.stats["after_inplace"], tripled)
    _assert_same_stats(rec.stats["copy"], tripled)
    assert rec._last is None  # nothing kept after the context
