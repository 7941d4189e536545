"""HF accelerate and Trainer with FSDP2 on a GPU: MuonClip built on the plain model, sharded by the
framework afterwards, against single-GPU oracles; the frameworks' own checkpoints resumed.

On one GPU (``LOCAL_RANK`` set, as torchrun sets it, so accelerate picks ``MULTI_GPU`` and really
enables FSDP2; nothing is overridden), each scenario in fresh processes (accelerate shards one model
per process):

* ``accelerate-<type>``: ``accelerator.prepare(model, MuonClip(model))`` with FSDP2, 4 steps vs the
  plain single-GPU MuonClip run (``benchmarks.scenarios.fsdp.train_single``); accelerate's own
  ``save_fsdp_model`` / ``save_fsdp_optimizer`` after step 2 (``SHARDED_STATE_DICT`` = DCP,
  ``FULL_STATE_DICT`` = torch's full state dict) and ``load_fsdp_*`` in a fresh process: steps 3-4
  must be bit-identical to the run that went on.
* ``torch-full-state``: torch's ``get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)``
  written, read with ``weights_only=True``, ``set_optimizer_state_dict(broadcast_from_rank0=True)``.
* ``trainer-<type>``: ``MuonClipTrainer`` + ``TrainingArguments(fsdp_config={"version": 2})`` vs the same
  Trainer without FSDP on the GPU; Trainer's FSDP checkpoint at step 2 and
  ``resume_from_checkpoint``: bit-identical.
* ``lightning-deepspeed-zero<stage>-<route>``: Lightning's ``DeepSpeedStrategy`` (unmodified on the GPU,
  ``devices=1``) with ``configure_optimizers`` returning MuonClip (ZeRO-2) or the config naming
  MuonClip (ZeRO-1, no ``adamw_patterns``: the split finds ``model.lm_head``) vs the single-GPU
  DeepSpeed-scenario oracle (clipping 1.0); Lightning checkpoint at step 2, resumed.
* ``accelerate-deepspeed-zero<stage>-<route>``: accelerate's DeepSpeed plugin on its real path
  (``DistributedType.DEEPSPEED`` on the GPU) in a script that imports no transformers
  (``benchmarks.scenarios.accelerate_ds``): ``"type": "MuonClip"`` with ``DummyOptim`` filling the
  "auto" values (ZeRO-2), or a MuonClip instance (ZeRO-1); the optimizer accelerate builds is our
  adapter with the expected hyperparameters, 4 steps vs plain MuonClip on the GPU.

Writes ``benchmarks/results/hf_fsdp2_h200.json`` (``--out``; with ``--only``
``hf_gpu_<terms>_h200.json``): the environment record (device, versions, commit) and one row per
scenario with the measured differences and its seconds. ``--only`` picks rows by name,
``--row-timeout`` bounds each row (its oracle and processes together; a row over it is killed and
reported failed), ``--list`` prints the rows. ``--cpu-smoke`` runs the same scenarios on the CPU
(gloo, accelerate's FSDP gate flipped as in the tests) into a temporary file, to check the script
itself. Without a GPU and without ``--cpu-smoke`` it exits 0 saying so.

    python benchmarks/hf_gpu.py                 # on the GPU machine, every row
    python benchmarks/hf_gpu.py --only lightning,accelerate-deepspeed --row-timeout 100
    python benchmarks/hf_gpu.py --cpu-smoke     # anywhere
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

# 4 steps of the fsdp scenario in fp32 (ns_dtype=float32): at W=1 FSDP2 adds no reduction, so the
# runs differ from the plain one only in kernel choices for the sharded views (measured 0 or ulps);
# 1e-4 absolute still flags any real divergence (a wrong layout moves parameters by ~1e-2 per step)
TOL = 1e-4
STEPS, SAVE_AT = 4, 2


def _entry(rank: int, fn_name: str, args: tuple, kw: dict, port: int, result: str, cpu: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import torch.distributed as dist

    import importlib

    module, _, name = fn_name.rpartition(":")
    try:
        fn = getattr(importlib.import_module(f"benchmarks.scenarios.{module or 'hf_fsdp2'}"), name)
        out = {"ok": True, "value": fn(0, 1, *args, **kw)}
    except BaseException as e:  # noqa: BLE001  (reported in the JSON row)
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    torch.save(out, result)
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(fn_name: str, *args: Any, tmp: str, cpu: bool, timeout: float = 300, **kw: Any) -> dict:
    from dist_muonclip.launch_env import free_port, spawn_local

    timeout = min(timeout, _budget_left())
    result = tempfile.mktemp(dir=tmp, suffix=".pt")
    spawn_local(_entry, 1, (fn_name, args, kw, free_port(), result, cpu), timeout=timeout, what=fn_name)
    out = torch.load(result, weights_only=False)
    if not out["ok"]:
        raise RuntimeError(f"{fn_name}: {out['error']}\n{out['tb']}")
    return out["value"]


# the running row's deadline (time.monotonic()); every process a row starts gets what is left of it
_DEADLINE = [float("inf")]


def _budget_left() -> float:
    left = _DEADLINE[0] - time.monotonic()
    if left <= 1:
        raise TimeoutError("the row's time budget (--row-timeout) is spent")
    return left


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _oracle(cpu: bool) -> dict:
    from benchmarks.scenarios.fsdp import train_single

    model, _, clipped = train_single("llama", STEPS, device=None if cpu else "cuda")
    return {"params": {k: p.detach().cpu().clone() for k, p in model.named_parameters()}, "clipped": clipped}


def row_names(cpu: bool = False) -> list[str]:
    """Every scenario row, in run order (``--only`` selects among them)."""
    names = [f"accelerate-{sdt}" for sdt in SDTS] + ["torch-full-state-cpu-offload"]
    names += [f"trainer-{sdt}" for sdt in SDTS]
    names += [f"lightning-deepspeed-zero{stage}-{route}" for stage, route in LIGHTNING_ROWS]
    names += [f"accelerate-deepspeed-zero{stage}-{route}" for stage, route in ACC_DS_ROWS]
    return names


SDTS = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
LIGHTNING_ROWS = ((1, "config"), (2, "configure_optimizers"))
ACC_DS_ROWS = ((2, "config"), (1, "instance"))


def select(names: list[str], only: str | None) -> list[str]:
    """Rows whose name contains one of the comma-separated ``only`` terms (or matches it as a glob)."""
    if not only:
        return list(names)
    terms = [t.strip() for t in only.split(",") if t.strip()]
    chosen = [n for n in names if any(t in n or fnmatch.fnmatchcase(n, t) for t in terms)]
    if not chosen:
        raise ValueError(f"--only {only!r} selects no row; rows: {', '.join(names)}")
    return chosen


def scenarios(tmp: str, cpu: bool, only: str | None = None, row_timeout: float = 600.0) -> list[dict]:
    rows: list[dict] = []
    cache: dict[str, Any] = {}

    def once(key: str, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def acc_row(sdt: str) -> dict:
        oracle = once("fsdp_oracle", lambda: _oracle(cpu))
        ck = os.path.join(tmp, f"acc_{sdt}")
        kw = {"save_at": SAVE_AT, "ckpt_dir": ck, "state_dict_type": sdt}
        a = _run("accelerate_fsdp2_call", STEPS, kw, tmp=tmp, cpu=cpu)
        b = _run("accelerate_fsdp2_call", STEPS, {**kw, "resume": True}, tmp=tmp, cpu=cpu)
        d_oracle, d_resume = _max_diff(a["params"], oracle["params"]), _max_diff(a["params"], b["params"])
        return {"forced_fsdp_gate": a["forced"], "layout_before": a["before"]["layout"], "layout": a["layout"],
                "max_abs_diff_vs_single_gpu": d_oracle, "resume_max_abs_diff": d_resume,
                "resume_losses_equal": b["losses"] == a["losses"][SAVE_AT:], "losses": a["losses"],
                "qk_clip_heads_clipped_last": a["metrics"].get("qk_clip/num_heads_clipped"),
                "pass": a["layout"] == "Shard0Layout" and d_oracle <= TOL and d_resume == 0.0}

    def torch_row() -> dict:
        oracle = once("fsdp_oracle", lambda: _oracle(cpu))
        path = os.path.join(tmp, "full.pt")
        a = _run("torch_full_state_worker", STEPS, SAVE_AT, path, False, tmp=tmp, cpu=cpu)
        b = _run("torch_full_state_worker", STEPS, SAVE_AT, path, True, tmp=tmp, cpu=cpu)
        d = _max_diff(a["params"], b["params"])
        c = a["checks"]
        return {"checks": c, "resume_max_abs_diff": d,
                "max_abs_diff_vs_single_gpu": _max_diff(a["params"], oracle["params"]),
                "pass": d == 0.0 and c["groups_plain"] and c["state_on_cpu"] and c["full_shapes"]}

    def trainer_row(sdt: str) -> dict:
        out = os.path.join(tmp, f"tr_{sdt}")
        plain = once("trainer_plain", lambda: _trainer(tmp, os.path.join(tmp, "tr_plain"), None, cpu))
        a = _trainer(tmp, out, sdt, cpu, save_steps=SAVE_AT)
        b = _trainer(tmp, out + "_res", sdt, cpu, resume=os.path.join(out, f"checkpoint-{SAVE_AT}"))
        d_plain, d_resume = _max_diff(a["params"], plain["params"]), _max_diff(a["params"], b["params"])
        return {"layout": a["layout"], "device": a["device"], "max_abs_diff_vs_trainer_without_fsdp": d_plain,
                "resume_max_abs_diff": d_resume, "resume_losses_equal": b["losses"] == a["losses"][SAVE_AT:],
                "global_step": b["global_step"],
                "pass": a["layout"] == "Shard0Layout" and d_plain <= TOL and d_resume == 0.0}

    def lightning_row(stage: int, route: str) -> dict:
        ds_oracle = once("ds_oracle", lambda: _ds_oracle(cpu))
        ck = os.path.join(tmp, f"lightning_{stage}_{route}")
        a = _run("lightning_ds:lightning_ds_worker", stage, STEPS, route, ck, SAVE_AT, False, tmp=tmp, cpu=cpu)
        b = _run("lightning_ds:lightning_ds_worker", stage, STEPS, route, ck, SAVE_AT, True, tmp=tmp, cpu=cpu)
        got = {k[len("model."):]: v for k, v in a["params"].items()}
        d_oracle, d_resume = _max_diff(got, ds_oracle), _max_diff(a["params"], b["params"])
        return {"zero_stage": a["zero_stage"], "layout": a["layout"], "cuda": a["is_cuda"],
                "max_abs_diff_vs_single_gpu": d_oracle, "resume_max_abs_diff": d_resume,
                "resume_losses_equal": b["losses"] == a["losses"][SAVE_AT:], "heads_clipped_last": a["clipped"],
                "pass": d_oracle <= TOL and d_resume == 0.0 and a["zero_stage"] == stage}

    def acc_ds_row(stage: int, route: str) -> dict:
        from benchmarks.scenarios.accelerate_ds import WANT, train_single

        oracle = once("acc_ds_oracle", lambda: train_single(STEPS, device=None if cpu else "cuda"))
        a = _run("accelerate_ds:accelerate_ds_worker", STEPS, stage, route, tmp=tmp, cpu=cpu)
        muon, adamw = a["groups"]
        got = {"lr": muon["lr"], "weight_decay": muon["weight_decay"], "adamw_lr": adamw["lr"],
               "momentum": muon["momentum"], "adamw_betas": tuple(adamw["betas"]), "adamw_eps": adamw["eps"]}
        d = _max_diff(a["params"], oracle)
        return {"zero_stage": a["zero_stage"], "layout": a["layout"], "device": a["device"],
                "distributed_type": a["distributed_type"], "num_processes": a["num_processes"],
                "optimizer": f"{a['adapter']}({a['inner']})", "hyperparameters": got,
                "muon_params": a["muon_names"], "max_abs_diff_vs_single_gpu": d, "losses": a["losses"],
                "transformers_imported_before_accelerator": a["before"]["transformers_imported"],
                "pass": (a["is_adapter"] and a["inner"] == "MuonClip" and got == WANT and d <= TOL
                         and a["zero_stage"] == stage and a["distributed_type"] == "DistributedType.DEEPSPEED"
                         and not a["before"]["transformers_imported"])}

    runs = {f"accelerate-{sdt}": functools.partial(acc_row, sdt) for sdt in SDTS}
    runs["torch-full-state-cpu-offload"] = torch_row
    runs.update({f"trainer-{sdt}": functools.partial(trainer_row, sdt) for sdt in SDTS})
    runs.update({f"lightning-deepspeed-zero{st}-{r}": functools.partial(lightning_row, st, r)
                 for st, r in LIGHTNING_ROWS})
    runs.update({f"accelerate-deepspeed-zero{st}-{r}": functools.partial(acc_ds_row, st, r) for st, r in ACC_DS_ROWS})
    assert list(runs) == row_names()
    for name in select(list(runs), only):
        if cpu and name == "trainer-FULL_STATE_DICT":   # see tests/test_hf_fsdp2.py: hangs with torch's AdamW too
            rows.append({"scenario": name, "ok": True,
                         "skipped": "CPU smoke: Trainer's FULL_STATE_DICT save on accelerate's forced-CPU FSDP path "
                                    "leaves ranks in different collectives with any optimizer (GPU only)"})
            continue
        t0 = time.monotonic()
        _DEADLINE[0] = t0 + row_timeout       # the row's oracle and processes share the budget
        try:
            r = runs[name]()
            r["ok"] = bool(r.pop("pass"))
        except Exception as e:  # noqa: BLE001  (one failing scenario must not hide the others)
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000]}
        finally:
            _DEADLINE[0] = float("inf")
        rows.append({"scenario": name, **r, "seconds": round(time.monotonic() - t0, 1)})
        print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def _ds_oracle(cpu: bool) -> dict:
    from benchmarks.scenarios.deepspeed import train_single

    model, _ = train_single(STEPS, device=None if cpu else "cuda")
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters()}


def _trainer(tmp: str, out_dir: str, fsdp: str | None, cpu: bool, **kw: Any) -> dict:
    # use_cpu: TrainingArguments(use_cpu=...) in the worker
    return _run("trainer_fsdp2_worker", out_dir, STEPS, fsdp, tmp=tmp, cpu=cpu, timeout=300,
                **{**kw, "use_cpu": cpu})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (gloo) to check the script")
    ap.add_argument("--only", default=None,
                    help="comma-separated terms: run the rows whose name contains one (or matches it as a glob), "
                         "e.g. 'lightning,accelerate-deepspeed'; --list shows the rows")
    ap.add_argument("--row-timeout", type=float, default=600.0,
                    help="seconds one row may take, its oracle and processes together (default 600); a row over it "
                         "is killed and reported as failed, the next row starts")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/hf_fsdp2_h200.json, with "
                                                 "--only hf_gpu_<terms>_h200.json; --cpu-smoke: a temporary file)")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(row_names()))
        return {"rows": row_names()}
    chosen = select(row_names(), args.only)       # a bad --only fails before anything runs
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("hf_gpu.py: no CUDA device; run it on the GPU machine, or use --cpu-smoke to check the script")
        return {"skipped": "no CUDA device"}
    from benchmarks._common import environment

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        rows = scenarios(tmp, cpu=args.cpu_smoke, only=args.only, row_timeout=args.row_timeout)
    payload = {"benchmark": "hf_fsdp2", "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "steps": STEPS,
               "save_at": SAVE_AT, "tolerance": TOL, "only": args.only, "rows_selected": chosen,
               "row_timeout_s": args.row_timeout, "seconds": round(time.monotonic() - t0, 1),
               "environment": environment(("transformers", "accelerate", "deepspeed", "lightning")), "rows": rows,
               "all_ok": all(r["ok"] for r in rows)}
    slug = "" if not args.only else "_" + "-".join(
        "".join(c if c.isalnum() or c in "-_" else "_" for c in t.strip()) for t in args.only.split(",") if t.strip())
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or (os.path.join(tempfile.gettempdir(), f"hf_gpu{slug}_cpu_smoke.json") if args.cpu_smoke
                       else os.path.join(results, f"hf_gpu{slug}_h200.json" if slug else "hf_fsdp2_h200.json"))
    with open(out, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"wrote {out}: all_ok={payload['all_ok']} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main().get("all_ok", True) else 1)
