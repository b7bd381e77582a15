"""bench/gpu_check.sh dry-runs on a machine without a GPU: every stage after preflight is
skipped cleanly, the summary is still written, nothing is built, exit status 2."""

import os
import pathlib
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
STAGES = (
    "build",
    "selfcheck",
    "smoke",
    "memcheck",
    "tests",
    "bench-quick",
    "bench-full",
    "initcheck",
)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_skips_every_stage_and_writes_the_summary(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    lines = summary.splitlines()
    assert any(line.startswith("preflight: ok") for line in lines), summary
    order = []
    for stage in STAGES:
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{stage}: SKIPPED (no GPU)")]
        assert len(hits) == 1, (stage, summary)
        order.append(hits[0])
    assert order == sorted(order)  # the documented stage order
    assert any(line.startswith("total: ") for line in lines)
    assert "===== summary" in r.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["summary.txt"], files  # nothing built or benchmarked
    assert len(files) <= 8
