"""The ``fsdp`` engine of ``launch/train.py``: FSDP2 (``fully_shard``) + MuonClip's Shard0 layout.

    torchrun --nproc_per_node=2 launch/train.py --fsdp --steps 20            # = --engine fsdp
    torchrun --nproc_per_node=2 launch/train.py --fsdp --fsdp-mixed-precision bf16 --save ckpt/

What it does: shards every decoder block and then the root with ``fully_shard`` on a 1-D mesh
over all ranks (:func:`dist_muonclip.fsdp.fully_shard_model`), hands MuonClip the Shard0 layout
and the mesh's process group (:meth:`FSDPEngine.optimizer_kwargs`), clips gradients on the
local shards with one all-reduce for the global norm, and checkpoints with
``torch.distributed.checkpoint`` (a directory per step, loadable at any world size).

train.py registers it as ``ENGINES["fsdp"]``, passes ``**engine.optimizer_kwargs()`` to
``MuonClip(...)``, and uses ``engine.save_checkpoint`` / ``engine.load_checkpoint`` instead of its
single-file checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["MIXED_PRECISION", "FSDPEngine"]

MIXED_PRECISION = ("none", "bf16")


class FSDPEngine:
    """FSDP2 engine. ``model.forward`` runs sharded (FSDP2 all-gathers per block); gradients are
    reduce-scattered (averaged) by FSDP2, so ``grad_reduction`` must be ``"external"``.

    Args:
        model: the (unwrapped) model, already on ``ctx.device``; sharded in place.
        ctx: train.py's ``DistContext`` (rank, world size, device, backend).
        mixed_precision: ``"bf16"``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
            (fp32 sharded parameters and optimizer state); ``"none"``: fp32 throughout.
        reshard_after_forward: FSDP2's option for the blocks (``False`` keeps parameters gathered
            between forward and backward: less communication, more memory).
    """

    name = "fsdp"

    def __init__(self, model: torch.nn.Module, ctx: Any, *, grad_reduction: str = "external",
                 mixed_precision: str = "none", reshard_after_forward: bool = True) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from dist_muonclip.fsdp import Shard0Layout, fully_shard_model

        if grad_reduction != "external":
            raise ValueError(f"--grad-reduction {grad_reduction!r} does not apply to the fsdp engine: FSDP2 "
                             "reduce-scatters gradients itself; use --grad-reduction external")
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={mixed_precision!r}: use one of {MIXED_PRECISION}")
        self.ctx = ctx
        self._own_group = False
        if not dist.is_initialized():
            # FSDP2 needs a process group even for one process: a private single-rank gloo group.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        self.mesh = init_device_mesh(ctx.device.type, (dist.get_world_size(),))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if mixed_precision == "bf16" else MixedPrecisionPolicy())
        self.module = fully_shard_model(model, self.mesh, policy, reshard_after_forward=reshard_after_forward)
        self.model = self.module
        self._layout = Shard0Layout(self.mesh)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments MuonClip needs for this engine (torch optimizers need none)."""
        return {"layout": self._layout, "process_group": self._layout.process_group}

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over the shards (one all-reduce), clipped to ``max_norm`` (0: no
        clipping). Same math as ``torch.nn.utils.clip_grad_norm_`` on the full gradients."""
        grads = [p.grad._local_tensor if hasattr(p.grad, "_local_tensor") else p.grad
                 for p in self.module.parameters() if p.grad is not None]
        device = grads[0].device if grads else self.ctx.device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            if g.numel():
                sq += g.float().square().sum()
        dist.all_reduce(sq, group=self._layout.process_group)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return norm

    # -- checkpoints (torch.distributed.checkpoint: one directory per step, any world size) ----
    def save_checkpoint(self, directory: str | os.PathLike, *, step: int, optimizer: torch.optim.Optimizer,
                        extra: dict[str, Any] | None = None) -> Path:
        """Write ``<directory>/step_<step>/`` with DCP (every rank writes its shards), crash-safe:
        DCP writes ``step_<step>.tmp/``, and once every rank is done rank 0 records the files'
        hashes in ``MANIFEST.json`` and renames the directory (:func:`checkpoint_files.publish_dir`)."""
        import torch.distributed.checkpoint as dcp

        from launch import checkpoint_files as ckpt_files

        group = self._layout.process_group
        path = Path(directory) / f"step_{step:07d}"
        tmp = ckpt_files.tmp_path(path)
        if dist.get_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt_files.clear_tmp(path)      # what a killed save left
        dist.barrier(group=group)
        dcp.save(self._state(optimizer, extra or {}, step), checkpoint_id=str(tmp))
        dist.barrier(group=group)           # every rank's shards are written
        ckpt_files.fault_point("save", step, dist.get_rank())
        if dist.get_rank() == 0:
            ckpt_files.publish_dir(tmp, path)
        dist.barrier(group=group)
        return path

    def load_checkpoint(self, path: str | os.PathLike, *, optimizer: torch.optim.Optimizer,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load a :meth:`save_checkpoint` directory (any world size: DCP reshards); returns
        ``{"step": int, "extra": dict}``. ``extra``: a template with the keys to read back (DCP
        loads only keys the template has); values stored by save must be identical on all ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        from dist_muonclip import fsdp

        state = self._state(optimizer, dict(extra or {}), 0)
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.module, state["model"])
        if _is_muonclip(optimizer):
            fsdp.set_optimizer_state_dict(self.module, optimizer, state["optim"])
        else:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(self.module, optimizer, state["optim"])
        return {"step": int(state["step"]), "extra": state.get("extra", {})}

    @staticmethod
    def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
        """A DCP checkpoint directory (verified against its manifest), or the newest complete
        ``step_*`` directory inside ``path`` (corrupt ones skipped with a warning), or None when
        ``path`` holds none yet (train.py then starts fresh)."""
        from launch import checkpoint_files as ckpt_files

        return ckpt_files.resolve(path, kind="dir", is_checkpoint=lambda p: (p / ".metadata").is_file())

    def _state(self, optimizer: torch.optim.Optimizer, extra: dict[str, Any], step: int) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from dist_muonclip import fsdp

        osd = (fsdp.get_optimizer_state_dict(self.module, optimizer) if _is_muonclip(optimizer)
               else get_optimizer_state_dict(self.module, optimizer))
        return {"model": get_model_state_dict(self.module), "optim": osd, "step": torch.tensor(step),
                "extra": extra}

    def close(self) -> None:
        """Destroy the private single-rank group, if this engine created one (barrier first)."""
        if self._own_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._own_group = False


def _is_muonclip(optimizer: Any) -> bool:
    from dist_muonclip.optimizer import MuonClip

    return isinstance(optimizer, MuonClip)
