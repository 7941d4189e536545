"""Rank discovery for launchers that do not set torch.distributed's env:// variables.

``torchrun`` and the ``deepspeed`` launcher export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. ``mpirun``/``mpiexec`` and ``srun`` do not; this module
fills them in before ``init_process_group`` (``env://``) runs:

* under MPI, from mpi4py: ``COMM_WORLD`` rank and size, the local rank from a shared-memory
  split of ``COMM_WORLD`` (ranks on the same node), and rank 0's address and a free port of
  rank 0 broadcast to everyone (unless ``MASTER_ADDR``/``MASTER_PORT`` are already set);
* under SLURM without MPI (``srun``), from ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
  and the first host of ``SLURM_JOB_NODELIST`` (``MASTER_ADDR`` must then be given or resolvable).

Run any entry point under it::

    mpirun -n 2 python -m dist_muonclip.launch_env launch/train.py --steps 10
    mpirun -n 2 python -m dist_muonclip.launch_env -m dist_muonclip.deepspeed --deepspeed_config configs/zero1.json
"""
from __future__ import annotations

import os
import re
import runpy
import socket
import sys
import time
from typing import Any, Callable, MutableMapping

__all__ = ["discover", "free_port", "leave_process_group", "main", "spawn_local"]

_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_MPI_HINTS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` now (for ``MASTER_PORT``; ``""``/``"0.0.0.0"`` mean any interface)."""
    with socket.socket() as s:
        s.bind((addr if addr not in ("", "0.0.0.0") else "", 0))
        return s.getsockname()[1]





_GROUPS_KEPT: list[Any] = []


def _release_kept_groups() -> None:
    _GROUPS_KEPT.clear()


def leave_process_group() -> None:
    """End a job's process group together: a barrier, then ``destroy_process_group``.

    The default group is also kept referenced until ``atexit``. Without that, the last reference to a
    gloo group can be a DDP ``Reducer``: it is freed when the trainer/model goes out of scope, with
    the GIL held, and the group's destructor then joins gloo's worker threads while one of them
    waits for the GIL to release a finished collective's Python tensors: a deadlock at exit (seen
    under load on a 2-core box: HF Trainer + DDP hung after its results were written). Groups freed
    from Python drop the GIL in their destructor; at ``atexit`` the kept reference goes that way.
    Does nothing when no group is initialized.
    """
    import atexit

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    if not _GROUPS_KEPT:
        atexit.register(_release_kept_groups)
    _GROUPS_KEPT.append(dist.group.WORLD)
    dist.destroy_process_group()


def _spawned(rank: int, fn: Callable[..., Any], args: tuple) -> None:
    """Child side of :func:`spawn_local`: run ``fn``, then leave without interpreter teardown.

    gloo's background threads can abort a process in teardown ("terminate called without an
    active exception", SIGABRT) even after ``destroy_process_group``; a child that finished its
    work flushes its output and exits with ``os._exit(0)``. Exceptions propagate as usual.
    """
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_local(fn: Callable[..., Any], nprocs: int, args: tuple = (), *, timeout: float | None = None,
                what: str | None = None) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes of this host and wait for all of them.

    Like ``torch.multiprocessing.spawn`` with a deadline: a run longer than ``timeout`` seconds
    (a rank stuck in a collective its peers never join) is killed and raises ``TimeoutError``
    naming ``what`` instead of hanging the caller. A rank that raises fails the whole run, as in
    ``spawn``. ``fn`` must be picklable (a module-level function).
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_spawned, args=(fn, args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if deadline is not None and time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{what or getattr(fn, '__name__', 'spawned run')} on {nprocs} processes ran for "
                               f"more than {timeout} s (killed): a rank is likely waiting in a collective")


def _own_address() -> str:
    """An address of this host other ranks can reach (the one a UDP socket would route out of)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))   # no packet is sent
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _from_mpi(env: MutableMapping[str, str]) -> dict[str, str]:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("launched under MPI but mpi4py is not importable: pip install mpi4py (and an MPI runtime, "
                           "e.g. pip install mpich, or Debian's openmpi)") from e
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = local.Get_rank()
    local.Free()
    addr = env.get("MASTER_ADDR") or (_own_address() if rank == 0 else None)
    port = env.get("MASTER_PORT") or (str(free_port(addr)) if rank == 0 else None)
    addr, port = comm.bcast((addr, port), root=0)
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank), "MASTER_ADDR": addr,
            "MASTER_PORT": str(port)}


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``node[03-05,07],gpu1`` -> ``node03``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR")
    return m.group(1) + (m.group(2).split(",")[0].split("-")[0] if m.group(2) else "")


def _from_slurm(env: MutableMapping[str, str]) -> dict[str, str]:
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    return out


def discover(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Fill ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` in ``env`` (default ``os.environ``).

    Variables already present (torchrun, deepspeed launcher) win. Returns the values set.
    """
    env = os.environ if env is None else env
    if all(k in env for k in _KEYS):
        return {k: env[k] for k in _KEYS}
    if any(k in env for k in _MPI_HINTS):
        found = _from_mpi(env)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        found = _from_slurm(env)
    else:   # a single process
        found = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                 "MASTER_PORT": env.get("MASTER_PORT", str(free_port("127.0.0.1")))}
    for k, v in found.items():
        env.setdefault(k, v)
    return {k: env[k] for k in _KEYS}


def main(argv: list[str] | None = None) -> None:
    """``python -m dist_muonclip.launch_env [-m module | script.py] args...``: discover, then run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m dist_muonclip.launch_env [-m module | script.py] [args...]")
    discover()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("launch_env: -m needs a module name")
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
