"""accelerate / HF Trainer FSDP2 scenarios (MuonClip built before the framework shards the model),
run on W gloo processes by tests/test_hf_fsdp2.py and on one GPU by benchmarks/hf_gpu.py.

accelerate enables FSDP only for GPU-like distributed types: on CPU (``MULTI_CPU``) an
``Accelerator(fsdp_plugin=...)`` is not FSDP. :func:`make_accelerator` then sets the state's
``distributed_type`` to ``FSDP`` (the one gate) so that ``accelerator.prepare`` runs accelerate's
own FSDP2 path unchanged (``_prepare_fsdp2``: ``fully_shard`` per decoder layer and the root, then
the optimizer's parameters swapped for the DTensors); checkpoints go through accelerate's own
``save_fsdp_model`` / ``save_fsdp_optimizer`` (torch's ``get_optimizer_state_dict``) and their
``load_*``. On a GPU nothing is overridden.
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.scenarios.fsdp import OPT_KW, QK, _full_params, build_model, local_batch


def make_accelerator(*, state_dict_type: str = "SHARDED_STATE_DICT", mixed_precision: str = "no"):
    """``Accelerator`` with an FSDP2 plugin wrapping each ``LlamaDecoderLayer`` (the tiny model's)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            reshard_after_forward=True, state_dict_type=state_dict_type)
    acc = Accelerator(fsdp_plugin=plugin, mixed_precision=mixed_precision)
    forced = acc.distributed_type != DistributedType.FSDP
    if forced:     # CPU: accelerate's device-type gate (see module doc); everything after it is accelerate's
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc, forced


def _sd_options(plugin):
    from accelerate.utils.fsdp_utils import _prepare_sd_options   # what save/load_fsdp_optimizer pass to torch

    return _prepare_sd_options(plugin)


def _device(acc) -> torch.device | None:
    return acc.device if acc.device.type != "cpu" else None


def accelerate_fsdp2_worker(rank: int, world: int, steps: int, *, save_at: int | None = None,
                            ckpt_dir: str | None = None, resume: bool = False,
                            state_dict_type: str = "SHARDED_STATE_DICT") -> dict[str, Any]:
    """MuonClip built on the plain model, then ``accelerator.prepare(model, optimizer)`` with FSDP2.

    Trains ``steps`` steps on this rank's rows of the fsdp scenario's global batch. ``save_at``:
    after that many steps, save with accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer``
    into ``ckpt_dir`` and keep training. ``resume``: load that checkpoint first (its steps are
    ``save_at``) and train the remaining ``steps - save_at``. ``state_dict_type``: accelerate's
    ``SHARDED_STATE_DICT`` (DCP) or ``FULL_STATE_DICT`` (torch's ``get_optimizer_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``, rank 0 writes one file read back with
    ``torch.load(weights_only=True)`` and broadcast from rank 0).
    """
    import dist_muonclip.hf as hf
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer

    from dist_muonclip import MuonClip

    acc, forced = make_accelerator(state_dict_type=state_dict_type)
    dev = _device(acc)
    model = build_model("llama")
    opt = MuonClip(model, qk_clip=QK["llama"], **OPT_KW)
    before = {"layout": type(opt.layout).__name__, "world_size": opt.world_size}
    model, popt = acc.prepare(model, opt)
    inner = hf.muonclip_optimizer(popt)
    plugin = acc.state.fsdp_plugin
    start = 0
    if resume:
        load_fsdp_model(plugin, acc, model, ckpt_dir)
        load_fsdp_optimizer(plugin, acc, popt, model, ckpt_dir)
        start = save_at
    losses = []
    for t in range(start, steps):
        if save_at is not None and t == save_at and not resume:
            save_fsdp_model(plugin, acc, model, ckpt_dir)
            save_fsdp_optimizer(plugin, acc, popt, model, ckpt_dir)
        ids = local_batch(t, rank, world)
        if dev is not None:
            ids = ids.to(dev)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        popt.step()
        popt.zero_grad()
        losses.append(loss.item())
    sd_options = {k: getattr(v, k) for k in ("full_state_dict", "cpu_offload", "broadcast_from_rank0")
                  for v in [_sd_options(plugin)]}
    return {"params": _full_params(model), "losses": losses, "forced": forced, "before": before,
            "sd_options": sd_options,
            "layout": type(inner.layout).__name__, "world_size": inner.world_size, "num_steps": inner.num_steps,
            "same_optimizer": inner is opt, "metrics": inner.metrics(),
            "group_values": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]}


def accelerate_fsdp2_call(rank: int, world: int, steps: int, kw: dict[str, Any]) -> dict[str, Any]:
    """:func:`accelerate_fsdp2_worker` with its keywords in one dict (spawn passes positionals)."""
    return accelerate_fsdp2_worker(rank, world, steps, **kw)


def _plain(v: Any) -> bool:
    """A value torch.load(weights_only=True) and JSON-like consumers accept in param_groups."""
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str))


def torch_full_state_worker(rank: int, world: int, steps: int, save_at: int, path: str, resume: bool) -> dict[str, Any]:
    """torch's own helpers on MuonClip after accelerate's FSDP2 prepare. Without ``resume``: after
    ``save_at`` steps, ``get_model_state_dict`` / ``get_optimizer_state_dict`` with
    ``full_state_dict=True, cpu_offload=True`` (rank 0 gets everything on the CPU), written by rank
    0 with ``torch.save``, then training goes on to ``steps``. With ``resume`` (fresh processes;
    accelerate shards one model per process): rank 0 reads the file with
    ``torch.load(weights_only=True)``, ``set_*_state_dict(..., full_state_dict=True,
    broadcast_from_rank0=True)`` loads it into a model + MuonClip prepared the same way, and
    training runs from ``save_at`` to ``steps``."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    import dist_muonclip.hf as hf
    from dist_muonclip import MuonClip

    acc, _ = make_accelerator()
    dev = _device(acc)
    model = build_model("llama")
    model, opt = acc.prepare(model, MuonClip(model, qk_clip=QK["llama"], **OPT_KW))
    inner = hf.muonclip_optimizer(opt)
    checks: dict[str, Any] = {"layout": type(inner.layout).__name__}
    if resume:
        load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        sd = torch.load(path, weights_only=True) if rank == 0 else {"model": {}, "optim": {}}
        set_model_state_dict(model, sd["model"], options=load)
        set_optimizer_state_dict(model, inner, sd["optim"], options=load)
    for t in range(save_at if resume else 0, steps):
        if t == save_at and not resume:
            save = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(model, options=save)
            osd = get_optimizer_state_dict(model, inner, options=save)
            checks["rank_has_state"] = bool(osd.get("state"))
            if rank == 0:
                torch.save({"model": msd, "optim": osd}, path)
                state = osd["state"]
                checks.update(
                    groups_plain=all(_plain(v) for g in osd["param_groups"] for k, v in g.items() if k != "params"),
                    state_on_cpu=all(isinstance(v, torch.Tensor) and v.device.type == "cpu"
                                     for s in state.values() for v in s.values()),
                    full_shapes=all(s["momentum_buffer" if "momentum_buffer" in s else "exp_avg"].shape == msd[k].shape
                                    for k, s in state.items()),
                    num_state=len(state), num_params=len(msd))
        ids = local_batch(t, rank, world)
        if dev is not None:
            ids = ids.to(dev)
        acc.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    return {"params": _full_params(model), "checks": checks}


# --------------------------------------------------------------------------------------------
# HF Trainer
# --------------------------------------------------------------------------------------------

def forced_fsdp_trainer(base: type) -> type:
    """``base`` (a Trainer class) whose accelerator runs FSDP2 on CPU: accelerate enables FSDP only
    for GPU-like distributed types (on ``MULTI_CPU`` it drops the plugin Trainer passes); this flips
    that one gate right after Trainer creates its Accelerator, so Trainer's own FSDP2 code runs
    unchanged (optimizer built on the plain model, ``accelerator.prepare`` shards and swaps, FSDP
    checkpoint save and resume). On a GPU it changes nothing."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class ForcedFSDP(base):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if state.distributed_type != DistributedType.FSDP:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

    return ForcedFSDP


class GlobalBatches(torch.utils.data.Dataset):
    """The fsdp scenario's global batches as rows (batch t = rows ``[8 t, 8 t + 8)``)."""

    def __init__(self, steps: int) -> None:
        from benchmarks.scenarios.fsdp import global_batch

        self.ids = torch.cat([global_batch(t) for t in range(steps)])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_fsdp2_worker(rank: int, world: int, out_dir: str, steps: int, fsdp: str | None,
                         save_steps: int | None = None, resume: str | None = None,
                         use_cpu: bool = False) -> dict[str, Any]:
    """``MuonClipTrainer`` on the fsdp scenario's model and batches (global batch 8, constant lr,
    no clipping, data in order): ``fsdp`` = FSDP2 ``state_dict_type`` or ``None`` (plain Trainer,
    the oracle). Returns full parameters, losses and the optimizer's layout."""
    from transformers import TrainingArguments

    import dist_muonclip.hf as hf

    extra: dict[str, Any] = {}
    if fsdp is not None:
        extra = dict(fsdp=True, fsdp_config={"version": 2,
                                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                             "state_dict_type": fsdp, "reshard_after_forward": True})
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=8 // world, learning_rate=OPT_KW["lr"],
        weight_decay=OPT_KW["weight_decay"], max_grad_norm=0.0, lr_scheduler_type="constant",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 1, logging_steps=1, report_to=[],
        seed=0, dataloader_num_workers=0, use_cpu=use_cpu, disable_tqdm=True, train_sampling_strategy="sequential",
        **extra)
    losses: list[float] = []

    from transformers import TrainerCallback

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cls = forced_fsdp_trainer(hf.MuonClipTrainer) if fsdp is not None else hf.MuonClipTrainer
    kw = {k: v for k, v in OPT_KW.items() if k not in ("lr", "weight_decay")}
    trainer = cls(model=build_model("llama"), args=args, train_dataset=GlobalBatches(steps), callbacks=[Losses()],
                  muonclip_kwargs={"qk_clip": QK["llama"], **kw})
    trainer.train(resume_from_checkpoint=resume)
    inner = hf.muonclip_optimizer(trainer)
    return {"params": _full_params(trainer.model), "losses": losses, "layout": type(inner.layout).__name__,
            "world_size": inner.world_size, "global_step": trainer.state.global_step,
            "clipped": inner.metrics().get("qk_clip/num_heads_clipped", 0.0),
            "device": str(next(trainer.model.parameters()).device)}
