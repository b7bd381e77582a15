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


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python3 on a GPU machine: logs each call, answers like the real tools would.
echo "python $* | PIP_NO_INDEX=${PIP_NO_INDEX:-} PYTHONHASHSEED=${PYTHONHASHSEED:-} CACHING=${PYTORCH_NO_CUDA_MEMORY_CACHING:-}" >>"$FAKE_LOG"
case "$1" in
  -) cat >/dev/null; echo "torch 2.11 cuda 13.0 NVIDIA H200"; echo "preflight-vars gpu=1 cap=90 timeout=1" ;;
  -m) case "$2" in
        pip) echo "Successfully installed any4" ;;
        pytest) echo "tests/test_gemm_cuda.py::test_x PASSED"; echo "== 5 passed in 1.0s ==" ;;
      esac ;;
  -c) case "$2" in
        *cuda_available*) [ "$FAKE_BUILD_OK" = 1 ] || exit 1; echo "{'cuda_compiled': True}" ;;
        *) echo "build_info {'cuda_compiled': $([ "$FAKE_BUILD_OK" = 1 ] && echo True || echo False)}" ;;
      esac ;;
  bench/gemm_cuda_bench.py)
    out=$(echo "$*" | sed -n "s/.*--out \([^ ]*\).*/\1/p")
    echo '{"records": []}' >"$out/gemm_cuda_bench.json"; echo "| shape |" >"$out/gemm_cuda_bench.md" ;;
  bench/gpu_sanitize_case.py) echo "ok tc bfloat16 ..."; echo "all ok" ;;
esac
exit 0
"""

FAKE_SANITIZER = r"""#!/usr/bin/env bash
echo "sanitizer $* | CACHING=${PYTORCH_NO_CUDA_MEMORY_CACHING:-}" >>"$FAKE_LOG"
if [ "$1" = --help ]; then echo "  --kernel-name arg"; exit 0; fi
if [ "$1" = --version ]; then echo "Version 2025.3.1"; exit 0; fi
while [ $# -gt 0 ] && [ "$1" != "$FAKE_PYTHON" ]; do shift; done
"$@" && echo "========= ERROR SUMMARY: 0 errors"
"""

FAKE_NVCC = r"""#!/usr/bin/env bash
echo "nvcc $*" >>"$FAKE_LOG"
if [ "$1" = --version ]; then echo "Cuda compilation tools, release 13.0"; exit 0; fi
out=$(echo "$*" | sed -n "s/.* -o \([^ ]*\).*/\1/p")
printf '#!/usr/bin/env bash\necho "ok M=1 N=64 K=4096 (fake selfcheck)"\n' >"$out"
chmod +x "$out"
"""


def fake_gpu_machine(tmp_path, build_ok):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("python3", FAKE_PYTHON),
        ("compute-sanitizer", FAKE_SANITIZER),
        ("nvcc", FAKE_NVCC),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    log = tmp_path / "calls.log"
    env = dict(
        os.environ,
        OUT=str(out),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=str(bin_dir / "python3"),
        FAKE_PYTHON=str(bin_dir / "python3"),
        FAKE_LOG=str(log),
        FAKE_BUILD_OK="1" if build_ok else "0",
    )
    env.pop("GPU_CHECK_DRY_RUN", None)
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    return r, out, log.read_text()


def summary_verdicts(out):
    verdicts = {}
    for line in (out / "summary.txt").read_text().splitlines():
        name, _, rest = line.partition(": ")
        if name in STAGES or name == "preflight":
            verdicts.setdefault(name, rest)
    return verdicts


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_stages_on_a_fake_gpu_machine(tmp_path):
    """The script's plumbing with every tool faked: stage order, options, files, exit status."""
    r, out, calls = fake_gpu_machine(tmp_path, build_ok=True)
    assert r.returncode == 0, r.stdout + r.stderr
    v = summary_verdicts(out)
    for stage in ("build", "smoke", "memcheck", "tests", "bench-quick", "bench-full", "initcheck"):
        assert v[stage].startswith("ok ("), (stage, v)
    assert v["selfcheck"].startswith("SKIPPED (the Python build works)")
    lines = calls.splitlines()

    def first(pattern):
        return next(i for i, line in enumerate(lines) if pattern in line)

    pip = lines[first("-m pip install")]
    assert "PIP_NO_INDEX=1" in pip and "CMAKE_CUDA_ARCHITECTURES=90-real" in pip
    pytest_call = lines[first("-m pytest")]
    for opt in ("-v", "-m gpu", "--timeout 90", "PYTHONHASHSEED=0", "tests/test_gemm_cuda.py"):
        assert opt in pytest_call, (opt, pytest_call)
    memcheck = lines[first("--tool memcheck")]
    initcheck = lines[first("--tool initcheck")]
    for call in (memcheck, initcheck):
        assert "CACHING=1" in call and "--print-limit" in call and "--kernel-name kns=any4" in call
        assert "racecheck" not in calls
    order = [
        first("-m pip install"),
        first("gpu_sanitize_case.py --smoke"),
        first("--tool memcheck"),
        first("-m pytest"),
        first("--quick"),
        first("--merge"),
        first("--tool initcheck"),
    ]
    assert order == sorted(order), order
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "summary.txt" in files and "gemm_cuda_bench.json" in files, files


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_failed_build_falls_back_to_the_nvcc_selfcheck(tmp_path):
    r, out, calls = fake_gpu_machine(tmp_path, build_ok=False)
    assert r.returncode == 1, r.stdout + r.stderr
    v = summary_verdicts(out)
    assert v["build"].startswith("FAILED") and v["selfcheck"].startswith("ok ("), v
    nvcc = next(line for line in calls.splitlines() if line.startswith("nvcc -std"))
    assert "-arch=sm_90" in nvcc and "bench/gpu_selfcheck.cpp" in nvcc and "cuda/" in nvcc
    for stage in ("smoke", "memcheck", "tests", "bench-quick", "bench-full", "initcheck"):
        assert v[stage] == "SKIPPED (no Python build)", (stage, v)
    summary = (out / "summary.txt").read_text()
    assert "selfcheck: ok M=1" in summary and "selfcheck: =====" not in summary
    assert len(list(out.iterdir())) <= 8
