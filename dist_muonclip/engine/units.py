"""Muon units: what the plan assigns owners to, and where their elements live on this rank.

A *unit* is a Muon parameter, or a chunk of consecutive matrices of a stacked parameter (fused MoE
experts ``[E, m, n]``: chunks of experts get owners of their own so one layer's experts spread over
ranks). :class:`Units` keeps the parameter registry (names, matrix views, registration order, param
group) and the chunks, and answers the layout questions per unit: its flat ranges per rank, its
local elements and local reduced gradient, its momentum on this rank.

Chunks are tensors so they can key optimizer state like parameters do. On the Replicated layout a
chunk is a ``[k, m, n]`` view of its parameter's matrices (its momentum is a state entry of its
own, on its owner); on sharded layouts it is a ``[k, m, n]`` meta tensor naming the chunk, its
local pieces are slices of the parameter's local pieces and its momentum a slice of the
parameter's (so checkpoints see per-parameter state). Chunks are cached by (parameter, start,
stop): a re-plan that keeps a chunk keeps its state.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..layouts import Layout
from ..param_split import as_matrices, matrix_shape
from ..plan import MatrixItem, chunk_ranges, split_on_ranges, split_stacked

__all__ = ["ParamRegistry", "Chunk", "Units", "view_of"]


def view_of(p: Tensor) -> str:
    """The matrix view of a parameter given without a model: 2-D -> matrix, >2-D -> flatten, else vector."""
    return "matrix" if p.ndim == 2 else ("flatten" if p.ndim > 2 else "vector")


class ParamRegistry:
    """Names, matrix views and registration order of the optimizer's parameters.

    Names key the optimizer state in checkpoints (stable across processes, rebuilt models and
    world sizes); the registration order is the model's parameter order when built from a model.
    """

    def __init__(self) -> None:
        self.names: dict[Tensor, str] = {}
        self.views: dict[Tensor, str] = {}
        self.order: dict[Tensor, int] = {}

    def register(self, p: Tensor, name: str, view: str | None = None) -> None:
        self.names.setdefault(p, name)
        self.views.setdefault(p, view or view_of(p))
        self.order.setdefault(p, len(self.order))

    def name(self, p: Tensor) -> str:
        return self.names[p]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Matrices ``[start, stop)`` of a stacked parameter, as one Muon unit."""

    param: Tensor
    start: int
    stop: int


class Units:
    """The Muon units of one plan, over a layout (see module doc)."""

    def __init__(self, registry: ParamRegistry, layout: Layout, rank: int) -> None:
        self.registry = registry
        self.layout = layout
        self.rank = rank
        self.chunks: dict[Tensor, Chunk] = {}          # chunk tensor -> its parameter and matrices
        self.chunks_of: dict[Tensor, list[Tensor]] = {}
        self.by_name: dict[str, Tensor] = {}
        self.group_of: dict[Tensor, int] = {}
        self._cache: dict[tuple, Tensor] = {}

    # -- building ----------------------------------------------------------------------------
    def items(self, param_groups: Sequence[dict], world_size: int) -> list[MatrixItem]:
        """The planner's items: Muon parameters, stacked ones cut into chunks (Replicated:
        ``min(E, W)`` equal chunks placed by LPT; sharded: along the layout's cuts, so no expert
        travels), registering the chunks as units."""
        reg = self.registry
        self.by_name = {reg.names[p]: p for g in param_groups for p in g["params"]}
        self.group_of = {p: gi for gi, g in enumerate(param_groups) for p in g["params"]}
        items = []
        for gi, g in enumerate(param_groups):
            if g["use_muon"]:
                for p in g["params"]:
                    b, m, n = matrix_shape(p.shape, reg.views[p])
                    items.append(MatrixItem(reg.names[p], gi, b, m, n, str(p.dtype), g["ns_steps"]))
        if self.layout.sharded:
            items = [c for i in items for c in (split_on_ranges(i, self.layout.ranges(self.by_name[i.name]))
                                                if i.num_matrices > 1 else [i])]
        elif world_size > 1:
            # a chunk must be a view of its parameter (updates land in place): non-contiguous stacks stay whole
            whole = [i for i in items if not self.by_name[i.name].is_contiguous()]
            items = whole + split_stacked([i for i in items if self.by_name[i.name].is_contiguous()], world_size)
        self._register_chunks(items)
        return items

    def _register_chunks(self, items: Iterable[MatrixItem]) -> None:
        reg, meta = self.registry, self.layout.sharded
        for t in self.chunks:
            reg.names.pop(t, None)
            reg.views.pop(t, None)
        self.chunks, self.chunks_of, keep = {}, {}, {}
        for item in items:
            if item.parent is None:
                continue
            p = self.by_name[item.parent]
            a, b = item.start, item.start + item.num_matrices
            key = (id(p), a, b)
            t = self._cache.get(key)
            if t is not None and (t.device.type == "meta") != meta:
                t = None
            if t is None and meta:
                t = torch.empty((item.num_matrices, item.m, item.n), device="meta")
            elif t is None:
                with torch.no_grad():
                    t = as_matrices(p.detach(), reg.views[p])[a:b]
            keep[key] = t
            self.chunks[t] = Chunk(p, a, b)
            self.chunks_of.setdefault(p, []).append(t)
            reg.names[t] = item.name
            reg.views[t] = "batch"
            self.by_name[item.name] = t
            self.group_of[t] = self.group_of[p]
        self._cache = keep

    def refresh(self) -> None:
        """Re-point chunk views whose parameter got new storage (``p.data = ...``, ``model.to(...)``)."""
        for t, c in self.chunks.items():
            if t.device.type == "meta":
                continue
            view = as_matrices(c.param.detach(), self.registry.views[c.param])[c.start:c.stop]
            if t.data_ptr() != view.data_ptr() or t.dtype != view.dtype or t.device != view.device:
                with torch.no_grad():
                    t.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())

    # -- per unit ------------------------------------------------------------------------------
    def param_of(self, u: Tensor) -> Tensor:
        """The parameter a unit belongs to (itself unless it is a chunk)."""
        c = self.chunks.get(u)
        return u if c is None else c.param

    def num_matrices(self, u: Tensor) -> int:
        return matrix_shape(u.shape, self.registry.views[u])[0]

    def ranges(self, u: Tensor) -> list[list[tuple[int, int]]]:
        """Per rank, the flat ranges of the unit's elements (relative to its first element)."""
        c = self.chunks.get(u)
        if c is None:
            return self.layout.ranges(u)
        return chunk_ranges(c.start, c.stop, math.prod(u.shape[1:]), self.layout.ranges(c.param))

    def local_size(self, u: Tensor, rank: int) -> int:
        return sum(b - a for a, b in self.ranges(u)[rank])

    def full_shape(self, u: Tensor) -> torch.Size:
        return u.shape if u in self.chunks else self.layout.full_shape(u)

    def chunk_slice(self, u: Tensor, flat: Tensor) -> Tensor:
        """A chunk's elements within its parameter's local 1-D ``flat`` (one local range)."""
        c = self.chunks[u]
        per = math.prod(u.shape[1:])
        lo, hi = c.start * per, c.stop * per
        for x, y in self.layout.ranges(c.param)[self.rank]:
            if y > x:
                s, e = max(x, lo), min(y, hi)
                return flat[s - x:e - x] if e > s else flat[:0]
        return flat[:0]

    def local_param(self, u: Tensor) -> Tensor:
        """1-D view of this rank's elements of the unit (writes reach the parameter)."""
        if u not in self.chunks:
            return self.layout.local_param(u)
        return self.chunk_slice(u, self.layout.local_param(self.chunks[u].param))

    def local_grad(self, u: Tensor) -> Tensor | None:
        """1-D reduced gradient matching :meth:`local_param` (sharded layouts), or ``None``."""
        if u not in self.chunks:
            return self.layout.local_grad(u)
        g = self.layout.local_grad(self.chunks[u].param)
        return None if g is None else self.chunk_slice(u, g)

    def full_grad(self, u: Tensor) -> Tensor:
        """Replicated layout: the unit's full gradient from ``p.grad`` (zeros where the graph gave none)."""
        c = self.chunks.get(u)
        if c is not None:
            g = c.param.grad
            return as_matrices(g, self.registry.views[c.param])[c.start:c.stop] if g is not None \
                else torch.zeros_like(u)
        return u.grad if u.grad is not None else torch.zeros_like(u)
