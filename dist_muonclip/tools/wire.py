"""The wire counter: every collective and point-to-point call of the process, counted on the wire.

:class:`WireCounter` sees DDP's, FSDP2's, DeepSpeed's and our own collectives (torch.distributed's
C++ entry points, intercepted at the dispatcher), prices each with the library's one byte model
(:func:`dist_muonclip.comm.bytes_sent`) and reports them as ``kind[tag]`` under the tags
:func:`dist_muonclip.comm.comm_tag` set, so its table and the optimizer's accountant line up.
Used by :class:`dist_muonclip.tools.profiler.StepProfiler` (``wire=True``).
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

import torch
import torch.utils._python_dispatch
from torch import Tensor

from ..comm import bytes_sent, current_comm_tag

__all__ = ["WireCounter"]


def _nbytes(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size() if isinstance(x, Tensor) else 0


def _group(a: dict[str, Any]) -> Any:
    """The ProcessGroup of a c10d op (boxed ScriptObject) or of a functional collective (name)."""
    import torch.distributed as dist

    if "process_group" in a:
        return dist.ProcessGroup.unbox(a["process_group"])
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(a["group_name"])


def _a2a_sent(inp: Tensor, splits: Any, rank: int, world: int) -> int:
    """Bytes of ``inp`` addressed to other ranks; ``splits`` count dim-0 rows (empty: equal)."""
    if inp.numel() == 0:
        return 0
    row = inp.numel() // max(1, inp.shape[0]) * inp.element_size()
    if splits:
        return sum(int(s) for r, s in enumerate(splits) if r != rank) * row
    return (world - 1) * (inp.shape[0] // world) * row


def _wire_cost(name: str, a: dict[str, Any]) -> tuple[str, float, int]:
    """``(kind, bytes sent by this rank, payload bytes)`` of one collective call, by the byte
    model of :mod:`dist_muonclip.comm` (:func:`~dist_muonclip.comm.bytes_sent`; all-to-all,
    gather, scatter, send: the bytes addressed to other ranks). ``name`` is the op's name in
    ``torch.ops.c10d`` / ``torch.ops._c10d_functional``."""
    pg = _group(a)
    w, rank = pg.size(), pg.rank()
    base = name.rstrip("_")
    if base in ("allreduce", "allreduce_coalesced", "all_reduce", "all_reduce_coalesced"):
        n = _nbytes(a.get("tensors", a.get("input", a.get("inputs"))))
        return "all_reduce", bytes_sent("all_reduce", n, w), n
    if base in ("broadcast", "reduce"):
        n = _nbytes(a.get("tensors", a.get("input")))
        root = int(a.get("root_rank", a.get("src", a.get("dst", 0))))
        return base, bytes_sent(base, n, w, rank, root), n
    if base in ("allgather", "_allgather_base", "allgather_coalesced",
                "allgather_into_tensor_coalesced"):
        n = _nbytes(a.get("output_tensors", a.get("output_tensor", a.get("output_lists", a.get("outputs")))))
        return "all_gather", bytes_sent("all_gather", n, w), n
    if base in ("all_gather_into_tensor", "all_gather_into_tensor_coalesced", "all_gather_into_tensor_out"):
        n = _nbytes(a.get("input", a.get("inputs"))) * int(a["group_size"])
        return "all_gather", bytes_sent("all_gather", n, w), n
    if base in ("reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced",
                "reduce_scatter_tensor"):
        n = _nbytes(a.get("input_tensors", a.get("input_tensor", a.get("inputs", a.get("input")))))
        return "reduce_scatter", bytes_sent("reduce_scatter", n, w), n
    if base == "alltoall_base":
        inp = a["input"]
        return "all_to_all", float(_a2a_sent(inp, a["input_split_sizes"], rank, w)), _nbytes(a["output"])
    if base == "all_to_all_single":
        inp = a["input"]
        return "all_to_all", float(_a2a_sent(inp, a["input_split_sizes"], rank, w)), _nbytes(inp)
    if base == "alltoall":
        ins = a["input_tensors"]
        return "all_to_all", float(sum(_nbytes(t) for r, t in enumerate(ins) if r != rank)), _nbytes(a["output_tensors"])
    if base == "gather":
        root = int(a["root_rank"])
        n = _nbytes(a["input_tensors"])
        return "gather", float(0 if rank == root else n), n
    if base == "scatter":
        root = int(a["root_rank"])
        ins = a["input_tensors"]
        sent = sum(_nbytes(t) for r, t in enumerate(ins[0]) if r != rank) if rank == root and ins else 0
        return "scatter", float(sent), _nbytes(a["output_tensors"])
    if base == "send":
        n = _nbytes(a["tensors"])
        return "send", float(n), n
    if base in ("recv", "recv_any_source"):
        return "recv", 0.0, _nbytes(a["tensors"])
    return base, 0.0, 0                    # barrier


#: Collectives counted: c10d ops (what ``torch.distributed``'s Python functions, DDP's C++
#: reducer, FSDP2 and DeepSpeed's torch backend all dispatch to) and functional collectives.
_C10D_OPS = ("allreduce_", "allreduce_coalesced_", "broadcast_", "reduce_", "allgather_", "_allgather_base_",
             "allgather_coalesced_", "allgather_into_tensor_coalesced_", "reduce_scatter_", "_reduce_scatter_base_",
             "reduce_scatter_tensor_coalesced_", "alltoall_base_", "alltoall_", "gather_", "scatter_", "send",
             "recv_", "recv_any_source_", "barrier")
_FUNCTIONAL_OPS = ("all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_",
                   "all_gather_into_tensor", "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced",
                   "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast",
                   "broadcast_")


def _wire_ops() -> list[tuple[str, str, Any]]:
    """``(namespace, name, OpOverload)`` of every counted collective this torch build has."""
    import torch.distributed  # noqa: F401  (registers the c10d ops)

    out = []
    for ns, names in (("c10d", _C10D_OPS), ("_c10d_functional", _FUNCTIONAL_OPS)):
        space = getattr(torch.ops, ns)
        for name in names:
            try:
                out.append((ns, name, getattr(space, name).default))
            except (AttributeError, RuntimeError):
                continue
    return out


_ACTIVE: list["WireCounter"] = []         # counters of the "kernel" mechanism that are running
_LIBS: list[Any] = []                      # their torch.library registrations (while any runs)
_ARG_NAMES: dict[Any, tuple[str, ...]] = {}


def _record_all(counters: Iterable["WireCounter"], name: str, op: Any, args: tuple, kwargs: dict) -> None:
    names = _ARG_NAMES.get(op)
    if names is None:
        names = _ARG_NAMES[op] = tuple(arg.name for arg in op._schema.arguments)
    a = dict(zip(names, args))
    if kwargs:
        a.update(kwargs)
    kind, sent, payload = _wire_cost(name, a)
    tag = current_comm_tag()
    if tag:
        kind = f"{kind}[{tag}]"
    for c in counters:
        c._record(kind, sent, payload)


def _kernel(name: str, op: Any):
    # the C++ entry point: OpOverload.__call__ of ops taking a ProcessGroup (TorchBind objects)
    # first scans the arguments in Python for fake script objects, doubling our cost per call
    call = getattr(op, "_op", op)

    def counted(*args: Any, **kwargs: Any) -> Any:
        if _ACTIVE:
            _record_all(_ACTIVE, name, op, args, kwargs)
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return call(*args, **kwargs)

    return counted


#: The dispatch key our counting kernels take: after autograd (functional collectives have
#: autograd kernels of their own), before the backend; every collective leaves it to a
#: fallthrough, and a call nested in a counted one (a functional collective's c10d op) runs
#: below it, so nothing is counted twice.
_KERNEL_KEY = "ADInplaceOrView"


def _kernel_mechanism_free() -> bool:
    """Whether no counted op has a kernel of its own on :data:`_KERNEL_KEY` (ours can take it)."""
    return not any(torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", _KERNEL_KEY)
                   for ns, name, _ in _wire_ops())


def _install_kernels() -> None:
    libs = {}
    for ns, name, op in _wire_ops():
        if ns not in libs:
            libs[ns] = torch.library.Library(ns, "IMPL")
        libs[ns].impl(name, _kernel(name, op), _KERNEL_KEY)
    _LIBS.extend(libs.values())


def _remove_kernels() -> None:
    for lib in _LIBS:
        lib._destroy()
    _LIBS.clear()


class _WireMode(torch.utils._python_dispatch.TorchDispatchMode):
    """The ``"dispatch_mode"`` mechanism: a dispatch mode, as torch's ``CommDebugMode``."""

    def __init__(self, counter: "WireCounter") -> None:
        super().__init__()
        self.counter = counter
        self.ops = {op: name for _, name, op in _wire_ops()}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = self.ops.get(func)
        if name is not None:
            _record_all((self.counter,), name, func, args, kwargs)
        return func(*args, **kwargs)


class WireCounter:
    """Counts calls and bytes of every collective this process puts on the wire, per collective
    kind, whoever issues it: DDP's reducer (C++), FSDP2, DeepSpeed, MuonClip, user code.

    It counts at the dispatcher, where ``torch.distributed``'s functions, DDP's reducer, FSDP2 and
    DeepSpeed's torch backend all arrive as ``c10d`` ops (and DTensor / compiled code as
    functional collectives), so nothing has to be patched before an engine is built. Bytes follow
    the byte model of :mod:`dist_muonclip.comm` (:func:`_wire_cost`); a call issued inside a
    :func:`~dist_muonclip.comm.comm_tag` block (MuonClip's own collectives carry their tags) is
    recorded as ``kind[tag]``, anything else under its bare kind (``all_gather``: e.g. FSDP2's).

    Mechanisms (``mechanism=``):

    * ``"kernel"``: a Python kernel on the ops' ``ADInplaceOrView`` dispatch key (which they
      otherwise fall through), counting and redispatching below it. Only the collectives
      themselves pay (one Python call each, tens of microseconds); calls made under ``torch.inference_mode`` skip
      that key and are not counted. Process-wide, registered while any counter runs.
    * ``"dispatch_mode"``: a ``TorchDispatchMode`` as torch's ``CommDebugMode``; sees every call,
      but every tensor op of the thread pays ~20 us of Python while it is active (a 3x slower
      step on a tiny CPU model, +10% on a 25M one).
    * ``"auto"``: ``"kernel"`` unless some collective already has a kernel on that key.

    ``with WireCounter() as wc: ...; wc.counts`` or ``start()`` / :meth:`take` / ``stop()``.
    """

    MECHANISMS = ("auto", "kernel", "dispatch_mode")

    def __init__(self, mechanism: str = "auto") -> None:
        if mechanism not in self.MECHANISMS:
            raise ValueError(f"mechanism={mechanism!r}: use one of {self.MECHANISMS}")
        self.mechanism = mechanism
        self.counts: dict[str, dict[str, float]] = {}
        self._mode: _WireMode | None = None
        self._lock = threading.Lock()        # autograd threads issue collectives too (DDP, FSDP2 on GPU)
        self.running = False

    def _record(self, kind: str, sent: float, payload: int) -> None:
        with self._lock:
            c = self.counts.setdefault(kind, {"calls": 0, "bytes": 0.0, "payload": 0})
            c["calls"] += 1
            c["bytes"] += sent
            c["payload"] += payload

    def start(self) -> "WireCounter":
        if self.running:
            return self
        if self.mechanism == "auto":
            self.mechanism = "kernel" if (_LIBS or _kernel_mechanism_free()) else "dispatch_mode"
        if self.mechanism == "kernel":
            if not _ACTIVE:
                _install_kernels()
            _ACTIVE.append(self)
        else:
            self._mode = _WireMode(self)
            self._mode.__enter__()
        self.running = True
        return self

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
            return
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _remove_kernels()

    def take(self) -> dict[str, dict[str, float]]:
        """The counts since the last ``take()`` (or start), and a fresh start."""
        with self._lock:
            out, self.counts = self.counts, {}
        return out

    def __enter__(self) -> "WireCounter":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
