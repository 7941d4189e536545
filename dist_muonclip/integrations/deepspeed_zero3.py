"""MuonClip on DeepSpeed ZeRO-3 partitions (``"zero_optimization": {"stage": 3}``).

What DeepSpeed 0.19 (``deepspeed/runtime/zero/stage3.py``) hands a client optimizer at stage 3:

* every parameter ``p`` is cut across all ``W`` data-parallel ranks on its own: with
  ``ps = ceil(p.ds_numel / W)`` (``p.partition_numel()``), rank ``r`` holds the flat elements
  ``[r * ps, min((r + 1) * ps, numel))`` of the full tensor in ``p.ds_tensor`` (padded to ``ps``);
  parameters under ``stage3_param_persistence_threshold`` stay gathered for forward/backward but
  are partitioned the same way for the optimizer;
* each param group is split into sub-groups (``sub_group_size`` elements); sub-group ``i``'s fp32
  master is one flat tensor ``fp32_partitioned_groups_flat[i]``, the concatenation of its
  parameters' padded partitions (``ps`` each, in sub-group order, identical offsets on every rank);
* ``step()`` visits the sub-groups in order: it sets the flat tensor's ``.grad`` (reduced,
  unscaled, clipped), calls the client's ``step()`` with the group's ``params`` narrowed to that one
  flat tensor, copies the fp32 partition into the bf16/fp32 model partition, and drops ``.grad``.

MuonClip needs every gradient at once (one preflight, QK-Clip after all updates), so
:class:`Zero3PartitionsLayout` keeps each sub-group's gradient as DeepSpeed offers it
(:meth:`stash_grad`), the client runs the whole step at the last sub-group, and the earlier
sub-groups' model partitions are refreshed from their fp32 partitions afterwards
(:meth:`refresh_model_partitions`). To the engine it is a sharded layout like ZeRO-1/2's flat
fragments: each Muon matrix's pieces go to its owner by one all-to-all per bucket, are
orthogonalized once, and the update pieces come back. Every rank holds ~1/W of every matrix, so
no rank is "where most of it lives": owners are placed by the LPT plan alone.

A partitioned parameter's ``.data`` is an empty tensor outside forward/backward while MuonClip
reads parameter shapes (its Muon/AdamW split, matrix views, the plan). :func:`full_shapes` stands
a broadcast tensor of the full shape (``p.ds_shape``) in for ``.data`` while MuonClip is built, bound
or stepped; MuonClip never touches a sharded layout's parameter storage (it works on the fp32
partitions), and DeepSpeed does not look at ``.data`` during its optimizer step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..layouts import Layout

__all__ = ["Zero3PartitionsLayout", "full_shapes", "is_zero3_param", "refresh_model_partitions"]


def is_zero3_param(p: Tensor) -> bool:
    """A parameter partitioned by ``deepspeed.zero.Init`` / ZeRO-3 (it carries ``ds_shape``)."""
    return hasattr(p, "ds_shape") and hasattr(p, "ds_tensor")


@contextlib.contextmanager
def full_shapes(params: Sequence[Tensor] | nn.Module) -> Iterator[None]:
    """Within the block, every partitioned ZeRO-3 parameter whose ``.data`` is not its full tensor
    shows a stand-in of its full shape (``ds_shape``) instead; restored on exit.

    The stand-in is one zero broadcast to the full shape (no memory; an in-place write to it
    raises, since its elements overlap), so an accidental write by the optimizer fails loudly."""
    if isinstance(params, nn.Module):
        params = list(params.parameters())
    swapped: list[tuple[Tensor, Tensor]] = []
    try:
        for p in params:
            if is_zero3_param(p) and tuple(p.shape) != tuple(p.ds_shape):
                swapped.append((p, p.data))
                # one element broadcast to the full shape (a Parameter cannot take a meta tensor)
                p.data = torch.zeros(1, dtype=p.dtype, device=p.device).expand(p.ds_shape)
        yield
    finally:
        for p, data in swapped:
            p.data = data


class Zero3PartitionsLayout(Layout):
    """Every parameter cut across all ranks by ZeRO-3 (see module doc); local views are slices of
    DeepSpeed's flat fp32 sub-group partitions.

    Args:
        sub_groups: per sub-group, its parameters in DeepSpeed's order (``optimizer.fp16_groups``).
        flats: per sub-group, this rank's fp32 partition (``optimizer.fp32_partitioned_groups_flat``).
        rank, world_size: this rank in, and the size of, the data-parallel group.
    """

    sharded = True

    def __init__(self, sub_groups: Sequence[Sequence[Tensor]], flats: Sequence[Tensor], rank: int,
                 world_size: int) -> None:
        if len(sub_groups) != len(flats):
            raise ValueError(f"Zero3PartitionsLayout: {len(sub_groups)} sub-groups but {len(flats)} fp32 partitions")
        self.rank, self.world_size = rank, world_size
        self._flats = list(flats)
        self._where: dict[Tensor, tuple[int, int]] = {}       # p -> (sub-group, offset in its flat partition)
        self._numel: dict[Tensor, int] = {}
        self._per_rank: dict[Tensor, int] = {}                # ps: elements per rank (padded)
        self._shape: dict[Tensor, torch.Size] = {}
        self._stashed: dict[int, Tensor] = {}
        self._index = {id(f): i for i, f in enumerate(self._flats)}
        for i, (params, flat) in enumerate(zip(sub_groups, flats)):
            off = 0
            for p in params:
                if p in self._where:
                    raise ValueError("Zero3PartitionsLayout: a parameter appears in two sub-groups")
                numel = int(p.ds_numel)
                ps = -(-numel // world_size)
                self._where[p] = (i, off)
                self._numel[p], self._per_rank[p], self._shape[p] = numel, ps, torch.Size(p.ds_shape)
                off += ps
            if flat.numel() != off:
                raise ValueError(f"Zero3PartitionsLayout: sub-group {i}'s fp32 partition has {flat.numel()} elements, "
                                 f"its parameters' partitions add up to {off}")

    # -- the Layout contract --------------------------------------------------------------------
    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        n, ps = self._numel[p], self._per_rank[p]
        out = []
        for r in range(self.world_size):
            a, b = r * ps, min((r + 1) * ps, n)
            out.append([(a, b)] if b > a else [])
        return out

    def _local(self, p: Tensor, flat: Tensor) -> Tensor:
        _, off = self._where[p]
        n, ps = self._numel[p], self._per_rank[p]
        size = max(0, min(ps, n - self.rank * ps))
        return flat[off:off + size]

    def local_param(self, p: Tensor) -> Tensor:
        return self._local(p, self._flats[self._where[p][0]].detach())

    def local_grad(self, p: Tensor) -> Tensor | None:
        i = self._where[p][0]
        g = self._flats[i].grad
        if g is None:
            g = self._stashed.get(i)
        return None if g is None else self._local(p, g)

    def full_shape(self, p: Tensor) -> torch.Size:
        return self._shape[p]

    # -- DeepSpeed's sub-group-at-a-time step ----------------------------------------------------
    @property
    def num_sub_groups(self) -> int:
        return len(self._flats)

    def sub_group_of(self, flat: Tensor) -> int:
        """Index of the sub-group whose fp32 partition is ``flat`` (the tensor DeepSpeed steps)."""
        i = self._index.get(id(flat))
        if i is None:
            raise RuntimeError("DeepSpeed stepped a tensor that is not one of ZeRO-3's fp32 sub-group partitions")
        return i

    def stash_grad(self, i: int) -> None:
        """Keep sub-group ``i``'s gradient partition: DeepSpeed drops it after stepping the sub-group."""
        g = self._flats[i].grad
        if g is None:
            self._stashed.pop(i, None)
        else:
            self._stashed[i] = g

    def clear_stash(self) -> None:
        self._stashed.clear()

    def stashed_sub_groups(self) -> list[int]:
        return sorted(self._stashed)


@torch.no_grad()
def refresh_model_partitions(wrapper: Any, sub_groups: Sequence[int]) -> None:
    """Copy the fp32 partitions of ``sub_groups`` into the model's (bf16 or fp32) partitions, as
    DeepSpeed does right after stepping each sub-group (ours were updated after its copy)."""
    for i in sub_groups:
        lp = wrapper.fp16_partitioned_groups_flat[i]
        hp = wrapper.fp32_partitioned_groups_flat[i]
        if lp is not None and lp.data_ptr() != hp.data_ptr():
            lp.data.copy_(hp.data)
