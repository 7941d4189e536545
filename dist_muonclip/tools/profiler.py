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

or ``prof = StepProfiler(out=...); opt = MuonClip(..., profiler=prof); prof.attach(opt)``; any
torch optimizer can be profiled (bytes and memory; phases only from MuonClip).

How each number is taken:

* phases: ``MuonClip.step()`` wraps its phases (preflight, reduce, ns, gather, scatter, apply,
  adamw, qk_clip) in ``profiler.phase(name)``. On CPU a phase is ``time.perf_counter`` around
  it; on GPU a pair of CUDA events, read back after the NEXT step (or at :meth:`close`), when
  they have long completed, so profiling adds no synchronization inside or after ``step()``.
  A phase entered several times in one step (once per bucket) is summed.
* bytes / calls (``wire=True``, the default): a :class:`WireCounter` counts every collective
  the process puts on the wire, at the dispatcher (``c10d`` ops), whoever issues it: DDP's
  reducer, FSDP2's all-gathers and reduce-scatters, DeepSpeed's reductions and all-gathers,
  MuonClip's own collectives (labelled with their tags, e.g. ``all_to_all[muon_to_owner]``) and any
  other (a training loop's loss all-reduce: label it with :func:`dist_muonclip.comm.comm_tag`).
  Bytes follow the byte model of :mod:`dist_muonclip.comm`. A step's record holds what was
  issued between the end of the previous ``step()`` (or :meth:`StepProfiler.attach`) and the end
  of this one: its forward and backward, the step itself, and anything the engine ran after
  the previous step (DeepSpeed all-gathers updated partitions after the inner optimizer's step).
  ``wire=False``: only the optimizer's :class:`~dist_muonclip.comm.CommAccountant` (register
  ``prof.accountant`` as DDP's comm hook state, ``ddp_accounting_hook``, to add DDP's all-reduces).
* NS FLOPs: the matrices this rank owns in the optimizer's plan times
  :func:`~dist_muonclip.newton_schulz.ns_flops` (the plan is what ``step()`` executes; matrices
  skipped for non-finite gradients are still counted).
* memory (bytes): ``params``, ``grads`` and ``optimizer_state`` are the summed sizes of their
  distinct storages at the end of ``step()`` (before ``zero_grad``); tensors the optimizer steps
  that are not the model's (DeepSpeed's flat fp32 partitions) are ``master_params``, and their
  gradients (the engine's reduced partitions) count in ``grads``. Peaks are taken per window,
  with the peak counter reset at each window's start: ``step_peak`` over ``step()`` itself,
  ``between_steps_peak`` from the end of the previous step to the start of this one (forward and
  backward: activations), ``peak`` the larger. ``step_start`` is the memory in use when
  ``step()`` began, and ``temporaries = step_peak - step_start - (optimizer state created in this
  step)``: the extra memory the optimizer step needed (gathered matrices, Newton-Schulz buffers,
  communication buffers). On GPU these are ``torch.cuda`` allocator numbers (``memory_allocated``
  / ``max_memory_allocated``, ``peak_kind = "cuda_allocated"``; the profiler resets the device's
  peak counters at each window start, so read your own whole-run peak from its records). On CPU they are the process's
  resident set: ``VmRSS`` and a ``VmHWM`` high-water mark reset per window through
  ``/proc/self/clear_refs`` (``peak_kind = "rss_per_window"``); RSS includes the interpreter and
  libraries, but per-window differences do not, and ``temporaries`` is then the RSS rise during
  ``step()``: a lower bound, since memory the allocator freed earlier and reuses does not raise
  RSS. Where the reset is not possible (not Linux), peaks are the lifetime high-water mark
  (``peak_kind = "rss_lifetime"``) and ``temporaries`` is ``None``.
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
import torch.utils._python_dispatch
from torch import Tensor

from ..comm import CommAccountant
from .wire import WireCounter

__all__ = ["StepProfiler", "WireCounter", "profile_optimizer", "PHASES", "storage_bytes", "owned_ns_flops", "load_trace",
           "rss_status", "reset_rss_peak", "rss_hwm_bytes"]

#: Phase names MuonClip.step() reports, in execution order.
PHASES = ("reduce", "preflight", "clip_grad", "momentum", "to_owner", "ns", "from_owner", "apply", "adamw", "qk_clip")


def _storage(t: Any) -> tuple[tuple[str, int], int] | None:
    """``((device, data_ptr), nbytes)`` of the storage behind ``t`` (a DTensor: its local shard)."""
    if t is None or not isinstance(t, Tensor):
        return None
    local = getattr(t, "_local_tensor", t)
    try:
        st = local.untyped_storage()
    except (RuntimeError, NotImplementedError):   # e.g. meta / fake tensors
        return None
    if st.data_ptr() == 0:
        return None
    return (str(local.device), st.data_ptr()), st.nbytes()


def storage_bytes(tensors: Iterable[Tensor | None], exclude: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once),
    leaving out storages whose key is in ``exclude``."""
    seen: set[tuple[str, int]] = set(exclude or ())
    total = 0
    for t in tensors:
        s = _storage(t)
        if s is None or s[0] in seen:
            continue
        seen.add(s[0])
        total += s[1]
    return total


def owned_ns_flops(optimizer: Any, rank: int | None = None) -> int:
    """Newton-Schulz FLOPs one step costs ``rank`` (default: the optimizer's own rank) under its
    plan: owned matrices times :func:`~dist_muonclip.newton_schulz.ns_flops`."""
    plan = getattr(optimizer, "plan", None)
    if plan is None:
        return 0
    rank = getattr(optimizer, "rank", 0) if rank is None else rank
    return sum(item.flops for item in plan.items if plan.owners[item.name] == rank)


def rss_hwm_bytes() -> int:
    """The process's lifetime resident-set high-water mark (``getrusage``), bytes."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def rss_status() -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` of this process in bytes from ``/proc/self/status`` (Linux), else ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    vals = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, val = line.split(":", 1)
            vals[key] = int(val.split()[0]) * 1024
    return (vals["VmRSS"], vals["VmHWM"]) if len(vals) == 2 else None


def reset_rss_peak() -> bool:
    """Reset this process's resident-set high-water mark (VmHWM) to its current RSS, by writing
    ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so that VmHWM read later is the peak of
    the window since this call. Returns ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return rss_status() is not None


# ----------------------------------------------------------------------------------------- wire
_PEAK_KINDS = {
    "cuda_allocated": "peaks: torch.cuda.max_memory_allocated per window",
    "rss_per_window": "peaks: process RSS high-water mark per window; temporaries: RSS rise in step(), a lower bound",
    "rss_lifetime": "peaks: process lifetime RSS high-water mark (no per-window reset here); temporaries n/a",
}


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
        wire: count every collective on the wire (a :class:`WireCounter`: DDP's, FSDP2's and
            DeepSpeed's traffic as well as the optimizer's, whichever engine). ``False``: only
            the optimizer's :class:`CommAccountant` (and whatever is registered on it, e.g.
            ``ddp_accounting_hook``). A string picks the :class:`WireCounter` mechanism.
        manual_step: ``False``: a record per ``optimizer.step()``. ``True``: a record per
            :meth:`step` call (a training step), which you make after the engine's step; needed
            where one training step calls the optimizer's ``step()`` several times (DeepSpeed
            steps its inner optimizer once per parameter group) or communicates after it.
    """

    def __init__(self, out: str | os.PathLike | None = None, *, model: torch.nn.Module | None = None,
                 log_dir: str | None = None, wandb_run: Any = None, device: str | torch.device | None = None,
                 print_summary: bool = True, wire: bool | str = True, manual_step: bool = False) -> None:
        if out is not None and not str(out).endswith(".json"):
            raise ValueError(f"out={str(out)!r} must end in .json (a .csv beside it is written too)")
        if not isinstance(wire, (bool, str)) or (isinstance(wire, str) and wire not in WireCounter.MECHANISMS):
            raise ValueError(f"wire={wire!r}: use True, False or a WireCounter mechanism {WireCounter.MECHANISMS}")
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
        self.wire: WireCounter | None = (None if wire is False else
                                         WireCounter("auto" if wire is True else wire))
        self._mem: dict[str, Any] = {}
        self.manual_step = bool(manual_step)
        self._in_step = False
        self._t0 = 0.0
        self._logger = None
        self._closed = False

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer: Any) -> "StepProfiler":
        """Hook into ``optimizer``: phases (``optimizer.profiler``), step pre/post hooks, and a
        :class:`CommAccountant` (installed if the optimizer has none). Idempotent."""
        inner = getattr(optimizer, "optimizer", None)
        if not hasattr(optimizer, "register_step_post_hook") and hasattr(inner, "register_step_post_hook"):
            optimizer = inner       # an engine's wrapper (DeepSpeed's ZeRO optimizer): the torch optimizer it steps
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
            optimizer.accountant = acc     # MuonClip's setter hands it to its communicator
        self.accountant = acc if acc is not None else CommAccountant()
        self._acc_seen = len(self.accountant.steps)
        if self.device is None:
            p = next((p for g in optimizer.param_groups for p in g["params"]), None)
            self.device = p.device if p is not None else torch.device("cpu")
        self._hooks.append(optimizer.register_step_pre_hook(self._pre_step))
        self._hooks.append(optimizer.register_step_post_hook(self._post_step))
        if self.wire is not None:
            self.wire.start()
        self._open_window()
        if (self.log_dir is not None or self.wandb_run is not None) and self.rank == 0:
            from .metrics import MetricsLogger

            self._logger = MetricsLogger(self.log_dir, wandb_run=self.wandb_run)
        return self

    @property
    def rank(self) -> int:
        """The optimizer's rank (MuonClip's process group), else the default group's, else 0."""
        return self._dist_attr("rank", "get_rank", 0)

    @property
    def world_size(self) -> int:
        return self._dist_attr("world_size", "get_world_size", 1)

    def _dist_attr(self, attr: str, fn: str, default: int) -> int:
        value = getattr(self.optimizer, attr, None)
        if value is not None:
            return int(value)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():    # a torch optimizer (AdamW under DeepSpeed/FSDP2)
            return int(getattr(dist, fn)())
        return default

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
    def _state_bytes(self) -> int:
        opt = self.optimizer
        return storage_bytes(t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor))

    def _open_window(self) -> None:
        """Start a memory window (the one between two steps, or a step's own): reset the peak."""
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mem["per_window"] = reset_rss_peak()

    def _window_peak(self) -> int:
        if self._cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        st = rss_status()
        return st[1] if st is not None and self._mem.get("per_window") else rss_hwm_bytes()

    def _current(self) -> int:
        if self._cuda:
            return int(torch.cuda.memory_allocated(self.device))
        st = rss_status()
        return st[0] if st is not None else 0

    def _begin_step(self) -> None:
        self._resolve_pending()
        self._mem["between_steps_peak"] = self._window_peak()    # forward + backward since the last step
        self._mem["step_start"] = self._current()
        self._mem["state_start"] = self._state_bytes()
        self._open_window()
        self._t0 = time.perf_counter()
        self._in_step = True

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._in_step:          # manual stepping: only the first optimizer step of a training step
            self._begin_step()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.manual_step:
            self._end_step()
        else:                          # sizes at the end of the optimizer's step (before zero_grad)
            self._mem["sizes"] = self._sizes()

    def step(self) -> None:
        """End a training step (with ``manual_step=True``): call it once per training step, after
        the engine's step, e.g. ``engine.step(); prof.step()``. For engines that step the wrapped
        optimizer several times per training step (DeepSpeed ZeRO steps its inner optimizer once
        per parameter group) or run collectives after it (DeepSpeed's partition all-gather)."""
        if not self.manual_step:
            raise ValueError("StepProfiler.step() is for manual_step=True; by default a step ends with the "
                             "optimizer's step()")
        if self.optimizer is None:
            raise ValueError("StepProfiler.step(): attach(optimizer) first")
        if not self._in_step:          # no optimizer step in this training step (e.g. skipped on overflow)
            self._begin_step()
        self._end_step()

    def _end_step(self) -> None:
        host_s = time.perf_counter() - self._t0
        self._in_step = False
        optimizer = self.optimizer
        memory = self._memory()
        if self.wire is not None:
            comm = {k: {"calls": c["calls"], "bytes": c["bytes"]} for k, c in self.wire.take().items()}
        else:
            comm = {}
            for s in self.accountant.steps[self._acc_seen:]:
                for kind, c in s.items():
                    d = comm.setdefault(kind, {"calls": 0, "bytes": 0.0})
                    d["calls"] += c["calls"]
                    d["bytes"] += c["bytes"]
        self._acc_seen = len(self.accountant.steps)
        rec: dict[str, Any] = {
            "step": len(self.records) + len(self._pending), "rank": self.rank, "world_size": self.world_size,
            "step_host_s": host_s, "comm": comm, "comm_bytes": sum(c["bytes"] for c in comm.values()),
            "comm_calls": sum(c["calls"] for c in comm.values()),
            "comm_counted": "wire" if self.wire is not None else "accountant",
            "ns_flops": owned_ns_flops(optimizer), "memory": memory,
        }
        self._open_window()
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
            flat.update({f"profile/memory/{k}": v for k, v in rec["memory"].items()
                         if isinstance(v, (int, float))})
            flat["profile/ns_gflops"] = rec["ns_flops"] / 1e9
            self._logger.log(rec["step"], flat)

    def _sizes(self) -> dict[str, Any]:
        opt = self.optimizer
        opt_params = [p for g in opt.param_groups for p in g["params"]]
        params = list(self.model.parameters()) if self.model is not None else opt_params
        # tensors the optimizer steps that are not the model's (DeepSpeed's flat fp32 partitions):
        # master copies, whose gradients are the engine's reduced gradient partitions
        keys = {s[0] for s in map(_storage, params) if s is not None}
        masters = [p for p in opt_params if (s := _storage(p)) is not None and s[0] not in keys]
        out = {"params": storage_bytes(params), "grads": storage_bytes(p.grad for p in params + masters),
               "optimizer_state": self._state_bytes()}
        if masters:
            out["master_params"] = storage_bytes(masters)
        return out

    def _memory(self) -> dict[str, Any]:
        """The memory split of this step (see the module doc); called at the end of ``step()``."""
        out: dict[str, Any] = self._mem.pop("sizes", None) or self._sizes()
        step_peak = self._window_peak()
        out["step_start"] = self._mem["step_start"]
        out["step_peak"] = step_peak
        out["between_steps_peak"] = self._mem["between_steps_peak"]
        out["peak"] = max(step_peak, out["between_steps_peak"])
        if self._cuda:
            out["peak_kind"] = "cuda_allocated"
        elif self._mem.get("per_window"):
            out["peak_kind"] = "rss_per_window"
        else:
            out["peak_kind"] = "rss_lifetime"
        # what step() needed above what it started with, less the state it created (first step)
        growth = out["optimizer_state"] - self._mem["state_start"]
        out["temporaries"] = (None if out["peak_kind"] == "rss_lifetime" else
                              max(0, step_peak - out["step_start"] - max(0, growth)))
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
        if self.wire is not None:
            self.wire.stop()
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
        lines.append("  memory (MB): " + ", ".join(
            f"{k} {'n/a' if mem[k] is None else f'{mem[k] / 1e6:.2f}'}" for k in
            ("params", "master_params", "grads", "optimizer_state", "temporaries", "step_peak", "between_steps_peak")
            if k in mem)
            + f" ({_PEAK_KINDS[mem['peak_kind']]})")
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
