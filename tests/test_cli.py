"""The any4 command line on a tiny local model (fast), plus argument errors."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import byte_tokenizer, random_ids, tiny_llama  # noqa: E402

import any4  # noqa: E402
from any4.cli import main  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. Numbers: 1, 2, 3, 5, 8, 13.\n"
    "Une phrase en français, und ein deutscher Satz.\n"
) * 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_hf")
    tiny_llama(seed=1).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "quantize" in out and "eval" in out and "bench" in out and "verify" in out
    for cmd in ("quantize", "eval", "verify", "bench"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    assert main([]) == 2


def test_quantize_then_eval_saved_dir(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    calib = tmp_path / "calib.txt"
    calib.write_text("calibration text, with some words in it.\r\nSecond line.")
    rc = main(["quantize", str(model_dir), "--fmt", "any4", "--group-size", "32", "--out", str(out),
               "--calibration", str(calib), "--mode", "sequential"])  # fmt: skip
    assert rc == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    meta = json.loads((out / "any4.json").read_text())
    assert meta["settings"]["mode"] == "sequential" and meta["settings"]["calibration_tokens"] > 20
    loaded = any4.load(out)
    assert loaded.model.layers[0].mlp.up_proj.fmt == "any4"

    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    prefix = tmp_path / "saved_eval"
    rc = main(
        [
            "eval",
            str(out),
            "--text",
            str(text),
            "--seq-len",
            "64",
            "--max-tokens",
            "256",
            "--out",
            str(prefix),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "saved_eval.json").read_text())
    rows = result["rows"]
    assert len(rows) == 1 and rows[0]["fmt"] == "any4" and math.isfinite(rows[0]["ppl"])
    # the settings recorded in the checkpoint, not this command's defaults (one-pass, no text)
    info = result["info"]
    assert info["mode"] == "sequential" and info["group_size"] == 32
    assert (
        info["checkpoint_settings"]["calibration_tokens"] == meta["settings"]["calibration_tokens"]
    )
    out_text = capsys.readouterr().out
    assert "mode=sequential" in out_text and "% of the" in out_text
    _verify_and_refuse(out, text, tmp_path, capsys)


def _verify_and_refuse(out, text, tmp_path, capsys) -> None:
    """any4 verify prints the checkpoint hash; edited or incomplete folders are refused."""
    import os
    import shutil
    import stat

    from any4.integrity import checkpoint_digest

    for name in os.listdir(out):  # every file any4 wrote has normal permissions, no temporaries
        assert stat.S_IMODE(os.stat(out / name).st_mode) & 0o644 == 0o644, name
        assert not name.endswith(".any4-tmp"), name
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{checkpoint_digest(out)[0]}  {out}" in printed
    assert "ok model.safetensors sha256:" in printed

    evaluate = ["--text", str(text), "--seq-len", "64", "--max-tokens", "128", "--out", str(tmp_path / "e")]  # fmt: skip
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    data = bytearray((edited / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10
    (edited / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(edited)]) == 1
    assert main(["eval", str(edited), *evaluate]) == 1
    assert "digest" in capsys.readouterr().err

    # any4.json edited (a layer's group size): the readable copy no longer matches.
    shutil.copy(out / "model.safetensors", edited / "model.safetensors")
    meta = json.loads((edited / "any4.json").read_text())
    next(iter(meta["layers"].values()))["group_size"] = 16
    (edited / "any4.json").write_text(json.dumps(meta))
    assert main(["verify", str(edited)]) == 1
    assert "any4.json" in capsys.readouterr().err

    # Without any4.json the weights are still recognised as any4 (not evaluated as random).
    (edited / "any4.json").unlink()
    assert main(["eval", str(edited), *evaluate]) == 0
    # A folder with the config but no weights: refused, not random weights.
    empty = tmp_path / "config_only"
    empty.mkdir()
    shutil.copy(out / "config.json", empty / "config.json")
    for name in os.listdir(out):
        if name.startswith("tokenizer") or name.endswith(".txt"):
            shutil.copy(out / name, empty / name)
    capsys.readouterr()
    assert main(["eval", str(empty), *evaluate]) == 1
    assert main(["verify", str(empty)]) == 1
    assert "not an any4 checkpoint" in capsys.readouterr().err


def test_quantize_keeps_checkpoint_dtype_and_dtype_option(tmp_path, capsys) -> None:
    src = tmp_path / "bf16"
    tiny_llama(seed=2, dtype=torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    for option, expected in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        out = tmp_path / f"q{len(option)}"
        argv = ["quantize", str(src), "--fmt", "int4", "--group-size", "16", "--out", str(out)]
        assert main(argv + option + ["--max-shard-size", "40KB"]) == 0
        assert (out / "model.safetensors.index.json").is_file()
        loaded = any4.load(out)
        assert loaded.model.norm.weight.dtype == expected
        assert loaded.model.embed_tokens.weight.dtype == expected
        text = capsys.readouterr().out
        assert f"kept in {str(expected).replace('torch.', '')}" in text and "% of the" in text


def test_eval_formats_table(model_dir, tmp_path, capsys) -> None:
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    prefix = tmp_path / "table"
    rc = main(["eval", str(model_dir), "--fmt", "fp,int4,any4", "--group-size", "16,32", "--text", str(text),
               "--seq-len", "64", "--max-tokens", "192", "--out", str(prefix)])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "table.json").read_text())
    got = {(r["fmt"], r["group_size"]) for r in data["rows"]}
    assert got == {("fp", None), ("int4", 16), ("int4", 32), ("any4", 16), ("any4", 32)}
    assert data["info"]["windows"] == 3 and data["info"]["seq_len"] == 64
    assert all(math.isfinite(r["ppl"]) and r["tokens"] == 3 * 63 for r in data["rows"])
    assert (tmp_path / "table.png").stat().st_size > 1000
    md = (tmp_path / "table.md").read_text()
    assert "ppl G=16" in md and "ppl G=32" in md and "| any4 |" in md
    assert "KLD G=16" in md and "top-1 G=32" in md
    assert "| fp |" in capsys.readouterr().out
    by = {(r["fmt"], r["group_size"]): r for r in data["rows"]}
    assert abs(by["fp", None]["kld"]) < 1e-6 and by["fp", None]["top1"] == 1.0
    for key in [("int4", 16), ("int4", 32), ("any4", 16), ("any4", 32)]:
        assert 0 < by[key]["kld"] < 5 and 0 < by[key]["top1"] <= 1
    # coarser groups lose more of the float model's distribution
    assert by["int4", 32]["kld"] > by["int4", 16]["kld"]


def test_eval_windows_are_shared_and_fp_matches_direct(model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from any4.eval import make_windows, perplexity, token_ids

    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    prefix = tmp_path / "fp"
    args = [
        "eval",
        str(model_dir),
        "--fmt",
        "fp",
        "--text",
        str(text),
        "--seq-len",
        "64",
        "--max-tokens",
        "200",
    ]
    assert main([*args, "--out", str(prefix)]) == 0
    row = json.loads((tmp_path / "fp.json").read_text())["rows"][0]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = token_ids(TEXT, byte_tokenizer())
    assert make_windows(ids, 64).shape == (ids.numel() // 64, 64)
    windows = make_windows(ids, 64, 200)
    assert windows.shape == (3, 64) and torch.equal(windows.reshape(-1), ids[:192])
    direct = perplexity(model, windows, progress=False)
    assert row["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    # Reference: the mean next-token negative log-likelihood computed directly in float64.
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    assert direct["nll"] == pytest.approx(float(nll), rel=1e-5)


def test_errors(model_dir, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir), "--fmt", "int5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["eval", str(model_dir), "--group-size", "12"])
    assert main(["quantize", str(model_dir), "--fmt", "int5", "--out", str(tmp_path / "x")]) == 1
    assert "unknown format" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--fmt",
                "fp",
                "--text",
                str(short),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 1
    )
    assert "not enough" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.gguf")]) == 1


def test_bench_runs(capsys) -> None:
    assert main(["bench", "--shapes", "40x64", "--batch", "1,3", "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.count("40 x 64") == 2


def test_calibration_ids_tokenize_like_the_cli() -> None:
    # Sanity of the byte tokenizer used above: one token per byte.
    tok = byte_tokenizer()
    assert len(tok("héllo")["input_ids"]) == len("héllo".encode())
    assert random_ids(5).shape == (1, 5)


@pytest.mark.parametrize(
    "preset, import_torch_first, expected",
    [(None, False, "PASSIVE"), ("ACTIVE", False, "ACTIVE"), (None, True, None)],
)
def test_cli_quiets_openmp_before_torch(preset, import_torch_first, expected):
    """The CLI asks for sleeping OpenMP workers, unless the user chose or torch is loaded."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = (
        "import torch\n" if import_torch_first else ""
    ) + "import os, any4.cli\nany4.cli.quiet_openmp()\nprint(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)
