"""Layouts over DeepSpeed's storage (ZeRO-0 bf16 fp32 masters, ZeRO-1/2 flat fp32 partitions).

See :mod:`dist_muonclip.integrations.deepspeed` for which layout each stage and precision uses;
ZeRO-3's partitions are :mod:`dist_muonclip.integrations.deepspeed_zero3`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..comm import Comm
from ..layouts import Layout
from ..plan import flat_partition

__all__ = ["FlatFragmentsLayout", "MasterSliceLayout"]


class FlatFragmentsLayout(Layout):
    """Matrices cut into fragments by DeepSpeed's flat fp32 partitions (ZeRO-1/2, BF16_Optimizer).

    DeepSpeed flattens each param group into one buffer (parameter ``i`` at ``offsets[i]``, with
    optional alignment padding between parameters) and gives rank ``r`` the elements
    ``[r * partition_size, (r + 1) * partition_size)`` of it. A parameter therefore lies on one or
    more consecutive ranks, as one contiguous fragment per rank. ``flat`` is this rank's fp32
    partition of the group (DeepSpeed sets its ``.grad`` to the reduced, clipped gradient before
    the step). One group: the constructor; several: :meth:`from_groups`.
    """

    sharded = True

    def __init__(self, params: Sequence[Tensor], offsets: Sequence[int], partition_size: int, rank: int,
                 world_size: int, flat: Tensor) -> None:
        self.rank, self.world_size = rank, world_size
        self._where: dict[Tensor, tuple[int, int, int]] = {}     # p -> (group, offset, numel)
        self._shape: dict[Tensor, torch.Size] = {}
        self._partition_size: list[int] = []
        self._flat: list[Tensor] = []
        self._stashed: dict[int, Tensor] = {}
        self._add_group(params, offsets, partition_size, flat)

    @classmethod
    def from_groups(cls, groups: Sequence[tuple[Sequence[Tensor], Sequence[int], int, Tensor]], rank: int,
                    world_size: int) -> "FlatFragmentsLayout":
        """One layout over several flat groups: ``(params, offsets, partition_size, flat)`` each."""
        if not groups:
            raise ValueError("FlatFragmentsLayout.from_groups: no groups")
        params, offsets, partition_size, flat = groups[0]
        layout = cls(params, offsets, partition_size, rank, world_size, flat)
        for g in groups[1:]:
            layout._add_group(*g)
        return layout

    def _add_group(self, params: Sequence[Tensor], offsets: Sequence[int], partition_size: int,
                   flat: Tensor) -> None:
        if len(params) != len(offsets):
            raise ValueError("FlatFragmentsLayout: one offset per parameter")
        if flat.numel() != int(partition_size):
            raise ValueError(f"FlatFragmentsLayout: partition has {flat.numel()} elements, expected "
                             f"{int(partition_size)}")
        gi = len(self._flat)
        self._partition_size.append(int(partition_size))
        self._flat.append(flat)
        for p, o in zip(params, offsets):
            if p in self._where:
                raise ValueError("FlatFragmentsLayout: a parameter appears in two groups")
            self._where[p] = (gi, int(o), p.numel())
            self._shape[p] = p.shape

    def stash_grad(self, group: int) -> None:
        """Keep group ``group``'s gradient partition for a step that runs after DeepSpeed has
        dropped it (ZeRO-1/2 step the client one group at a time, see DeepSpeedClient.step)."""
        g = self._flat[group].grad
        if g is None:
            self._stashed.pop(group, None)
        else:
            self._stashed[group] = g

    def clear_stash(self) -> None:
        self._stashed.clear()

    def _grad_of(self, group: int) -> Tensor | None:
        g = self._flat[group].grad
        return self._stashed.get(group) if g is None else g

    def _span(self, p: Tensor, r: int) -> tuple[int, int]:
        gi, off, n = self._where[p]
        ps = self._partition_size[gi]
        a, b = max(off, r * ps), min(off + n, (r + 1) * ps)
        return (a - off, b - off) if b > a else (0, 0)

    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        out = []
        for r in range(self.world_size):
            a, b = self._span(p, r)
            out.append([(a, b)] if b > a else [])
        return out

    def fragments(self, p: Tensor) -> list[tuple[int, int, int]]:
        """``(rank, offset in rank's partition of p's group, length)`` of every fragment of ``p``."""
        gi, off, _ = self._where[p]
        ps = self._partition_size[gi]
        out = []
        for r in range(self.world_size):
            a, b = self._span(p, r)
            if b > a:
                out.append((r, off + a - r * ps, b - a))
        return out

    def owner_hint(self, p: Tensor) -> int:
        """The rank holding the largest fragment of ``p`` (lowest rank on ties): orthogonalizing
        there moves only the other fragments (none for a matrix inside one partition)."""
        sizes = [b - a for a, b in (self._span(p, r) for r in range(self.world_size))]
        return max(range(self.world_size), key=lambda r: (sizes[r], -r))

    def _local(self, p: Tensor, flat: Tensor) -> Tensor:
        a, b = self._span(p, self.rank)
        if b <= a:
            return flat[:0]
        gi, off, _ = self._where[p]
        base = off - self.rank * self._partition_size[gi]
        return flat[base + a:base + b]

    def local_param(self, p: Tensor) -> Tensor:
        return self._local(p, self._flat[self._where[p][0]].detach())

    def local_grad(self, p: Tensor) -> Tensor | None:
        g = self._grad_of(self._where[p][0])
        return None if g is None else self._local(p, g)

    def full_shape(self, p: Tensor) -> torch.Size:
        return self._shape[p]


class MasterSliceLayout(Layout):
    """Full fp32 master copies on every rank (DeepSpeed stage 0 + bf16), split into equal slices.

    Each rank updates only its slice of the concatenated masters of each group (ZeRO-1 state
    sharding; with DeepSpeedClient's two groups every rank holds 1/W of the Muon and 1/W of the
    AdamW elements: balanced state); :meth:`all_gather_` then refreshes the other slices (one
    all-gather) so every replica's master is complete again before DeepSpeed copies masters into
    the bf16 parameters. ``groups``: more lists of ``(params, masters, names)`` after the first.
    """

    sharded = True

    def __init__(self, params: Sequence[Tensor], masters: Sequence[Tensor], names: Sequence[str], comm: Comm,
                 groups: Sequence[tuple[Sequence[Tensor], Sequence[Tensor], Sequence[str]]] = ()) -> None:
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size
        all_groups = [(params, masters, names), *groups]
        self._master = {p: m for ps, ms, _ in all_groups for p, m in zip(ps, ms)}
        self._shape = {p: p.shape for p in self._master}
        self._by_name = {n: p for ps, _, ns in all_groups for n, p in zip(ns, ps)}
        self._ranges = {p: [[] for _ in range(self.world_size)] for p in self._master}
        # per rank: its slice of every group, packed back to back into one chunk for the all-gather
        self.chunk = 0
        self._segments: list[list[Any]] = [[] for _ in range(self.world_size)]
        for ps, _, ns in all_groups:
            chunk, segments = flat_partition([(n, p.numel()) for n, p in zip(ns, ps)], self.world_size)
            self.chunk += chunk
            for r, segs in enumerate(segments):
                self._segments[r].extend(segs)
                for seg in segs:
                    self._ranges[self._by_name[seg.name]][r].append((seg.start, seg.stop))

    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        return self._ranges[p]

    def master(self, p: Tensor) -> Tensor:
        """``p``'s full fp32 master copy (every rank holds all of it)."""
        return self._master[p]

    def owner_hint(self, p: Tensor) -> int:
        sizes = [sum(b - a for a, b in rs) for rs in self._ranges[p]]
        return max(range(self.world_size), key=lambda r: (sizes[r], -r))

    def _local(self, p: Tensor, t: Tensor) -> Tensor:
        rs = self._ranges[p][self.rank]
        return t.view(-1)[rs[0][0]:rs[0][1]] if rs else t.view(-1)[:0]

    def local_param(self, p: Tensor) -> Tensor:
        return self._local(p, self._master[p].detach())

    def local_grad(self, p: Tensor) -> Tensor | None:
        g = self._master[p].grad
        return None if g is None else self._local(p, g)

    def full_shape(self, p: Tensor) -> torch.Size:
        return self._shape[p]

    @torch.no_grad()
    def all_gather_(self) -> None:
        """Every rank's updated slices into every rank's masters (one all-gather, fp32)."""
        if self.world_size == 1:
            return
        self.comm.all_gather_segments_(
            self._segments, lambda s: self._master[self._by_name[s.name]].detach().view(-1)[s.start:s.stop],
            self.chunk, dtype=torch.float32, device=next(iter(self._master.values())).device,
            tag="master_gather")
