"""HF Trainer / accelerate / deepspeed.initialize scenarios run on W gloo processes by tests/test_hf.py
(module-level functions, so spawn can pickle them)."""
from __future__ import annotations

import os
from typing import Any

import torch

from tests._dist_workers import GLOBAL_BATCH, SEQ, VOCAB, local_batch
from tests._ds_workers import _count_ns, _setup, ds_config
from tests._tiny_hf import tiny_model
from benchmarks.scenarios.hf_fsdp2 import forced_fsdp_trainer

# QK-Clip below the tiny model's max logits (~0.09-0.11 in the first steps), so heads are clipped
# from the first steps on and the clip is part of what the oracles compare
QK = {"qk_clip": {"tau": 0.05}}


def _masters(client) -> dict[str, torch.Tensor]:
    """fp32 master weights by name through the adapter's public full-state export (a collective)."""
    return {k: v.detach().cpu().clone() for k, v in client.full_state_dict()["masters"].items()}


def ds_native_worker(rank: int, world: int, stage: int, steps: int, mode: str) -> dict[str, Any]:
    """DeepSpeed's own ``deepspeed.initialize`` after ``import dist_muonclip.hf``.

    ``mode``: ``"config"`` (``"type": "MuonClip"`` in the JSON, WarmupLR from the JSON) or
    ``"instance"`` (a plain MuonClip as the client optimizer, no optimizer section, no scheduler).
    """
    _setup()
    import deepspeed

    import dist_muonclip.hf as hf
    from dist_muonclip import MuonClip

    model = tiny_model("llama", seed=0)
    cfg = ds_config(stage, world, scheduler=(mode == "config"), params=QK)
    if mode == "instance":
        opt = MuonClip(model, **cfg.pop("optimizer")["params"])
        engine, returned, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    else:
        engine, returned, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
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
    return {"params": _masters(engine.basic_optimizer), "ns": sum(ns_calls), "lrs": lrs,
            "layout": engine.basic_optimizer.layout_name, "world_size": inner.world_size,
            "is_instance": mode != "instance" or inner is opt, "metrics": inner.metrics()}


def ds_refusals_worker(rank: int, world: int) -> dict[str, str]:
    """``deepspeed.initialize`` calls that must raise before training: the exception type and message."""
    _setup()
    import deepspeed

    import dist_muonclip.hf  # noqa: F401
    from dist_muonclip import MuonClip

    def attempt(**kw) -> str:
        try:
            deepspeed.initialize(**kw)
        except (ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    def cfg_with(stage: int = 1, **params) -> dict[str, Any]:
        cfg = ds_config(stage, world)
        cfg["optimizer"]["params"].update(params)
        return cfg

    out = {}
    model = tiny_model("llama", seed=0)
    params = list(model.parameters())
    # ZeRO-3 and offload_optimizer cpu are supported (tests/test_hf_zero3.py); what is not, on a fresh
    # model each (a stage-3 engine may partition the model before the optimizer is built)
    cfg = cfg_with(3)
    cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    fresh = tiny_model("llama", seed=0)
    out["zero3"] = attempt(model=fresh, model_parameters=list(fresh.parameters()), config=cfg)
    cfg = cfg_with(3)    # (fp16 is refused by DeepSpeed itself on CPU; partial offload below stage 3 too)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "ratio": 0.5}
    fresh = tiny_model("llama", seed=0)
    out["offload"] = attempt(model=fresh, model_parameters=list(fresh.parameters()), config=cfg)
    out["auto"] = attempt(model=model, model_parameters=params, config=cfg_with(weight_decay="auto"))
    out["both_spellings"] = attempt(model=model, model_parameters=params,
                                    config=cfg_with(betas=[0.9, 0.95], adamw_betas=[0.9, 0.95]))
    out["bad_value"] = attempt(model=model, model_parameters=params, config=cfg_with(momentum=1.5))
    out["instance_and_section"] = attempt(model=model, optimizer=MuonClip(model, lr=0.01), config=cfg_with())
    opt = MuonClip(model, lr=0.01)
    cfg = cfg_with()
    del cfg["optimizer"]
    out["instance_scheduler"] = attempt(model=model, optimizer=opt, config=cfg,
                                        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    return out


# --------------------------------------------------------------------------------------------
# HF Trainer
# --------------------------------------------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    """``n`` fixed random sequences (seeded): the same data in every process and every run."""

    def __init__(self, n: int = 64, seed: int = 7) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out_dir: str, *, max_steps: int, per_device: int, gas: int = 1, save_steps: int | None = None,
          deepspeed: Any = None, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=gas, learning_rate=0.02, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=2,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 1, logging_steps=1,
        report_to=[], seed=0, data_seed=0, dataloader_num_workers=0, use_cpu=True, deepspeed=deepspeed,
        disable_tqdm=True, save_only_model=False, **kw)


class _Recorder:
    """A TrainerCallback that records the inner MuonClip's lr and metrics after every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.metrics: list[dict[str, float]] = []
        self.losses: list[float] = []

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, optimizer=None, **kw):
                import dist_muonclip.hf as hf

                inner = hf.unwrap_optimizer(optimizer)
                rec.lrs.append([g["lr"] for g in inner.param_groups])
                rec.metrics.append(inner.metrics())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    rec.losses.append(float(logs["loss"]))

        return CB()


def hf_ds_config(stage: int, *, optimizer: str | None = "MuonClip", scheduler: bool = False) -> dict[str, Any]:
    """A user's HF-style DeepSpeed config: every value Trainer knows is "auto"."""
    cfg: dict[str, Any] = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "steps_per_print": 10_000,
    }
    if optimizer:
        cfg["optimizer"] = {"type": optimizer, "params": {
            "lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto", "adamw_lr": 0.01,
            "ns_dtype": "float32", "ns_backend": "torch", **QK}}
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                           "warmup_num_steps": 2}}
    return cfg


def trainer_worker(rank: int, world: int, out_dir: str, max_steps: int = 3, *, stage: int | None = None,
                   per_device: int = 4, gas: int = 1, save_steps: int | None = None, resume: str | None = None,
                   route: str = "config", scheduler: bool = False, fsdp: str | None = None) -> dict[str, Any]:
    """One HF Trainer run on the tiny Llama.

    ``stage``: DeepSpeed ZeRO stage (``None``: no DeepSpeed, DDP). ``route``: ``"config"`` (JSON
    names MuonClip), ``"instance"`` (``optimizers=(MuonClip(model), None)``, built before
    ``TrainingArguments``: i.e. before the process group of a torchrun job would exist),
    ``"subclass"`` (:class:`dist_muonclip.hf.MuonClipTrainer`), ``"factory"``
    (``optimizer_cls_and_kwargs``), ``"instance+scheduler"`` (must raise). ``fsdp``: FSDP2
    through ``TrainingArguments(fsdp=..., fsdp_config={"version": 2, ...})`` with that
    ``state_dict_type`` (route ``"subclass"``; on CPU accelerate's FSDP gate is flipped, see
    :func:`benchmarks.scenarios.hf_fsdp2.forced_fsdp_trainer`).
    """
    if stage is not None:
        _setup()
    from transformers import Trainer

    import dist_muonclip.hf as hf
    from dist_muonclip import MuonClip

    model = tiny_model("llama", seed=0)
    mc = dict(lr=0.02, adamw_lr=0.01, weight_decay=0.1, adamw_betas=(0.9, 0.95), ns_dtype="float32",
              ns_backend="torch", **QK)
    user_opt = MuonClip(model, **mc) if route.startswith("instance") else None
    ds = None
    if stage is not None:
        ds = hf_ds_config(stage, optimizer="MuonClip" if route == "config" else None, scheduler=scheduler)
    extra: dict[str, Any] = {}
    if fsdp is not None:
        extra = dict(fsdp=True, fsdp_config={"version": 2,
                                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                             "state_dict_type": fsdp, "reshard_after_forward": True})
    args = _args(out_dir, max_steps=max_steps, per_device=per_device, gas=gas, save_steps=save_steps, deepspeed=ds,
                 **extra)
    rec = _Recorder()
    kw: dict[str, Any] = dict(model=model, args=args, train_dataset=TokenDataset(), callbacks=[rec.callback()])
    cls = Trainer
    if route == "subclass":
        cls = forced_fsdp_trainer(hf.MuonClipTrainer) if fsdp is not None else hf.MuonClipTrainer
        kw["muonclip_kwargs"] = {k: v for k, v in mc.items() if k not in ("lr", "weight_decay", "adamw_betas")}
    elif route == "factory":
        kw["optimizer_cls_and_kwargs"] = (hf.MuonClipFactory, mc)
    elif route == "instance":
        kw["optimizers"] = (user_opt, None)
    elif route == "instance+scheduler":
        kw["optimizers"] = (user_opt, torch.optim.lr_scheduler.LambdaLR(user_opt, lambda s: 1.0))
    trainer = cls(**kw)
    ns_calls: list[int] = []
    restore = _count_ns(ns_calls)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        restore()
    inner = hf.muonclip_optimizer(trainer)
    if stage is not None:
        client = trainer.model_wrapped.basic_optimizer
        params = _masters(client)
        layout = client.layout_name
        cfg = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        opt_params = (cfg.get("optimizer") or {}).get("params")
    elif fsdp is not None:
        params = {k: p.full_tensor().detach().cpu().clone() for k, p in trainer.model.named_parameters()}
        layout, opt_params = type(inner.layout).__name__, [{k: v for k, v in g.items() if k != "params"}
                                                           for g in inner.param_groups]
    else:
        params = {k: p.detach().cpu().clone() for k, p in trainer.model.named_parameters()}
        layout, opt_params = "ddp", None
    names = {p: n for n, p in trainer.model.named_parameters()}
    return {"params": params, "ns": sum(ns_calls), "num_steps": inner.num_steps, "world_size": inner.world_size,
            "global_step": trainer.state.global_step, "lrs": rec.lrs, "metrics": rec.metrics, "losses": rec.losses,
            "layout": layout, "opt_params": opt_params, "is_user_instance": user_opt is not None and inner is user_opt,
            "muon_names": sorted(names[p] for g in inner.param_groups if g["use_muon"] for p in g["params"]),
            "files": sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []}


def trainer_call(rank: int, world: int, out_dir: str, kw: dict[str, Any]) -> dict[str, Any]:
    """:func:`trainer_worker` with its keywords in one dict (what run_distributed passes on)."""
    return trainer_worker(rank, world, out_dir, **kw)


# --------------------------------------------------------------------------------------------
# torchrun-like processes: the environment is set, the process group is NOT created (the
# framework under test creates it, as under torchrun)
# --------------------------------------------------------------------------------------------

def _torchrun_entry(rank: int, fn, world: int, port: int, args: tuple, result_dir: str) -> None:
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DIST_MUONCLIP_DS_SHM="0")
    torch.set_num_threads(1)
    try:
        out = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException as e:  # report the failure to the test instead of dying silently
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


def run_torchrun_like(fn, world: int, *args: Any, tmp_path, port: int, timeout: float = 600) -> list[dict]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes with torchrun's environment and
    no process group (a hang is killed after ``timeout`` and reported)."""
    from dist_muonclip.launch_env import spawn_local

    result_dir = str(tmp_path)
    os.makedirs(result_dir, exist_ok=True)
    spawn_local(_torchrun_entry, world, (fn, world, port, args, result_dir), timeout=timeout,
                what=f"torchrun-like run of {fn.__name__}")
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def accelerate_ds_worker(rank: int, world: int, steps: int) -> dict[str, Any]:
    """accelerate's DeepSpeed plugin with ``DummyOptim`` and a config naming MuonClip (lr and
    weight_decay "auto", filled by accelerate from DummyOptim). Each rank feeds its own rows of the
    global batch by hand: on CPU accelerate counts one process under DeepSpeed and would give both
    ranks the same batches through a prepared loader."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    import dist_muonclip.hf as hf

    _setup()
    model = tiny_model("llama", seed=0)
    cfg = ds_config(2, world, params=QK)
    cfg["optimizer"]["params"].update(lr="auto", weight_decay="auto")
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
    engine, opt = acc.prepare(model, DummyOptim(model.parameters(), lr=0.02, weight_decay=0.1))
    inner = hf.muonclip_optimizer(engine)
    ns_calls: list[int] = []
    restore = _count_ns(ns_calls)
    try:
        for t in range(steps):
            ids = local_batch(t, rank, world)
            acc.backward(engine(input_ids=ids, labels=ids).loss)
            opt.step()
            opt.zero_grad()
    finally:
        restore()
    return {"params": _masters(engine.basic_optimizer), "ns": sum(ns_calls), "world_size": inner.world_size,
            "num_processes": acc.num_processes, "layout": engine.basic_optimizer.layout_name,
            "lr": [g["lr"] for g in inner.param_groups], "num_steps": inner.num_steps}
