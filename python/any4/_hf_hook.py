"""Registers any4 with transformers as soon as transformers' quantizer registry is imported,
without importing transformers (seconds, and torch) on ``import any4`` (see ``any4.hf``).

``install()`` adds a finder to ``sys.meta_path`` that wraps the loader of
``transformers.quantizers.auto``: once that module has run, ``any4.hf`` is imported, which
registers ``Any4Config`` and ``Any4HfQuantizer``. When the registry is already imported, it
registers at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any, Optional

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        import any4.hf  # noqa: F401  (registers on import)
    except Exception as e:  # a broken or too-old transformers must not break it or any4
        warnings.warn(f"any4: could not register with transformers ({e})", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ... of the real loader
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[Any]:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
