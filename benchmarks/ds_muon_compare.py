#!/usr/bin/env python
"""MuonClip (FlatFragments) vs DeepSpeed's built-in ``"type": "Muon"`` at ZeRO-1/2, same model.

Per optimizer step, summed over all ranks, both runs are measured the same way:

* bytes on the wire of every torch.distributed collective and point-to-point op (DeepSpeed's
  gradient reduction and parameter all-gather included), with the ring model of
  :mod:`dist_muonclip.comm` (all-reduce 2 (W-1)/W N, reduce-scatter / all-gather (W-1)/W N,
  all-to-all: bytes to others; the full list, and what is not seen, above ``COUNTED``); for
  MuonClip its own CommAccountant is recorded beside it as a cross-check of the counter;
* Newton-Schulz runs: matrices orthogonalized (ours: ``orthogonalize`` calls x batch size; DeepSpeed:
  ``muon_update`` calls), against the number of Muon matrices. DeepSpeed orthogonalizes a matrix on
  every rank whose partition it overlaps, so matrices cut by a partition boundary are done twice.

    python benchmarks/ds_muon_compare.py --world 2 4 --stage 1 2 --steps 3

Writes ``benchmarks/results/ds_muon_compare_cpu.json``. CPU/gloo: the wall times are for
reference only; bytes and NS counts are what the comparison is about.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# torch.distributed entry points the counter wraps, with the bytes the calling rank sends (ring /
# chain model of dist_muonclip.comm; W ranks in the call's group, r this rank, N a tensor's bytes):
#   all_reduce 2(W-1)/W N; all_reduce_coalesced the same over its tensors; reduce and broadcast
#   (W-1)/W N; all_gather (list) (W-1) N(input); all_gather_into_tensor / all_gather_single /
#   _all_gather_base (W-1)/W N(output); all_gather_coalesced (W-1) N per input; reduce_scatter
#   (list) (W-1)/W sum N(inputs); reduce_scatter_tensor / _single / _reduce_scatter_base (W-1)/W
#   N(input); all_to_all_single and all_to_all the bytes addressed to other ranks; gather N on
#   non-destination ranks; scatter the other ranks' chunks, on the source; send / isend N, recv /
#   irecv 0 (counted at the sender); batch_isend_irecv its send ops; barrier 0 (calls only).
# Object collectives (all_gather_object, broadcast_object_list, ...) are counted through the
# tensor collectives they issue. Not seen: torch.distributed._functional_collectives (DTensor /
# FSDP2; neither DeepSpeed ZeRO-0/1/2 nor MuonClip use them) and collectives issued from C++
# (DDP's reducer; not used here).
COUNTED = ("all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
           "all_gather_single", "_all_gather_base", "all_gather_coalesced", "reduce_scatter",
           "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "all_to_all",
           "all_to_all_single", "gather", "scatter", "send", "isend", "recv", "irecv", "batch_isend_irecv",
           "barrier", "monitored_barrier")


def _count_collectives(record):
    """Wrap torch.distributed's collectives and point-to-point ops (list above) so that every call
    reports ``record(name, bytes_sent_by_this_rank)``.

    The same wrapper replaces the function in ``torch.distributed`` and in
    ``torch.distributed.distributed_c10d`` (where torch's own functions look each other up), and
    every reference an already imported ``dist_muonclip`` / ``deepspeed`` module captured (e.g.
    ``dist_muonclip.comm._all_gather_single``). A call made while another counted call runs (a
    deprecated name forwarding to its successor, a coalesced call issuing its parts, an object
    collective's tensor collectives inside a wrapped call) is not counted again: each call a
    library makes is counted exactly once, at the outermost entry point.
    """
    import functools
    import threading

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    def nbytes(t):
        return t.numel() * t.element_size()

    def others(w, r, tensors):
        return sum(nbytes(t) for i, t in enumerate(tensors) if i != r)

    def a2a_single(w, r, out, inp, out_splits=None, in_splits=None, *a):
        if not in_splits:
            return nbytes(inp) * (w - 1) / w
        row = nbytes(inp) // inp.shape[0] if inp.ndim and inp.shape[0] else 0
        return sum(s for i, s in enumerate(in_splits) if i != r) * row

    def is_root(r, root, group_root):
        """``root`` is a global rank, ``group_root`` a rank in the call's group (torch >= 2.6 takes either)."""
        return dist.get_rank() == root if root is not None else r == (group_root or 0)

    def gather(w, r, t, gather_list=None, dst=None, group=None, async_op=False, group_dst=None):
        return 0 if is_root(r, dst, group_dst) else nbytes(t)

    def scatter(w, r, t, scatter_list=None, src=None, group=None, async_op=False, group_src=None):
        return others(w, r, scatter_list or []) if is_root(r, src, group_src) else 0

    def p2p_sends(w, r, ops, *a):
        return sum(nbytes(op.tensor) for op in ops if getattr(op.op, "__name__", "") in ("isend", "send"))

    costs = {
        "all_reduce": lambda w, r, t, *a: 2 * (w - 1) / w * nbytes(t),
        "all_reduce_coalesced": lambda w, r, ts, *a: 2 * (w - 1) / w * sum(nbytes(t) for t in ts),
        "reduce": lambda w, r, t, *a: (w - 1) / w * nbytes(t),
        "broadcast": lambda w, r, t, *a: (w - 1) / w * nbytes(t),
        "all_gather": lambda w, r, outs, t, *a: (w - 1) * nbytes(t),
        "all_gather_into_tensor": lambda w, r, out, inp, *a: (w - 1) / w * nbytes(out),
        "all_gather_single": lambda w, r, out, inp, *a: (w - 1) / w * nbytes(out),
        "_all_gather_base": lambda w, r, out, inp, *a: (w - 1) / w * nbytes(out),
        "all_gather_coalesced": lambda w, r, outs, ins, *a: (w - 1) * sum(nbytes(t) for t in ins),
        "reduce_scatter": lambda w, r, out, ins, *a: (w - 1) / w * sum(nbytes(t) for t in ins),
        "reduce_scatter_tensor": lambda w, r, out, inp, *a: (w - 1) / w * nbytes(inp),
        "reduce_scatter_single": lambda w, r, out, inp, *a: (w - 1) / w * nbytes(inp),
        "_reduce_scatter_base": lambda w, r, out, inp, *a: (w - 1) / w * nbytes(inp),
        "all_to_all_single": a2a_single,
        "all_to_all": lambda w, r, outs, ins, *a: others(w, r, ins),
        "gather": gather,
        "scatter": scatter,
        "send": lambda w, r, t, *a: nbytes(t),
        "isend": lambda w, r, t, *a: nbytes(t),
        "recv": lambda w, r, *a: 0,
        "irecv": lambda w, r, *a: 0,
        "batch_isend_irecv": p2p_sends,
        "barrier": lambda w, r, *a: 0,
        "monitored_barrier": lambda w, r, *a: 0,
    }
    assert set(costs) == set(COUNTED)
    inside = threading.local()
    originals = {}

    def wrap(name, cost):
        real = getattr(c10d, name, None) or getattr(dist, name, None)
        if real is None:
            return
        sig = inspect.signature(real)

        @functools.wraps(real)
        def counted(*args, **kwargs):
            if getattr(inside, "depth", 0):
                return real(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            vals = list(bound.arguments.values())
            group = bound.arguments.get("group")
            if name == "batch_isend_irecv":
                group = getattr(vals[0][0], "group", None) if vals[0] else None
            record(name, cost(dist.get_world_size(group), dist.get_rank(group), *vals))
            inside.depth = 1
            try:
                return real(*args, **kwargs)
            finally:
                inside.depth = 0

        originals[id(real)] = counted
        for mod in (dist, c10d):
            if getattr(mod, name, None) is real:
                setattr(mod, name, counted)

    for name, cost in costs.items():
        wrap(name, cost)
    # references captured before the wrap (module-level aliases in already imported modules)
    for modname, mod in list(sys.modules.items()):
        if mod is None or not modname.startswith(("dist_muonclip", "deepspeed")):
            continue
        for attr, val in list(vars(mod).items()):
            if callable(val) and id(val) in originals:
                setattr(mod, attr, originals[id(val)])


def _worker(rank, world, port, kind, stage, steps, hidden, layers, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DIST_MUONCLIP_DS_SHM="0")
    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    step_bytes: list[dict] = []
    current: dict = defaultdict(float)
    calls: dict = defaultdict(int)

    def record(name, b):
        current[name] += b
        calls[name] += 1

    # before deepspeed.comm captures references to the collectives (references dist_muonclip.comm
    # captured at import are re-pointed by _count_collectives)
    _count_collectives(record)
    import transformers as tf

    from dist_muonclip.deepspeed import disable_shm_comm, initialize, muonclip_optimizer
    from dist_muonclip.param_split import split_parameters

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
        import dist_muonclip.optimizer as optmod

        real = optmod.orthogonalize

        def counting(x, **kw):
            ns[0] += int(x.shape[0]) if x.ndim == 3 else 1
            return real(x, **kw)

        optmod.orthogonalize = counting
        layout = engine._dist_muonclip.layout_name
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
    for t in range(steps):
        current.clear()
        calls.clear()
        ns[0] = 0
        g = torch.Generator().manual_seed(t)
        ids = torch.randint(0, 128, (2 * world, 32), generator=g)[2 * rank:2 * rank + 2]
        n_acc = len(acc.steps) if acc is not None else 0
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        acc_bytes: dict = defaultdict(float)     # MuonClip's own accounting of its collectives
        if acc is not None and len(acc.steps) > n_acc:
            for key, c in acc.steps[-1].items():
                acc_bytes[key.split("[")[0]] += c["bytes"]
        step_bytes.append({"bytes": dict(current), "calls": dict(calls), "ns": ns[0], "acc": dict(acc_bytes)})
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
        # cross-check: MuonClip is the only all-to-all user here, so the counter's all-to-all bytes
        # must be exactly what MuonClip's accountant recorded for its all-to-alls
        row["muonclip_accountant_bytes_per_step"] = dict(acc)
        a2a = by_kind.get("all_to_all_single", 0.0)
        row["all_to_all_counter_equals_accountant"] = a2a == acc.get("all_to_all", 0.0)
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
            "counted": list(COUNTED),
            "note": "bytes per optimizer step summed over ranks, ring model; steps after the first averaged; "
                    "every call into the torch.distributed functions in 'counted' is counted once "
                    "(functional collectives and C++-issued collectives are not seen; none are used here)"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
