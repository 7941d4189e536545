"""The preflight: decide, identically on every rank, what this step does (DESIGN.md step 1).

One packed all-reduce(MAX) carries an error flag, per-parameter has-gradient and non-finite
flags, and every layer's per-head max logits. Non-finite flags come from the reduced gradient
pieces each rank holds (:class:`~dist_muonclip.engine.grads.GradSource`), so every mode skips
exactly the parameters whose reduced gradient is non-finite. Only errors raised before the
all-reduce reach the other ranks through the error flag.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import Comm
from .grads import GradSource

__all__ = ["StepPlan", "preflight", "clip_coefficient"]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What this step does, the same on every rank."""

    active: set              # parameters that step (a gradient somewhere, all finite)
    skipped: set             # parameters skipped for non-finite gradients
    max_logits: Tensor | None   # [layers, heads], reduced over ranks (QK-Clip on)
    grad_norms: dict = dataclasses.field(default_factory=dict)   # CUDA: (data_ptr, numel) -> fp32 L2 norm


def _local_flags(params: Sequence[Tensor], names: dict, grads: GradSource, skip_nonfinite: bool,
                 max_logits: Callable[[], Tensor | None], ml_shape: tuple | None, device: torch.device,
                 norms_out: dict) -> Tensor:
    """``[error=0, has_grad..., non_finite..., max_logits...]`` of this rank, fp32."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(f"parameter {names[p]!r} has a sparse gradient; MuonClip needs dense "
                               "gradients (use nn.Embedding(sparse=False))")
    parts = [torch.zeros(1, device=device),
             torch.tensor([grads.has_grad(p) for p in params], dtype=torch.float32, device=device)]
    if skip_nonfinite:
        index = {p: i for i, p in enumerate(params)}
        held = [(index[p], g) for p, g in grads.held(params, once=False)]
        # One multi-tensor L1-norm pass, a launch per dtype and device (isfinite + all per
        # parameter took the preflight to 17.8 ms on an H100 for a 1.2B model, this 3.9 ms:
        # benchmarks/results/multi_gpu_h100x1.json). An inf or nan element makes the sum
        # non-finite, and so does an L1 norm beyond fp32 range: equally a step not to take.
        flags = torch.zeros(len(params), device=device)
        if held:
            gs = [g for _, g in held]
            if all(g.is_cuda for g in gs):
                # CUDA: fp32 L2 norms (non-finite on an inf/nan element, or a sum of squares beyond
                # fp32 range, |g| ~ 1e19), kept for the step's grad-norm metric: one pass over the
                # gradients instead of two (benchmarks/results/optimizer_step_h200.json)
                norms = torch._foreach_norm(gs, 2, dtype=torch.float32)
                norms_out.update({(g.data_ptr(), g.numel()): n for g, n in zip(gs, norms)})
            else:
                norms = torch._foreach_norm(gs, 1)
            bad = (~torch.stack([n.float().to(device) for n in norms]).isfinite()).float()
            flags.index_add_(0, torch.tensor([i for i, _ in held], device=device), bad)
        parts.append(flags.clamp_(max=1.0))
    if ml_shape is not None:
        s = max_logits()
        if s is None:
            s = torch.full(ml_shape, float("-inf"))
        if tuple(s.shape) != ml_shape:
            raise ValueError(f"max logits have shape {tuple(s.shape)}, expected {ml_shape} (layers x heads)")
        parts.append(s.float().reshape(-1).to(device))
    return torch.cat(parts)


def preflight(params: Sequence[Tensor], names: dict, grads: GradSource, comm: Comm | None, *,
              skip_nonfinite: bool, max_logits: Callable[[], Tensor | None], ml_shape: tuple | None,
              layer_names: Sequence[str] | None, device: torch.device,
              skip_nonfinite_logits: bool = False) -> StepPlan:
    """Run the preflight (module doc); raises on every rank together, before any state changes.

    ``skip_nonfinite_logits``: a layer whose reduced max logits hold inf/nan (tracked by the
    forward) is not clipped this step (its record is dropped, with a warning) instead of raising;
    its parameters step as their gradients allow (an overflowing forward leaves non-finite
    gradients, skipped by ``skip_nonfinite``)."""
    n = len(params)
    head_len = 1 + n * (2 if skip_nonfinite else 1)
    size = head_len + (math.prod(ml_shape) if ml_shape is not None else 0)
    error = None
    norms: dict = {}
    try:
        packed = _local_flags(params, names, grads, skip_nonfinite, max_logits, ml_shape, device, norms)
    except Exception as e:
        if comm is None:
            raise
        error = e                  # tell the other ranks instead of leaving them waiting
        packed = torch.zeros(size, device=device)
        packed[0] = 1.0
    assert packed.numel() == size
    if comm is not None:
        packed = comm.to_device(packed)      # CPU offload over NCCL: the flags travel on the accelerator
        comm.all_reduce(packed, op=dist.ReduceOp.MAX, tag="preflight")
    host = packed.tolist()                             # the one device->host read of the step
    head = host[:head_len]
    if head[0]:
        if error is not None:
            raise error
        raise RuntimeError("MuonClip.step(): another rank failed in step() (see its error); this rank stops "
                           "too instead of waiting for it")
    has_grad = {p for p, h in zip(params, head[1:1 + n]) if h}
    nonfinite = {p for p, f in zip(params, head[1 + n:]) if f} if skip_nonfinite else set()
    reduced = None
    if ml_shape is not None:
        k = math.prod(ml_shape)
        reduced = packed[len(packed) - k:].reshape(ml_shape)
        vals = host[len(host) - k:]
        heads = ml_shape[1]
        bad = [any(v != v or v == math.inf for v in vals[i * heads:(i + 1) * heads]) for i in range(ml_shape[0])]
        if any(bad):
            layers = [layer_names[i] if layer_names else str(i) for i, b in enumerate(bad) if b]
            if not skip_nonfinite_logits:
                raise ValueError(f"non-finite max attention logits in layer(s) {layers}: the forward pass produced "
                                 "inf/nan attention scores; no parameter or state was changed by this step")
            rows = torch.tensor(bad, device=reduced.device).view(-1, 1)
            reduced = reduced.masked_fill(rows, float("-inf"))     # "nothing recorded": no clip there
            warnings.warn(f"MuonClip: non-finite max attention logits in layer(s) {layers}: QK-Clip skipped for "
                          "them this step (their records dropped)", RuntimeWarning, stacklevel=5)
    if nonfinite:
        warnings.warn("MuonClip: non-finite gradient, step skipped (state untouched) for "
                      + ", ".join(sorted(names[p] for p in nonfinite)), RuntimeWarning, stacklevel=5)
    return StepPlan(has_grad - nonfinite, nonfinite, reduced, norms)


def clip_coefficient(plan: StepPlan, grads: GradSource, comm: Comm | None, max_grad_norm: float,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """``(min(1, max_grad_norm / ||g||), ||g||)`` of the reduced global gradient of the active
    parameters (skipped ones are left out, so one inf gradient does not zero every other
    parameter's step). Each element is counted on exactly one rank; one scalar all-reduce sums
    the squares when ranks hold different elements."""
    # the sum's order (the set's) is part of the bits: keep it
    active = list(plan.active)
    sq = [g.float().square().sum() for _, g in grads.held(active, once=True)]
    total = torch.stack([s.to(device) for s in sq]).sum() if sq else torch.zeros((), device=device)
    if comm is not None and grads.partial:
        total = comm.to_device(total)
        comm.all_reduce(total, tag="grad_norm")
    norm = total.sqrt()
    return (max_grad_norm / (norm + 1e-6)).clamp(max=1.0), norm

