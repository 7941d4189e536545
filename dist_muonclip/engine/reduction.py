"""Optimizer-owned gradient reduction (``grad_reduction="optimizer"``, Replicated layout, no DDP).

Gradients are reduced straight to the rank that needs them, from post-accumulate-grad hooks, so
the reduction overlaps backward and total traffic equals DDP's all-reduce: a Muon matrix (or chunk
of experts) goes to its owner, an AdamW element to the rank holding it in its flat ZeRO-1 slice,
unsharded AdamW to every rank (all-reduce).

Communication buckets follow DDP: parameters in backward order (reverse registration order at
first, the order the first backward really produced afterwards: :meth:`OwnedReduction.rebuild`,
as DDP rebuilds its buckets after the first iteration), capped by ``bucket_cap_mb`` with a 1 MiB
first bucket (:func:`~dist_muonclip.plan.bucket_by_size`). Inside a bucket the flat buffer is
sorted by destination, so each destination's elements are one contiguous region: one reduce per
destination (what DeepSpeed ZeRO-1/2 issues per partition), in place, so no rank ever holds more
than the bucket itself (an all-to-all to owners would receive W copies).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import Tensor

from ..comm import Comm
from ..plan import bucket_by_size
from .adamw import Partition
from .grads import GradSource
from .units import Units

__all__ = ["OwnedReduction", "CommBucket", "FIRST_BUCKET_BYTES"]

# DDP's first bucket (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES): the first reduction starts early
FIRST_BUCKET_BYTES = 1024 * 1024
GRAD_REDUCE = "grad_reduce"


@dataclasses.dataclass(frozen=True)
class MuonSink:
    """Reduced elements that are a whole Muon unit (kept by its owner)."""

    unit: Tensor


@dataclasses.dataclass(frozen=True)
class AdamWSink:
    """Reduced elements of an AdamW partition's slice, at ``offset`` in it."""

    key: tuple
    offset: int


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a flat range ``[start, stop)`` of a parameter's gradient is reduced to."""

    start: int
    stop: int
    dest: int | None          # rank, or None = every rank (all-reduce)
    sink: MuonSink | AdamWSink


@dataclasses.dataclass
class Launched:
    """A bucket whose reductions are in flight."""

    bucket: "CommBucket"
    flat: Tensor
    works: list


@dataclasses.dataclass(frozen=True)
class CommBucket:
    """One communication bucket."""

    params: tuple        # parameters whose gradients it carries, backward order (readiness)
    pieces: tuple        # (param, start, stop): flat element ranges, in buffer order
    regions: tuple       # (dest rank, or None = every rank, offset, numel): one collective each
    mine: tuple          # (MuonSink | AdamWSink, offset, numel): reduced elements this rank keeps
    numel: int


class OwnedReduction(GradSource):
    """The reduced gradients this rank keeps: owned Muon units and its AdamW slices."""

    def __init__(self, units: Units, comm: Comm, *, param_groups: Sequence[dict], owner_of: dict[Tensor, int],
                 partitions: Sequence[Partition], bucket_cap_mb: float) -> None:
        super().__init__(units)
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.param_groups = param_groups
        self.owner_of = owner_of
        self.partitions = partitions
        self.cap = int(bucket_cap_mb * 1024 * 1024)
        self.reduced: dict[Tensor, Tensor] = {}           # owned unit -> reduced (averaged) gradient
        self.adamw_slices: dict[tuple, Tensor] = {}       # partition key -> this rank's reduced slice
        self.sync_enabled = True
        self._launched: list[Launched] = []
        self._ready: set[Tensor] = set()
        self._grad_order: list[Tensor] = []               # hook order seen in the first backward
        self.bucket_order: list[Tensor] | None = None
        self.buckets = self._build_buckets()
        self._hooks: list[Any] = []

    # -- construction ------------------------------------------------------------------------
    def register_hooks(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self.on_grad_ready))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _routes(self) -> dict[Tensor, list[Route]]:
        routes: dict[Tensor, list[Route]] = defaultdict(list)
        units = self.units
        for g in self.param_groups:
            if not g["use_muon"]:
                continue
            for p in g["params"]:
                chunks = units.chunks_of.get(p)
                if not chunks:
                    routes[p].append(Route(0, p.numel(), self.owner_of[p], MuonSink(p)))
                    continue
                for t in chunks:      # chunks of stacked experts: contiguous flat ranges of p
                    c, per = units.chunks[t], t[0].numel()
                    routes[p].append(Route(c.start * per, c.stop * per, self.owner_of[t], MuonSink(t)))
        for part in self.partitions:
            for r, segs in enumerate(part.segments):
                off = 0
                for seg in segs:
                    if seg.stop > seg.start:
                        routes[units.by_name[seg.name]].append(
                            Route(seg.start, seg.stop, r if part.sharded else None, AdamWSink(part.key, off)))
                    off += seg.stop - seg.start
        return routes

    def _build_buckets(self) -> list[CommBucket]:
        routes = self._routes()
        order_of = self.units.registry.order
        order = sorted(routes, key=lambda p: -order_of[p])     # backward: reverse registration
        if self.bucket_order is not None:                         # ... or as observed
            seen = [p for p in self.bucket_order if p in routes]
            known = set(seen)
            order = seen + [p for p in order if p not in known]
        sizes = [((p.dtype, p.device), p.numel() * p.element_size()) for p in order]
        out = []
        for members in bucket_by_size(sizes, self.cap, FIRST_BUCKET_BYTES):
            params = [order[i] for i in members]
            flat = [(r.dest, p, r.start, r.stop, r.sink) for p in params for r in routes[p]]
            flat.sort(key=lambda t: self.world_size if t[0] is None else t[0])   # stable: param order kept
            pieces, regions, mine, off = [], [], [], 0
            for dest, p, a, b, sink in flat:
                if regions and regions[-1][0] == dest:
                    regions[-1][2] += b - a
                else:
                    regions.append([dest, off, b - a])
                if dest is None or dest == self.rank:
                    mine.append((sink, off, b - a))
                pieces.append((p, a, b))
                off += b - a
            out.append(CommBucket(tuple(params), tuple(pieces), tuple(tuple(r) for r in regions), tuple(mine), off))
        return out

    def describe(self) -> list:
        """What must agree across ranks (checked with the plan)."""
        names = self.units.registry.names
        return [([names[p] for p in b.params], [r[0] for r in b.regions]) for b in self.buckets]

    # -- during backward ----------------------------------------------------------------------
    def on_grad_ready(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: launch, in bucket order, every bucket whose gradients all
        exist. Buckets launch in the same order on every rank whatever order hooks fire in."""
        if self.bucket_order is None and p not in self._ready:
            self._grad_order.append(p)
        if not self.sync_enabled:
            return
        self._ready.add(p)
        while len(self._launched) < len(self.buckets):
            bucket = self.buckets[len(self._launched)]
            # a parameter frozen now has no gradient coming (one unfrozen later has no hook: it
            # keeps its bucket waiting until step(), which launches whatever is left)
            if not all(q in self._ready or not q.requires_grad for q in bucket.params):
                break
            self._launched.append(self._launch(bucket))

    def _launch(self, bucket: CommBucket) -> Launched:
        """Pack the bucket's gradients (sorted by destination) and start one reduce per
        destination region (all-reduce for unsharded AdamW), in place in the flat buffer."""
        dtype, device = bucket.params[0].dtype, bucket.params[0].device
        parts = []
        for p, a, b in bucket.pieces:
            g = p.grad
            # no gradient on this rank (or a sparse one, which the preflight refuses on every rank): zeros
            parts.append(g.reshape(-1)[a:b] if g is not None and not g.is_sparse
                         else torch.zeros(b - a, dtype=dtype, device=device))
        flat = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype, device=device)
        works = []
        for dest, off, n in bucket.regions:
            view = flat[off:off + n]
            if dest is None:
                works.append(self.comm.all_reduce(view, async_op=True, tag=GRAD_REDUCE))
            else:
                works.append(self.comm.reduce(view, dest, async_op=True, tag=GRAD_REDUCE))
        return Launched(bucket, flat, works)

    # -- in step() ----------------------------------------------------------------------------
    def launch(self) -> None:
        """Launch the buckets whose hooks did not all fire (no gradient on this rank, no hooks),
        so every rank issues the same collectives in the same order."""
        while len(self._launched) < len(self.buckets):
            self._launched.append(self._launch(self.buckets[len(self._launched)]))

    def finish(self) -> None:
        """Wait for the reductions; keep (averaged) what this rank needs: its owned units in
        ``reduced`` and its AdamW slice per partition in ``adamw_slices``."""
        w = self.world_size
        for part in self.partitions:
            p0 = part.params[0]
            size = part.chunk if part.sharded else sum(q.numel() for q in part.params)
            self.adamw_slices[part.key] = torch.zeros(size, dtype=p0.dtype, device=p0.device)
        for job in self._launched:
            for work in job.works:
                work.wait()
            for sink, off, n in job.bucket.mine:
                if isinstance(sink, MuonSink):
                    self.reduced[sink.unit] = job.flat[off:off + n].div(w).view(sink.unit.shape)
                else:
                    self.adamw_slices[sink.key][sink.offset:sink.offset + n] = job.flat[off:off + n]
        for buf in self.adamw_slices.values():
            buf.div_(w)
        self._launched = []
        self._ready.clear()

    def held(self, params: Sequence[Tensor], *, once: bool) -> list[tuple[Tensor, Tensor]]:
        """Owned units' and this rank's AdamW slices' reduced gradients. ``once``: unsharded AdamW
        (every rank holds it) only on rank 0."""
        wanted = set(params)
        out = [(p, g) for u, g in self.reduced.items() if (p := self.units.param_of(u)) in wanted]
        by_name = self.units.by_name
        for part in self.partitions:
            buf = self.adamw_slices.get(part.key)
            if buf is None or (once and not part.sharded and self.rank != 0):
                continue
            off = 0
            for seg in part.mine:
                n = seg.stop - seg.start
                if n and by_name[seg.name] in wanted:
                    out.append((by_name[seg.name], buf[off:off + n]))
                off += n
        return out

    def unit_grad(self, u: Tensor) -> Tensor:
        return self.reduced[u]

    def adamw_slice(self, key: tuple) -> Tensor | None:
        return self.adamw_slices.pop(key, None)

    def end_step(self) -> None:
        self.reduced.clear()
        self.adamw_slices.clear()
        self.rebuild()

    def rebuild(self) -> bool:
        """After the first step, bucket in the order the first backward produced gradients (DDP's
        ``_rebuild_buckets``): rank 0's observed order, broadcast once as an index tensor (the only
        extra collective, counted), so every rank builds the same buckets. Parameters rank 0 saw
        no gradient for keep their reverse-registration place after the observed ones. Returns
        whether it rebuilt (only the first time)."""
        if self.bucket_order is not None:
            return False
        params = list(self.units.registry.order)
        index = {p: i for i, p in enumerate(params)}
        order = torch.full((len(params),), -1, dtype=torch.int64, device=self.comm.device)
        seen = list(dict.fromkeys(index[p] for p in self._grad_order if p in index))   # first sighting
        if seen:
            order[:len(seen)] = torch.tensor(seen, dtype=torch.int64)
        self.comm.broadcast(order, 0, tag="bucket_order")
        self.bucket_order = [params[i] for i in order.tolist() if i >= 0]
        self._grad_order = []
        self.buckets = self._build_buckets()
        return True
