"""Loads the compiled extension with a clear error if the build is missing."""

from __future__ import annotations

try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "any4's compiled core (any4._C) could not be imported. Install the package with "
        "`pip install .` from the repository root (running from the source tree without "
        f"building does not work). Original error: {e}"
    ) from e

C = _C
