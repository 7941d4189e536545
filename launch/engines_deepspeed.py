"""The ``deepspeed`` engine of ``launch/train.py``: a DeepSpeed JSON config drives the run.

    deepspeed --num_gpus 8 launch/train.py --deepspeed_config configs/zero2_bf16.json --steps 1000
    torchrun --nproc_per_node=2 launch/train.py --deepspeed_config configs/zero1.json --steps 20
    python launch/train.py --deepspeed_config configs/zero0.json --optimizer adamw   # AdamW baseline

What comes from where:

* **Optimizer**: the config's ``"optimizer": {"type": "MuonClip", ...}`` section when it has one
  (train.py's optimizer flags are then not used: the config is the source of truth, as in any
  DeepSpeed job); without a section, train.py builds MuonClip (or ``--optimizer adamw``) from
  its flags and hands the instance to DeepSpeed.
* **lr schedule**: the config's ``"scheduler"`` section when it has one; otherwise train.py's
  warmup + cosine schedule (``--warmup-steps``), applied to the optimizer DeepSpeed sees.
* **Batch**: train.py's ``--batch-size`` (global, sequences) is authoritative: the engine sets
  ``train_batch_size = --batch-size``, ``train_micro_batch_size_per_gpu = --batch-size / W`` and
  one micro-batch per step (``gradient_accumulation_steps`` > 1 is refused: train.py runs one
  forward/backward per optimizer step).
* **Gradient clipping**: the config's ``gradient_clipping`` when set, else ``--grad-clip``;
  DeepSpeed clips the reduced raw gradient before the optimizer step.
* **Checkpoints**: ``--save DIR`` writes ``DIR/step_NNNNNNN/`` with ``engine.save_checkpoint``
  plus MuonClip's full-state export, so ``--resume DIR`` works at any world size
  (:func:`dist_muonclip.deepspeed.load_checkpoint`); AdamW runs use DeepSpeed's own checkpoints
  (same world size).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DeepSpeedEngine", "prepare_train_config"]


def prepare_train_config(config: Any, *, batch_size: int, world_size: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config for a train.py run: batch keys from ``--batch-size``, clipping from
    ``--grad-clip`` unless the config sets it. Raises naming the key on what train.py cannot run."""
    from dist_muonclip.deepspeed import load_config

    cfg = load_config(config)
    gas = cfg.get("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise ValueError(f"DeepSpeed config gradient_accumulation_steps={gas}: launch/train.py runs one micro-batch "
                         "per optimizer step; set it to 1 (raise --batch-size instead), or use "
                         "python -m dist_muonclip.deepspeed for accumulation")
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the world size {world_size}")
    cfg["train_batch_size"] = batch_size
    cfg["train_micro_batch_size_per_gpu"] = batch_size // world_size
    cfg["gradient_accumulation_steps"] = 1
    if "gradient_clipping" not in cfg:
        cfg["gradient_clipping"] = float(grad_clip)
    return cfg


class DeepSpeedEngine:
    """DeepSpeed engine for train.py (see the module doc). DeepSpeed reduces gradients, so
    ``grad_reduction`` must be ``"external"``.

    Args:
        model: the unwrapped model on ``ctx.device`` (DeepSpeed converts it to bf16 when the
            config enables bf16).
        ctx: train.py's ``DistContext``.
        config: path of the DeepSpeed JSON config.
    """

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, ctx: Any, *, grad_reduction: str = "external",
                 config: str | os.PathLike | None = None) -> None:
        if grad_reduction != "external":
            raise ValueError(f"--grad-reduction {grad_reduction!r} does not apply to the deepspeed engine: DeepSpeed "
                             "reduces gradients itself; use --grad-reduction external")
        if config is None:
            raise ValueError("the deepspeed engine needs --deepspeed_config PATH (e.g. configs/zero1.json)")
        self.module = model
        self.ctx = ctx
        self.config_path = str(config)
        self.ds: Any = None          # the DeepSpeedEngine, after build_optimizer
        self.model: Any = model      # forward goes through self.ds once built
        self.is_muonclip = False
        self.config_scheduler = False
        self.source = ""

    # -- optimizer --------------------------------------------------------------------------
    def build_optimizer(self, args: argparse.Namespace, build: Any) -> Any:
        """Create the DeepSpeed engine; returns the optimizer whose ``param_groups`` carry the lr
        (train.py's schedule writes there) and whose ``metrics()`` train.py logs. ``build`` is
        train.py's ``build_optimizer(args, model)`` for configs without an optimizer section."""
        import deepspeed

        from dist_muonclip import deepspeed as dmds

        cfg = prepare_train_config(self.config_path, batch_size=args.batch_size, world_size=self.ctx.world_size,
                                   grad_clip=args.grad_clip)
        section = cfg.get("optimizer")
        self.config_scheduler = cfg.get("scheduler") is not None
        if section is not None:
            kind = str(section.get("type", "")).lower() if isinstance(section, dict) else ""
            if kind != "muonclip":
                raise ValueError(f"{self.config_path}: optimizer type {section.get('type')!r}; launch/train.py's "
                                 "deepspeed engine runs MuonClip from the config, or --optimizer adamw/muonclip from "
                                 "its flags when the config has no optimizer section")
            if args.optimizer != "muonclip":
                raise ValueError(f"--optimizer {args.optimizer} but {self.config_path} has a MuonClip optimizer "
                                 "section; drop the flag or use a config without an optimizer section")
            self.ds, *_ = dmds.initialize(model=self.module, config=cfg)
            self.source = f"MuonClip from {self.config_path}"
        elif args.optimizer == "muonclip":
            self.ds, *_ = dmds.initialize(model=self.module, optimizer=build(args, self.module), config=cfg)
            self.source = "MuonClip from the command line"
        else:
            optimizer = build(args, self.module)
            self.ds, *_ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=cfg)
            self.source = "AdamW from the command line"
        self.model = self.ds
        self.is_muonclip = args.optimizer == "muonclip"
        return dmds.deepspeed_client(self.ds) if self.is_muonclip else self.ds.optimizer

    @property
    def inner_optimizer(self) -> Any:
        """The MuonClip instance (for the profiler and metrics), or DeepSpeed's optimizer."""
        from dist_muonclip.deepspeed import muonclip_optimizer

        return muonclip_optimizer(self.ds) if self.is_muonclip else self.ds.optimizer

    # -- step -------------------------------------------------------------------------------
    def backward_step(self, loss: torch.Tensor) -> float:
        """Backward, clip (config), optimizer step, zero grads and scheduler, as DeepSpeed does;
        returns the global gradient norm before clipping (NaN when DeepSpeed did not compute it)."""
        self.ds.backward(loss)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | os.PathLike, *, step: int, optimizer: Any = None) -> Path:
        """``<directory>/step_<step>/``: DeepSpeed's checkpoint (+ MuonClip's full-state export),
        crash-safe: written as tag ``step_<step>.tmp``, then rank 0 records every file's hash in
        ``MANIFEST.json``, renames the directory and points ``<directory>/latest`` at it."""
        import torch.distributed as dist

        from dist_muonclip import deepspeed as dmds
        from launch import checkpoint_files as ckpt_files

        final = Path(directory) / f"step_{step:07d}"
        tmp = ckpt_files.tmp_path(final)
        rank = dist.get_rank() if dist.is_initialized() else 0
        barrier = dist.barrier if dist.is_initialized() else (lambda: None)
        if rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            ckpt_files.clear_tmp(final)     # what a killed save left
        barrier()
        if self.is_muonclip:
            dmds.save_checkpoint(self.ds, str(directory), tag=tmp.name, save_latest=False)
        else:
            self.ds.save_checkpoint(str(directory), tag=tmp.name, save_latest=False)
        barrier()                           # every rank's files are written
        ckpt_files.fault_point("save", step, rank)
        if rank == 0:
            ckpt_files.publish_dir(tmp, final)
            latest = Path(directory) / "latest"     # DeepSpeed's own pointer, for engine.load_checkpoint(dir)
            latest_tmp = latest.with_name("latest.tmp")
            latest_tmp.write_text(final.name)
            os.replace(latest_tmp, latest)
        barrier()
        return final

    def load_checkpoint(self, path: str | os.PathLike, *, optimizer: Any = None) -> dict[str, Any]:
        """Resume from :meth:`save_checkpoint` output (MuonClip: any world size)."""
        from dist_muonclip import deepspeed as dmds

        path = Path(path)
        if self.is_muonclip:
            dmds.load_checkpoint(self.ds, str(path.parent), tag=path.name)
        else:
            load_path, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name)
            if load_path is None:
                raise ValueError(f"--resume {str(path)!r}: DeepSpeed found no checkpoint there")
        return {"step": int(self.ds.global_steps)}

    @staticmethod
    def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
        """A ``step_*`` checkpoint directory (verified against its manifest), or the newest
        complete one inside ``path`` (corrupt ones skipped with a warning), or None when ``path``
        holds none yet (train.py then starts fresh)."""
        from launch import checkpoint_files as ckpt_files

        return ckpt_files.resolve(path, kind="dir",
                                  is_checkpoint=lambda p: ckpt_files.step_of(p) is not None and p.is_dir())
