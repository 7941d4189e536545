"""The AdamW part: embeddings, the output head, norms, biases and other 1-D parameters.

AdamW is elementwise, so it needs no owner. Replicated layout: per (group, dtype, device) the
parameters' flat concatenation is split into ``world_size`` equal slices (classic ZeRO-1,
:func:`~dist_muonclip.plan.flat_partition`); each rank updates its slice with torch's own AdamW
kernel and the slices are all-gathered. Sharded layouts: every rank updates the pieces it holds,
with no communication. State is created in one place (:func:`adamw_state`), shaped like the
elements this rank updates.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from ..comm import Comm
from ..plan import Segment, flat_partition
from .units import Units

__all__ = ["Partition", "AdamWPart", "PartitionedAdamW", "LocalPiecesAdamW", "adamw_state", "adamw_apply"]

ADAMW_GATHER = "adamw_gather"


@dataclasses.dataclass(frozen=True)
class Partition:
    """AdamW parameters of one (group, dtype, device), flattened and split into equal slices."""

    group: int
    kind: tuple
    params: list
    chunk: int
    segments: list
    mine: list
    sharded: bool

    @property
    def key(self) -> tuple:
        return (self.group, self.kind)


def adamw_state(state: dict, like: Tensor, *, fused: bool | None) -> dict:
    """AdamW state of one parameter (created on first use): torch.optim.AdamW's convention of a
    CPU ``step`` counter unless the fused kernel runs, moments shaped like ``like`` (the elements
    this rank updates)."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=like.device if fused else "cpu")
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.contiguous_format)
    return state


def adamw_apply(state: dict, group: dict, items: Sequence[tuple[Tensor, Tensor, Tensor]], *,
                foreach: bool | None, fused: bool | None) -> None:
    """torch's AdamW kernel on ``(param, view, grad)`` triples (``view``: the elements updated)."""
    if not items:
        return
    views, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
    for p, view, grad in items:
        s = adamw_state(state[p], view, fused=fused)
        views.append(view)
        grads.append(grad)
        exp_avgs.append(s["exp_avg"])
        exp_avg_sqs.append(s["exp_avg_sq"])
        steps.append(s["step"])
    beta1, beta2 = group["betas"]
    _torch_adam(views, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach, fused=fused,
                decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


class AdamWPart(ABC):
    """Steps the AdamW parameters on the elements this rank updates."""

    def __init__(self, units: Units, param_groups: Sequence[dict], state: dict, *, foreach: bool | None,
                 fused: bool | None) -> None:
        self.units = units
        self.param_groups = param_groups
        self.state = state
        self.foreach = foreach
        self.fused = fused
        self.partitions: list[Partition] = []

    @abstractmethod
    def step(self, active: set, clip: Callable[[Tensor], Tensor], grad_slice: Callable[[tuple], Tensor | None]
             ) -> None:
        """One AdamW step of the ``active`` parameters; ``clip`` scales a gradient by the global
        clip coefficient; ``grad_slice(key)``: a partition's reduced slice when the optimizer
        reduced it (``None``: read the parameters' gradients)."""

    @abstractmethod
    def held_ranges(self, p: Tensor) -> list[tuple[int, int]]:
        """Flat ranges of ``p`` whose AdamW state this rank holds (checkpoints)."""


class PartitionedAdamW(AdamWPart):
    """Replicated layout: equal flat slices per rank (or everything on every rank when not sharded)."""

    def __init__(self, units: Units, param_groups: Sequence[dict], state: dict, *, foreach: bool | None,
                 fused: bool | None, comm: Comm | None, rank: int, world_size: int, shard: bool) -> None:
        super().__init__(units, param_groups, state, foreach=foreach, fused=fused)
        self.comm = comm
        names = units.registry.names
        shard = shard and world_size > 1
        for gi, g in enumerate(param_groups):
            if g["use_muon"]:
                continue
            by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in g["params"]:
                by_kind[(str(p.dtype), str(p.device))].append(p)
            for kind, params in by_kind.items():
                chunk, segs = flat_partition([(names[p], p.numel()) for p in params], world_size if shard else 1)
                mine = segs[rank] if shard else segs[0]
                self.partitions.append(Partition(gi, kind, params, chunk, segs, mine, shard))

    @staticmethod
    def segment_view(p: Tensor, seg: Segment) -> Tensor:
        if seg.start == 0 and seg.stop == p.numel():
            return p.detach()
        return p.detach().view(-1)[seg.start:seg.stop]

    def step(self, active: set, clip: Callable[[Tensor], Tensor], grad_slice: Callable[[tuple], Tensor | None]
             ) -> None:
        by_name = self.units.by_name
        for part in self.partitions:
            reduced = grad_slice(part.key)
            items, off = [], 0
            for seg in part.mine:
                p, n = by_name[seg.name], seg.stop - seg.start
                if p in active and n:
                    view = self.segment_view(p, seg)
                    if reduced is not None:
                        grad = reduced[off:off + n].view_as(view)
                    else:
                        gr = self.units.full_grad(p)
                        grad = gr if view.shape == p.shape else gr.reshape(-1)[seg.start:seg.stop]
                    items.append((p, view, clip(grad)))
                off += n
            adamw_apply(self.state, self.param_groups[part.group], items, foreach=self.foreach, fused=self.fused)
            if part.sharded:
                self._gather(part)

    def _gather(self, part: Partition) -> None:
        """All-gather the updated slices so every replica holds the full parameters."""
        by_name = self.units.by_name
        self.comm.all_gather_segments_(
            part.segments, lambda seg: self.segment_view(by_name[seg.name], seg).reshape(-1), part.chunk,
            dtype=part.params[0].dtype, device=part.params[0].device, tag=ADAMW_GATHER)

    def held_ranges(self, p: Tensor) -> list[tuple[int, int]]:
        name = self.units.registry.names[p]
        return [(seg.start, seg.stop) for part in self.partitions for seg in part.mine if seg.name == name]


class LocalPiecesAdamW(AdamWPart):
    """Sharded layouts: AdamW on the local pieces, no communication."""

    def step(self, active: set, clip: Callable[[Tensor], Tensor], grad_slice: Callable[[tuple], Tensor | None]
             ) -> None:
        layout = self.units.layout
        for g in self.param_groups:
            if g["use_muon"]:
                continue
            items = []
            for p in g["params"]:
                local = layout.local_param(p)
                if p in active and local.numel():
                    lg = layout.local_grad(p)
                    items.append((p, local, clip(lg) if lg is not None else torch.zeros_like(local)))
            adamw_apply(self.state, g, items, foreach=self.foreach, fused=self.fused)

    def held_ranges(self, p: Tensor) -> list[tuple[int, int]]:
        return list(self.units.layout.ranges(p)[self.units.rank])
