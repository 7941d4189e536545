"""Triton kernels for dist_muonclip: Newton-Schulz orthogonalization and per-head max logits.

Importing this package never imports Triton: the launchers import it on first call, so a
CPU-only install without Triton can import everything (``triton_available()`` says whether the
kernels can run). One op per file, each with a torch reference in :mod:`.reference`.
"""
from __future__ import annotations

import functools

from ._env import interpret
from .attention_max import attention_forward_with_max_triton, attention_with_max_logits
from .max_logit import max_logits_triton
from .newton_schulz import gram_newton_schulz_triton, newton_schulz_triton

__all__ = [
    "attention_forward_with_max_triton",
    "attention_with_max_logits",
    "gram_newton_schulz_triton",
    "max_logits_triton",
    "newton_schulz_triton",
    "triton_available",
]


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
