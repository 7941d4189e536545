"""The engine behind :class:`~dist_muonclip.optimizer.MuonClip`: one Muon pipeline for every layout.

Built once per (layout, process group, param groups) and rebuilt on a re-plan. At construction
the layout hands over its exchange (:mod:`.exchange`), the distribution mode picks the gradient
source (:mod:`.grads`, :mod:`.reduction`) and the AdamW part (:mod:`.adamw`); the step then reads:

    reduce -> preflight -> per bucket: momentum, to owner, orthogonalize, from owner, apply
           -> AdamW -> QK-Clip -> metrics

with no mode switch on the way. The plan (owners, same-shape buckets) is deterministic and
validated across ranks once, here.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..comm import Comm
from ..functional import muon_apply_, muon_momentum_, update_scale
from ..layouts import Layout, scale_rows_
from ..ns_split import orthogonalize_blocks
from ..plan import build_plan
from ..transfers import HostCopy, to_device
from .adamw import AdamWPart, LocalPiecesAdamW, PartitionedAdamW
from .checkpoint import StateFormat
from .exchange import BucketJob, Exchange
from .failfast import guarded
from .grads import GradSource, ReplicatedGrads, ShardedGrads
from .preflight import StepPlan, clip_coefficient, preflight
from .reduction import OwnedReduction
from .units import ParamRegistry, Units

__all__ = ["Engine", "EngineOptions"]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Options the engine reads (set once by the optimizer shell)."""

    skip_nonfinite: bool
    adamw_foreach: bool | None
    adamw_fused: bool | None
    max_grad_norm: float | None
    bucket_cap_mb: float
    shard_adamw: bool


class Engine:
    """Units, plan, exchange, gradient source, AdamW part and state format of one optimizer."""

    def __init__(self, *, param_groups: list[dict], state: dict, registry: ParamRegistry, layout: Layout,
                 comm: Comm | None, owns_reduction: bool, options: EngineOptions, clipper: Any = None,
                 profiler: Any = None, ns_splits: dict | None = None) -> None:
        self.param_groups = param_groups
        self.state = state
        self.registry = registry
        self.layout = layout
        self.comm = comm
        self.rank = comm.rank if comm is not None else 0
        self.world_size = comm.world_size if comm is not None else 1
        self.owns_reduction = owns_reduction
        # the preflight's group: every data-parallel rank (HSDP replicas too), else the process group
        dp = layout.data_parallel_group
        self.dp_comm = Comm(dp, comm.accountant) if dp is not None and comm is not None else comm
        self.options = options
        self.clipper = clipper
        self.ns_splits = ns_splits or {}       # parameter -> BlockSplit (ns_split option)
        self.ml_shape = tuple(clipper.max_logits(None).shape) if clipper is not None else None
        self.profiler = profiler
        self.units = Units(registry, layout, self.rank)
        self.grads: GradSource | None = None
        self.replan()

    # -- the plan ----------------------------------------------------------------------------
    def replan(self) -> None:
        """Deterministic plan of owners, buckets, AdamW slices and reduction buckets on every
        rank, validated across ranks."""
        units, layout = self.units, self.layout
        items = units.items(self.param_groups, self.world_size)
        preferred: dict[str, int] = {}
        if layout.sharded:   # orthogonalize a matrix where (most of) it lives
            for g in self.param_groups:
                if g["use_muon"]:
                    for p in g["params"]:
                        r = layout.owner_hint(p)
                        if r is not None:
                            preferred[self.registry.names[p]] = r
            for t in units.chunks:
                sizes = [sum(b - a for a, b in rs) for rs in units.ranges(t)]
                preferred[self.registry.names[t]] = max(range(len(sizes)), key=lambda r: (sizes[r], -r))
        self.plan = build_plan(items, self.world_size, preferred)
        self.owner_of = {units.by_name[n]: o for n, o in self.plan.owners.items()}
        opts = self.options
        if layout.sharded:
            self.adamw: AdamWPart = LocalPiecesAdamW(units, self.param_groups, self.state,
                                                     foreach=opts.adamw_foreach, fused=opts.adamw_fused)
        else:
            self.adamw = PartitionedAdamW(units, self.param_groups, self.state, foreach=opts.adamw_foreach,
                                          fused=opts.adamw_fused, comm=self.comm, rank=self.rank,
                                          world_size=self.world_size, shard=opts.shard_adamw)
        if self.grads is not None:
            self.grads.remove_hooks()
        if self.owns_reduction:
            self.grads = OwnedReduction(units, self.comm, param_groups=self.param_groups, owner_of=self.owner_of,
                                        partitions=self.adamw.partitions, bucket_cap_mb=opts.bucket_cap_mb)
            self.grads.register_hooks([p for g in self.param_groups for p in g["params"]])
        else:
            self.grads = ShardedGrads(units) if layout.sharded else ReplicatedGrads(units)
        self.exchange: Exchange = layout.make_exchange(units, self.state, self.comm, self.rank, self.world_size)
        self.format = StateFormat(units, self.param_groups, self.state, self.adamw, self.owner_of, rank=self.rank,
                                  adamw_fused=opts.adamw_fused)
        if self.comm is not None:
            self._check_plan_across_ranks()

    def _check_plan_across_ranks(self) -> None:
        names = self.registry.names
        descr = [(names[p], tuple(p.shape), str(p.dtype), bool(g["use_muon"]))
                 for g in self.param_groups for p in g["params"]]
        digests = self.comm.all_gather_object(((self.plan.digest(), repr(self.grads.describe())), descr))
        if len({d for d, _ in digests}) == 1:
            return
        base = digests[0][1]
        for r, (_, other) in enumerate(digests):
            if other == base:
                continue
            for i in range(max(len(base), len(other))):
                a = base[i] if i < len(base) else None
                b = other[i] if i < len(other) else None
                if a != b:
                    raise ValueError(f"MuonClip plans differ across ranks: parameter #{i} is {a} on rank 0 but {b} on "
                                     f"rank {r}; every rank must build the optimizer from the same model and groups")
        raise ValueError("MuonClip plans differ across ranks (same parameters, different plan); this is a bug")

    def owners_by_name(self) -> dict[str, tuple[int, str]]:
        """Muon unit name -> (owner, its parameter's name): who holds which momentum (Replicated)."""
        names = self.registry.names
        return {n: (o, names[self.units.param_of(self.units.by_name[n])]) for n, o in self.plan.owners.items()}

    def migrate_moved_state(self, old: dict[str, tuple[int, str]]) -> None:
        """After a re-plan (Replicated layout, distributed), move the momentum of units whose
        owner changed to the new owner. The decision depends on the plans only (identical
        everywhere), so every rank takes part in the one ``all_gather_object``, or none does."""
        moved = {pname for n, (o, pname) in old.items() if self.plan.owners.get(n) != o}
        if not moved or self.comm is None or self.layout.sharded:
            return
        local = {n: s for n, s in self.format.local().items() if n in moved}
        full = self.format.merge(self.comm.all_gather_object(local))
        params = {self.units.by_name[n] for n in moved}
        for p in params:
            for t in (p, *self.units.chunks_of.get(p, ())):
                self.state.pop(t, None)
        self.state.update(self.format.from_full(full, params))

    # -- the step ------------------------------------------------------------------------------
    def phase(self, name: str):
        """Time a phase of ``step()`` when a profiler is attached (``profiler.phase(name)``)."""
        return self.profiler.phase(name) if self.profiler is not None else contextlib.nullcontext()

    def reduce(self) -> None:
        """Finish the gradient reduction this engine owns (nothing when DDP / FSDP2 / DeepSpeed did it)."""
        if self.units.chunks:
            self.units.refresh()
        self.grads.launch()
        with self.phase("reduce"):
            self.grads.finish()

    def preflight(self, s_max: Any) -> tuple[StepPlan, Callable[[Tensor], Tensor], Tensor | None]:
        """One all-reduce(MAX) of flags and max logits; then the global gradient-clip coefficient.
        Returns the step's plan, the gradient scaling and the clipped norm (when measured)."""
        params = [p for g in self.param_groups for p in g["params"]]
        clipper = self.clipper
        with self.phase("preflight"):
            plan = preflight(params, self.registry.names, self.grads, self.dp_comm,
                             skip_nonfinite=self.options.skip_nonfinite,
                             max_logits=lambda: clipper.max_logits(s_max) if clipper is not None else None,
                             ml_shape=self.ml_shape, layer_names=clipper.layer_names() if clipper else None,
                             device=self.grads.device(params),
                             # tracked logits: an overflow storm is skipped; a given s_max is the caller's input
                             skip_nonfinite_logits=self.options.skip_nonfinite and s_max is None)
        if self.options.max_grad_norm is None:
            return plan, (lambda g: g), None
        with self.phase("clip_grad"):
            device = self.units.layout.local_param(next(iter(self.units.by_name.values()))).device
            coef, norm = clip_coefficient(plan, self.grads, self.comm, self.options.max_grad_norm, device)
        return plan, (lambda g: g * coef.to(g.dtype)), norm

    @guarded("muon")
    def muon(self, plan: StepPlan, clip: Callable[[Tensor], Tensor]) -> list[Tensor]:
        """Per bucket: momentum -> to owner -> orthogonalize -> from owner -> apply. All buckets'
        pieces start moving first, then each bucket is orthogonalized as its pieces arrive and its
        updates start back, so one bucket's communication overlaps the next one's Newton-Schulz.
        Returns per bucket the squared norm of the updates this rank applied (update-RMS metric).
        ``layout.buckets_in_flight`` (CPU offload: a few) bounds how many buckets' pieces wait on
        the accelerator at once; every rank has the same bound, so the collectives' order agrees."""
        depth = self.layout.buckets_in_flight
        jobs: list[BucketJob] = []
        waiting: collections.deque[BucketJob] = collections.deque()
        for b in self.plan.buckets:
            job = self._momentum_to_owner(b, plan, clip)
            if job is None:
                continue
            jobs.append(job)
            waiting.append(job)
            if depth is not None and len(waiting) > depth:
                self._orthogonalize_from_owner(waiting.popleft())
        for job in waiting:
            self._orthogonalize_from_owner(job)
        return [self._apply(job) for job in jobs]

    def _momentum_to_owner(self, bucket, plan: StepPlan, clip: Callable[[Tensor], Tensor]) -> BucketJob | None:
        units = self.units
        active = [u for n in bucket.names if units.param_of(u := units.by_name[n]) in plan.active]
        if not active:
            return None
        job = BucketJob(bucket, self.param_groups[bucket.group], active,
                        [u for u in active if self.owner_of[u] == self.rank], self.owner_of)
        bufs = self.exchange.momentum_buffers(job)
        g = job.group
        with self.phase("momentum"):
            pieces = muon_momentum_([clip(self.grads.unit_grad(u)) for u, _ in bufs], [b for _, b in bufs],
                                    momentum=g["momentum"], nesterov=g["nesterov"])
        self.exchange.to_owner(job, pieces)
        return job

    def _orthogonalize_from_owner(self, job: BucketJob) -> None:
        with self.phase("to_owner"):
            matrices = self.exchange.owned_matrices(job)
        ortho = None
        if matrices:
            g = job.group
            ns_kw = dict(coefficients=g["ns_coefficients"], steps=g["ns_steps"], dtype=g["ns_dtype"],
                         eps=g["ns_eps"], backend=g["ns_backend"])
            home = matrices[0].device
            # e.g. the accelerator under CPU offload (over NCCL the matrices already arrive there)
            dev = self.layout.ns_device(matrices[0])
            with self.phase("ns"):
                src = matrices if dev is None or dev == home else [to_device(x, dev) for x in matrices]
                ortho = orthogonalize_blocks(src, [self.ns_splits.get(u) for u in job.mine],
                                             lambda m, n: update_scale(m, n, g["adjust_lr_fn"]), **ns_kw)
                if ortho.device != home:
                    ortho = HostCopy(ortho, home).wait()
        self.exchange.from_owner(job, ortho)

    def _apply(self, job: BucketJob) -> Tensor:
        with self.phase("from_owner"):
            targets, updates = self.exchange.received_updates(job)
        g, b = job.group, job.bucket
        scale = update_scale(b.m, b.n, g["adjust_lr_fn"])
        with self.phase("apply"):
            muon_apply_(targets, updates, lr=g["lr"], weight_decay=g["weight_decay"], scale=scale)
        u = job.updates
        if u.is_cuda:     # one fp32-accumulating pass over the (bf16) updates, no fp32 copy of them
            return torch.linalg.vector_norm(u, dtype=torch.float32).square() * scale**2
        return u.float().square().sum() * scale**2

    @guarded("adamw")
    def step_adamw(self, plan: StepPlan, clip: Callable[[Tensor], Tensor]) -> None:
        with self.phase("adamw"):
            self.adamw.step(plan.active, clip, self.grads.adamw_slice)

    @guarded("qk_clip")
    def qk_clip(self, plan: StepPlan) -> None:
        """Scale the rows of W_q / W_k (and biases, MLA parts) of heads over tau, on the elements
        this rank holds. The preflight refused or dropped non-finite logits: no second sync."""
        if plan.max_logits is None:
            return
        layout = self.layout
        with self.phase("qk_clip"):
            for p, scale in self.clipper.row_scales(plan.max_logits, check_finite=False):
                scale_rows_(layout.local_param(p), scale, layout.ranges(p)[self.rank], layout.full_shape(p))

    @guarded("metrics")
    def metrics(self, plan: StepPlan, update_sq: Sequence[Tensor], grad_norm: Tensor | None) -> dict[str, Tensor]:
        """Device scalars: the global gradient norm when clipping measured it, else the norm of
        the reduced pieces this rank holds (no extra collective for a metric); update RMS."""
        metrics: dict[str, Tensor] = {}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        else:
            grads = [g for _, g in self.grads.held(list(plan.active), once=True)]
            if grads:
                metrics["grad_norm"] = torch.linalg.vector_norm(torch.stack(_norms(grads, plan.grad_norms)))
        n_muon = sum(self.exchange.num_local(p) for p in plan.active
                     if self.param_groups[self.units.group_of[p]]["use_muon"])
        if update_sq and n_muon:
            metrics["muon_update_rms"] = torch.sqrt(torch.stack([s.to(update_sq[0].device) for s in update_sq]).sum()
                                                    / n_muon)
        metrics["num_skipped"] = torch.tensor(float(len(plan.skipped)))
        return metrics

    def end_step(self) -> None:
        self.grads.end_step()


def _norms(tensors: list[Tensor], known: dict) -> list[Tensor]:
    """fp32 L2 norms of ``tensors``: those the preflight measured (``known``, CUDA), the rest in
    one multi-tensor launch per (device, dtype) on CUDA (on the CPU torch's per-tensor norms)."""
    groups: dict[tuple, list[int]] = {}
    out: list[Tensor] = [torch.empty(0)] * len(tensors)
    for i, t in enumerate(tensors):
        n = known.get((t.data_ptr(), t.numel())) if t.is_cuda else None
        if n is not None:
            out[i] = n
            continue
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (dev, _), idx in groups.items():
        ts = [tensors[i] for i in idx]
        norms = (torch._foreach_norm(ts, 2, dtype=torch.float32) if dev.type == "cuda"
                 else [torch.linalg.vector_norm(t.float()) for t in ts])
        for i, n in zip(idx, norms):
            out[i] = n
    return out
