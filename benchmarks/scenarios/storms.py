"""Non-finite storms (issue 18): NaN/inf gradients on random ranks, steps and parameters, a whole
step of them, and inf max logits, against a one-process oracle that skips the same things.

A storm is a seeded schedule (:func:`schedule`), the same in every worker and in the oracle:

* ``grads[step][rank]``: ``(parameter name, value)`` pairs; that rank writes the value (nan, inf or
  -inf) into one element of ITS gradient of that parameter (DDP's averaged ``.grad`` and an FSDP2
  shard after backward; under the optimizer-owned reduction, which starts during backward, in a
  tensor hook) so the reduced gradient the optimizer tests is non-finite;
* ``whole_step``: every parameter's gradient poisoned on one rank;
* ``logits[step][rank]``: ``(layer, head)`` whose tracked max logit that rank sets to inf.

Workers return which parameters they really poisoned (an FSDP2 rank may hold no element of a
small parameter) and the state of every parameter before and after each step; the oracle
(:func:`oracle`) runs the global batch in one process, drops the gradients of exactly those
parameters at those steps (never active: no state change) and drops the inf layers' records.
"""
from __future__ import annotations

import random
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.scenarios.fsdp import OPT_KW, QK, build_model, fsdp_setup, global_batch, local_batch

KIND = "llama"
VALUES = (float("nan"), float("inf"), float("-inf"))


def schedule(seed: int, steps: int, world: int, names: list[str], layers: int, heads: int) -> dict[str, Any]:
    """The seeded storm: for each step, per rank, a few poisoned parameters (about a third of
    the steps are calm); one whole-step storm; inf max logits on two steps."""
    rng = random.Random(seed)
    grads: dict[int, dict[int, list[tuple[str, float]]]] = {}
    for t in range(steps):
        if rng.random() < 0.35:
            continue
        per = {}
        for r in rng.sample(range(world), rng.randint(1, world)):
            per[r] = [(n, rng.choice(VALUES)) for n in rng.sample(names, rng.randint(1, 3))]
        grads[t] = per
    whole = {"step": rng.randrange(1, steps), "rank": rng.randrange(world), "value": rng.choice(VALUES)}
    logit_steps = rng.sample([t for t in range(steps) if t != whole["step"]], 2)
    logits = {t: {rng.randrange(world): [(rng.randrange(layers), rng.randrange(heads))]} for t in logit_steps}
    return {"seed": seed, "steps": steps, "grads": grads, "whole_step": whole, "logits": logits}


def _poison_(grad: torch.Tensor | None, value: float) -> bool:
    """Write ``value`` into one element this rank holds; False when it holds none."""
    if grad is None:
        return False
    local = grad._local_tensor if hasattr(grad, "_local_tensor") else grad
    if local.numel() == 0:
        return False
    local.view(-1)[local.numel() // 2] = value
    return True


def _poisoned(grad: torch.Tensor, value: float) -> torch.Tensor:
    out = grad.clone()
    out.view(-1)[out.numel() // 2] = value
    return out


def _snapshot(model: nn.Module, opt: Any) -> dict[str, Any]:
    out = {}
    for n, p in model.named_parameters():
        local = p._local_tensor if hasattr(p, "_local_tensor") else p
        st = opt.state.get(p, {})
        out[n] = (local.detach().clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    return out


def _same_weight(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0])


def _same_state(a: tuple, b: tuple) -> bool:
    return a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) if torch.is_tensor(a[1][k]) else a[1][k] == b[1][k] for k in a[1])


def storm_worker(rank: int, world: int, mode: str, storm: dict[str, Any]) -> dict[str, Any]:
    """Train under the storm with ``mode`` = "ddp" (DDP reduces, MuonClip replicated), "owned"
    (the optimizer reduces to owners) or "fsdp" (FSDP2 row shards)."""
    from dist_muonclip import MuonClip

    if mode == "fsdp":
        model, opt = fsdp_setup(KIND, world)
        fwd = model
    else:
        model = build_model(KIND)
        opt = MuonClip(model, qk_clip=QK[KIND], grad_reduction="external" if mode == "ddp" else "optimizer", **OPT_KW)
        fwd = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    params = dict(model.named_parameters())
    tracker = opt.qk_clipper.tracker
    poisoned: dict[int, list[str]] = {}
    same_weight, same_state, warned, clipped = [], [], [], []
    by_id = {id(p): n for n, p in params.items()}
    clip_targets = sorted({by_id[id(t.param)] for layer in opt.qk_clipper.layers for t in layer.targets})
    for t in range(storm["steps"]):
        ids = local_batch(t, rank, world)
        mine = list(storm["grads"].get(t, {}).get(rank, []))
        whole = storm["whole_step"]
        if whole["step"] == t and whole["rank"] == rank:
            mine += [(n, whole["value"]) for n in params]
        # the optimizer-owned reduction starts during backward: poison there (a tensor hook), so the
        # value travels the reduction; DDP and FSDP2 hand the optimizer their reduced .grad
        hooks = ([params[n].register_hook(lambda g, v=v: _poisoned(g, v)) for n, v in mine]
                 if mode == "owned" else [])
        fwd(input_ids=ids, labels=ids).loss.backward()
        for h in hooks:
            h.remove()
        if mode == "owned":
            poisoned[t] = sorted({n for n, _ in mine})
        else:
            poisoned[t] = sorted({n for n, v in mine if _poison_(params[n].grad, v)})
        for layer, head in storm["logits"].get(t, {}).get(rank, []):
            tracker.values()[layer, head] = float("inf")
        before = _snapshot(model, opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        after = _snapshot(model, opt)
        msgs = [str(w.message) for w in caught]
        warned.append([m for m in msgs if "non-finite" in m])
        # what this rank sees unchanged (its own elements; the test compares with the global skip set)
        same_weight.append(sorted(n for n in params if _same_weight(before[n], after[n])))
        same_state.append(sorted(n for n in params if _same_state(before[n], after[n])))
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
        opt.zero_grad(set_to_none=True)
    from benchmarks.scenarios.fsdp import _full_params

    return {"params": _full_params(model), "poisoned": poisoned, "same_weight": same_weight,
            "same_state": same_state, "clip_targets": clip_targets, "warned": warned, "clipped": clipped,
            "state_finite": all(torch.isfinite(v._local_tensor if hasattr(v, "_local_tensor") else v).all()
                                for s in opt.state.values() for v in s.values()
                                if torch.is_tensor(v) and v.is_floating_point())}


def oracle(storm: dict[str, Any], skipped: dict[int, set[str]]) -> tuple[nn.Module, list[float]]:
    """One process, the global batch; at each step the gradients of ``skipped[step]`` are dropped
    (as if those parameters had none) and the layers given inf max logits are not clipped."""
    from dist_muonclip import MuonClip

    model = build_model(KIND)
    opt = MuonClip(model, qk_clip=QK[KIND], **OPT_KW)
    params = dict(model.named_parameters())
    tracker = opt.qk_clipper.tracker
    clipped = []
    for t in range(storm["steps"]):
        ids = global_batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        for n in skipped.get(t, ()):
            params[n].grad = None
        for per_rank in storm["logits"].get(t, {}).values():
            for layer, _ in per_rank:
                tracker.values()[layer, :] = float("-inf")
        opt.step()
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
        opt.zero_grad(set_to_none=True)
    return model, clipped
