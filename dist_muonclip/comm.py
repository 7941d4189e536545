"""Collectives used by the distributed engine, and an accountant that counts what they move.

Byte model (per rank, per call), the usual ring-algorithm cost used by NCCL's "bus bandwidth":

    all_reduce       of N bytes: 2 (W-1)/W * N sent
    reduce_scatter   of N input bytes: (W-1)/W * N sent
    all_gather       of N output bytes: (W-1)/W * N sent
    all_to_all       exactly the bytes addressed to other ranks
    reduce           of N bytes to a root: N sent by every other rank, 0 by the root
    broadcast        of N bytes from a root: (W-1) N sent by the root, 0 by the others

so an all-reduce costs exactly a reduce-scatter plus an all-gather. Reduce and broadcast are
counted as a star (what a ring reduce sends per rank, exactly; a ring or tree broadcast moves
the same total (W-1) N, spread over the ranks differently): every element crosses the wire once
per rank that needs it, so summed over ranks one reduce per owner costs what a reduce-scatter
costs, and one broadcast per owner what an all-gather costs. ``payload`` counts the logical
tensor bytes (input for reductions, output for gathers) for reference.

:class:`Comm` labels the collectives it issues with their tag (:func:`comm_tag`), so a wire-level
counter (:class:`dist_muonclip.profiler.WireCounter`, which sees every collective of the process:
DDP's, FSDP2's, DeepSpeed's and ours) reports them under the same ``kind[tag]`` names as the
accountant; collectives issued outside any tag are the engine's.
"""
from __future__ import annotations

import contextlib
import json
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .transfers import cat_to_device, to_device

__all__ = ["CommAccountant", "Comm", "WorkList", "ddp_accounting_hook", "comm_tag", "current_comm_tag", "bytes_sent"]


# torch >= 2.12 renamed the tensor collectives (*_into_tensor / *_tensor -> *_single) and warns on
# the old names; older releases only have the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def bytes_sent(kind: str, nbytes: float, world_size: int, rank: int = 0, root: int = 0) -> float:
    """Bytes one rank puts on the wire for one collective of ``nbytes`` payload, by the byte model
    above (``kind``: all_reduce, reduce_scatter, all_gather, reduce, broadcast; ``root`` for the
    last two). The accountant, the wire counter and the cost model all price calls with it."""
    w = world_size
    if kind == "all_reduce":
        return 2 * (w - 1) / w * nbytes
    if kind in ("reduce_scatter", "all_gather"):
        return (w - 1) / w * nbytes
    if kind == "reduce":
        return 0.0 if rank == root else float(nbytes)
    if kind == "broadcast":
        return float((w - 1) * nbytes) if rank == root else 0.0
    raise ValueError(f"bytes_sent: unknown collective kind {kind!r}")


_TAG = threading.local()


@contextlib.contextmanager
def comm_tag(tag: str | None) -> Iterator[None]:
    """Label the collectives issued inside the block (on this thread): a wire-level counter
    records them as ``kind[tag]`` (e.g. ``all_reduce[loss]``). The innermost tag wins."""
    prev = getattr(_TAG, "tag", None)
    _TAG.tag = tag or prev
    try:
        yield
    finally:
        _TAG.tag = prev


def current_comm_tag() -> str | None:
    """The tag set by the innermost :func:`comm_tag` block on this thread, or ``None``."""
    return getattr(_TAG, "tag", None)


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


# DDP checks the hook's annotations as objects; `from __future__ import annotations` made them strings.
ddp_accounting_hook.__annotations__.update(bucket=dist.GradBucket, return_=None)
ddp_accounting_hook.__annotations__.pop("return_")
ddp_accounting_hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


class WorkList:
    """Several async collectives waited on as one (``wait()`` like a ``dist.Work``)."""

    def __init__(self, works: Sequence[Any]) -> None:
        self.works = [w for w in works if w is not None]

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True


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
        # the device types this group's backend takes ("cuda:nccl": CUDA only; "cpu:gloo,cuda:gloo": both)
        self.device_types = frozenset(part.split(":")[0] for part in str(dist.get_backend_config(group)).split(","))

    # -- where collective buffers live ---------------------------------------------------------
    # CPU optimizer offload (DeepSpeed offload_optimizer) keeps the optimizer's tensors in host
    # memory while the group may be NCCL (CUDA tensors only): every tensor the engine hands a
    # collective goes through on_device / to_device / stage / empty (dist_muonclip.transfers).

    def on_device(self, t: Tensor) -> bool:
        """Whether ``t`` can go into this group's collectives where it is."""
        return t.device.type in self.device_types

    def to_device(self, t: Tensor) -> Tensor:
        """``t`` itself when the group takes it where it is, else a copy on :attr:`device`
        (pinned, non-blocking from the host). Collect results from the returned tensor."""
        return t if self.on_device(t) else to_device(t, self.device)

    def stage(self, pieces: Sequence[Tensor]) -> Tensor:
        """A send buffer: the concatenation of the 1-D ``pieces``, where they are when the group
        takes that device, else on :attr:`device` (concatenated into pinned host memory and copied
        without blocking the host)."""
        if all(self.on_device(p) for p in pieces):
            return torch.cat(list(pieces))
        return cat_to_device(pieces, self.device)

    def empty(self, numel: int, dtype: torch.dtype, like: Tensor) -> Tensor:
        """A receive buffer of ``numel`` elements: on ``like``'s device (a staged send buffer)
        when the group takes it, else on :attr:`device`."""
        return torch.empty(numel, dtype=dtype, device=like.device if self.on_device(like) else self.device)

    def _count(self, kind: str, tag: str, sent: float, payload: int) -> None:
        if self.accountant is not None:
            self.accountant.record(f"{kind}[{tag}]" if tag else kind, bytes=sent, payload=payload)

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM, async_op: bool = False, tag: str = ""):
        n = t.numel() * t.element_size()
        self._count("all_reduce", tag, bytes_sent("all_reduce", n, self.world_size), n)
        with comm_tag(tag):
            return dist.all_reduce(t, op=op, group=self.group, async_op=async_op)

    def all_gather_into_tensor(self, out: Tensor, inp: Tensor, async_op: bool = False, tag: str = ""):
        n = out.numel() * out.element_size()
        self._count("all_gather", tag, bytes_sent("all_gather", n, self.world_size), n)
        with comm_tag(tag):
            return _all_gather_single(out, inp, group=self.group, async_op=async_op)

    def reduce_scatter_tensor(self, out: Tensor, inp: Tensor, async_op: bool = False, tag: str = ""):
        n = inp.numel() * inp.element_size()
        self._count("reduce_scatter", tag, bytes_sent("reduce_scatter", n, self.world_size), n)
        with comm_tag(tag):
            return _reduce_scatter_single(out, inp, group=self.group, async_op=async_op)

    def all_to_all_single(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int],
                          async_op: bool = False, tag: str = ""):
        es = inp.element_size()
        sent = sum(s for r, s in enumerate(in_splits) if r != self.rank) * es
        self._count("all_to_all", tag, sent, out.numel() * es)
        with comm_tag(tag):
            return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=async_op)

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def reduce(self, t: Tensor, dst: int, op=dist.ReduceOp.SUM, async_op: bool = False, tag: str = ""):
        """Sum ``t`` into group rank ``dst``'s ``t`` (other ranks' ``t`` is left unspecified)."""
        n = t.numel() * t.element_size()
        self._count("reduce", tag, bytes_sent("reduce", n, self.world_size, self.rank, dst), n)
        with comm_tag(tag):
            return dist.reduce(t, dst=self._global_rank(dst), op=op, group=self.group, async_op=async_op)

    def broadcast(self, t: Tensor, src: int, async_op: bool = False, tag: str = ""):
        """Copy group rank ``src``'s ``t`` into every rank's ``t``."""
        n = t.numel() * t.element_size()
        self._count("broadcast", tag, bytes_sent("broadcast", n, self.world_size, self.rank, src), n)
        with comm_tag(tag):
            return dist.broadcast(t, src=self._global_rank(src), group=self.group, async_op=async_op)

    def all_gather_uneven(self, local: Tensor, counts: list[int], async_op: bool = False, tag: str = ""):
        """Gather ``local`` (``counts[rank]`` rows) from every rank into ``[sum(counts), ...]``.

        Equal counts use ``all_gather_into_tensor``; uneven ones one broadcast per rank with rows,
        straight from and into ``out`` (gloo has no uneven all-gather; padding would put extra
        bytes on the wire, and an all-to-all would need a send buffer of ``W`` copies of
        ``local``). Either way each element leaves its rank once per peer and nothing but ``out``
        is allocated. Returns ``(out, work)`` (``work`` waits for all pieces).
        """
        out = torch.empty((sum(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
        if len(set(counts)) == 1:
            work = self.all_gather_into_tensor(out, local.contiguous(), async_op=async_op, tag=tag)
            return out, work
        if len(counts) != self.world_size or local.shape[0] != counts[self.rank]:
            raise ValueError(f"all_gather_uneven: counts {counts} do not match world size {self.world_size} "
                             f"and this rank's {local.shape[0]} rows")
        starts = [sum(counts[:r]) for r in range(self.world_size)]
        out[starts[self.rank]:starts[self.rank] + counts[self.rank]].copy_(local)
        works = [self.broadcast(out[starts[r]:starts[r] + c], r, async_op=async_op, tag=tag)
                 for r, c in enumerate(counts) if c]
        return out, (WorkList(works) if async_op else None)

    def all_gather_segments_(self, segments: Sequence[Sequence[Any]], view: Any, chunk: int, *,
                             dtype: torch.dtype, device: torch.device, tag: str = "") -> None:
        """Equal flat slices (classic ZeRO-1): rank r holds ``segments[r]`` (objects with ``start``
        and ``stop``), each read and written through ``view(seg)``, a 1-D view of its elements.
        Packs this rank's segments into a ``chunk``-sized buffer, all-gathers, and copies every
        other rank's segments into place."""
        send = torch.zeros(chunk, dtype=dtype, device=device)
        off = 0
        for seg in segments[self.rank]:
            n = seg.stop - seg.start
            send[off:off + n] = view(seg)
            off += n
        full = torch.empty(chunk * self.world_size, dtype=dtype, device=device)
        self.all_gather_into_tensor(full, send, tag=tag)
        for r, segs in enumerate(segments):
            if r == self.rank:
                continue
            off = r * chunk
            for seg in segs:
                n = seg.stop - seg.start
                view(seg).copy_(full[off:off + n])
                off += n

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
