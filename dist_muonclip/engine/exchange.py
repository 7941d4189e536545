"""How a bucket's matrices reach their owner and how the updates come back: one exchange per layout.

The Muon pipeline (:class:`~dist_muonclip.engine.engine.Engine`) is the same for every layout:

    momentum on the pieces this rank updates -> to_owner -> orthogonalize on the owner
    -> from_owner -> apply on the pieces this rank holds

and the exchange, chosen once by the layout (:meth:`~dist_muonclip.layouts.Layout.make_exchange`),
decides what each arrow moves:

===================  ===============================  =============================  ==========================
exchange             momentum on                      to owner                       from owner
===================  ===============================  =============================  ==========================
:class:`Replicated`  the owner's whole matrices       nothing (owners hold them)     all-gather of the updates
:class:`Sharded`     every rank's pieces              all-to-all of the pieces       all-to-all of update pieces
===================  ===============================  =============================  ==========================

Collective tags name the direction on every layout: ``muon_to_owner`` and ``muon_from_owner``.
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..comm import Comm
from ..newton_schulz import as_dtype
from ..param_split import as_matrices
from ..plan import Bucket
from ..transfers import HostCopy
from .units import Units

__all__ = ["BucketJob", "Exchange", "ReplicatedExchange", "ShardedExchange", "TO_OWNER", "FROM_OWNER",
           "momentum_buffer"]

TO_OWNER = "muon_to_owner"
FROM_OWNER = "muon_from_owner"


def momentum_buffer(state: dict, like: Tensor, *, memory_format: torch.memory_format = torch.preserve_format
                    ) -> Tensor:
    """Muon's ``momentum_buffer`` in one parameter's state (zeros like ``like`` on first use: the
    elements this rank keeps momentum for), named as in ``torch.optim.Muon``."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(like, memory_format=memory_format)
    return state["momentum_buffer"]


@dataclasses.dataclass
class BucketJob:
    """One bucket of one step as it moves through the pipeline."""

    bucket: Bucket
    group: dict
    active: list[Tensor]                   # units that step, in bucket order (owner, name)
    mine: list[Tensor]                     # the active units this rank owns
    owner_of: dict[Tensor, int]            # unit -> owner rank
    work: Any = None                       # the collective in flight
    received: Tensor | None = None         # to_owner's output buffer
    updates: Tensor | None = None          # from_owner's output buffer
    host: HostCopy | None = None           # its copy to the host (CPU offload over a device-only group)
    targets: list[Tensor] = dataclasses.field(default_factory=list)   # where updates are applied


class Exchange(ABC):
    """Moves one bucket's matrices to their owner and the updates back (see module doc)."""

    def __init__(self, units: Units, state: dict, comm: Comm | None, rank: int, world_size: int) -> None:
        self.units = units
        self.state = state
        self.comm = comm
        self.rank = rank
        self.world_size = world_size

    @abstractmethod
    def momentum_buffers(self, job: BucketJob) -> list[tuple[Tensor, Tensor]]:
        """``(unit, momentum buffer)`` for the units whose momentum this rank updates (created as
        zeros on first use), the buffer covering the elements this rank feeds to the owner."""

    @abstractmethod
    def to_owner(self, job: BucketJob, pieces: list[Tensor]) -> None:
        """Start moving the momentum-updated ``pieces`` (one per :meth:`momentum_units`) to their owners."""

    @abstractmethod
    def owned_matrices(self, job: BucketJob) -> list[Tensor]:
        """Wait for :meth:`to_owner`; the ``[k, m, n]`` matrices of ``job.mine``."""

    @abstractmethod
    def from_owner(self, job: BucketJob, ortho: Tensor | None) -> None:
        """Start sending the owner's orthogonalized ``[B, m, n]`` updates (``None``: owns none) back."""

    @abstractmethod
    def received_updates(self, job: BucketJob) -> tuple[list[Tensor], list[Tensor]]:
        """Wait for :meth:`from_owner`; ``(targets, updates)``: the tensors this rank applies to
        (parameters or 1-D local pieces) and the matching update pieces."""

    @abstractmethod
    def num_local(self, u: Tensor) -> int:
        """Elements of unit ``u`` this rank applies updates to (update-RMS metric)."""


class ReplicatedExchange(Exchange):
    """Every rank holds every element: owners orthogonalize what they own, updates are all-gathered."""

    def momentum_buffers(self, job: BucketJob) -> list[tuple[Tensor, Tensor]]:
        """The owner's whole buffer, a state entry of the unit (a parameter or a chunk of experts)."""
        return [(u, momentum_buffer(self.state[u], u)) for u in job.mine]

    def to_owner(self, job: BucketJob, pieces: list[Tensor]) -> None:
        job.received = pieces            # the owner already holds the reduced matrices: nothing moves

    def owned_matrices(self, job: BucketJob) -> list[Tensor]:
        views = self.units.registry.views
        return [as_matrices(v, views[u]) for v, u in zip(job.received, job.mine)]

    def from_owner(self, job: BucketJob, ortho: Tensor | None) -> None:
        if self.comm is None:
            job.updates = ortho
            return
        counts = [0] * self.world_size
        for u in job.active:
            counts[job.owner_of[u]] += self.units.num_matrices(u)
        if ortho is None:
            b = job.bucket
            ortho = torch.empty((0, b.m, b.n), dtype=as_dtype(job.group["ns_dtype"]),
                                device=job.active[0].device)
        job.updates, job.work = self.comm.all_gather_uneven(ortho.contiguous(), counts, async_op=True,
                                                             tag=FROM_OWNER)

    def received_updates(self, job: BucketJob) -> tuple[list[Tensor], list[Tensor]]:
        if job.work is not None:
            job.work.wait()
        pieces = job.updates.split([self.units.num_matrices(u) for u in job.active])
        return job.active, list(pieces)

    def num_local(self, u: Tensor) -> int:
        return u.numel()


class ShardedExchange(Exchange):
    """Every element lives on one rank: pieces travel to the owner and update pieces come back,
    each as one all-to-all per bucket (row shards and flat fragments alike)."""

    def momentum_buffers(self, job: BucketJob) -> list[tuple[Tensor, Tensor]]:
        """Every rank's local pieces: the parameter's local buffer, a chunk's being a slice of it
        (so checkpoints see per-parameter state)."""
        out, units = [], self.units
        for u in job.active:
            p = units.param_of(u)
            buf = momentum_buffer(self.state[p], units.layout.local_param(p), memory_format=torch.contiguous_format)
            out.append((u, buf if p is u else units.chunk_slice(u, buf)))
        return out

    def to_owner(self, job: BucketJob, pieces: list[Tensor]) -> None:
        w, units = self.world_size, self.units
        in_splits = [0] * w
        for u, v in zip(job.active, pieces):
            in_splits[job.owner_of[u]] += v.numel()
        out_splits = [sum(units.local_size(u, s) for u in job.mine) for s in range(w)]
        # on the group's device: under CPU offload the pieces are host tensors and NCCL takes
        # CUDA ones only; the matrices then arrive, and are orthogonalized, on the accelerator
        local = units.local_param(job.active[0])
        send = self.comm.stage(pieces) if pieces else self.comm.empty(0, local.dtype, like=local)
        job.received = self.comm.empty(sum(out_splits), send.dtype, like=send)
        job.work = self.comm.all_to_all_single(job.received, send, out_splits, in_splits, async_op=True,
                                               tag=TO_OWNER)

    def owned_matrices(self, job: BucketJob) -> list[Tensor]:
        job.work.wait()
        units, recv = self.units, job.received
        fulls = [recv.new_empty(math.prod(units.full_shape(u))) for u in job.mine]
        off = 0
        for s in range(self.world_size):
            for u, full in zip(job.mine, fulls):
                for a, b in units.ranges(u)[s]:
                    full[a:b] = recv[off:off + b - a]
                    off += b - a
        job.received = recv.new_empty(0)      # the pieces are in the full matrices now: free the buffer
        views = units.registry.views
        return [as_matrices(f.view(units.full_shape(u)), views[u]) for f, u in zip(fulls, job.mine)]

    def from_owner(self, job: BucketJob, ortho: Tensor | None) -> None:
        w, units = self.world_size, self.units
        sends: list[Tensor] = []
        in_splits = [0] * w
        if ortho is not None:
            flats = [o.reshape(-1) for o in ortho.split([units.num_matrices(u) for u in job.mine])]
            for r in range(w):
                for u, flat in zip(job.mine, flats):
                    for a, b in units.ranges(u)[r]:
                        sends.append(flat[a:b])
                        in_splits[r] += b - a
        send = (self.comm.stage(sends) if sends else
                self.comm.empty(0, as_dtype(job.group["ns_dtype"]), like=job.received))
        out_splits = [sum(units.local_size(u, self.rank) for u in job.active if job.owner_of[u] == s)
                      for s in range(w)]
        job.updates = self.comm.empty(sum(out_splits), send.dtype, like=send)
        job.work = self.comm.all_to_all_single(job.updates, send, out_splits, in_splits, async_op=True,
                                               tag=FROM_OWNER)
        home = units.local_param(job.active[0]).device
        if job.updates.device != home:      # CPU offload: start the copy back now, beside the next NS
            job.work.wait()                 # (NCCL: the current stream waits; the host does not)
            job.work = None
            job.host = HostCopy(job.updates, home)

    def received_updates(self, job: BucketJob) -> tuple[list[Tensor], list[Tensor]]:
        if job.work is not None:
            job.work.wait()
        updates = job.updates if job.host is None else job.host.wait()
        sizes = [self.units.local_size(u, self.rank) for u in job.active]
        return [self.units.local_param(u) for u in job.active], list(updates.split(sizes))

    def num_local(self, u: Tensor) -> int:
        return self.units.local_size(u, self.rank)
