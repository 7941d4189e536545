"""Misuse check: MuonClip built in a multi-process job before the process group exists.

Core module (no integration imports) so that ``MuonClip.__init__`` can call
:func:`check_process_group`; :mod:`dist_muonclip.hf` re-exports it.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch.distributed as dist

__all__ = ["DistributedNotReadyWarning", "check_process_group"]


class DistributedNotReadyWarning(UserWarning):
    """MuonClip was built in a multi-process job before ``torch.distributed`` was initialized."""


def check_process_group(process_group: Any = None, *, env: dict[str, str] | None = None,
                        strict: bool = False) -> str | None:
    """Warn (``strict``: raise ``RuntimeError``) when ``WORLD_SIZE > 1`` but no process group exists.

    Such a MuonClip runs single-process on every rank: each rank orthogonalizes every matrix and,
    with QK-Clip, clips with its own max logits, so replicas drift apart. Meant to be called by
    ``MuonClip.__init__`` when ``process_group`` is None. Integrations that move the optimizer onto
    the group later (``dist_muonclip.deepspeed.initialize``, the hooks of ``dist_muonclip.hf``) repair it, so
    the default is a warning. Returns the message (``None``: nothing wrong).
    """
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if process_group is not None or world <= 1 or (dist.is_available() and dist.is_initialized()):
        return None
    msg = (f"MuonClip built with WORLD_SIZE={world} but torch.distributed is not initialized: it would run "
           "single-process on every rank (each rank orthogonalizes every matrix, QK-Clip uses per-rank max "
           "logits, replicas drift). Build it after the process group exists: after init_process_group, "
           "TrainingArguments(...) or Accelerator(); or let dist_muonclip.deepspeed.initialize / Trainer "
           "(with `import dist_muonclip.hf`) move it onto the group before the first step")
    if strict:
        raise RuntimeError(msg)
    warnings.warn(msg, DistributedNotReadyWarning, stacklevel=3)
    return msg
