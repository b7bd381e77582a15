"""Loads the compiled extension with a clear error if the build is missing."""

from __future__ import annotations

import os

MAX_THREADS = 1024  # the core's kMaxThreads (cpp/parallel.h)


def check_thread_count(n: object, what: str = "number of threads") -> int:
    """An int thread count in [1, MAX_THREADS] (ValueError/TypeError otherwise)."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            import numpy as np

            if not isinstance(n, np.integer):
                raise TypeError
        except TypeError:
            raise TypeError(f"{what} must be an int, got {type(n).__name__}") from None
    if not 1 <= int(n) <= MAX_THREADS:
        raise ValueError(f"{what} must be in [1, {MAX_THREADS}], got {n}")
    return int(n)


_env = os.environ.get("ANY4_NUM_THREADS")
if _env is not None and _env.strip():
    try:
        _value = int(_env)
    except ValueError:
        raise ValueError(f"ANY4_NUM_THREADS={_env!r} is not an integer") from None
    check_thread_count(_value, "ANY4_NUM_THREADS")

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "any4's compiled core (any4._C) could not be imported. Install the package with "
        "`pip install .` from the repository root (running from the source tree without "
        f"building does not work). Original error: {e}"
    ) from e

C = _C
