"""any4.atomic: complete-or-absent files, normal permissions, no temporaries left behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from any4 import atomic


def _temporaries(directory) -> list:
    return sorted(n for n in os.listdir(directory) if n.endswith(atomic.TEMP_SUFFIX))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_replaces_and_has_normal_permissions(tmp_path) -> None:
    path = tmp_path / "sub" / "a.json"
    atomic.write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    atomic.write_text(path, "second")
    assert path.read_text() == "second"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()
    assert _temporaries(path.parent) == []


def test_exception_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "model.bin"
    atomic.write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_write(path) as fh:
            fh.write(b"partial new content")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert _temporaries(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(tmp_path / "never") as fh:
            fh.write(b"x")
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path) -> None:
    path = tmp_path / "big.bin"
    code = textwrap.dedent(
        f"""
        import sys
        from any4 import atomic
        with atomic.atomic_write({str(path)!r}) as fh:
            fh.write(b"x" * 100000)
            fh.flush()
            print("written", flush=True)
            sys.stdin.read()  # wait to be killed
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "written"
        left = _temporaries(tmp_path)
        assert len(left) == 1 and str(p.pid) in left[0]
        # The writer is alive: another write into the directory must not touch its file.
        atomic.write_bytes(tmp_path / "other.bin", b"y")
        assert _temporaries(tmp_path) == left
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert not path.exists()
    assert _temporaries(tmp_path) == left  # a kill cannot clean up
    atomic.write_bytes(path, b"fresh")  # the next save removes the dead writer's temporary
    assert _temporaries(tmp_path) == []
    assert path.read_bytes() == b"fresh"


def test_other_hosts_temporaries_are_kept(tmp_path) -> None:
    foreign = tmp_path / f".a.bin.otherhost.1.abcd{atomic.TEMP_SUFFIX}"
    foreign.write_bytes(b"")
    atomic.write_bytes(tmp_path / "a.bin", b"z")
    assert foreign.exists()


def test_scratch_directory_and_publish(tmp_path) -> None:
    with atomic.scratch_directory(tmp_path) as scratch:
        assert os.path.dirname(scratch) == str(tmp_path)
        (open(os.path.join(scratch, "tok.json"), "w")).close()
        with open(os.path.join(scratch, "vocab.txt"), "w") as fh:
            fh.write("a b")
        assert atomic.publish_files(scratch, tmp_path) == ["tok.json", "vocab.txt"]
    assert sorted(os.listdir(tmp_path)) == ["tok.json", "vocab.txt"]
    assert (tmp_path / "vocab.txt").read_text() == "a b"
    assert stat.S_IMODE(os.stat(tmp_path / "vocab.txt").st_mode) == 0o666 & ~_umask()
