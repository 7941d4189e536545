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
from benchmarks.scenarios.tiny_hf import tiny_model

GLOBAL_BATCH, SEQ, VOCAB = 8, 16, 96
# tau=0.1 sits inside the tiny model's max-logit range (~0.10-0.14), so QK-Clip clips heads in
# most steps and the cross-rank MAX reduction of the logits is exercised. bucket_cap_mb=0.05
# (50 KiB) cuts the tiny model's ~300 KB of gradients into 5 communication buckets for the
# optimizer-owned reduction, so reductions start during backward (ignored by the other modes).
OPT_KW = dict(lr=0.02, adamw_lr=0.01, weight_decay=0.1, ns_dtype="float32", ns_backend="torch",
              qk_clip={"tau": 0.1}, bucket_cap_mb=0.05)
# Fewer Muon matrices (3) than ranks (4): the hidden matrices other than two q_proj and one k_proj
# are frozen (not moved to AdamW: AdamW divides each element by its own RMS, so an element whose
# gradient nearly cancels over the batch turns the reduction's summation order into a 1e-4
# difference, measured, and would need a looser tolerance than the engine deserves)
FEW_MATRICES_KW = dict(freeze=("*mlp*", "*o_proj*", "*v_proj*", "model.layers.1.self_attn.k_proj.weight"))


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


def build(kind: str = "llama", device: str | torch.device | None = None, freeze: tuple[str, ...] = (), **kw):
    """The tiny model and its MuonClip; ``freeze``: fnmatch globs of parameters left frozen."""
    import fnmatch

    model = tiny_model(kind, seed=0)
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in freeze):
            p.requires_grad_(False)
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
    first_bucket_calls = [len(b.regions) for b in getattr(opt.engine.grads, "buckets", [])]   # before the rebuild after step 1
    if load_state is not None:
        model.load_state_dict(load_state["model"])
        opt.load_state_dict(load_state["optim"])
    fwd = model
    if mode == "ddp":
        ids_kw = {"device_ids": [dev.index]} if dev is not None and dev.type == "cuda" else {}
        fwd = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1, **ids_kw)
        fwd.register_comm_hook(acc, ddp_accounting_hook)
    # optimizer-owned reduction: after each gradient's hook (registered after the optimizer's, so
    # it runs second), how many reduction collectives this backward has launched so far
    trace: list[int] = []

    def reduce_calls() -> int:
        return sum(c["calls"] for s in acc.steps for k, c in s.items() if k.endswith("[grad_reduce]"))

    if mode == "optimizer":
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _p: trace.append(reduce_calls() - base))
    clipped = []
    for t in range(start, start + steps):
        ids = to_device(local_batch(t, rank, world), dev)
        trace.clear()
        base = reduce_calls()
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
    out = {"params": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
           "acc": acc.totals(), "acc_steps": acc.steps, "num_steps": len(acc.steps),
           "owners": dict(opt.plan.owners), "loads": list(opt.plan.loads), "clipped": clipped,
           "bucket_counts": [b.counts(world) for b in opt.plan.buckets],
           "comm_bucket_calls": [len(b.regions) for b in getattr(opt.engine.grads, "buckets", [])], "hook_trace": list(trace),
           "first_comm_bucket_calls": first_bucket_calls,
           "state_numel": sum(t.numel() for s in opt.state.values() for t in s.values()
                              if isinstance(t, torch.Tensor) and t.ndim > 0)}
    if save_state:
        out["checkpoint"] = {"model": out["params"], "optim": opt.state_dict(),
                             "shard": opt.state_dict(sharded=True)}
    return out


def mismatch_worker(rank: int, world: int):
    """Rank 1 builds a model whose layer 1 MLP is wider: the plan check must name the parameter."""
    model = tiny_model("llama", seed=0, intermediate_size=96 if rank == 0 else 112)
    MuonClip(model, lr=0.01)
    return "constructed"


class _TwoBranch(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 12, bias=bias)
        self.b = nn.Linear(12, 12, bias=bias)
        self.c = nn.Linear(12, 12, bias=bias)

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


def _poison(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g.view(-1)[0] = float("inf")
    return g


def nonfinite_worker(rank: int, world: int, mode: str, max_grad_norm: float | None, steps: int = 3,
                     bad_step: int = 1, bad_rank: int = 1):
    """At ``bad_step``, a tensor hook puts an inf into c's weight and bias gradients on
    ``bad_rank`` during backward, so it travels the engine's reduction (DDP's all-reduce, or the
    optimizer's reduce to owners): every rank must skip c (Muon) and c.bias (AdamW) alike, keep
    their state, and step the others as if c had no gradient (also in the global norm)."""
    import warnings

    model = _TwoBranch(bias=True)
    opt = MuonClip(model, lr=0.05, ns_dtype="float32", ns_backend="torch", max_grad_norm=max_grad_norm,
                   grad_reduction="external" if mode == "ddp" else "optimizer")
    fwd = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    c = (model.c.weight, model.c.bias)

    def snapshot():
        return ([p.detach().clone() for p in c],
                [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {} for p in c])

    out = {}
    for t in range(steps):
        handles = [p.register_hook(_poison) for p in c] if t == bad_step and rank == bad_rank else []
        fwd(branch_inputs(t, rank), use_b=True).backward()
        for h in handles:
            h.remove()
        before = snapshot()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if t == bad_step:
            after = snapshot()
            out["c_unchanged"] = all(torch.equal(x, y) for x, y in zip(before[0], after[0]))
            out["c_state_unchanged"] = all(sb.keys() == sa.keys() and all(torch.equal(sb[k], sa[k]) for k in sb)
                                           for sb, sa in zip(before[1], after[1]))
            out["c_has_state"] = [bool(s) for s in after[1]]
            out["warned"] = any("c.weight" in str(w.message) and "c.bias" in str(w.message) for w in caught)
            out["metrics"] = opt.metrics()
        opt.zero_grad(set_to_none=True)
    out["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def nonfinite_oracle(world: int, max_grad_norm: float | None, steps: int = 3, bad_step: int = 1):
    """One process on the global batch; at ``bad_step`` c has no gradient at all (never active:
    no state change, not in the norm), which is what skipping it must amount to."""
    model = _TwoBranch(bias=True)
    opt = MuonClip(model, lr=0.05, ns_dtype="float32", ns_backend="torch", max_grad_norm=max_grad_norm)
    metrics = None
    for t in range(steps):
        for r in range(world):
            (model(branch_inputs(t, r), use_b=True) / world).backward()
        if t == bad_step:
            model.c.weight.grad = model.c.bias.grad = None
        opt.step()
        if t == bad_step:
            metrics = opt.metrics()
        opt.zero_grad(set_to_none=True)
    return model, metrics


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


def add_group_worker(rank: int, world: int, steps: int, mode: str = "optimizer", add_at: int = 0):
    """Parameters join through add_param_group after ``add_at`` steps: every rank re-plans
    identically. With ``add_at`` > 0 the optimizer starts with b alone (owned by rank 0); adding
    a and c moves b to rank 1 (LPT over a, b, c), so b's momentum has to travel with it."""
    model = _TwoBranch()
    first = [("b.weight", model.b.weight)] if add_at else [("a.weight", model.a.weight), ("b.weight", model.b.weight)]
    later = [("a.weight", model.a.weight), ("c.weight", model.c.weight)] if add_at else [("c.weight", model.c.weight)]
    opt = MuonClip(first, lr=0.05, ns_dtype="float32", ns_backend="torch",
                   grad_reduction="external" if mode == "ddp" else "optimizer")
    fwd = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    out = {}
    for t in range(steps):
        if t == add_at:
            out["owners_before"] = dict(opt.plan.owners)
            before = opt.state_dict()["state"].get("b.weight", {})    # the full state: a collective
            opt.add_param_group({"params": later})
            after = opt.state.get(model.b.weight) or {}
            out["b_momentum_before"] = before.get("momentum_buffer")
            m = after.get("momentum_buffer")                            # on its owner only
            out["b_momentum_after_add"] = None if m is None else m.clone()   # (steps update it in place)
        fwd(branch_inputs(t, rank), use_b=True).backward()
        opt.step()
        model.zero_grad(set_to_none=True)     # also the gradients of parameters not yet in the optimizer
    return {**out, "params": {k: v.clone() for k, v in model.state_dict().items()},
            "owners": dict(opt.plan.owners)}


def add_group_oracle(world: int, steps: int, add_at: int = 0):
    """One process, same schedule of param groups, gradient = mean over the ranks' losses."""
    model = _TwoBranch()
    first = [("b.weight", model.b.weight)] if add_at else [("a.weight", model.a.weight), ("b.weight", model.b.weight)]
    later = [("a.weight", model.a.weight), ("c.weight", model.c.weight)] if add_at else [("c.weight", model.c.weight)]
    opt = MuonClip(first, lr=0.05, ns_dtype="float32", ns_backend="torch")
    for t in range(steps):
        if t == add_at:
            opt.add_param_group({"params": later})
        for r in range(world):
            (model(branch_inputs(t, r), use_b=True) / world).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model


def calls_worker(rank: int, world: int, calls: list[tuple[str, tuple]]):
    """Several scenarios in one process group, in order: ``calls`` = [(function name, args)].
    One spawn instead of one per scenario: process start-up dominates these tiny runs on CI."""
    return [globals()[name](rank, world, *args) for name, args in calls]


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
