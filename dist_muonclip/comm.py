"""Collectives used by the distributed engine, and an accountant that counts what they move.

Byte model (per rank, per call), the usual ring-algorithm cost used by NCCL's "bus bandwidth":

    all_reduce       of N bytes: 2 (W-1)/W * N sent
    reduce_scatter   of N input bytes: (W-1)/W * N sent
    all_gather       of N output bytes: (W-1)/W * N sent
    all_to_all       exactly the bytes addressed to other ranks

so an all-reduce costs exactly a reduce-scatter plus an all-gather. ``payload`` counts the
logical tensor bytes (input for reductions, output for gathers) for reference.
"""
from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommAccountant", "Comm", "ddp_accounting_hook"]


@dataclass
class _Counter:
    calls: int = 0
    bytes: float = 0.0
    payload: int = 0


@dataclass
class CommAccountant:
    """Counts calls and bytes per collective type, per step, on this rank.

    The first record after :meth:`end_step` opens a new step (so a DDP hook's all-reduces during
    backward and the optimizer's collectives in ``step()`` land in the same step; ``MuonClip``
    calls ``end_step()`` at the end of its step). ``with accountant.step(): ...`` also works.
    ``steps`` keeps one dict per step; ``totals()`` sums them. Use it in your own runs or benchmarks::

        acc = CommAccountant()
        opt = MuonClip(model, lr=..., accountant=acc)
        ddp.register_comm_hook(acc, ddp_accounting_hook)   # count DDP's all-reduces too
    """

    steps: list[dict[str, dict[str, float]]] = field(default_factory=list)
    _current: dict[str, _Counter] | None = None

    def record(self, kind: str, *, bytes: float, payload: int) -> None:
        if self._current is None:
            self._current = defaultdict(_Counter)
            self.steps.append({})
        c = self._current[kind]
        c.calls += 1
        c.bytes += bytes
        c.payload += payload
        self.steps[-1][kind] = {"calls": c.calls, "bytes": c.bytes, "payload": c.payload}

    @contextlib.contextmanager
    def step(self) -> Iterator["CommAccountant"]:
        self._current = defaultdict(_Counter)
        self.steps.append({})
        try:
            yield self
        finally:
            self._current = None

    def totals(self, steps: slice | None = None) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes": 0.0, "payload": 0})
        for s in self.steps[steps or slice(None)]:
            for kind, c in s.items():
                for k in ("calls", "bytes", "payload"):
                    out[kind][k] += c[k]
        return dict(out)

    def total_bytes(self, kinds: Sequence[str] | None = None, steps: slice | None = None) -> float:
        return sum(c["bytes"] for k, c in self.totals(steps).items() if kinds is None or k in kinds)

    def end_step(self) -> None:
        """Close the current step: the next record opens a new one (the optimizer calls this)."""
        self._current = None

    def reset(self) -> None:
        self.steps.clear()
        self._current = None

    def to_json(self) -> str:
        return json.dumps({"steps": self.steps, "totals": self.totals()})


def ddp_accounting_hook(state: CommAccountant, bucket: "dist.GradBucket") -> torch.futures.Future[Tensor]:
    """A DDP comm hook that all-reduces (averages) like DDP's default and records the bytes."""
    tensor = bucket.buffer()
    group = dist.group.WORLD
    w = dist.get_world_size(group)
    n = tensor.numel() * tensor.element_size()
    state.record("all_reduce", bytes=2 * (w - 1) / w * n, payload=n)
    tensor.div_(w)
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Comm:
    """Thin wrapper over a process group: the collectives the engine issues, counted."""

    def __init__(self, group: Any = None, accountant: CommAccountant | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.accountant = accountant
        self.device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _count(self, kind: str, sent: float, payload: int) -> None:
        if self.accountant is not None:
            self.accountant.record(kind, bytes=sent, payload=payload)

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM, async_op: bool = False):
        n = t.numel() * t.element_size()
        self._count("all_reduce", 2 * (self.world_size - 1) / self.world_size * n, n)
        return dist.all_reduce(t, op=op, group=self.group, async_op=async_op)

    def all_gather_into_tensor(self, out: Tensor, inp: Tensor, async_op: bool = False):
        n = out.numel() * out.element_size()
        self._count("all_gather", (self.world_size - 1) / self.world_size * n, n)
        return dist.all_gather_into_tensor(out, inp, group=self.group, async_op=async_op)

    def reduce_scatter_tensor(self, out: Tensor, inp: Tensor, async_op: bool = False):
        n = inp.numel() * inp.element_size()
        self._count("reduce_scatter", (self.world_size - 1) / self.world_size * n, n)
        return dist.reduce_scatter_tensor(out, inp, group=self.group, async_op=async_op)

    def all_to_all_single(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int],
                          async_op: bool = False):
        es = inp.element_size()
        sent = sum(s for r, s in enumerate(in_splits) if r != self.rank) * es
        self._count("all_to_all", sent, out.numel() * es)
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=async_op)

    def all_gather_uneven(self, local: Tensor, counts: list[int], async_op: bool = False):
        """Gather ``local`` (``counts[rank]`` rows) from every rank into ``[sum(counts), ...]``.

        Equal counts use ``all_gather_into_tensor``; uneven ones an ``all_to_all_single`` whose
        send side repeats ``local`` once per peer (gloo has no uneven all-gather). Either way each
        rank sends ``(W-1) * local`` bytes: no padding on the wire. Returns ``(out, work)``.
        """
        row = local[0].numel() if local.shape[0] else int(torch.tensor(local.shape[1:]).prod())
        out = torch.empty((sum(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
        if len(set(counts)) == 1:
            work = self.all_gather_into_tensor(out, local.contiguous(), async_op=async_op)
            return out, work
        send = local.reshape(-1).repeat(self.world_size)
        work = self.all_to_all_single(out.view(-1), send, [c * row for c in counts],
                                      [local.numel()] * self.world_size, async_op=async_op)
        return out, work

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
