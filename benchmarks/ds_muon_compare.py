#!/usr/bin/env python
"""MuonClip (FlatFragments) vs DeepSpeed's built-in ``"type": "Muon"`` at ZeRO-1/2, same model.

Per optimizer step, summed over all ranks, both runs are measured the same way:

* bytes on the wire of every collective and point-to-point op (DeepSpeed's gradient reduction
  and parameter all-gather included), counted at the dispatcher by the library's
  :class:`~dist_muonclip.profiler.WireCounter` with the byte model of :mod:`dist_muonclip.comm`;
  for MuonClip its own CommAccountant is recorded beside it as a cross-check of the counter;
* Newton-Schulz runs: matrices orthogonalized (ours: ``orthogonalize`` calls x batch size; DeepSpeed:
  ``muon_update`` calls), against the number of Muon matrices. DeepSpeed orthogonalizes a matrix on
  every rank whose partition it overlaps, so matrices cut by a partition boundary are done twice.

    python benchmarks/ds_muon_compare.py --world 2 4 --stage 1 2 --steps 3

Writes ``benchmarks/results/ds_muon_compare_cpu.json``. CPU/gloo: the wall times are for
reference only; bytes and NS counts are what the comparison is about.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(rank, world, port, kind, stage, steps, hidden, layers, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DIST_MUONCLIP_DS_SHM="0")
    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    step_bytes: list[dict] = []
    import transformers as tf

    from dist_muonclip.deepspeed import deepspeed_client, disable_shm_comm, initialize, muonclip_optimizer
    from dist_muonclip.param_split import split_parameters
    from dist_muonclip.profiler import WireCounter

    disable_shm_comm()
    ns = [0]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, attn_implementation="eager")
    model = tf.AutoModelForCausalLM.from_config(cfg)
    infos = split_parameters(model)
    n_muon = sum(1 for i in infos if i.use_muon)
    ds_cfg = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10_000}
    acc = None
    if kind == "muonclip":
        from dist_muonclip.comm import CommAccountant

        acc = CommAccountant()
        ds_cfg["optimizer"] = {"type": "MuonClip", "params": {"lr": 0.02, "adamw_lr": 0.01, "ns_backend": "torch",
                                                              "qk_clip": False}}
        engine, *_ = initialize(model=model, config=ds_cfg, accountant=acc)
        import dist_muonclip.ns_split as optmod

        real = optmod.orthogonalize

        def counting(x, **kw):
            ns[0] += int(x.shape[0]) if x.ndim == 3 else 1
            return real(x, **kw)

        optmod.orthogonalize = counting
        layout = deepspeed_client(engine).layout_name
        assert muonclip_optimizer(engine) is not None
    else:
        import deepspeed
        import deepspeed.runtime.zero.muon.original_muon as om

        for info in infos:
            info.param.use_muon = info.use_muon
        ds_cfg["optimizer"] = {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        real = om.muon_update

        def counting_update(*a, **k):
            ns[0] += 1
            return real(*a, **k)

        om.muon_update = counting_update
        layout = "deepspeed"
    times = []
    wire = WireCounter().start()
    for t in range(steps):
        wire.take()
        ns[0] = 0
        g = torch.Generator().manual_seed(t)
        ids = torch.randint(0, 128, (2 * world, 32), generator=g)[2 * rank:2 * rank + 2]
        n_acc = len(acc.steps) if acc is not None else 0
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        counts = wire.take()
        acc_bytes: dict = defaultdict(float)     # MuonClip's own accounting of its (tagged) collectives
        for acc_step in (acc.steps[n_acc:] if acc is not None else []):
            for key, c in acc_step.items():
                acc_bytes[key] += c["bytes"]
        step_bytes.append({"bytes": {k: c["bytes"] for k, c in counts.items()},
                           "calls": {k: c["calls"] for k, c in counts.items()}, "ns": ns[0], "acc": dict(acc_bytes)})
    wire.stop()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"steps": step_bytes, "times": times, "n_muon": n_muon, "layout": layout}, f)
    dist.barrier()
    dist.destroy_process_group()


def run(kind: str, stage: int, world: int, steps: int, hidden: int, layers: int) -> dict:
    from dist_muonclip.launch_env import free_port, spawn_local

    out_dir = tempfile.mkdtemp()
    spawn_local(_worker, world, (world, free_port(), kind, stage, steps, hidden, layers, out_dir), timeout=1800,
                what=f"{kind} ZeRO-{stage} comparison")
    ranks = [json.load(open(os.path.join(out_dir, f"{r}.json"))) for r in range(world)]
    measured = range(1, steps) if steps > 1 else range(steps)   # step 0 includes lazy state setup
    by_kind: dict = defaultdict(float)
    calls: dict = defaultdict(float)
    acc: dict = defaultdict(float)
    ns_per_step = []
    for t in measured:
        for r in ranks:
            for k, b in r["steps"][t]["bytes"].items():
                by_kind[k] += b / len(measured)
            for k, c in r["steps"][t]["calls"].items():
                calls[k] += c / len(measured)
            for k, b in r["steps"][t]["acc"].items():
                acc[k] += b / len(measured)
        ns_per_step.append(sum(r["steps"][t]["ns"] for r in ranks))
    row = {"optimizer": kind, "zero_stage": stage, "world_size": world, "layout": ranks[0]["layout"],
           "num_muon_matrices": ranks[0]["n_muon"], "ns_matrices_per_step": ns_per_step,
           "bytes_per_step_all_ranks": sum(by_kind.values()), "bytes_per_step_by_collective": dict(by_kind),
           "calls_per_step_by_collective": dict(calls)}
    if kind == "muonclip":
        # cross-check: MuonClip's collectives carry their tags on the wire, so the counter's tagged
        # bytes must be exactly what MuonClip's accountant recorded
        row["muonclip_accountant_bytes_per_step"] = dict(acc)
        tagged = {k: b for k, b in by_kind.items() if "[" in k}
        row["tagged_counter_equals_accountant"] = tagged == dict(acc)
    return {**row,
            "step_time_s_median": sorted(t for r in ranks for t in r["times"][1:] or r["times"])[
                len(ranks) * max(1, steps - 1) // 2]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--stage", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ds_muon_compare_cpu.json"))
    args = p.parse_args(argv)
    import deepspeed
    import torch

    rows = []
    for world in args.world:
        for stage in args.stage:
            pair = {}
            for kind in ("muonclip", "deepspeed_muon"):
                row = run(kind, stage, world, args.steps, args.hidden_size, args.layers)
                pair[kind] = row
                rows.append(row)
                print(f"W={world} stage {stage} {kind:15s} NS/step {row['ns_matrices_per_step']} "
                      f"(matrices {row['num_muon_matrices']}) bytes/step {row['bytes_per_step_all_ranks']:.0f}")
            ours, theirs = pair["muonclip"], pair["deepspeed_muon"]
            ratio = ours["bytes_per_step_all_ranks"] / theirs["bytes_per_step_all_ranks"]
            ours["bytes_ratio_vs_deepspeed_muon"] = ratio
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        # code that differs from that commit (the library and this script): empty for a clean measurement
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dist_muonclip", "benchmarks/ds_muon_compare.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except OSError:
        commit, dirty = None, None
    meta = {"device": platform.processor() or platform.machine(), "backend": "gloo (CPU)", "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "git_commit": commit, "code_modified_since_commit": dirty,
            "model": f"llama hidden {args.hidden_size} x {args.layers} layers, vocab 128, fp32",
            "note": "bytes per optimizer step summed over ranks, counted on the wire by dist_muonclip.profiler."
                    "WireCounter (every c10d and functional collective, once; dist_muonclip.comm's byte model); "
                    "steps after the first averaged"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
