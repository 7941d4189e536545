"""Per-step, per-rank profile of a MuonClip run: time per phase, bytes and calls per collective,
Newton-Schulz FLOPs done by this rank, memory split into parameters / gradients / optimizer state.

Switch it on in your own run::

    from dist_muonclip.profiler import profile_optimizer

    with profile_optimizer(opt, out="trace.json", model=model) as prof:
        for batch in data:
            loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
    # rank 0 printed prof.summary(); every rank wrote trace[.rankR].json and .csv

or ``prof = StepProfiler(out=...); opt = MuonClip(..., profiler=prof); prof.attach(opt)``.

How each number is taken:

* phases: ``MuonClip.step()`` wraps its phases (preflight, reduce, ns, gather, scatter, apply,
  adamw, qk_clip) in ``profiler.phase(name)``. On CPU a phase is ``time.perf_counter`` around
  it; on GPU a pair of CUDA events, read back after the NEXT step (or at :meth:`close`), when
  they have long completed, so profiling adds no synchronization inside or after ``step()``.
  A phase entered several times in one step (once per bucket) is summed.
* bytes / calls: the optimizer's :class:`~dist_muonclip.comm.CommAccountant` (ring model of
  :mod:`dist_muonclip.comm`). :meth:`attach` installs one when the optimizer has none; register
  ``prof.accountant`` as DDP's comm hook state (``ddp_accounting_hook``) to count DDP's all-reduces.
* NS FLOPs: the matrices this rank owns in the optimizer's plan times
  :func:`~dist_muonclip.newton_schulz.ns_flops` (the plan is what ``step()`` executes; matrices
  skipped for non-finite gradients are still counted).
* memory: parameters, gradients and optimizer state are the summed bytes of their distinct
  storages at the end of ``step()`` (before ``zero_grad``). The peak is
  ``torch.cuda.max_memory_allocated`` over the step on GPU and the process resident-set
  high-water mark (``getrusage``) on CPU; ``temporaries = peak - params - grads - state`` (on CPU
  this also holds the interpreter, libraries and activations: treat it as an upper bound).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from .comm import CommAccountant

__all__ = ["StepProfiler", "profile_optimizer", "PHASES", "storage_bytes", "owned_ns_flops", "load_trace"]

#: Phase names MuonClip.step() reports, in execution order.
PHASES = ("preflight", "reduce", "ns", "gather", "scatter", "apply", "adamw", "qk_clip")


def storage_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, Tensor):
            continue
        local = getattr(t, "_local_tensor", t)      # DTensor: this rank's shard
        try:
            st = local.untyped_storage()
        except (RuntimeError, NotImplementedError):   # e.g. meta / fake tensors
            continue
        key = (str(local.device), st.data_ptr())
        if key in seen or st.data_ptr() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def owned_ns_flops(optimizer: Any, rank: int | None = None) -> int:
    """Newton-Schulz FLOPs one step costs ``rank`` (default: the optimizer's own rank) under its
    plan: owned matrices times :func:`~dist_muonclip.newton_schulz.ns_flops`."""
    plan = getattr(optimizer, "_plan", None)
    if plan is None:
        return 0
    rank = getattr(optimizer, "rank", 0) if rank is None else rank
    return sum(item.flops for item in plan.items if plan.owners[item.name] == rank)


def _rss_hwm_bytes() -> int:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


class StepProfiler:
    """Collects one record per optimizer step on this rank (see module doc).

    Args:
        out: trace path (``.json``; a ``.csv`` with the same stem is written too). With more than
            one rank, rank ``r > 0`` writes ``<stem>.rank<r>.json``. ``None``: keep in memory.
        model: the model, for the parameter/gradient bytes (default: the optimizer's parameters).
        log_dir, wandb_run: also send per-step scalars to TensorBoard / W&B on rank 0
            (:class:`~dist_muonclip.metrics.MetricsLogger`).
        device: ``"cuda"`` uses CUDA events; default: CUDA when the parameters are on a GPU.
        print_summary: print :meth:`summary` on rank 0 at :meth:`close`.
    """

    def __init__(self, out: str | os.PathLike | None = None, *, model: torch.nn.Module | None = None,
                 log_dir: str | None = None, wandb_run: Any = None, device: str | torch.device | None = None,
                 print_summary: bool = True) -> None:
        if out is not None and not str(out).endswith(".json"):
            raise ValueError(f"out={str(out)!r} must end in .json (a .csv beside it is written too)")
        self.out = None if out is None else str(out)
        self.model = model
        self.log_dir, self.wandb_run = log_dir, wandb_run
        self.device = None if device is None else torch.device(device)
        self.print_summary = print_summary
        self.records: list[dict[str, Any]] = []
        self.optimizer: Any = None
        self.accountant: CommAccountant | None = None
        self._cpu_phases: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, Any, Any]] = []
        self._pending: list[tuple[dict[str, Any], list]] = []   # GPU records awaiting their events
        self._hooks: list[Any] = []
        self._acc_seen = 0
        self._t0 = 0.0
        self._logger = None
        self._closed = False

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer: Any) -> "StepProfiler":
        """Hook into ``optimizer``: phases (``optimizer.profiler``), step pre/post hooks, and a
        :class:`CommAccountant` (installed if the optimizer has none). Idempotent."""
        if self.optimizer is optimizer:
            return self
        if self.optimizer is not None:
            raise ValueError("this StepProfiler is already attached to another optimizer; make one per optimizer")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        optimizer.profiler = self
        acc = getattr(optimizer, "accountant", None)
        if acc is None and hasattr(optimizer, "accountant"):
            acc = CommAccountant()
            optimizer.accountant = acc
            comm = getattr(optimizer, "_comm", None)
            if comm is not None:
                comm.accountant = acc
        self.accountant = acc if acc is not None else CommAccountant()
        self._acc_seen = len(self.accountant.steps)
        if self.device is None:
            p = next((p for g in optimizer.param_groups for p in g["params"]), None)
            self.device = p.device if p is not None else torch.device("cpu")
        self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
        self._hooks.append(optimizer.register_step_post_hook(self._post_step))
        if (self.log_dir is not None or self.wandb_run is not None) and self.rank == 0:
            from .metrics import MetricsLogger

            self._logger = MetricsLogger(self.log_dir, wandb_run=self.wandb_run)
        return self

    @property
    def rank(self) -> int:
        return int(getattr(self.optimizer, "rank", 0)) if self.optimizer is not None else 0

    @property
    def world_size(self) -> int:
        return int(getattr(self.optimizer, "world_size", 1)) if self.optimizer is not None else 1

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase of ``step()`` (called by the optimizer)."""
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self._cpu_phases[name] += time.perf_counter() - t

    # ------------------------------------------------------------------ step hooks
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._resolve_pending()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        host_s = time.perf_counter() - self._t0
        comm: dict[str, dict[str, float]] = {}
        for s in self.accountant.steps[self._acc_seen:]:
            for kind, c in s.items():
                d = comm.setdefault(kind, {"calls": 0, "bytes": 0.0})
                d["calls"] += c["calls"]
                d["bytes"] += c["bytes"]
        self._acc_seen = len(self.accountant.steps)
        rec: dict[str, Any] = {
            "step": len(self.records) + len(self._pending), "rank": self.rank, "world_size": self.world_size,
            "step_host_s": host_s, "comm": comm, "comm_bytes": sum(c["bytes"] for c in comm.values()),
            "comm_calls": sum(c["calls"] for c in comm.values()), "ns_flops": owned_ns_flops(optimizer),
            "memory": self._memory(),
        }
        if self._cuda:
            self._pending.append((rec, self._events))
            self._events = []
        else:
            rec["phases_s"] = dict(self._cpu_phases)
            self._cpu_phases.clear()
            self._finish(rec)

    def _resolve_pending(self) -> None:
        """Read back CUDA events of earlier steps (done by now: no stall)."""
        for rec, events in self._pending:
            phases: dict[str, float] = defaultdict(float)
            for name, start, end in events:
                end.synchronize()
                phases[name] += start.elapsed_time(end) / 1e3
            rec["phases_s"] = dict(phases)
            self._finish(rec)
        self._pending = []

    def _finish(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self._logger is not None:
            flat = {f"profile/phase_ms/{k}": v * 1e3 for k, v in rec["phases_s"].items()}
            flat.update({f"profile/bytes/{k}": c["bytes"] for k, c in rec["comm"].items()})
            flat.update({f"profile/memory/{k}": v for k, v in rec["memory"].items()})
            flat["profile/ns_gflops"] = rec["ns_flops"] / 1e9
            self._logger.log(rec["step"], flat)

    def _memory(self) -> dict[str, int]:
        opt = self.optimizer
        params = list(self.model.parameters()) if self.model is not None else [
            p for g in opt.param_groups for p in g["params"]]
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]
        out = {"params": storage_bytes(params), "grads": storage_bytes(p.grad for p in params),
               "optimizer_state": storage_bytes(state)}
        if self._cuda:
            out["peak"] = int(torch.cuda.max_memory_allocated(self.device))
            out["peak_kind"] = "cuda_max_allocated"   # type: ignore[assignment]
        else:
            out["peak"] = _rss_hwm_bytes()
            out["peak_kind"] = "rss_high_water"       # type: ignore[assignment]
        out["temporaries"] = max(0, out["peak"] - out["params"] - out["grads"] - out["optimizer_state"])
        return out

    # ------------------------------------------------------------------ output
    def close(self) -> None:
        """Resolve outstanding events, detach hooks, write the trace, print the summary (rank 0)."""
        if self._closed:
            return
        self._closed = True
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._resolve_pending()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.optimizer is not None and getattr(self.optimizer, "profiler", None) is self:
            self.optimizer.profiler = None
        if self._logger is not None:
            self._logger.close()
        if self.out is not None:
            self.write(self.out)
        if self.print_summary and self.rank == 0 and self.records:
            print(self.summary())

    def trace_path(self, path: str) -> str:
        if self.world_size > 1 and self.rank > 0:
            return path[: -len(".json")] + f".rank{self.rank}.json"
        return path

    def to_dict(self) -> dict[str, Any]:
        return {"format": "dist_muonclip.profile.v1", "rank": self.rank, "world_size": self.world_size,
                "device": str(self.device), "torch": torch.__version__, "steps": self.records}

    def write(self, path: str) -> str:
        """Write the JSON trace (and the CSV beside it); returns the JSON path of this rank."""
        path = self.trace_path(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        rows = [self._flat(r) for r in self.records]
        cols = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("step", "rank", "world_size"), k))
        with open(path[: -len(".json")] + ".csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        return path

    @staticmethod
    def _flat(rec: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in rec.items() if not isinstance(v, dict)}
        row.update({f"phase_s.{k}": v for k, v in rec.get("phases_s", {}).items()})
        for kind, c in rec["comm"].items():
            row[f"bytes.{kind}"] = c["bytes"]
            row[f"calls.{kind}"] = c["calls"]
        row.update({f"memory.{k}": v for k, v in rec["memory"].items()})
        return row

    def summary(self, skip_first: int = 1) -> str:
        """A printable table: mean per step (after ``skip_first`` warm-up steps) of this rank."""
        recs = self.records[skip_first:] or self.records
        if not recs:
            return "StepProfiler: no steps recorded"
        n = len(recs)
        lines = [f"dist_muonclip profile: rank {self.rank}/{self.world_size}, {n} steps (mean per step, "
                 f"{len(self.records) - n} warm-up skipped), device {self.device}"]
        lines.append(f"  {'phase':<12}{'ms':>10}")
        phases: dict[str, float] = defaultdict(float)
        for r in recs:
            for k, v in r.get("phases_s", {}).items():
                phases[k] += v / n
        for k in sorted(phases, key=lambda k: PHASES.index(k) if k in PHASES else len(PHASES)):
            lines.append(f"  {k:<12}{phases[k] * 1e3:>10.3f}")
        lines.append(f"  {'step (host)':<12}{sum(r['step_host_s'] for r in recs) / n * 1e3:>10.3f}")
        kinds = sorted({k for r in recs for k in r["comm"]})
        if kinds:
            lines.append(f"  {'collective':<34}{'calls':>8}{'MB sent':>12}")
            for k in kinds:
                calls = sum(r["comm"].get(k, {}).get("calls", 0) for r in recs) / n
                mb = sum(r["comm"].get(k, {}).get("bytes", 0.0) for r in recs) / n / 1e6
                lines.append(f"  {k:<34}{calls:>8.1f}{mb:>12.4f}")
            lines.append(f"  {'total':<34}{sum(r['comm_calls'] for r in recs) / n:>8.1f}"
                         f"{sum(r['comm_bytes'] for r in recs) / n / 1e6:>12.4f}")
        lines.append(f"  NS GFLOP on this rank: {sum(r['ns_flops'] for r in recs) / n / 1e9:.4f}")
        mem = recs[-1]["memory"]
        lines.append("  memory (MB): " + ", ".join(f"{k} {mem[k] / 1e6:.2f}" for k in
                                                 ("params", "grads", "optimizer_state", "temporaries", "peak"))
                     + f" (peak: {mem['peak_kind']})")
        return "\n".join(lines)

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def profile_optimizer(optimizer: Any, out: str | os.PathLike | None = None, **kwargs: Any) -> Iterator[StepProfiler]:
    """``with profile_optimizer(opt, out="trace.json", model=model) as prof: ...`` (see module doc).
    Keyword arguments go to :class:`StepProfiler`."""
    prof = StepProfiler(out, **kwargs).attach(optimizer)
    try:
        yield prof
    finally:
        prof.close()


def load_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every rank's records of a trace written by :meth:`StepProfiler.write` (``path`` = rank 0's
    JSON; ``<stem>.rank<r>.json`` files beside it are picked up), as one list."""
    path = str(path)
    with open(path, encoding="utf-8") as f:
        first = json.load(f)
    out = list(first["steps"])
    for r in range(1, int(first["world_size"])):
        with open(path[: -len(".json")] + f".rank{r}.json", encoding="utf-8") as f:
            out.extend(json.load(f)["steps"])
    return out
