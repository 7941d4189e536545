"""Workers for tests/test_offload.py: a CPU stand-in for an accelerator-only process group.

On the H200 MuonClip with ``offload_optimizer: {"device": "cpu"}`` failed at every ZeRO stage with
``RuntimeError: No backend type associated with device type cpu``: the engine handed NCCL (CUDA
tensors only) the host-resident tensors of the offloaded optimizer. Over gloo a CPU test cannot
see that, since gloo takes every CPU tensor. :func:`install_device_only_group` makes MuonClip's
:class:`~dist_muonclip.comm.Comm` behave like such a group on the CPU:

* a tensor is "on the group's device" only if it came out of ``Comm.to_device`` / ``stage`` /
  ``empty`` during this step (the engine's one way to put a tensor on the group's device), and
  those functions really copy (``dist_muonclip.comm.to_device`` / ``cat_to_device`` stand-ins
  clone), as a host -> device copy would;
* every collective ``Comm`` issues raises NCCL's error for a tensor that is not, naming the
  collective's tag.

So a collective on an offloaded tensor (or on anything built from one without staging) fails here
as it failed on the GPU, and the numbers of a run are those of a real staged run.
"""
from __future__ import annotations

import functools

import torch

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "reduce",
               "broadcast")


def install_device_only_group() -> dict:
    """Patch :class:`Comm` in this process (see module doc). Returns counters:
    ``staged`` (tensors put on the "device") and ``checked`` (tensors collectives received)."""
    import dist_muonclip.comm as comm_mod
    from dist_muonclip import MuonClip
    from dist_muonclip.comm import Comm

    on_device: dict[int, torch.Tensor] = {}     # storage address -> a tensor keeping it alive (one step)
    stats = {"staged": 0, "checked": 0, "tags": set()}

    def register(t: torch.Tensor) -> torch.Tensor:
        on_device[t.untyped_storage().data_ptr()] = t
        stats["staged"] += 1
        return t

    Comm.on_device = lambda self, t: t.untyped_storage().data_ptr() in on_device
    for name in ("to_device", "stage", "empty"):
        orig = getattr(Comm, name, None)
        if orig is not None:     # (absent before the fix: then nothing is ever on the device)
            setattr(Comm, name, functools.wraps(orig)(lambda self, *a, _o=orig, **k: register(_o(self, *a, **k))))
    comm_mod.to_device = lambda t, device: t.clone()                     # a device copy, even here
    comm_mod.cat_to_device = lambda pieces, device: torch.cat(list(pieces))

    for name in COLLECTIVES:
        orig = getattr(Comm, name)

        def checked(self, *args, _o=orig, _name=name, **kw):
            for t in list(args) + list(kw.values()):
                if isinstance(t, torch.Tensor):
                    stats["checked"] += 1
                    if t.untyped_storage().data_ptr() not in on_device:
                        raise RuntimeError(f"No backend type associated with device type cpu ({_name}"
                                           f"[{kw.get('tag', '')}] got a tensor that was not staged on the "
                                           "process group's device)")
            stats["tags"].add(kw.get("tag", ""))
            return _o(self, *args, **kw)

        setattr(Comm, name, checked)

    step = MuonClip.step

    def fresh_step(self, *a, **k):
        on_device.clear()                          # staged buffers of the previous step are gone
        return step(self, *a, **k)

    MuonClip.step = functools.wraps(step)(fresh_step)
    return stats


def flat_layout_worker(rank: int, world: int, steps: int, device_only: bool, runs=({},)) -> list[dict]:
    """MuonClip on flat fragments (DeepSpeed-ZeRO-1/2-like cuts, mid-row and uneven) with QK-Clip
    clipping, once per entry of ``runs`` (``max_grad_norm``: the global gradient clip and its
    all-reduce; ``buckets_in_flight``: the layout's bound): the engine's collectives without
    DeepSpeed. ``device_only``: under :func:`install_device_only_group`."""
    stats = install_device_only_group() if device_only else None
    outs = []
    for run in runs:
        out = _run_flat(rank, world, steps, **run)
        if stats is not None:
            out["stats"] = {**stats, "tags": sorted(stats["tags"])}
            stats["tags"].clear()
        outs.append(out)
    return outs


def _run_flat(rank: int, world: int, steps: int, max_grad_norm: float | None = None,
              buckets_in_flight: int | None = None) -> dict:
    import torch.distributed as dist

    from benchmarks.scenarios import ddp as S
    from dist_muonclip import MuonClip
    from dist_muonclip.layouts import FlatRangesLayout

    model = S.tiny_model("llama", seed=0)
    names = {p: n for n, p in model.named_parameters()}
    ranges = {n: S.random_ranges(n, p.numel(), world) for n, p in model.named_parameters()}
    opt = MuonClip(model, **S.OPT_KW, max_grad_norm=max_grad_norm, layout=FlatRangesLayout(ranges, names, rank))
    opt.layout.buckets_in_flight = buckets_in_flight
    for t in range(steps):
        ids = S.local_batch(t, rank, world)
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                (a, b), = ranges[n][rank]
                flat = p.view(-1)
                flat[:a].zero_()
                flat[b:].zero_()
                dist.all_reduce(p.data)
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "metrics": opt.metrics(), "num_buckets": len(opt.plan.buckets)}


def ds_offload_worker(rank: int, world: int, scenarios: list[dict], device_only: bool) -> list[dict]:
    """DeepSpeed ZeRO runs (``benchmarks.scenarios.deepspeed.zero3_worker`` scenarios, e.g. with
    ``offload``), under :func:`install_device_only_group` when ``device_only``."""
    from benchmarks.scenarios import deepspeed as D

    stats = install_device_only_group() if device_only else None
    outs = D.zero3_worker(rank, world, scenarios)
    if stats is not None:
        for o in outs:
            o["stats"] = {**stats, "tags": sorted(stats["tags"])}
    return outs


def bf16_clip_worker(rank: int, world: int, runs: list[dict], steps: int = 3) -> list[dict]:
    """The bf16 CPU smoke of benchmarks/zero_offload_gpu.py (tiny Llama, ``"bf16"``, MuonClip,
    fp32 Newton-Schulz), once per run: ``stage``, ``offload``, ``clip`` (``gradient_clipping``).
    Returns DeepSpeed's global gradient norm per step and the fp32 masters by name."""
    import os

    import benchmarks.zero_offload_gpu as B
    from dist_muonclip import deepspeed as dmc_ds

    os.environ.setdefault("DIST_MUONCLIP_DS_SHM", "0")
    dmc_ds.disable_shm_comm()
    outs = []
    for run in runs:
        model = B.build_model(B.SMOKE_SHAPE, "cpu")
        cfg = B.ds_config("muonclip", run["stage"], run["offload"], 2, 0.02)
        cfg["gradient_clipping"] = run["clip"]
        engine, *_ = dmc_ds.initialize(model=model, config=cfg)
        gen = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(steps):
            ids = torch.randint(0, B.SMOKE_SHAPE["vocab_size"], (2, 32), generator=gen)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
        masters = {k: v.detach().float().clone() for k, v in dmc_ds.full_state_dict(engine)["masters"].items()}
        engine.destroy()
        outs.append({"norms": norms, "masters": masters})
    return outs
