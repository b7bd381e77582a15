"""Atomic file writes: every file any4 writes appears complete or not at all.

A write goes to a temporary file in the destination's own directory (so the final rename never
crosses file systems), is flushed and fsynced, gets the normal permissions of a new file
(0666 minus the umask, i.e. 0644 usually; ``tempfile.mkstemp`` would give 0600), and is renamed
over the destination with ``os.replace`` (atomic on POSIX and Windows); the directory is then
fsynced so the rename itself survives a power cut. Any exception removes the temporary file.

A process killed mid-write (SIGKILL, power loss) cannot clean up: its temporary is named
``.<name>.<host>.<pid>.<random>.any4-tmp`` and the next write into that directory removes the
temporaries left by dead processes of this host (:func:`remove_stale_temporaries`). Live
writers (other ranks of a distributed save) and other hosts' files are left alone.

Usage::

    with atomic_write(path) as fh:      # binary file object
        fh.write(data)
    write_text(path, text); write_json(path, obj); write_bytes(path, data)
    with scratch_directory(dst) as tmp:  # for third-party writers (tokenizer.save_pretrained)
        tokenizer.save_pretrained(tmp)
        publish_files(tmp, dst)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from typing import IO, Any, Union

TEMP_SUFFIX = ".any4-tmp"
PathLike = Union[str, os.PathLike]


def _host() -> str:
    # No dots in the host part: the name is split on dots to find the pid.
    return socket.gethostname().replace(".", "_") or "localhost"


def temporary_name(path: PathLike) -> str:
    """A fresh temporary path next to ``path`` (same directory; see the module docstring)."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    token = secrets.token_hex(4)
    return os.path.join(directory, f".{name}.{_host()}.{os.getpid()}.{token}{TEMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell: keep its file
    return True


def remove_stale_temporaries(directory: PathLike) -> list:
    """Remove temporaries of any4 writes in ``directory`` left by dead processes of this host.

    Returns the paths removed. Files of live processes and of other hosts are kept.
    """
    directory = os.fspath(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    host = _host()
    for name in names:
        if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
            continue
        parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        if _pid_alive(int(parts[2])):
            continue
        full = os.path.join(directory, name)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
            removed.append(full)
        except OSError:
            pass
    return removed


def fsync_directory(directory: PathLike) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where unsupported."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, *, durable: bool = True) -> Iterator[IO[bytes]]:
    """Context manager: a binary file object whose content replaces ``path`` on success.

    The destination directory is created if needed. On an exception inside the block the
    temporary is removed and ``path`` is untouched. ``durable=False`` skips the fsyncs (tests).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    tmp = temporary_name(path)
    # O_EXCL: never follow or reuse an existing name; mode 0o666 & ~umask: normal permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(directory)


def write_bytes(path: PathLike, data: Union[bytes, bytearray, memoryview]) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as fh:
        fh.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def scratch_directory(dst_dir: PathLike) -> Iterator[str]:
    """A temporary directory inside ``dst_dir`` (removed on exit, and by the next write into
    ``dst_dir`` if a kill left it): for third-party code that writes files non-atomically (e.g. a
    tokenizer's ``save_pretrained``). Publish its files with :func:`publish_files`."""
    dst_dir = os.fspath(dst_dir)
    os.makedirs(dst_dir, exist_ok=True)
    remove_stale_temporaries(dst_dir)
    path = temporary_name(os.path.join(dst_dir, "scratch"))
    os.mkdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish_files(src_dir: PathLike, dst_dir: PathLike) -> list:
    """Copy every regular file of ``src_dir`` into ``dst_dir``, each atomically
    (:func:`write_bytes`); returns the names published, sorted."""
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    published = []
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if not os.path.isfile(src) or os.path.islink(src):
            continue
        with open(src, "rb") as fh:
            data = fh.read()
        write_bytes(os.path.join(dst_dir, name), data)
        published.append(name)
    return published


__all__ = [
    "atomic_write",
    "fsync_directory",
    "publish_files",
    "remove_stale_temporaries",
    "scratch_directory",
    "temporary_name",
    "write_bytes",
    "write_json",
    "write_text",
]
