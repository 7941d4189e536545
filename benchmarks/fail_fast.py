"""Time to fail, together: one rank raises in Newton-Schulz, how soon does every rank raise?

Issue 18. On W gloo CPU processes, one clean step, then ``dist_muonclip.ns_split.orthogonalize``
is monkeypatched on the failing rank to raise (as an out-of-memory on the owner would). Every rank
must raise :class:`dist_muonclip.engine.failfast.PeerFailure` naming the failing rank and the
original exception, within seconds (without fail-fast the peers wait in the owner's scatter until
the process group timeout, 30 min by default). Per engine (DDP, optimizer-owned reduction,
FSDP2) and W, the JSON has each rank's delay from the failing raise to its own raise:

    python benchmarks/fail_fast.py --out benchmarks/results/fail_fast_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MESSAGE = "injected failure in Newton-Schulz"


def _setup(mode: str, rank: int, world: int):
    from torch import nn

    if mode == "fsdp":
        from benchmarks.scenarios import fsdp as sc
        model, opt = sc.fsdp_setup("llama", world)
        return model, model, opt, (lambda t: sc.local_batch(t, rank, world))
    from benchmarks.scenarios import ddp as sc
    model, opt = sc.build("llama", grad_reduction="external" if mode == "ddp" else "optimizer")
    fwd = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    return model, fwd, opt, (lambda t: sc.local_batch(t, rank, world))


def worker(rank: int, world: int, mode: str, bad_rank: int, port: int, result_dir: str) -> None:
    """One clean step, then a step whose Newton-Schulz raises on ``bad_rank``; writes
    ``rank{R}.json`` with the error each rank raised and when (wall clock, same host)."""
    import torch.distributed as dist

    from dist_muonclip import ns_split

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, fwd, opt, batch = _setup(mode, rank, world)
    out: dict = {"rank": rank, "raised": None}
    for t in range(2):
        ids = batch(t)
        fwd(input_ids=ids, labels=ids).loss.backward()
        if t == 1 and rank == bad_rank:
            def boom(*a, **k):
                out["t_inject"] = time.time()
                raise torch.OutOfMemoryError(MESSAGE)
            ns_split.orthogonalize = boom
        try:
            opt.step()
        except Exception as e:      # noqa: BLE001 - the point is to see what every rank raises
            out.update(raised=type(e).__name__, message=str(e), cause=type(e.__cause__).__name__, t_raise=time.time(),
                       step=t)
            break
        opt.zero_grad(set_to_none=True)
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(out))


def run(mode: str, world: int, bad_rank: int, result_dir: str, timeout: float = 240) -> list[dict]:
    """Spawn the W ranks; the results per rank plus each rank's delay after the injected raise."""
    from dist_muonclip.launch_env import free_port, spawn_local

    os.makedirs(result_dir, exist_ok=True)
    spawn_local(worker, world, (world, mode, bad_rank, free_port(), result_dir), timeout=timeout,
                what=f"fail-fast {mode} W={world}")
    res = [json.loads(Path(result_dir, f"rank{r}.json").read_text()) for r in range(world)]
    t0 = res[bad_rank].get("t_inject")
    for r in res:
        r["delay_s"] = (r["t_raise"] - t0) if t0 is not None and r.get("t_raise") is not None else None
    return res


def main() -> None:
    import tempfile

    from benchmarks._common import environment

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fail_fast_cpu.json"))
    ap.add_argument("--modes", default="ddp,optimizer,fsdp")
    ap.add_argument("--worlds", default="2,4")
    args = ap.parse_args()
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for mode in args.modes.split(","):
            bad = world - 1
            with tempfile.TemporaryDirectory() as d:
                t = time.time()
                res = run(mode, world, bad, d)
                wall = time.time() - t
            delays = [r["delay_s"] for r in res]
            ok = all(r["raised"] == "PeerFailure" and f"rank {bad} failed in muon" in r["message"]
                     and MESSAGE in r["message"] for r in res)
            rows.append({"mode": mode, "world": world, "failing_rank": bad, "all_raised_naming_rank": ok,
                         "max_delay_s": max(d for d in delays if d is not None), "delays_s": delays,
                         "messages": [r["message"] for r in res], "run_wall_s": wall})
            print(f"{mode:9s} W={world}: all ranks raised={ok} max delay {rows[-1]['max_delay_s']:.3f} s", flush=True)
    Path(args.out).write_text(json.dumps({"environment": environment(), "runs": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
