"""The README's test command and the one CI runs must stay the same."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = [ln.strip() for ln in readme.splitlines() if "pytest" in ln and ln.startswith("    ")]
    assert cmds, "README has no indented test command"
    assert cmds[0] in ci, f"CI does not run the README test command {cmds[0]!r}"
