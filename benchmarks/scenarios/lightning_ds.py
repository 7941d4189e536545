"""PyTorch Lightning's DeepSpeed strategy with MuonClip (ZeRO-1/2), run on W gloo processes by
tests/test_lightning_deepspeed.py and on a GPU by benchmarks/hf_gpu.py.

Lightning's ``DeepSpeedStrategy`` refuses any accelerator but CUDA (``setup_environment``) and checks
GPU indices (``setup_distributed``) and passes ``root_device.index`` (``None`` on CPU) to
``deepspeed.initialize`` as ``device_rank``. On CPU :func:`strategy` returns a subclass that skips
the two device checks and passes the local rank (what DeepSpeed uses by itself without args), and
nothing else; everything else is Lightning's own: its DeepSpeed config (micro batch size, gradient
clipping filled from the Trainer), ``deepspeed.initialize`` with the optimizer from
``configure_optimizers`` or with none when the config names ``"type": "MuonClip"``, its
optimizer-step loop and its checkpoints (``engine.save_checkpoint`` / ``load_checkpoint``). On a
GPU nothing is overridden.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.scenarios.deepspeed import CLIP, MC_PARAMS, _setup, qk_clip_params
from benchmarks.scenarios.ddp import GLOBAL_BATCH, local_batch
from benchmarks.scenarios.tiny_hf import tiny_model


def strategy(config: dict[str, Any]):
    """Lightning's ``DeepSpeedStrategy(config=...)``; on CPU with its CUDA-only check skipped."""
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_environment()
            DDPStrategy.setup_environment(self)      # without the CUDA check (module doc)

        def setup_distributed(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_distributed()
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()                             # Lightning's own steps, without the GPU-index check
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            if isinstance(self.accelerator, CUDAAccelerator):
                return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
            import argparse

            import deepspeed

            # Lightning's call, with device_rank = the local rank (a CPU device has no index; this is
            # what DeepSpeed itself uses without args)
            engine, opt, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
                model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
                lr_scheduler=lr_scheduler, dist_init_required=False)
            return engine, opt

    cls = DeepSpeedStrategy if torch.cuda.is_available() else CPUDeepSpeedStrategy
    return cls(config=config)


def lightning_config(stage: int, route: str) -> dict[str, Any]:
    """What a Lightning user writes: the ZeRO stage and, for ``route="config"``, MuonClip named in
    the JSON; batch size and clipping come from the Trainer."""
    cfg: dict[str, Any] = {"zero_optimization": {"stage": stage}, "steps_per_print": 10_000}
    if route == "config":
        # DeepSpeed builds MuonClip on its module, the LightningModule ("model.lm_head" there): the
        # automatic split finds the HF head inside it, as on the bare model (no adamw_patterns)
        cfg["optimizer"] = {"type": "MuonClip", "params": {**MC_PARAMS, **qk_clip_params()}}
    return cfg


def lightning_ds_worker(rank: int, world: int, stage: int, steps: int, route: str,
                        ckpt_dir: str | None = None, save_at: int | None = None,
                        resume: bool = False) -> dict[str, Any]:
    """Lightning ``Trainer(strategy=DeepSpeedStrategy(config))`` fitting the tiny Llama on this
    rank's rows of the DeepSpeed scenario's global batches. ``route``: ``"configure_optimizers"``
    (a MuonClip instance built on the inner HF model) or ``"config"`` (the JSON names MuonClip).
    ``save_at`` / ``resume``: Lightning checkpoint after that many steps, fit again from it."""
    _setup()
    import lightning as L

    import dist_muonclip.hf as hf
    from dist_muonclip import MuonClip

    per = GLOBAL_BATCH // world        # Lightning reads the micro batch size from the loader
    rows = [{"input_ids": r} for t in range(steps) for r in local_batch(t, rank, world)]

    class LitLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_model("llama", seed=0)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            ids = batch["input_ids"]
            loss = self.model(input_ids=ids, labels=ids).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            if route == "config":
                return None
            return MuonClip(self.model, **MC_PARAMS, **qk_clip_params())

    loader = torch.utils.data.DataLoader(rows, batch_size=per, shuffle=False)
    callbacks = []
    if save_at is not None and not resume:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", save_top_k=-1,
                                                             every_n_train_steps=save_at))
    lit = LitLM()
    trainer = L.Trainer(accelerator="cuda" if torch.cuda.is_available() else "cpu", devices=world,
                        strategy=strategy(lightning_config(stage, route)), max_steps=steps, gradient_clip_val=CLIP,
                        callbacks=callbacks, logger=False, use_distributed_sampler=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks), num_sanity_val_steps=0)
    ckpt_path = os.path.join(ckpt_dir, f"step={save_at}.ckpt") if resume else None
    if resume:
        # the loader restarts the epoch: skip the batches the checkpointed run already read
        loader = torch.utils.data.DataLoader(rows[save_at * per:], batch_size=per, shuffle=False)
    trainer.fit(lit, loader, ckpt_path=ckpt_path)
    engine = trainer.strategy.model
    inner = hf.muonclip_optimizer(engine)
    client = engine.basic_optimizer
    masters = {k: v.detach().cpu().clone() for k, v in client.full_state_dict()["masters"].items()}
    muon_ids = {id(p) for g in inner.param_groups if g["use_muon"] for p in g["params"]}
    muon = sorted(n for n, p in lit.named_parameters() if id(p) in muon_ids)   # LightningModule names
    return {"params": masters, "losses": lit.losses, "muon_params": muon, "world_size": inner.world_size, "num_steps": inner.num_steps,
            "layout": client.layout_name, "global_step": trainer.global_step,
            "zero_stage": engine.zero_optimization_stage(),
            "micro_batch": engine.train_micro_batch_size_per_gpu(), "clip": engine.gradient_clipping(),
            "clipped": inner.metrics().get("qk_clip/num_heads_clipped", 0.0), "is_cuda": torch.cuda.is_available()}
