"""Run a patch right after a module is imported, without importing it ourselves.

``import dist_muonclip.hf`` patches transformers and accelerate, but must not import them: an
accelerate-only script would otherwise load transformers (seconds, and a package it never asked
for), and importing ``transformers.trainer`` from inside another transformers import can meet a
half-initialized module. :func:`when_imported` calls ``callback(module)`` now when the module is
already imported, else right after the import system has executed it (a meta-path finder that
wraps the module's own loader; the module keeps its real loader in ``__loader__`` /
``__spec__.loader``). The callback runs once and must only patch the module it is given and
modules that module has imported (nothing is half-initialized then). A failing import leaves the
hook in place for the next attempt.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any, Callable

__all__ = ["when_imported", "pending", "is_importable"]

_LOCK = threading.RLock()


def is_importable(name: str) -> bool:
    """Whether top-level package ``name`` is installed (found, not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _initializing(mod: ModuleType) -> bool:
    return bool(getattr(getattr(mod, "__spec__", None), "_initializing", False))


class _CallbackLoader(importlib.abc.Loader):
    """The module's own loader, then the callback."""

    def __init__(self, finder: "_PostImportFinder", loader: Any) -> None:
        self._finder = finder
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.fire(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` while hooks are pending; finds nothing itself: it asks the other
    finders and wraps the loader of the modules it watches."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.hooks:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(self, spec.loader)
        return spec

    def fire(self, module: ModuleType) -> None:
        with _LOCK:
            callback = self.hooks.pop(module.__name__, None)
            if not self.hooks and self in sys.meta_path:
                sys.meta_path.remove(self)
        if callback is not None:
            callback(module)


_FINDER = _PostImportFinder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """``callback(module)`` once module ``name`` is imported: now if it is (fully), else right after
    its import. A module caught mid-import is left to that import (its hook is set for a retry)."""
    mod = sys.modules.get(name)
    if mod is not None and not _initializing(mod):
        callback(mod)
        return
    with _LOCK:
        _FINDER.hooks[name] = callback
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def pending() -> list[str]:
    """Module names whose hook has not run yet."""
    with _LOCK:
        return sorted(_FINDER.hooks)
