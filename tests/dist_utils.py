"""Run a function on W CPU processes over gloo, with a deadline instead of a hang."""
from __future__ import annotations

import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from dist_muonclip.launch_env import free_port, spawn_local


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = fn(rank, world_size, *args)
        torch.save({"ok": True, "value": out}, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException as e:  # report the failure to the test instead of dying silently
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, tmp_path, timeout: float = 300,
                    port: int | None = None) -> list[dict]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Returns each rank's ``{"ok", "value"}`` or ``{"ok": False, "error", "tb"}``. A run that
    exceeds ``timeout`` is killed and reported as a hang. ``port``: the rendezvous port (default:
    one the OS says is free now).
    """
    result_dir = str(tmp_path)
    os.makedirs(result_dir, exist_ok=True)
    spawn_local(_entry, world_size, (fn, world_size, port or free_port(), args, result_dir), timeout=timeout,
                what=f"distributed run of {fn.__name__}")
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def values(results: list[dict]) -> list[Any]:
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r} failed: {res['error']}\n{res['tb']}"
    return [res["value"] for res in results]
