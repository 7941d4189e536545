"""Where a parameter's elements live on this rank (DESIGN.md, "Layouts").

The core never asks which engine is running; it asks the parameter's layout:

* :class:`Replicated` (DDP, torchrun, DeepSpeed ZeRO-0): every rank holds every element and the
  reduced gradient. Owners orthogonalize; the updates are all-gathered.
* sharded layouts (FSDP2 ``Shard(0)`` row shards, DeepSpeed ZeRO-1/2 flat fragments): every
  element is held by exactly one rank. A layout says which flat element ranges of the full
  row-major tensor each rank holds (:meth:`Layout.ranges`) and gives 1-D views of the local
  elements and of their reduced gradient. The engine then gathers full matrices on owners with an
  all-to-all of pieces and sends update pieces back the same way.

Row-shards and flat fragments are the same thing to the engine: a row shard ``[r0, r1)`` of an
``[R, C]`` matrix is the flat range ``[r0 * C, r1 * C)``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["Layout", "Replicated", "FlatRangesLayout", "piece_row_scale", "scale_rows_"]


class Layout(ABC):
    """Where a parameter's elements live on this rank (see module doc): the whole contract.

    Subclasses implement :meth:`ranges`, :meth:`local_param` and :meth:`local_grad`; every other
    hook has a default that suits a layout without extra needs. ``sharded``: every element lives
    on exactly one rank (else every rank holds everything).
    """

    sharded: bool = False

    @abstractmethod
    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        """Per rank, the sorted flat ranges ``[start, stop)`` of ``p``'s full tensor it holds."""

    @abstractmethod
    def local_param(self, p: Tensor) -> Tensor:
        """1-D view of this rank's elements of ``p`` (range order); writes reach the real storage."""

    @abstractmethod
    def local_grad(self, p: Tensor) -> Tensor | None:
        """1-D reduced gradient matching :meth:`local_param`, or ``None`` when there is none."""

    def full_shape(self, p: Tensor) -> torch.Size:
        """The full (unsharded) shape of ``p``."""
        return p.shape

    def make_exchange(self, units: Any, state: dict, comm: Any, rank: int, world_size: int) -> Any:
        """The engine's exchange for this layout (:mod:`dist_muonclip.engine.exchange`): how a
        bucket's matrices reach their owner and how updates come back. Decided once, here."""
        from .engine.exchange import ReplicatedExchange, ShardedExchange

        cls = ShardedExchange if self.sharded else ReplicatedExchange
        return cls(units, state, comm, rank, world_size)

    @property
    def process_group(self) -> Any:
        """The process group whose ranks index :meth:`ranges` (``None``: the optimizer's own).
        ``MuonClip(model)`` runs on it when it reads the layout from the parameters."""
        return None

    @property
    def data_parallel_group(self) -> Any:
        """Every data-parallel rank, when wider than the process group (HSDP: the replicas see
        other data): the preflight reduces max logits and flags over it. ``None``: the process group."""
        return None

    #: where the owner runs Newton-Schulz (``None``: where the gathered matrix is); set by an
    #: integration, e.g. DeepSpeed's CPU optimizer offload sets the accelerator
    ns_on: torch.device | None = None

    def ns_device(self, t: Tensor) -> torch.device | None:
        """The device on which the owner orthogonalizes the gathered matrix ``t`` (``None``: where
        ``t`` is). Under CPU optimizer offload the accelerator: the engine copies the matrix there,
        runs Newton-Schulz and copies the update back."""
        return self.ns_on

    #: how many buckets' pieces may wait on their owners before the first is orthogonalized
    #: (``None``: all of them, the most overlap). CPU optimizer offload sets a few: the pieces
    #: and gathered matrices then occupy accelerator memory for a few buckets, not for every matrix.
    buckets_in_flight: int | None = None

    @property
    def head_shard(self) -> tuple[int, int] | None:
        """Tensor parallel: ``(tp size, this rank's tp coordinate)`` when each rank computes only
        its block of attention heads (the max-logit tracker then records them at their global
        positions); ``None``: every rank computes every head."""
        return None

    def owner_hint(self, p: Tensor) -> int | None:
        """The rank where (most of) ``p`` lives, to orthogonalize it there (``None``: no preference)."""
        return None

    def check_param(self, p: Tensor, name: str) -> None:
        """Refuse, naming it, a parameter this layout cannot hold (called before any state exists)."""

    def validate(self, params: Sequence[Tensor], names: dict, world_size: int, rank: int) -> None:
        """Check every parameter (:meth:`check_param`) and that the ranges tile each exactly once."""
        for p in params:
            self.check_param(p, names.get(p, "<unnamed>"))
        for p in params:
            ranges = self.ranges(p)
            if len(ranges) != world_size:
                raise ValueError(f"layout gives {len(ranges)} ranks of ranges for {names[p]!r}, world size is "
                                 f"{world_size}")
            flat = sorted(r for per_rank in ranges for r in per_rank if r[1] > r[0])
            pos, numel = 0, math.prod(self.full_shape(p))
            for start, stop in flat:
                if start != pos:
                    raise ValueError(f"layout ranges of {names[p]!r} leave a gap or overlap at element {pos}")
                pos = stop
            if pos != numel:
                raise ValueError(f"layout ranges of {names[p]!r} cover {pos} of {numel} elements")
            local = sum(b - a for a, b in ranges[rank])
            if self.local_param(p).numel() != local:
                raise ValueError(f"layout: local view of {names[p]!r} has {self.local_param(p).numel()} elements, "
                                 f"its ranges say {local}")

    # -- optimizer state: defaults keep the optimizer's own format --------------------------------
    def init_optimizer_state(self, optim: Any) -> None:
        """Create optimizer state eagerly (e.g. FSDP2: DCP sees the same keys on every rank)."""

    def optimizer_state_dict(self, optim: Any) -> dict[str, Any] | None:
        """``optim.state_dict()`` in a layout-specific format, or ``None`` for the optimizer's own."""
        return None

    def load_optimizer_state_dict(self, optim: Any, state_dict: dict[str, Any]) -> bool:
        """Load a layout-specific state dict; ``False`` when ``state_dict`` is not in its format."""
        return False


class Replicated(Layout):
    """Every rank holds the full parameter and its (externally or optimizer-) reduced gradient."""

    sharded = False

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size

    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        return [[(0, p.numel())] for _ in range(self.world_size)]

    def local_param(self, p: Tensor) -> Tensor:
        return p.detach().view(-1)

    def local_grad(self, p: Tensor) -> Tensor | None:
        return None if p.grad is None else p.grad.view(-1)

    def check_param(self, p: Tensor, name: str) -> None:
        if hasattr(p, "placements") and hasattr(p, "device_mesh"):   # a DTensor (FSDP2, tensor parallel)
            raise ValueError(
                f"parameter {name!r} is a DTensor with placements {tuple(p.placements)} "
                "(FSDP2 / tensor parallel) but the layout is Replicated; leave layout=None (MuonClip reads "
                "the layout from DTensor parameters), use dist_muonclip.fsdp.make_muonclip(model, ...) or pass "
                "layout=dist_muonclip.fsdp.Shard0Layout(mesh), process_group=mesh.get_group()")

    def validate(self, params: Sequence[Tensor], names: dict, world_size: int, rank: int) -> None:
        for p in params:     # every rank holds everything: nothing to tile
            self.check_param(p, names.get(p, "<unnamed>"))


class FlatRangesLayout(Layout):
    """A sharded layout given explicitly: ``ranges[name][r]`` are rank r's flat ranges of a
    parameter whose full tensor every rank still stores (local views slice it).

    Used by tests to exercise arbitrary cuts (mid-row, uneven, empty), and by integrations whose
    engine keeps full-size tensors but owns only a slice of them.
    """

    sharded = True

    def __init__(self, ranges: dict[str, list[list[tuple[int, int]]]], names: dict[Tensor, str], rank: int) -> None:
        self._ranges = ranges
        self._names = names
        self.rank = rank

    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        return self._ranges[self._names[p]]

    def _cat(self, flat: Tensor, ranges: list[tuple[int, int]]) -> Tensor:
        ranges = [r for r in ranges if r[1] > r[0]]
        if len(ranges) == 1:
            return flat[ranges[0][0]:ranges[0][1]]
        if not ranges:
            return flat[:0]
        raise ValueError("FlatRangesLayout supports one contiguous range per rank and parameter")

    def local_param(self, p: Tensor) -> Tensor:
        return self._cat(p.detach().view(-1), self.ranges(p)[self.rank])

    def local_grad(self, p: Tensor) -> Tensor | None:
        return None if p.grad is None else self._cat(p.grad.view(-1), self.ranges(p)[self.rank])


def piece_row_scale(scale: Tensor, ranges: Sequence[tuple[int, int]], row_numel: int) -> Tensor:
    """Per-element multipliers for the local elements ``ranges`` of a tensor whose dim-0 rows
    (``row_numel`` elements each) get ``scale[row]`` (QK-Clip on shards and fragments)."""
    idx = [torch.arange(a, b, device=scale.device) // row_numel for a, b in ranges if b > a]
    if not idx:
        return scale.new_empty(0)
    return scale[torch.cat(idx)]


def scale_rows_(local: Tensor, scale: Tensor, ranges: Sequence[tuple[int, int]], full_shape: Sequence[int]) -> None:
    """Multiply row ``i`` (dim 0) of a tensor of ``full_shape`` by ``scale[i]``, on this rank's
    elements ``local`` (1-D, the flat ``ranges`` of the full tensor: the whole tensor, row shards
    or flat fragments). QK-Clip's one row-scaling function. A ``[1, C]`` ``scale`` multiplies
    column ``j`` of a 2-D ``[R, C]`` tensor by ``scale[0, j]`` instead (transposed projections:
    GPT-2's ``Conv1D`` stores ``[in, out]``). Low precision: multiply in fp32 and round once, so
    the clipped max logit lands on tau, not a hair above."""
    if not local.numel():
        return
    row = math.prod(full_shape[1:])
    ranges = [r for r in ranges if r[1] > r[0]]
    scale = scale.to(local.device)
    whole_rows = len(ranges) == 1 and ranges[0][0] % row == 0 and ranges[0][1] % row == 0
    if scale.ndim == 2:                                   # per column
        if scale.shape[0] != 1 or scale.shape[1] != row:
            raise ValueError(f"column scale of shape {tuple(scale.shape)} does not match a tensor of shape "
                             f"{tuple(full_shape)}")
        if whole_rows:
            target, factor = local.view(-1, row), scale
        else:
            idx = torch.cat([torch.arange(a, b, device=scale.device) % row for a, b in ranges])
            target, factor = local, scale[0][idx]
    elif whole_rows:                                      # whole rows: broadcast
        r0, r1 = ranges[0][0] // row, ranges[0][1] // row
        target, factor = local.view(r1 - r0, row), scale[r0:r1].view(-1, 1)
    else:
        target, factor = local, piece_row_scale(scale, ranges, row)
    if local.dtype in (torch.float32, torch.float64):
        target.mul_(factor.to(local.dtype))
    else:
        target.copy_(target.float() * factor)
