"""Fail fast, together: an exception on one rank in a step phase after the preflight ends every
rank's step within seconds instead of leaving the others in a collective until the timeout.

The phases after the preflight (Muon, AdamW, QK-Clip, metrics) run collectives that every rank
must enter; one rank raising there (out of memory in Newton-Schulz on an owner, a bug, an injected
fault) would leave its peers waiting for its pieces. :func:`guarded` wraps such a phase:

* the rank that raises first records ``"rank R failed in <phase>: <exception>"`` in the process
  group's store (first writer wins), then aborts every process group, which closes its
  connections: peers blocked in a collective with it get an error at once;
* a peer whose collective errors that way (and aborts in turn, so ranks waiting on *it* get an
  error too) reads the record and raises the same message.

Every rank raises ``RuntimeError("rank R failed in <phase>: ...; the process group was aborted")``
chained to its local exception. The process group is unusable afterwards: the process should
exit (a torchrun elastic agent restarts the workers; ``--resume`` restores the last checkpoint).
The no-error path costs one ``try`` per phase: no collective, no store access.
"""
from __future__ import annotations

import datetime
import functools
import time
from typing import Any, Callable

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["PeerFailure", "guarded", "STORE_KEY"]

STORE_KEY = "dist_muonclip/failfast"
SEEN_KEY = "dist_muonclip/failfast/seen"
#: how long a peer waits for the failing rank's record before reporting its own error
RECORD_WAIT_S = 5.0


class PeerFailure(RuntimeError):
    """A step phase failed on some rank; every rank's process group has been aborted."""


def _store():
    try:
        return c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _record(store, message: str) -> str:
    """First writer wins; returns the message on record (ours or an earlier rank's)."""
    if store is None:
        return message
    try:
        got = store.compare_set(STORE_KEY, "", message)
        return got.decode() if isinstance(got, bytes) else str(got)
    except Exception:               # the store itself may be gone (its host rank died)
        return message


def _read(store, fallback: str) -> str:
    if store is None:
        return fallback
    try:
        store.set_timeout(datetime.timedelta(seconds=RECORD_WAIT_S))
        return store.get(STORE_KEY).decode()
    except Exception:
        return fallback


def _wait_for_readers(store, rank: int, world: int) -> None:
    """Count this rank as having read the record; rank 0 (whose process hosts the store when the
    group was started without an agent) lingers until every rank has read it, or
    ``RECORD_WAIT_S``, so a peer that errors later still finds the record."""
    if store is None:
        return
    try:
        seen = store.add(SEEN_KEY, 1)
        deadline = time.monotonic() + RECORD_WAIT_S
        while rank == 0 and seen < world and time.monotonic() < deadline:
            time.sleep(0.01)
            seen = store.add(SEEN_KEY, 0)
    except Exception:
        pass


def _abort() -> None:
    try:
        c10d._abort_process_group()     # every group: peers may wait in a sub-group's collective
    except Exception:
        pass


def _is_comm_error(exc: BaseException) -> bool:
    """A collective's error caused by a peer closing its connections (gloo: 'Connection closed
    by peer'/'Connection reset'; NCCL: DistBackendError after an abort)."""
    if isinstance(exc, getattr(dist, "DistBackendError", ())) or isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "aborted", "Socket Timeout", "ProcessGroupGloo", "gloo/transport"))


def fail(phase: str, exc: BaseException) -> PeerFailure:
    """Record, abort and build the error every rank raises (for a failure caught in ``phase``)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    store = _store()
    own = f"rank {rank} failed in {phase}: {type(exc).__name__}: {exc}"
    if _is_comm_error(exc):
        # most likely a peer's abort: give its record a moment to be readable
        message = _read(store, own)
    else:
        message = _record(store, own)
    _abort()
    _wait_for_readers(store, rank, world)
    return PeerFailure(f"{message}; the process group was aborted")


def guarded(phase: str) -> Callable:
    """Decorator for an :class:`~dist_muonclip.engine.engine.Engine` step phase: on an exception
    in a distributed run, abort the process groups and raise :class:`PeerFailure` on every rank."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except PeerFailure:
                raise
            except Exception as exc:
                if self.comm is None or self.world_size == 1 or not dist.is_initialized():
                    raise
                raise fail(phase, exc) from exc
        return run
    return wrap
