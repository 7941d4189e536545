"""Training metrics for MuonClip: QK-Clip (per-layer max logit before the clip, heads clipped,
min eta) and Muon (update RMS, grad norm), to TensorBoard, Weights & Biases and a plain dict.

Metrics are produced as device tensors (no host sync in the optimizer step). :class:`MetricsLogger`
moves one step's metrics to the host with a single packed copy (one sync per logged step, none on
steps it skips), then hands floats to every sink. TensorBoard and wandb are imported lazily;
wandb is only used when a run is active (``wandb.run``) or one is passed in (offline runs work).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch

__all__ = [
    "DictSink",
    "MetricsLogger",
    "MetricsSink",
    "TensorBoardSink",
    "WandbSink",
    "grad_norm",
    "to_host",
    "update_rms",
]


# --------------------------------------------------------------------------------------------
# device-side metric helpers (no sync)
# --------------------------------------------------------------------------------------------
def update_rms(updates: Iterable[torch.Tensor]) -> torch.Tensor:
    """RMS over all elements of the applied updates, sqrt(sum u^2 / numel) (fp32 device scalar).
    With the "match_rms_adamw" scale (Moonlight, arXiv 2502.16982) this sits near 0.2."""
    ups = [u for u in updates if u.numel()]
    if not ups:
        return torch.zeros(())
    sq = torch.stack([u.detach().float().pow(2).sum() for u in ups]).sum()
    return (sq / sum(u.numel() for u in ups)).sqrt()


def grad_norm(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """Global L2 norm of gradients (``None`` skipped), fp32 device scalar."""
    gs = [g.detach() for g in tensors if g is not None]
    if not gs:
        return torch.zeros(())
    norms = torch._foreach_norm([g.float() for g in gs])
    return torch.linalg.vector_norm(torch.stack(norms))


def _flatten(metrics: Mapping[str, Any]) -> tuple[list[str], list[torch.Tensor], dict[str, float]]:
    """Split into (tensor names, tensors as fp32 scalars) and already-host floats; a 1-D tensor
    ``x`` under ``name`` becomes ``name/0``, ``name/1``..."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    host: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            v = value.detach()
            if v.numel() == 1:
                names.append(name)
                tensors.append(v.reshape(()).float())
            else:
                for i, x in enumerate(v.reshape(-1).float().unbind()):
                    names.append(f"{name}/{i}")
                    tensors.append(x)
        elif isinstance(value, (int, float, bool)):
            host[name] = float(value)
        else:
            raise TypeError(f"metric {name!r}: expected a tensor or a number, got {type(value).__name__}")
    return names, tensors, host


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device metrics -> ``{name: float}`` with exactly one device->host copy (one sync)."""
    names, tensors, host = _flatten(metrics)
    if tensors:
        devices = {t.device for t in tensors}
        dev = next(iter(devices))
        packed = torch.stack([t.to(dev) for t in tensors])
        host.update(zip(names, packed.tolist()))
    return host


# --------------------------------------------------------------------------------------------
# sinks
# --------------------------------------------------------------------------------------------
class MetricsSink(Protocol):
    def write(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class DictSink:
    """Keeps every logged step: ``history`` is a list of ``(step, {name: float})``."""

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, float]]] = []

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self.history.append((step, dict(values)))

    def close(self) -> None:
        pass


class TensorBoardSink:
    """``torch.utils.tensorboard.SummaryWriter`` scalars under ``log_dir`` (needs ``tensorboard``)."""

    def __init__(self, log_dir: str, *, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("TensorBoard logging needs `pip install tensorboard` (or pass log_dir=None)") from e
        self.writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """``run.log(values, step=step)`` on a wandb run (online or offline)."""

    def __init__(self, run: Any) -> None:
        if run is None or not hasattr(run, "log"):
            raise TypeError("WandbSink needs a wandb run (wandb.init(...)); got None")
        self.run = run

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        pass  # the run belongs to the user: they call run.finish()


def _active_wandb_run() -> Any:
    wandb = sys.modules.get("wandb")  # no import: if the user never imported wandb, no run is active
    return getattr(wandb, "run", None) if wandb is not None else None


class MetricsLogger:
    """Fan-out of per-step metrics to sinks, with one host sync per logged step.

    Args:
        log_dir: TensorBoard directory (None: no TensorBoard).
        wandb_run: "auto" (the active ``wandb.run`` if any), a run object, or None (off).
        every: log every N-th call of :meth:`log` (others cost nothing: no sync).
        keep_history: also keep a :class:`DictSink` (``logger.history``).
        sinks: extra sinks (objects with ``write(step, values)`` and ``close()``).
    """

    def __init__(self, log_dir: str | None = None, *, wandb_run: Any = "auto", every: int = 1,
                 keep_history: bool = False, sinks: Iterable[MetricsSink] = ()) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.sinks: list[MetricsSink] = list(sinks)
        self._dict = DictSink() if keep_history else None
        if self._dict is not None:
            self.sinks.append(self._dict)
        if log_dir is not None:
            self.sinks.append(TensorBoardSink(log_dir))
        run = _active_wandb_run() if isinstance(wandb_run, str) and wandb_run == "auto" else wandb_run
        if isinstance(wandb_run, str) and wandb_run != "auto":
            raise ValueError(f"wandb_run must be 'auto', a wandb run or None; got {wandb_run!r}")
        if run is not None:
            self.sinks.append(WandbSink(run))
        self.last: dict[str, float] = {}
        self._calls = 0

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        return self._dict.history if self._dict is not None else []

    def due(self) -> bool:
        """Whether the next :meth:`log` call will write (callers can skip computing metrics)."""
        return self._calls % self.every == 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """Write one step's metrics (device tensors or numbers). Returns the host values, or None
        on a skipped step."""
        due = self.due()
        self._calls += 1
        if not due or not metrics:
            return None
        values = to_host(metrics)
        for sink in self.sinks:
            sink.write(step, values)
        self.last = values
        return values

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
