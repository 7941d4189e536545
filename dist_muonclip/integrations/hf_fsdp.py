"""accelerate and HF Trainer with FSDP2 (``fsdp_version=2``) and MuonClip.

accelerate shards the model *after* the optimizer exists: ``Accelerator.prepare(model, optimizer)``
(and Trainer, which builds its optimizer on the unsharded model and then calls that prepare) runs
``fully_shard`` on the model and then ``fsdp2_switch_optimizer_parameters``, which replaces each
param group's ``params`` with the DTensor parameters (same group, same position). A MuonClip built
on the plain tensors would then see DTensors it has no layout for (``mixed torch.Tensor and
DTensor``). ``import dist_muonclip.hf`` wraps that function: after the swap,
:meth:`MuonClip.rebind_params` moves names, QK-Clip targets and Newton-Schulz splits to the DTensors
and rebuilds the layout from them (:func:`dist_muonclip.dtensor_layout.layout_from_params`), on
every rank, before the first step. State created eagerly by the FSDP2 layout then makes torch's
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (what accelerate's
``save_fsdp_optimizer`` / ``load_fsdp_optimizer`` and Trainer's FSDP checkpoints call) see the
same keys on every rank; ``param_groups`` hold only plain values (``ns_dtype`` as a name).

A MuonClip that has already stepped cannot follow a swap (its state belongs to the old tensors):
``rebind_params`` raises ``ValueError`` naming the fix.
"""
from __future__ import annotations

import functools
from typing import Any

from ..optimizer import MuonClip

__all__ = ["patch_accelerate", "rebind_after_switch"]


def rebind_after_switch(optimizer: Any) -> bool:
    """Call :meth:`MuonClip.rebind_params` on the MuonClip behind ``optimizer`` (accelerate's
    ``AcceleratedOptimizer`` or MuonClip itself); ``False`` for other optimizers."""
    from .hf import unwrap_optimizer

    inner = unwrap_optimizer(optimizer)
    return inner.rebind_params() if isinstance(inner, MuonClip) else False


def patch_accelerate() -> None:
    """Wrap accelerate's ``fsdp2_switch_optimizer_parameters`` (once: called by
    :func:`dist_muonclip.integrations.hf.install`)."""
    import accelerate.accelerator as acc_mod
    import accelerate.utils as acc_utils
    from accelerate.utils import fsdp_utils

    orig = fsdp_utils.fsdp2_switch_optimizer_parameters

    @functools.wraps(orig)
    def fsdp2_switch_optimizer_parameters(optimizer, mapping):
        orig(optimizer, mapping)
        rebind_after_switch(optimizer)

    # accelerator.py imported the name; patch every place it is looked up from
    for mod in (fsdp_utils, acc_utils, acc_mod):
        if getattr(mod, "fsdp2_switch_optimizer_parameters", None) is orig:
            mod.fsdp2_switch_optimizer_parameters = fsdp2_switch_optimizer_parameters
