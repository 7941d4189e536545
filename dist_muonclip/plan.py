"""The distribution plan: which rank owns (orthogonalizes) each Muon matrix.

Pure planning, no process group. Every rank builds the same plan from the same sorted input:

* Ownership: longest-processing-time (LPT) bin packing on Newton-Schulz FLOPs (Graham 1969: LPT
  is within 4/3 of the optimal makespan). Matrices are taken in order of decreasing FLOPs
  (tie-break by parameter name) and each goes to the rank with the least load so far (tie-break
  by lowest rank). A parameter that is a stack of matrices (fused MoE experts ``[E, m, n]``) is
  first cut into chunks of experts, each an item of its own, so one layer's experts spread over
  many ranks instead of loading one rank with ``E`` matrices (at ``W`` >= the number of stacked
  parameters that one rank would set the step time): ``min(E, world_size)`` equal chunks placed by
  LPT on replicated parameters (:func:`split_stacked`), the layout's own cuts on sharded ones
  (:func:`split_on_ranges`: whole experts stay where they lie).
* Buckets: the Muon parameters of one param group with the same matrix shape and dtype form a
  bucket. Its owned members are orthogonalized by their owner as one ``[B, m, n]`` batch, and its
  updates are exchanged in one collective. Buckets are ordered by decreasing size so the first
  exchange starts early and overlaps the following buckets' Newton-Schulz.
* AdamW parameters (elementwise) need no owner: their flat concatenation per group is split into
  ``world_size`` equal contiguous slices (classic ZeRO-1), see :func:`flat_partition`.
* Communication buckets (optimizer-owned gradient reduction) are a separate grouping: gradients in
  the order backward produces them, capped in bytes like DDP's ``bucket_cap_mb``
  (:func:`bucket_by_size`), so reductions start while backward still runs. The same-shape
  buckets above only batch Newton-Schulz.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from .newton_schulz import ns_flops

__all__ = ["MatrixItem", "Bucket", "Plan", "build_plan", "flat_partition", "Segment", "split_stacked",
           "split_on_ranges", "chunk_ranges", "bucket_by_size"]


@dataclass(frozen=True)
class MatrixItem:
    """One Muon parameter as the planner sees it: ``num_matrices`` matrices of ``m x n``."""

    name: str
    group: int
    num_matrices: int
    m: int
    n: int
    dtype: str
    ns_steps: int = 5
    parent: str | None = None   # a chunk of a stacked parameter: its name ...
    start: int = 0              # ... and the index of its first matrix there

    @property
    def numel(self) -> int:
        return self.num_matrices * self.m * self.n

    @property
    def flops(self) -> int:
        return self.num_matrices * ns_flops(self.m, self.n, self.ns_steps)


@dataclass(frozen=True)
class Bucket:
    """Same-shape Muon parameters of one group; ``names`` ordered by (owner, name)."""

    group: int
    m: int
    n: int
    dtype: str
    names: tuple[str, ...]
    owners: tuple[int, ...]
    num_matrices: tuple[int, ...]

    def owned_by(self, rank: int) -> list[str]:
        return [n for n, o in zip(self.names, self.owners) if o == rank]

    def counts(self, world_size: int) -> list[int]:
        """Number of matrices each rank owns in this bucket."""
        c = [0] * world_size
        for o, k in zip(self.owners, self.num_matrices):
            c[o] += k
        return c

    @property
    def numel(self) -> int:
        return sum(self.num_matrices) * self.m * self.n


@dataclass(frozen=True)
class Plan:
    world_size: int
    owners: dict[str, int]
    buckets: tuple[Bucket, ...]
    loads: tuple[int, ...]  # NS FLOPs per rank
    items: tuple[MatrixItem, ...] = field(repr=False, default=())

    def digest(self) -> str:
        """A hash identical on every rank iff the plans are identical."""
        text = repr((self.world_size, sorted(self.owners.items()),
                     [(b.group, b.m, b.n, b.dtype, b.names, b.owners) for b in self.buckets]))
        return hashlib.sha256(text.encode()).hexdigest()

    def owned_numel(self, rank: int) -> int:
        by_name = {i.name: i for i in self.items}
        return sum(by_name[n].numel for n, o in self.owners.items() if o == rank)


def split_stacked(items: Sequence[MatrixItem], world_size: int) -> list[MatrixItem]:
    """Cut every stacked item (``num_matrices`` > 1) into ``min(num_matrices, world_size)``
    contiguous chunks of near-equal size (the first ``num_matrices % k`` one matrix larger), named
    ``"<name>[start:stop]"``. Other items pass through. Chunks are independent matrices for
    Newton-Schulz (each expert is orthogonalized on its own), so any split is exact."""
    out: list[MatrixItem] = []
    for item in items:
        k = min(item.num_matrices, world_size)
        if k <= 1:
            out.append(item)
            continue
        base, extra = divmod(item.num_matrices, k)
        start = 0
        for c in range(k):
            size = base + (c < extra)
            out.append(MatrixItem(f"{item.name}[{start}:{start + size}]", item.group, size, item.m, item.n,
                                  item.dtype, item.ns_steps, parent=item.name, start=start))
            start += size
    return out


def split_on_ranges(item: MatrixItem, ranges: Sequence[Sequence[tuple[int, int]]]) -> list[MatrixItem]:
    """Cut a stacked item along a sharded layout's per-rank flat ranges (elements of the whole
    ``[num_matrices, m, n]`` parameter): every run of whole matrices inside one rank's range is a
    chunk (it can be orthogonalized there without moving), every matrix a range boundary cuts
    is a chunk of its own. ``[item]`` when nothing is cut, or when a rank holds the parameter in
    several ranges (then its pieces are not one slice of the parameter)."""
    if item.num_matrices < 2 or any(sum(b > a for a, b in rs) > 1 for rs in ranges):
        return [item]
    per = item.m * item.n
    cuts = {0, item.num_matrices}
    for rs in ranges:
        for a, b in rs:
            if b > a:
                cuts |= {a // per, -(-a // per), b // per, -(-b // per)}
    cuts = sorted(cuts)
    if len(cuts) <= 2:
        return [item]
    return [MatrixItem(f"{item.name}[{c0}:{c1}]", item.group, c1 - c0, item.m, item.n, item.dtype, item.ns_steps,
                       parent=item.name, start=c0) for c0, c1 in zip(cuts, cuts[1:])]


def chunk_ranges(start: int, stop: int, per: int, ranges: Sequence[Sequence[tuple[int, int]]]
                 ) -> list[list[tuple[int, int]]]:
    """Per rank, the flat ranges of matrices ``[start, stop)`` (``per`` elements each) of a stacked
    parameter held in ``ranges``, relative to the chunk's first element."""
    lo, hi = start * per, stop * per
    return [[(max(x, lo) - lo, min(y, hi) - lo) for x, y in rs if min(y, hi) > max(x, lo)] for rs in ranges]


def build_plan(items: Sequence[MatrixItem], world_size: int, preferred: dict[str, int] | None = None) -> Plan:
    """Owner per matrix by LPT on NS FLOPs, and same-shape buckets (see module doc).

    ``preferred`` (name -> rank) pins owners first, e.g. a sharded layout's hint that a matrix
    lies (mostly) on one rank, so orthogonalizing it there moves few or no fragments; the other
    matrices are then packed by LPT around those loads.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise ValueError("build_plan: parameter names must be unique")
    preferred = dict(preferred or {})
    loads = [0] * world_size
    owners: dict[str, int] = {}
    ordered = sorted(items, key=lambda i: (-i.flops, i.name))
    for item in ordered:
        rank = preferred.get(item.name)
        if rank is not None and 0 <= rank < world_size:
            owners[item.name] = rank
            loads[rank] += item.flops
    for item in ordered:
        if item.name not in owners:
            rank = min(range(world_size), key=lambda r: (loads[r], r))   # LPT: least loaded, lowest rank
            owners[item.name] = rank
            loads[rank] += item.flops
    groups: dict[tuple, list[MatrixItem]] = {}
    for item in items:
        groups.setdefault((item.group, item.m, item.n, item.dtype), []).append(item)
    buckets = []
    for (group, m, n, dtype), members in groups.items():
        members = sorted(members, key=lambda i: (owners[i.name], i.name))
        buckets.append(Bucket(group, m, n, dtype, tuple(i.name for i in members),
                              tuple(owners[i.name] for i in members), tuple(i.num_matrices for i in members)))
    buckets.sort(key=lambda b: (-b.numel, b.group, b.m, b.n, b.dtype))
    return Plan(world_size, owners, tuple(buckets), tuple(loads), tuple(items))


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, stop)`` of parameter ``name``'s flattened tensor held by one rank."""

    name: str
    start: int
    stop: int


def flat_partition(sizes: Sequence[tuple[str, int]], world_size: int) -> tuple[int, list[list[Segment]]]:
    """Split the concatenation of ``sizes`` (name, numel) into ``world_size`` equal slices.

    Returns ``(chunk, segments)``: every rank's slice has ``chunk = ceil(total / world_size)``
    elements (the last one padded), and ``segments[r]`` lists the pieces of parameters in rank
    ``r``'s slice, in order.
    """
    total = sum(n for _, n in sizes)
    chunk = -(-total // world_size) if total else 0
    segments: list[list[Segment]] = [[] for _ in range(world_size)]
    offset = 0
    for name, numel in sizes:
        start = offset
        while start < offset + numel:
            rank = start // chunk
            stop = min(offset + numel, (rank + 1) * chunk)
            segments[rank].append(Segment(name, start - offset, stop - offset))
            start = stop
        offset += numel
    return chunk, segments


def bucket_by_size(sizes: Sequence[tuple[Hashable, int]], cap_bytes: int,
                   first_cap_bytes: int | None = None) -> list[list[int]]:
    """Group tensors into communication buckets the way DDP does
    (``torch.distributed._compute_bucket_assignment_by_size``).

    ``sizes`` lists ``(key, nbytes)`` per tensor in the order their gradients are expected
    (backward order); ``key`` (e.g. dtype and device) separates tensors that cannot share a flat
    buffer. One bucket per key is open at a time and closes once it holds ``>= cap_bytes``; the
    first bucket of each key closes at ``first_cap_bytes`` instead (DDP: 1 MiB) so the first
    reduction starts as early as possible. A tensor larger than the cap gets a bucket of its own.
    Returns lists of tensor indices, ordered by the position of each bucket's first tensor, so
    launching buckets in this order follows backward.
    """
    if cap_bytes <= 0:
        raise ValueError(f"cap_bytes must be > 0, got {cap_bytes}")
    first = cap_bytes if first_cap_bytes is None else min(first_cap_bytes, cap_bytes)
    open_: dict[Hashable, tuple[list[int], int]] = {}
    closed: dict[Hashable, int] = {}
    done: list[list[int]] = []
    for i, (key, nbytes) in enumerate(sizes):
        members, total = open_.get(key, ([], 0))
        members.append(i)
        total += nbytes
        if total >= (first if closed.get(key, 0) == 0 else cap_bytes):
            done.append(members)
            closed[key] = closed.get(key, 0) + 1
            open_.pop(key, None)
        else:
            open_[key] = (members, total)
    done.extend(members for members, _ in open_.values())
    return sorted(done, key=lambda b: b[0])
