"""MuonClip on FSDP2 (``torch.distributed.fsdp.fully_shard``) models: wrapping helpers, and the Shard0
layout and DCP state functions re-exported from the core :mod:`dist_muonclip.dtensor_layout`.

``MuonClip(model)`` on a sharded model reads the layout from its DTensor parameters (1-D FSDP mesh,
or HSDP's 2-D ``(Replicate(), Shard(0))`` mesh); :func:`make_muonclip` is the same plus eager state.

FSDP2 stores every parameter as a ``DTensor`` split on dim 0 over a 1-D device mesh, with
``torch.chunk`` semantics: ``R`` rows on ``W`` ranks give chunks of ``ceil(R / W)`` rows, the
last non-empty chunk shorter, trailing ranks empty when ``R < W`` (e.g. 3 rows on 4 ranks:
1, 1, 1, 0). FSDP2 pads its internal storage to equal chunks; ``DTensor._local_tensor`` is the
unpadded view of this rank's real rows, and gradients arrive reduce-scattered (averaged) as
``DTensor`` s with the same placement.

:class:`Shard0Layout` tells the MuonClip engine (DESIGN.md, "Layouts") which rows each rank
holds. A row shard ``[r0, r1)`` of a parameter whose rows have ``C`` elements is the flat range
``[r0 * C, r1 * C)`` of its row-major full tensor, so the engine treats it like any sharded
layout: momentum on local rows -> all-to-all of row shards to the owner -> Newton-Schulz on the
assembled matrix -> all-to-all of update rows back; AdamW on local rows; QK-Clip scales the held
rows. Nothing calls ``full_tensor()``.

Usage (one call; see also :func:`fully_shard_model` and :func:`make_muonclip`)::

    from dist_muonclip import fsdp
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = fsdp.fully_shard_model(model, mp_policy=policy)   # fully_shard per decoder block, then the root
    opt = fsdp.make_muonclip(model, lr=2e-2)

Checkpoints with ``torch.distributed.checkpoint`` (DCP), any world size on load::

    sd = {"model": get_model_state_dict(model), "optim": fsdp.get_optimizer_state_dict(model, opt)}
    dcp.save(sd, checkpoint_id=path)
    # later, any world size: build model + optimizer the same way, then
    sd = {"model": get_model_state_dict(model), "optim": fsdp.get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)          # reads into the (re-sharded) templates in place
    set_model_state_dict(model, sd["model"]); fsdp.set_optimizer_state_dict(model, opt, sd["optim"])
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import nn

from ..dtensor_layout import (STATE_FORMAT, Shard0Layout, get_optimizer_state_dict, init_state_, layout_from_params,
                              set_optimizer_state_dict, shard0_rows, torch_optimizer_state_dict)

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

    from ..optimizer import MuonClip

__all__ = [
    "STATE_FORMAT",
    "Shard0Layout",
    "find_blocks",
    "fully_shard_model",
    "get_optimizer_state_dict",
    "init_state_",
    "layout_from_params",
    "make_muonclip",
    "set_optimizer_state_dict",
    "shard0_rows",
    "torch_optimizer_state_dict",
]


# ------------------------------------------------------------------------------ wrapping
def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class is in a transformers model's
    ``_no_split_modules`` (decoder layers), else the items of every top-most ``nn.ModuleList``."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if blocks:
            return blocks
    blocks, inside = [], set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.ModuleList):
            for child in m:
                if any(True for _ in child.parameters()):
                    blocks.append(child)
            inside.update(id(x) for x in m.modules())
    return blocks


def fully_shard_model(model: nn.Module, mesh: DeviceMesh | None = None, mp_policy: Any = None, *,
                      reshard_after_forward: bool = True, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Apply FSDP2 the usual way: ``fully_shard`` on every block (see :func:`find_blocks`), then on
    the root (embeddings, final norm, head). Returns ``model`` (sharded in place).

    Args:
        mesh: 1-D device mesh (FSDP), or 2-D ``(replicate, shard)`` mesh (HSDP: ``fully_shard``
            places parameters ``(Replicate(), Shard(0))``); default: all ranks on a 1-D mesh,
            device type from the backend (NCCL -> cuda).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, e.g.
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``:
            fp32 sharded parameters and optimizer state, bf16 compute, fp32 gradient reduction.
        reshard_after_forward: passed to ``fully_shard`` for the blocks (the root keeps FSDP2's
            default).
        blocks: modules to shard individually instead of :func:`find_blocks`' choice.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fully_shard_model needs an initialized process group (torch.distributed."
                           "init_process_group, e.g. under torchrun)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim not in (1, 2):
        raise ValueError(f"fully_shard_model takes a 1-D mesh (FSDP) or a 2-D (replicate, shard) mesh (HSDP), got "
                         f"{mesh.ndim}-D {mesh}")
    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    blocks = find_blocks(model) if blocks is None else list(blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def make_muonclip(model: nn.Module, **kwargs: Any) -> MuonClip:
    """``MuonClip`` for a model sharded with ``fully_shard``: the Shard0 layout on the model's mesh, the mesh's
    process group, gradients reduced by FSDP2 (``grad_reduction="external"``). Optimizer state
    is created eagerly so DCP sees the same keys on every rank."""
    from ..optimizer import MuonClip

    mesh = next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)
    if mesh is None:
        raise ValueError("make_muonclip: the model has no DTensor parameters; shard it first with "
                         "dist_muonclip.fsdp.fully_shard_model(model) or torch's fully_shard")
    layout = kwargs.pop("layout", None) or Shard0Layout(mesh)
    kwargs.setdefault("process_group", layout.process_group)
    opt = MuonClip(model, layout=layout, **kwargs)
    init_state_(opt)
    return opt
