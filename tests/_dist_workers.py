"""Training scenarios run on W gloo processes by test_distributed (module-level for spawn).

The equivalence scenarios (:func:`train_single`, :func:`train_worker`) also run on GPUs over NCCL
from ``benchmarks/multi_gpu.py --check``: ``device=None`` keeps everything on the CPU (the tests),
``device="cuda"`` puts each rank on ``cuda:LOCAL_RANK`` (the oracle on the current GPU).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from dist_muonclip import MuonClip
from dist_muonclip.comm import CommAccountant, ddp_accounting_hook
from tests._tiny_hf import tiny_model

GLOBAL_BATCH, SEQ, VOCAB = 8, 16, 96
# tau=0.1 sits inside the tiny model's max-logit range (~0.10-0.14), so QK-Clip clips heads in
# most steps and the cross-rank MAX reduction of the logits is exercised.
OPT_KW = dict(lr=0.02, adamw_lr=0.01, weight_decay=0.1, ns_dtype="float32", ns_backend="torch",
              qk_clip={"tau": 0.1})


def rank_device(device: str | torch.device | None) -> torch.device | None:
    """``None`` -> None (CPU, the tests' default); ``"cuda"`` -> this rank's GPU (``LOCAL_RANK``,
    else the current device); any other value -> ``torch.device(device)``."""
    if device is None:
        return None
    if str(device) == "cuda":
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
    return torch.device(device)


def to_device(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return x if device is None else x.to(device)


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def local_batch(step: int, rank: int, world: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world
    return global_batch(step)[rank * per:(rank + 1) * per]


def build(kind: str = "llama", device: str | torch.device | None = None, **kw):
    model = tiny_model(kind, seed=0)
    dev = rank_device(device)
    if dev is not None:
        model.to(dev)
    opt = MuonClip(model, **{**OPT_KW, **kw})
    return model, opt


def train_single(steps: int, kind: str = "llama", start: int = 0, model=None, opt=None, device=None, **kw):
    """The oracle: one process, the whole global batch (on ``device``, default CPU)."""
    if model is None:
        model, opt = build(kind, device, **kw)
    dev = next(model.parameters()).device
    for t in range(start, start + steps):
        ids = global_batch(t).to(dev)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def train_worker(rank: int, world: int, mode: str, steps: int, kind: str = "llama", kw: dict | None = None,
                 save_state: bool = False, load_state: dict | None = None, start: int = 0,
                 device: str | None = None):
    """Train under DDP ('ddp') or optimizer-owned reduction ('optimizer'); return params + accounting.
    ``device="cuda"``: this rank's GPU (NCCL); parameters are returned on the CPU either way."""
    kw = dict(kw or {})
    acc = CommAccountant()
    dev = rank_device(device)
    model, opt = build(kind, dev, grad_reduction="external" if mode == "ddp" else "optimizer", accountant=acc, **kw)
    if load_state is not None:
        model.load_state_dict(load_state["model"])
        opt.load_state_dict(load_state["optim"])
    fwd = model
    if mode == "ddp":
        ids_kw = {"device_ids": [dev.index]} if dev is not None and dev.type == "cuda" else {}
        fwd = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1, **ids_kw)
        fwd.register_comm_hook(acc, ddp_accounting_hook)
    for t in range(start, start + steps):
        ids = to_device(local_batch(t, rank, world), dev)
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {"params": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
           "acc": acc.totals(), "num_steps": len(acc.steps), "owners": dict(opt._plan.owners),
           "loads": list(opt._plan.loads),
           "state_numel": sum(t.numel() for s in opt.state.values() for t in s.values()
                              if isinstance(t, torch.Tensor) and t.ndim > 0)}
    if save_state:
        out["checkpoint"] = {"model": out["params"], "optim": opt.state_dict()}
    return out


def mismatch_worker(rank: int, world: int):
    """Rank 1 builds a model whose layer 1 MLP is wider: the plan check must name the parameter."""
    model = tiny_model("llama", seed=0, intermediate_size=96 if rank == 0 else 112)
    MuonClip(model, lr=0.01)
    return "constructed"


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 12, bias=False)
        self.b = nn.Linear(12, 12, bias=False)
        self.c = nn.Linear(12, 12, bias=False)

    def forward(self, x, use_b: bool):
        h = self.a(x)
        if use_b:
            h = h + self.b(x)
        return self.c(torch.tanh(h)).square().mean()


def branch_inputs(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(10 * step + rank))


def missing_grad_worker(rank: int, world: int, steps: int):
    """Parameter b gets a gradient on rank 0 only (optimizer-owned reduction: zeros elsewhere)."""
    model = _TwoBranch()
    opt = MuonClip(model, lr=0.05, ns_dtype="float32", ns_backend="torch", grad_reduction="optimizer")
    for t in range(steps):
        model(branch_inputs(t, rank), use_b=(rank == 0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def nonfinite_worker(rank: int, world: int):
    """Rank 1 sees an inf in c's gradient: every rank skips c alike and keeps its state clean."""
    import warnings

    model = _TwoBranch()
    opt = MuonClip(model, lr=0.05, ns_dtype="float32", ns_backend="torch", grad_reduction="optimizer")
    model(branch_inputs(0, rank), use_b=True).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    c_before = model.c.weight.detach().clone()
    c_state = {k: v.clone() for k, v in opt.state[model.c.weight].items()} if model.c.weight in opt.state else {}
    a_before = model.a.weight.detach().clone()
    model(branch_inputs(1, rank), use_b=True).backward()
    if rank == 1:
        model.c.weight.grad[0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    c_state_after = {k: v.clone() for k, v in opt.state[model.c.weight].items()} if model.c.weight in opt.state else {}
    return {"c_unchanged": torch.equal(model.c.weight, c_before),
            "c_state_unchanged": c_state.keys() == c_state_after.keys()
            and all(torch.equal(c_state[k], c_state_after[k]) for k in c_state),
            "a_changed": not torch.equal(model.a.weight, a_before),
            "warned": any("c.weight" in str(w.message) for w in caught),
            "params": {k: v.clone() for k, v in model.state_dict().items()}}


def failing_rank_worker(rank: int, world: int):
    """Rank 1 hands step() a sparse gradient: it raises, the others must raise too, not hang."""
    model = _TwoBranch()
    opt = MuonClip(model, lr=0.05, ns_backend="torch")
    model(branch_inputs(0, rank), use_b=True).backward()
    if rank == 1:
        model.a.weight.grad = model.a.weight.grad.to_sparse()
    opt.step()
    return "stepped"


def random_ranges(name: str, numel: int, world: int) -> list[list[tuple[int, int]]]:
    """Deterministic cuts of [0, numel) into `world` contiguous pieces: mid-row, uneven, some empty."""
    import random
    import zlib

    rng = random.Random(zlib.crc32(name.encode()))
    cuts = [0] + sorted(rng.randint(0, numel) for _ in range(world - 1)) + [numel]
    return [[(cuts[r], cuts[r + 1])] for r in range(world)]


def flat_layout_worker(rank: int, world: int, steps: int):
    """Sharded engine on arbitrary flat fragments (DeepSpeed-ZeRO-1/2-like cuts).

    Gradients are averaged by hand (the sharding engine's job), the optimizer updates only this
    rank's fragments, and the full parameters are re-assembled after each step (zero what is not
    ours, all-reduce SUM), as DeepSpeed's parameter all-gather would.
    """
    from dist_muonclip.layouts import FlatRangesLayout

    model = tiny_model("llama", seed=0)
    names = {p: n for n, p in model.named_parameters()}
    ranges = {n: random_ranges(n, p.numel(), world) for n, p in model.named_parameters()}
    acc = CommAccountant()
    opt = MuonClip(model, **OPT_KW, layout=FlatRangesLayout(ranges, names, rank), accountant=acc)
    for t in range(steps):
        ids = local_batch(t, rank, world)
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
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "acc": acc.totals(),
            "state": opt.state_dict()}


def add_group_worker(rank: int, world: int, steps: int):
    """Parameter c joins later through add_param_group: every rank re-plans identically."""
    model = _TwoBranch()
    opt = MuonClip([("a.weight", model.a.weight), ("b.weight", model.b.weight)], lr=0.05, ns_dtype="float32",
                   ns_backend="torch", grad_reduction="optimizer")
    opt.add_param_group({"params": [("c.weight", model.c.weight)]})
    for t in range(steps):
        model(branch_inputs(t, rank), use_b=True).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"params": {k: v.clone() for k, v in model.state_dict().items()},
            "owners": dict(opt._plan.owners)}


def spawn_sleeper(rank: int, marker_dir: str) -> None:
    """Rank 0 waits forever (a peer that never joins a collective); rank 1 returns at once."""
    import os
    import time

    open(os.path.join(marker_dir, f"started{rank}"), "w").close()
    while rank == 0:
        time.sleep(0.1)


def spawn_failer(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
