"""Where the reduced gradient lives on this rank: one source per distribution mode, chosen once.

* :class:`ReplicatedGrads`: DDP, DeepSpeed ZeRO-0 or the user reduced the gradients; every rank
  holds every reduced gradient in ``p.grad``.
* :class:`ShardedGrads`: FSDP2 / DeepSpeed ZeRO-1/2: each rank holds the reduced gradient of its
  pieces (``layout.local_grad``).
* :class:`~dist_muonclip.engine.reduction.OwnedReduction` (optimizer-owned reduction) is a
  source too: the owners' reduced matrices and each rank's AdamW slices.

The engine reads gradients only through this interface, so the step has no mode switch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

from .units import Units

__all__ = ["GradSource", "ReplicatedGrads", "ShardedGrads"]


class GradSource(ABC):
    """The reduced gradient as this rank holds it (see module doc)."""

    #: True when ranks hold different elements, so a global sum needs an all-reduce.
    partial: bool = True

    def __init__(self, units: Units) -> None:
        self.units = units

    def has_grad(self, p: Tensor) -> bool:
        """Did backward give ``p`` a gradient on this rank (before any reduction)?"""
        return p.grad is not None

    @abstractmethod
    def held(self, params: Sequence[Tensor], *, once: bool) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, reduced gradient piece)`` for every piece of ``params`` this rank holds.
        ``once``: over all ranks every element appears once (for global sums and norms)."""

    @abstractmethod
    def unit_grad(self, u: Tensor) -> Tensor:
        """The reduced gradient of Muon unit ``u`` that this rank feeds its momentum (the whole
        unit on its owner, or this rank's pieces), zeros where the graph gave none."""

    def device(self, params: Sequence[Tensor]) -> torch.device:
        """Where this step's flags are computed: the first gradient's device."""
        return next((p.grad.device for p in params if p.grad is not None), params[0].device)

    def adamw_slice(self, key: tuple) -> Tensor | None:
        """A partition's reduced AdamW slice when the optimizer reduced it (else ``None``: read
        the parameters' gradients)."""
        return None

    def describe(self) -> list:
        """What must agree across ranks besides the plan (reduction buckets)."""
        return []

    def remove_hooks(self) -> None:
        """Detach from the parameters (before a re-plan builds a new source)."""

    def launch(self) -> None:
        """Start whatever reduction has not started yet (collective: every rank calls it)."""

    def finish(self) -> None:
        """Wait for the reductions this step needs."""

    def end_step(self) -> None:
        """Drop this step's reduced gradients."""


class ReplicatedGrads(GradSource):
    """Every rank holds every reduced gradient (``p.grad``)."""

    partial = False

    def held(self, params: Sequence[Tensor], *, once: bool) -> list[tuple[Tensor, Tensor]]:
        return [(p, p.grad) for p in params if p.grad is not None]

    def unit_grad(self, u: Tensor) -> Tensor:
        return self.units.full_grad(u)


class ShardedGrads(GradSource):
    """Each rank holds the reduced gradient of its pieces (``layout.local_grad``)."""

    def has_grad(self, p: Tensor) -> bool:
        return self.units.layout.local_grad(p) is not None

    def device(self, params: Sequence[Tensor]) -> torch.device:
        return self.units.layout.local_param(params[0]).device

    def held(self, params: Sequence[Tensor], *, once: bool) -> list[tuple[Tensor, Tensor]]:
        out = []
        for p in params:
            g = self.units.layout.local_grad(p)
            if g is not None:
                out.append((p, g))
        return out

    def unit_grad(self, u: Tensor) -> Tensor:
        g = self.units.local_grad(u)
        return g if g is not None else torch.zeros_like(self.units.local_param(u))
