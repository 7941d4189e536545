"""ZeRO-3 / offload scenarios on DeepSpeed's own deepspeed.initialize and HF Trainer (after
``import dist_muonclip.hf``), run on W gloo processes by tests/test_hf_zero3.py."""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from tests import _hf_workers as H
from tests._dist_workers import local_batch
from tests._ds_workers import _count_ns, _setup, ds_config, load_zero3_weights
from tests._tiny_hf import tiny_model


def zero_init_model(rank: int, cfg: dict[str, Any] | None, ref: dict[str, torch.Tensor] | None = None):
    """The tiny Llama built under ``deepspeed.zero.Init`` with the seed-0 weights. ``cfg=None``:
    HF's own zero.Init (Trainer's HfDeepSpeedConfig is alive; ``ref`` built before it was)."""
    import deepspeed

    deepspeed.init_distributed()
    if ref is None:
        ref = {k: v.detach().clone() for k, v in tiny_model("llama", seed=0).named_parameters()}
    with deepspeed.zero.Init(config_dict_or_path=cfg) if cfg is not None else contextlib.nullcontext():
        model = tiny_model("llama", seed=0)
    load_zero3_weights(model, ref, rank)
    return model


def ds_native_zero3_worker(rank: int, world: int, steps: int, mode: str, offload: bool = False,
                           zero_init: bool = True) -> dict[str, Any]:
    """DeepSpeed's own ``deepspeed.initialize`` at ZeRO-3 (``mode``: ``"config"``: the JSON names
    MuonClip, WarmupLR; ``"instance"``: a MuonClip built under ``full_shapes``; ``"bare_instance"``:
    one built on the partitioned model without it, must raise)."""
    _setup()
    import deepspeed

    import dist_muonclip.hf as hf
    from dist_muonclip import MuonClip

    cfg = ds_config(3, world, scheduler=(mode == "config"), params=H.QK)
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 64}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    model = zero_init_model(rank, cfg) if zero_init else tiny_model("llama", seed=0)
    if mode == "config":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        params = cfg.pop("optimizer")["params"]
        if mode == "bare_instance":
            try:
                bare = MuonClip(model, **{**params, "qk_clip": False})   # QK-Clip would refuse the 0-row q_proj first
                deepspeed.initialize(model=model, optimizer=bare, config=cfg)
            except ValueError as e:
                return {"error": str(e)}
            return {"error": None}
        with hf.full_shapes(model):
            opt = MuonClip(model, **params)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    inner = hf.muonclip_optimizer(engine)
    ns_calls: list[int] = []
    restore = _count_ns(ns_calls)
    lrs = []
    try:
        for t in range(steps):
            ids = local_batch(t, rank, world)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            lrs.append([g["lr"] for g in inner.param_groups])
    finally:
        restore()
    client = engine.basic_optimizer
    state_devices = sorted({str(v.device) for st in inner.state.values() for v in st.values()
                            if isinstance(v, torch.Tensor) and v.ndim > 0})
    return {"params": H._masters(client), "ns": sum(ns_calls), "lrs": lrs, "layout": client.layout_name,
            "world_size": inner.world_size, "metrics": inner.metrics(), "state_devices": state_devices,
            "n_muon": sum(len(g["params"]) for g in inner.param_groups if g["use_muon"])}


def trainer_zero3_worker(rank: int, world: int, out_dir: str, max_steps: int = 3, *, per_device: int = 4,
                         gas: int = 1, save_steps: int | None = None, resume: str | None = None,
                         offload: bool = False, stage: int = 3, scheduler: bool = False,
                         route: str = "config") -> dict[str, Any]:
    """HF Trainer with ``TrainingArguments(deepspeed=cfg)`` at ``stage`` (3: the model is built
    under ``deepspeed.zero.Init`` after the arguments, as ``from_pretrained`` does), ``offload``:
    ``offload_optimizer: {"device": "cpu"}``. ``route``: ``"config"`` (JSON names MuonClip) or
    ``"subclass"`` (:class:`dist_muonclip.hf.MuonClipTrainer`, no optimizer section)."""
    _setup()
    from transformers import Trainer

    import dist_muonclip.hf as hf

    ds = H.hf_ds_config(stage, optimizer="MuonClip" if route == "config" else None, scheduler=scheduler)
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 64
    if offload:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    ref = {k: v.detach().clone() for k, v in tiny_model("llama", seed=0).named_parameters()}  # before zero3 is on
    args = H._args(out_dir, max_steps=max_steps, per_device=per_device, gas=gas, save_steps=save_steps,
                   deepspeed=ds)
    if stage == 3:
        from transformers.integrations import is_deepspeed_zero3_enabled

        assert is_deepspeed_zero3_enabled()
        model = zero_init_model(rank, None, ref)      # from_config under HF's zero.Init
    else:
        model = tiny_model("llama", seed=0)
    zero_init = any(hasattr(p, "ds_shape") for p in model.parameters())
    rec = H._Recorder()
    kw: dict[str, Any] = dict(model=model, args=args, train_dataset=H.TokenDataset(), callbacks=[rec.callback()])
    cls = Trainer
    if route == "subclass":
        cls = hf.MuonClipTrainer
        kw["muonclip_kwargs"] = dict(adamw_lr=0.01, ns_dtype="float32", ns_backend="torch", **H.QK)
    trainer = cls(**kw)
    ns_calls: list[int] = []
    restore = _count_ns(ns_calls)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        restore()
    inner = hf.muonclip_optimizer(trainer)
    client = trainer.model_wrapped.basic_optimizer
    state_devices = sorted({str(v.device) for st in inner.state.values() for v in st.values()
                            if isinstance(v, torch.Tensor) and v.ndim > 0})
    return {"params": H._masters(client), "ns": sum(ns_calls), "num_steps": inner.num_steps,
            "world_size": inner.world_size, "global_step": trainer.state.global_step, "lrs": rec.lrs,
            "metrics": rec.metrics, "losses": rec.losses, "layout": client.layout_name, "zero_init": zero_init,
            "state_devices": state_devices, "files": sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []}


def trainer_zero3_call(rank: int, world: int, out_dir: str, kw: dict[str, Any]) -> dict[str, Any]:
    return trainer_zero3_worker(rank, world, out_dir, **kw)
