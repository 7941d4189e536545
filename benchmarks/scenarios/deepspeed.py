"""DeepSpeed scenarios run on W gloo processes by tests/test_deepspeed.py (module-level for spawn).

:func:`train_single` and :func:`ds_train_worker` also serve ``benchmarks/multi_gpu.py --check`` on
GPUs: ``kind`` picks the tiny model (GQA "llama", MLA "deepseek_v3"), ``device`` the oracle's
device; DeepSpeed places each rank's engine on its accelerator (``cuda:LOCAL_RANK``) by itself.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.scenarios.ddp import GLOBAL_BATCH, global_batch, local_batch
from benchmarks.scenarios.tiny_hf import tiny_model

# Equivalence runs: fp32 Newton-Schulz so the only difference from the oracle is reduction order.
MC_PARAMS = dict(lr=0.02, adamw_lr=0.01, weight_decay=0.1, ns_dtype="float32", ns_backend="torch")
CLIP = 1.0   # DeepSpeed gradient_clipping; the oracle clips the raw gradient the same way


def qk_clip_params() -> dict[str, Any]:
    """QK-Clip active on the tiny model: tau below its max logits, so heads get clipped every step."""
    try:
        import dist_muonclip.qk_clip  # noqa: F401
    except ImportError:
        return {}
    return {"qk_clip": {"tau": 0.1}}


def ds_config(stage: int, world: int, *, bf16: bool | str = False, params: dict | None = None,
              scheduler: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "MuonClip", "params": {**MC_PARAMS, **qk_clip_params(), **(params or {})}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if bf16 == "fp32_accum":   # ZeRO-1 + bf16 + fp32 gradient accumulation -> DeepSpeed's BF16_Optimizer
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.002, "warmup_max_lr": 0.02,
                                                           "warmup_num_steps": 4, "warmup_type": "linear"}}
    return cfg


def warmup_factor(step: int) -> float:
    """lr factor of optimizer step ``step`` (0-based) under the WarmupLR section of :func:`ds_config`.

    DeepSpeed's WarmupLR starts at ``last_batch_iteration = -1`` (lr = warmup_min_lr) and is stepped
    after every optimizer step, so step ``t`` runs with gamma = max(0, t - 1) / 4 (capped at 1) and
    lr = 0.002 + 0.018 * gamma, i.e. a factor 0.1 + 0.9 * gamma of the configured lr 0.02.
    """
    return 0.1 + 0.9 * min(1.0, max(0, step - 1) / 4)


def train_single(steps: int, *, clip: float = CLIP, start: int = 0, model=None, opt=None, params: dict | None = None,
                 scheduler: bool = False, kind: str = "llama", device: str | torch.device | None = None,
                 model_kw: dict | None = None, norms: list | None = None):
    """Single-process oracle: whole global batch, raw-gradient clipping before the optimizer.
    ``norms``: a list that receives every step's pre-clip global gradient norm."""
    from dist_muonclip import MuonClip

    if model is None:
        model = tiny_model(kind, seed=0, **(model_kw or {}))
        if device is not None:
            model.to(device)
        opt = MuonClip(model, **{**MC_PARAMS, **qk_clip_params(), **(params or {})})
    dev = next(model.parameters()).device
    base = [g["lr"] for g in opt.param_groups]
    for t in range(start, start + steps):
        if scheduler:
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * warmup_factor(t)
        ids = global_batch(t).to(dev)
        model(input_ids=ids, labels=ids).loss.backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if norms is not None:
                norms.append(float(norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _setup() -> None:
    os.environ.setdefault("DIST_MUONCLIP_DS_SHM", "0")
    from dist_muonclip.deepspeed import disable_shm_comm

    disable_shm_comm()


def layout_name(engine) -> str:
    from dist_muonclip.deepspeed import deepspeed_client

    return deepspeed_client(engine).layout_name


def _fp32_params(engine) -> dict[str, torch.Tensor]:
    """Parameters by name; fp32 master weights where DeepSpeed keeps them (exact for comparison)."""
    from dist_muonclip.deepspeed import full_state_dict

    state = full_state_dict(engine)
    return {k: v.detach().cpu().clone() for k, v in state["masters"].items()}


def ds_train_worker(rank: int, world: int, stage: int, steps: int, bf16: bool | str = False, params: dict | None = None,
                    scheduler: bool = False, use_instance: bool = False, accountant: bool = False,
                    save_dir: str | None = None, save_at: int | None = None, resume_dir: str | None = None,
                    start: int = 0, native_resume: bool = False, kind: str = "llama", model_kw: dict | None = None):
    """One DeepSpeed run of the tiny ``kind`` model; returns fp32 master parameters (CPU), lrs,
    NS calls, state size, accountant totals and the optimizer's metrics."""
    _setup()
    from dist_muonclip import MuonClip
    from dist_muonclip.comm import CommAccountant
    from dist_muonclip.deepspeed import initialize, load_checkpoint, muonclip_optimizer, save_checkpoint

    model = tiny_model(kind, seed=0, **(model_kw or {}))
    cfg = ds_config(stage, world, bf16=bf16, params=params, scheduler=scheduler)
    acc = CommAccountant() if accountant else None
    if use_instance:
        mc = cfg.pop("optimizer")["params"]
        opt = MuonClip(model, accountant=acc, **mc)
        engine, *_ = initialize(model=model, optimizer=opt, config=cfg)
    else:
        engine, *_ = initialize(model=model, config=cfg, accountant=acc)
    inner = muonclip_optimizer(engine)
    lp_loaded = loaded = saved = None
    if resume_dir is not None:
        if native_resume:
            engine.load_checkpoint(resume_dir)
        else:
            load_checkpoint(engine, resume_dir)
        loaded = _fp32_params(engine)
        lp_loaded = _lp_mismatch(engine, loaded)
    ns_calls = []
    restore_ns = _count_ns(ns_calls)
    lrs, norms = [], []
    try:
        for t in range(start, start + steps):
            ids = local_batch(t, rank, world).to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            lrs.append([g["lr"] for g in inner.param_groups])
            norm = engine.get_global_grad_norm()     # DeepSpeed's pre-clip global norm
            norms.append(None if norm is None else float(norm))
            if save_dir is not None and save_at is not None and t + 1 == save_at:
                save_checkpoint(engine, save_dir, tag="ckpt")
                saved = _fp32_params(engine)
    finally:
        restore_ns()
    layout = inner.layout
    moved = 0      # Muon elements held by a rank other than the matrix's owner (sent there and back)
    if layout.sharded:
        for g in inner.param_groups:
            if g["use_muon"]:
                for p in g["params"]:
                    moved += _moved_elems(inner, layout, p)
    local = {"muon": 0, "adamw": 0}     # parameter elements whose optimizer state this rank holds
    if layout.sharded:
        for g in inner.param_groups:
            for p in g["params"]:
                local["muon" if g["use_muon"] else "adamw"] += sum(b - a for a, b in layout.ranges(p)[rank])
    masters = _fp32_params(engine)
    out = {"moved_elems": moved, "local_elems": local, "params": masters, "lrs": lrs, "norms": norms,
           "lp_params": {k: p.detach().cpu().clone() for k, p in engine.module.named_parameters()},
           "lp_mismatch_after_load": lp_loaded, "lp_mismatch": _lp_mismatch(engine, masters),
           "saved_params": saved, "loaded_params": loaded,
           "layout": layout_name(engine),
           "ns_matrices": ns_calls,
           "state_numel": sum(t.numel() for s in inner.state.values() for t in s.values()
                              if isinstance(t, torch.Tensor) and t.ndim > 0),
           "acc": acc.totals() if acc is not None else None, "acc_steps": len(acc.steps) if acc else 0,
           "metrics": inner.metrics()}
    return out


def _lp_mismatch(engine, masters: dict[str, torch.Tensor]) -> list[str]:
    """Names of the model's (low-precision) parameters that are not their fp32 master rounded to
    the parameter's dtype: DeepSpeed must refresh them from the masters after every step and load."""
    return [k for k, p in engine.module.named_parameters()
            if not torch.equal(p.detach().cpu(), masters[k].to(p.dtype).view_as(p))]


def _moved_elems(inner, layout, p) -> int:
    """Elements of ``p`` held by ranks other than the owner of the matrices they belong to. A
    stacked [E, m, n] parameter may be planned as chunks of whole matrices (``MatrixItem.parent``
    / ``start``), each with its own owner (an MLA + MoE model's experts)."""
    name = inner.param_name(p)
    owners = inner.plan.owners
    if name in owners:
        spans = [(0, p.numel(), owners[name])]
    else:
        per = p[0].numel()      # elements of one matrix of the stack
        spans = [(it.start * per, (it.start + it.num_matrices) * per, owners[it.name])
                 for it in inner.plan.items if it.parent == name]
    ranges = layout.ranges(p)
    return sum(max(0, min(b, hi) - max(a, lo)) for lo, hi, owner in spans
               for r, rs in enumerate(ranges) if r != owner for a, b in rs)


def _count_ns(calls: list):
    """Record every matrix this rank orthogonalizes (at the engine's call site,
    ``dist_muonclip.ns_split.orthogonalize``); returns the function that puts the real one back
    (several scenarios share one process)."""
    import dist_muonclip.ns_split as optmod

    real = optmod.orthogonalize

    def counting(x, **kw):
        calls.append(int(x.shape[0]) if x.ndim == 3 else 1)
        return real(x, **kw)

    optmod.orthogonalize = counting

    def restore() -> None:
        optmod.orthogonalize = real

    return restore


def ds_nonfinite_worker(rank: int, world: int, stage: int, bf16: bool | str):
    """Rank 1 gets an inf in one Muon matrix's gradient at step 2 (config with gradient_clipping
    and a WarmupLR scheduler): the step must leave MuonClip's state (momentum, AdamW moments) and
    the fp32 masters untouched, DeepSpeed must book it as a skipped step (``skipped_steps``,
    ``was_step_applied``, scheduler not advanced, global norm inf), and training must go on."""
    _setup()
    from dist_muonclip.deepspeed import full_state_dict, initialize, muonclip_optimizer

    model = tiny_model("llama", seed=0)
    engine, *_ = initialize(model=model, config=ds_config(stage, world, bf16=bf16, scheduler=True))
    inner = muonclip_optimizer(engine)
    target = model.model.layers[0].mlp.up_proj.weight
    poison = {"on": False}
    target.register_hook(lambda g: g * float("inf") if poison["on"] and rank == 1 else g)

    def snapshot():
        state = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                 for p, s in inner.state.items()}
        return state, full_state_dict(engine)["masters"]

    import warnings

    out = {"applied": [], "norms": []}
    for t in range(5):
        ids = local_batch(t, rank, world)
        if t == 2:
            before = snapshot()
            poison["on"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        poison["on"] = False
        out["applied"].append(engine.was_step_applied())
        norm = engine.get_global_grad_norm()
        out["norms"].append(None if norm is None else float(norm))
        if t == 2:
            after = snapshot()
            out["state_unchanged"] = before[0].keys() == after[0].keys() and all(
                torch.equal(before[0][k][n], after[0][k][n]) for k in before[0] for n in before[0][k])
            out["masters_unchanged"] = all(torch.equal(before[1][k], after[1][k]) for k in before[1])
            out["num_state"] = len(before[0])
    final = full_state_dict(engine)["masters"]
    out["finite"] = all(bool(v.isfinite().all()) for v in final.values())
    out["state_finite"] = all(bool(v.isfinite().all()) for s in inner.state.values() for v in s.values()
                              if isinstance(v, torch.Tensor))
    out["moved"] = any(not torch.equal(final[k], after[1][k]) for k in final)
    out["skipped_steps"] = engine.skipped_steps
    out["scheduler_steps"] = engine.lr_scheduler.last_batch_iteration + 1
    out["muonclip_steps"] = inner.num_steps
    out["layout"] = layout_name(engine)
    return out


def ds_args_worker(rank: int, world: int, config_path: str):
    """The --deepspeed_config path: deepspeed.add_config_arguments + initialize(args=...)."""
    _setup()
    import argparse

    import deepspeed

    from dist_muonclip.deepspeed import initialize, muonclip_optimizer

    bad = ds_config(1, world, params={"momentum": 1.5})
    try:   # a value out of range: refused with the config path, before DeepSpeed touches the model
        initialize(model=tiny_model("llama", seed=0), config=bad)
        value_error = None
    except ValueError as e:
        value_error = str(e)
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    parser.add_argument("--local_rank", type=int, default=rank)
    args = parser.parse_args(["--deepspeed_config", config_path])
    model = tiny_model("llama", seed=0)
    engine, opt, _, sched = initialize(args=args, model=model)
    ids = local_batch(0, rank, world)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    inner = muonclip_optimizer(engine)
    return {"layout": layout_name(engine), "stage": engine.zero_optimization_stage(),
            "opt_is_engine_optimizer": opt is engine.optimizer, "momentum": inner.param_groups[0]["momentum"],
            "args_untouched": args.deepspeed_config == config_path, "stepped": bool(inner.state),
            "value_error": value_error}


# ---------------------------------------------------------------- DeepSpeed Muon's tags and keys

# DeepSpeed Muon's own tagging rule (deepspeed.set_optimizer_flags): matrices that are not
# embeddings or the head -> Muon. One hidden matrix is moved to AdamW by its tag, so the tags
# differ from MuonClip's automatic split; the own-names run says the same with adamw_patterns.
TAGGED_TO_ADAMW = "model.layers.0.mlp.down_proj.weight"
# A section written for DeepSpeed's Muon ("type": "Muon" changed to "MuonClip") ...
DEEPSPEED_MUON_PARAMS = {"lr": 0.01, "muon_lr": 0.02, "momentum": 0.95, "weight_decay": 0.1, "betas": [0.9, 0.95],
                         "eps": 1e-8, "ns_method": "gram", "torch_adam": True, "adam_w_mode": True}
# ... and the same run in MuonClip's own names (adjust_lr_fn "original": DeepSpeed's update scale)
OWN_NAMES_PARAMS = {"lr": 0.02, "adamw_lr": 0.01, "momentum": 0.95, "weight_decay": 0.1, "adamw_betas": [0.9, 0.95],
                    "adamw_eps": 1e-8, "ns_coefficients": "jordan", "adjust_lr_fn": "original",
                    "adamw_patterns": [TAGGED_TO_ADAMW]}


def tag_like_deepspeed(model) -> None:
    for name, p in model.named_parameters():
        p.use_muon = p.ndim >= 2 and not any(k in name for k in ("embed", "lm_head")) and name != TAGGED_TO_ADAMW


def ds_tags_worker(rank: int, world: int, stages, steps: int):
    """Per ZeRO stage: the tagged model with DeepSpeed Muon's keys, then the untagged model with
    MuonClip's own names; returns both runs' fp32 masters, bf16/fp32 model parameters, losses and
    the split table of the tagged run."""
    _setup()
    from dist_muonclip.deepspeed import initialize, muonclip_optimizer

    out = {}
    for stage in stages:
        for variant, params in (("deepspeed_keys", DEEPSPEED_MUON_PARAMS), ("own_names", OWN_NAMES_PARAMS)):
            model = tiny_model("llama", seed=0)
            if variant == "deepspeed_keys":
                tag_like_deepspeed(model)
            cfg = ds_config(stage, world)
            cfg["optimizer"]["params"] = {**params, "ns_dtype": "float32", "ns_backend": "torch", **qk_clip_params()}
            engine, *_ = initialize(model=model, config=cfg)
            losses = []
            for t in range(steps):
                ids = local_batch(t, rank, world).to(engine.device)
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.detach()))
            # ZeRO-3 partitions the module's parameters (empty outside forward): the masters say it all
            lp = {} if stage == 3 else {k: p.detach().cpu().clone() for k, p in engine.module.named_parameters()}
            out[stage, variant] = {"params": _fp32_params(engine), "losses": losses,
                                   "split": muonclip_optimizer(engine).describe_split(), "lp": lp}
    return out


# ---------------------------------------------------------------- engine checkpoints, stage x precision

def ds_engine_checkpoint_worker(rank: int, world: int, scenarios, root: str, steps: int = 2):
    """Per ``(stage, bf16)``: train ``steps``, ``engine.save_checkpoint``, train ``steps`` more
    (the reference); then a fresh model and engine, ``engine.load_checkpoint``, ``steps`` steps.
    Returns, per scenario, the names that differ (fp32 masters and model parameters right after
    the load vs at the save, and after the resumed steps vs the reference) and both lr traces."""
    _setup()
    from dist_muonclip.deepspeed import initialize, muonclip_optimizer

    def run(engine, start):
        lrs = []
        for t in range(start, start + steps):
            ids = local_batch(t, rank, world).to(engine.device)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            lrs.append([g["lr"] for g in muonclip_optimizer(engine).param_groups])
        return lrs

    def snapshot(engine):
        return _fp32_params(engine), {k: p.detach().cpu().clone() for k, p in engine.module.named_parameters()}

    def diff(a, b):
        return sorted(k for k in a if not torch.equal(a[k], b[k]))

    out = {}
    for stage, bf16 in scenarios:
        ckpt = os.path.join(root, f"zero{stage}_{bf16}")
        engine, *_ = initialize(model=tiny_model("llama", seed=0),
                                config=ds_config(stage, world, bf16=bf16, scheduler=True))
        run(engine, 0)
        engine.save_checkpoint(ckpt, tag="mid")
        saved = snapshot(engine)
        ref_lrs = run(engine, steps)
        ref = snapshot(engine)
        fresh, *_ = initialize(model=tiny_model("llama", seed=1),     # other init: the load must overwrite it
                               config=ds_config(stage, world, bf16=bf16, scheduler=True))
        fresh.load_checkpoint(ckpt, tag="mid")
        loaded = snapshot(fresh)
        lrs = run(fresh, steps)
        got = snapshot(fresh)
        out[stage, bf16] = {"load_masters": diff(loaded[0], saved[0]), "load_params": diff(loaded[1], saved[1]),
                            "resume_masters": diff(got[0], ref[0]), "resume_params": diff(got[1], ref[1]),
                            "lrs": lrs, "ref_lrs": ref_lrs, "steps": int(fresh.global_steps),
                            "ref_steps": int(engine.global_steps)}
    return out


# ------------------------------------------------------------------ ZeRO-3 (tests/test_deepspeed_zero3.py)

def zero3_config(world: int, *, bf16: bool = False, micro: int | None = None, persistence: int = 64,
                 sub_group_size: int | None = None, params: dict | None = None) -> dict[str, Any]:
    """Stage 3 config: parameters under ``persistence`` elements (norm weights) stay whole for
    forward/backward; ``micro`` < global batch / world turns on gradient accumulation."""
    cfg = ds_config(3, world, bf16=bf16, params=params)
    per = GLOBAL_BATCH // world
    micro = per if micro is None else micro
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = per // micro
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": persistence}
    if sub_group_size is not None:
        cfg["zero_optimization"]["sub_group_size"] = sub_group_size
    return cfg


def load_zero3_weights(model, ref: dict, rank: int) -> None:
    """Copy ``ref`` into a model partitioned by ``deepspeed.zero.Init`` (as HF's from_pretrained
    does under ZeRO-3): gather, rank 0 writes, DeepSpeed re-partitions."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(ref[n])


def zero3_worker(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Several ZeRO-3 runs in one spawn. Each scenario: ``steps``, ``bf16``, ``zero_init`` (build the
    model under ``deepspeed.zero.Init``), ``micro`` (micro-batch size: gradient accumulation),
    ``sub_group_size``, ``persistence``, ``kind``, ``model_kw``. Returns per scenario the fp32
    masters (full, by name), the NS matrices counted per step on this rank, the layout name,
    the elements of Muon matrices held by non-owners, and the metrics."""
    _setup()
    import deepspeed

    from dist_muonclip.deepspeed import full_state_dict, initialize, muonclip_optimizer

    results = []
    for sc in scenarios:
        stage = sc.get("stage", 3)
        if stage == 3:
            cfg = zero3_config(world, bf16=sc.get("bf16", False), micro=sc.get("micro"),
                               persistence=sc.get("persistence", 64), sub_group_size=sc.get("sub_group_size"),
                               params=sc.get("params"))
        else:
            cfg = ds_config(stage, world, bf16=sc.get("bf16", False), params=sc.get("params"))
        if sc.get("offload"):
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        kind, model_kw = sc.get("kind", "llama"), sc.get("model_kw") or {}
        if sc.get("zero_init", False):
            deepspeed.init_distributed()     # zero.Init reads the world size from deepspeed.comm
            # HF's weight init runs on the already partitioned (empty) tensors under zero.Init:
            # load the oracle's initial weights the way HF's from_pretrained does under ZeRO-3.
            # (Built first: the model class's lazy import fails inside zero.Init's patched
            # tensor constructors.)
            ref = dict(tiny_model(kind, seed=0, **model_kw).named_parameters())
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                model = tiny_model(kind, seed=0, **model_kw)
            load_zero3_weights(model, ref, rank)
        else:
            model = tiny_model(kind, seed=0, **model_kw)
        from dist_muonclip.comm import CommAccountant

        acc = CommAccountant()
        engine, *_ = initialize(model=model, config=cfg, accountant=acc)
        inner = muonclip_optimizer(engine)
        gas = cfg.get("gradient_accumulation_steps", 1)
        micro = cfg["train_micro_batch_size_per_gpu"]
        ns_per_step = []
        for t in range(sc.get("steps", 3)):
            calls: list = []
            restore = _count_ns(calls)
            try:
                ids = local_batch(t, rank, world)
                for k in range(gas):
                    mb = ids[k * micro:(k + 1) * micro].to(engine.device)
                    engine.backward(engine(input_ids=mb, labels=mb).loss)
                    engine.step()
            finally:
                restore()
            ns_per_step.append(sum(calls))
        layout = inner.layout
        moved = sum(_moved_elems_z3(inner, layout, p) for g in inner.param_groups if g["use_muon"]
                    for p in g["params"])
        masters = {k: v.detach().cpu().clone() for k, v in full_state_dict(engine)["masters"].items()}
        results.append({"params": masters, "ns_per_step": ns_per_step, "layout": layout_name(engine),
                        "moved_elems": moved, "metrics": inner.metrics(),
                        "num_sub_groups": getattr(layout, "num_sub_groups", None),
                        "acc": acc.totals(), "acc_steps": len(acc.steps),
                        "state_numel": sum(t.numel() for st in inner.state.values() for t in st.values()
                                           if isinstance(t, torch.Tensor) and t.ndim > 0),
                        "state_devices": sorted({str(v.device) for st in inner.state.values() for v in st.values()
                                                 if isinstance(v, torch.Tensor) and v.ndim > 0}),
                        "partition_devices": sorted({str(layout.local_param(p).device) for g in inner.param_groups
                                                     for p in g["params"]})})
        engine.destroy()
    return results


def _moved_elems_z3(inner, layout, p) -> int:
    """Elements of a (non-stacked) Muon matrix held by ranks other than its owner."""
    owner = inner.plan.owners.get(inner.param_name(p))
    if owner is None:
        return 0
    return sum(b - a for r, rs in enumerate(layout.ranges(p)) if r != owner for a, b in rs)


def zero3_ckpt_worker(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """Checkpoint runs in one spawn, each ``dict(stage, steps, start, save_dir=None, save_at=None,
    resume=None | "native" | "full", resume_dir)``: train ``steps`` steps from ``start`` (after
    resuming), optionally saving through :func:`dist_muonclip.deepspeed.save_checkpoint` after step
    ``save_at``. Returns per run the fp32 masters at the end and right after loading."""
    _setup()
    from dist_muonclip.deepspeed import full_state_dict, initialize, load_checkpoint, save_checkpoint

    out = []
    for run in runs:
        stage = run["stage"]
        cfg = zero3_config(world) if stage == 3 else ds_config(stage, world)
        engine, *_ = initialize(model=tiny_model("llama", seed=0), config=cfg)
        loaded = None
        if run.get("resume") == "native":
            engine.load_checkpoint(run["resume_dir"], tag="ckpt")
        elif run.get("resume") == "full":
            load_checkpoint(engine, run["resume_dir"], tag="ckpt")
        if run.get("resume"):
            loaded = {k: v.clone() for k, v in full_state_dict(engine)["masters"].items()}
        start = run.get("start", 0)
        for t in range(start, start + run["steps"]):
            ids = local_batch(t, rank, world).to(engine.device)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            if run.get("save_at") == t + 1:
                save_checkpoint(engine, run["save_dir"], tag="ckpt")
        lp = {k: p.detach().clone() for k, p in engine.module.named_parameters()} if stage != 3 else None
        out.append({"params": {k: v.clone() for k, v in full_state_dict(engine)["masters"].items()},
                    "loaded": loaded, "lp": lp})
        engine.destroy()
    return out
