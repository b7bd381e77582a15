"""KL divergence and top-1 agreement against the float model (any4.metrics, any4.eval)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from any4.eval import perplexity  # noqa: E402
from any4.metrics import Reference, compare, kl_divergence, reference_topk  # noqa: E402


def _one_hot_shift_kld(logits: torch.Tensor, j: int, delta: float) -> torch.Tensor:
    """Closed form of KL(softmax(a) || softmax(a + delta e_j)) = log(1 + p_j (e^d - 1)) - d p_j."""
    p = torch.softmax(logits.double(), -1)[:, j]
    return torch.log1p(p * math.expm1(delta)) - delta * p


@pytest.mark.parametrize("top_k", [7, 64, 1000])
def test_self_kld_is_zero_and_agreement_one(top_k) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(33, 101, generator=g) * 3
    kld, same = compare(logits, *reference_topk(logits, top_k))
    assert kld.shape == (33,) and same.dtype == torch.bool
    assert kld.abs().max() < 1e-6
    assert bool(same.all())


@pytest.mark.parametrize("top_k", [5, 101])
def test_shift_of_a_top_token_gives_the_analytic_kld(top_k) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 101, generator=g, dtype=torch.float64) * 2
    j = int(torch.topk(logits.sum(0), 1).indices)  # usually inside every row's top-5
    delta = 1.7
    q = logits.clone()
    q[:, j] += delta
    expected = _one_hot_shift_kld(logits, j, delta)
    kld, _ = compare(q, *reference_topk(logits, top_k))
    exact = kl_divergence(torch.log_softmax(logits.double(), -1), torch.log_softmax(q.double(), -1))
    torch.testing.assert_close(exact, expected, rtol=1e-9, atol=1e-12)
    idx = reference_topk(logits, top_k)[0]
    inside = (idx == j).any(1)
    # the tail of Q is proportional to the tail of P wherever j is in the top-k: exact there
    torch.testing.assert_close(kld[inside], expected[inside], rtol=1e-5, atol=1e-7)
    # elsewhere the tail-lumped KLD (no tail samples) is a lower bound of the full one
    lumped, _ = compare(q, *reference_topk(logits, top_k, tail_samples=0))
    torch.testing.assert_close(lumped[inside], expected[inside], rtol=1e-5, atol=1e-7)
    assert bool((lumped[~inside] <= expected[~inside] + 1e-7).all())
    if top_k == 101:
        assert bool(inside.all())


def test_tail_lumping_is_a_lower_bound_and_exact_at_full_vocab() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.randn(25, 60, generator=g) * 2
    q = p + 0.5 * torch.randn(25, 60, generator=g)
    exact = kl_divergence(torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1))
    prev = None
    for k in (1, 4, 16, 59, 60):
        kld, _ = compare(q, *reference_topk(p, k, tail_samples=0))
        assert bool((kld <= exact + 1e-6).all())
        if prev is not None:  # a larger k never loses information
            assert float(kld.sum()) >= prev - 1e-6
        prev = float(kld.sum())
    torch.testing.assert_close(kld, exact, rtol=1e-5, atol=1e-6)


def test_sampled_tail_estimates_the_full_kld() -> None:
    g = torch.Generator().manual_seed(5)
    p = torch.randn(200, 300, generator=g, dtype=torch.float64) * 1.5
    q = p + 0.4 * torch.randn(200, 300, generator=g, dtype=torch.float64)
    exact = kl_divergence(torch.log_softmax(p, -1), torch.log_softmax(q, -1))
    lumped, _ = compare(q, *reference_topk(p, 8, tail_samples=0))
    assert float(lumped.mean()) < 0.8 * float(exact.mean())  # the tail matters here
    # standard error of the Monte-Carlo mean, from the exact tail distributions
    logp, logq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    idx = reference_topk(p, 8)[0].long()
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(1, idx, True)
    lp_t = torch.where(in_top, float("-inf"), logp)
    lq_t = torch.where(in_top, float("-inf"), logq)
    lp_t = lp_t - torch.logsumexp(lp_t, 1, keepdim=True)
    lq_t = lq_t - torch.logsumexp(lq_t, 1, keepdim=True)
    pt = torch.exp(lp_t)
    r = torch.where(in_top, 0.0, lp_t - lq_t)
    var = (pt * r * r).sum(1) - (pt * r).sum(1) ** 2
    p_tail = 1 - torch.exp(logp).mul(in_top).sum(1)
    samples = 64
    se = float(torch.sqrt((p_tail**2 * var).sum() / samples) / p.shape[0])
    est = []
    for seed in range(4):
        kld, _ = compare(q, *reference_topk(p, 8, tail_samples=samples, seed=seed))
        est.append(float(kld.mean()))
    err = torch.tensor(est) - float(exact.mean())
    assert float(err.abs().max()) < 4 * se, (err, se)
    assert se < 0.05 * float(exact.mean())  # the check above is tight enough to mean something
    assert len(set(est)) == 4  # different seeds, different samples
    again, _ = compare(q, *reference_topk(p, 8, tail_samples=64, seed=3))
    assert float(again.mean()) == est[3]  # seeded: reproducible


def test_top1_agreement_counts_argmax_matches() -> None:
    p = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0]])
    q = torch.tensor([[2.0, 1.0, 0.0], [3.0, 2.0, 1.0], [1.0, 0.0, 5.0]])
    _, same = compare(q, *reference_topk(p, 2))
    assert same.tolist() == [True, False, True]


def test_compare_rejects_mismatched_shapes() -> None:
    logits = torch.randn(4, 10)
    ref = reference_topk(logits, 3)
    with pytest.raises(ValueError):
        compare(torch.randn(5, 10), *ref)
    with pytest.raises(ValueError):
        reference_topk(torch.randn(10), 3)
    with pytest.raises(ValueError):
        reference_topk(logits, 0)
    with pytest.raises(ValueError):
        reference_topk(logits, 3, tail_samples=-1)
    idx, lp, tail, sid, slp = ref
    with pytest.raises(ValueError):
        compare(logits, idx, lp, tail, sid, slp[:, :1])


class _FixedLogits(torch.nn.Module):
    """A 'causal LM' whose logits are a fixed function of the token ids (plus an offset)."""

    def __init__(self, vocab: int, shift: float = 0.0, j: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.shift, self.j = shift, j

    def forward(self, input_ids, use_cache=False):
        logits = self.table[input_ids].clone()
        logits[..., self.j] += self.shift
        return (logits,)


def test_perplexity_reports_kld_and_top1_against_a_recorded_reference() -> None:
    vocab = 23
    windows = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(4))
    base = _FixedLogits(vocab)
    ref = Reference(top_k=vocab)
    r0 = perplexity(base, windows, progress=False, record=ref, reference=ref)
    assert len(ref) == 3 and ref.indices[0].shape == (16, vocab)
    assert abs(r0["kld"]) < 1e-6 and r0["top1"] == 1.0
    delta, j = 3.0, 5
    shifted = _FixedLogits(vocab, delta, j)
    r1 = perplexity(shifted, windows, progress=False, reference=ref, batch_size=2)
    ctx = windows[:, :-1].reshape(-1)
    expected = _one_hot_shift_kld(base.table.detach()[ctx], j, delta).mean()
    assert r1["kld"] == pytest.approx(float(expected), rel=1e-5)
    agree = (base.table[ctx].argmax(1) == shifted(ctx[None])[0][0].argmax(1)).double().mean()
    assert r1["top1"] == pytest.approx(float(agree))
    assert r1["top1"] < 1.0  # the shift moves some argmaxes (else the test shows nothing)
    with pytest.raises(ValueError):
        perplexity(shifted, windows[:2], progress=False, reference=ref)


def test_cli_default_top_k_matches_the_library() -> None:
    from any4 import cli, metrics

    assert cli.DEFAULT_KLD_TOP_K == metrics.DEFAULT_TOP_K


def test_evaluate_formats_scores_the_float_model_once_for_the_reference() -> None:
    pytest.importorskip("transformers")
    from _tiny import tiny_llama

    from any4.eval import evaluate_formats

    model = tiny_llama(seed=2)
    windows = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(8))
    ref = Reference(top_k=16, tail_samples=8)
    rows = evaluate_formats(model, windows, ["int4"], [16], progress=False, reference=ref)
    assert len(ref) == 2 and [r["fmt"] for r in rows] == ["int4"]  # no fp row was asked for
    assert rows[0]["kld"] > 0 and 0 < rows[0]["top1"] <= 1
    again = evaluate_formats(model, windows, ["fp", "int4"], [16], progress=False, reference=ref)
    assert len(ref) == 2  # reused, not recorded again
    assert abs(again[0]["kld"]) < 1e-6 and again[0]["top1"] == 1.0
    assert again[1]["kld"] == pytest.approx(rows[0]["kld"], rel=1e-9)
    off = evaluate_formats(model, windows, ["int4"], [16], progress=False, kld_top_k=None)
    assert off[0]["kld"] is None and off[0]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-9)
