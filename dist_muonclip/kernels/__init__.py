"""Triton kernels for dist_muonclip: Newton-Schulz orthogonalization and per-head max logits.

Importing this package never imports Triton. Each op lives in its own module, which imports
Triton and defines its kernels at module level; the package imports such a module on the first
use of one of its names (PEP 562 ``__getattr__``), so a CPU-only install without Triton imports
everything else (``triton_available()`` says whether the kernels can run). A name used without
Triton raises ImportError naming the fix. Torch references live in :mod:`.reference`.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

from ._env import interpret

__all__ = [
    "apply_update_triton",
    "attention_forward_with_max_triton",
    "attention_with_max_logits",
    "gram_newton_schulz_triton",
    "max_logits_triton",
    "momentum_nesterov_triton",
    "newton_schulz_triton",
    "triton_available",
]

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "apply_update_triton": "elementwise",
    "momentum_nesterov_triton": "elementwise",
    "attention_forward_with_max_triton": "attention_max",
    "attention_with_max_logits": "attention_max",
    "max_logits_triton": "max_logit",
    "gram_newton_schulz_triton": "newton_schulz",
    "newton_schulz_triton": "newton_schulz",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _triton_importable():
        raise ImportError(
            f"dist_muonclip.kernels.{name} needs Triton, which is not importable here; install triton "
            "(pip install triton) or use the torch backends (newton_schulz backend='torch', tracker backend='torch')")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def triton_available(device: "str | None" = None) -> bool:
    """True when the Triton kernels can run: Triton is installed and either a CUDA device is
    present or ``TRITON_INTERPRET=1`` is set (CPU interpreter, for tests)."""
    # Device first: on a CPU-only process this never imports triton (importing it outside
    # interpreter mode would pin its jit'd standard library to compiled mode for the process).
    if not interpret():
        import torch

        if not (torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))):
            return False
    return _triton_importable()


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
