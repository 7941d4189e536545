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
* ``lightning-deepspeed-zero<stage>-<route>``: Lightning's ``DeepSpeedStrategy`` (unmodified on the GPU)
  with ``configure_optimizers`` returning MuonClip (ZeRO-2) or the config naming MuonClip (ZeRO-1) vs
  the single-GPU DeepSpeed-scenario oracle (clipping 1.0); Lightning checkpoint at step 2, resumed.

Writes ``benchmarks/results/hf_fsdp2_h200.json`` (``--out``): the environment record (device,
versions, commit) and one row per scenario with the measured differences. ``--cpu-smoke`` runs
the same scenarios on the CPU (gloo, accelerate's FSDP gate flipped as in the tests) into a
temporary file, to check the script itself. Without a GPU and without ``--cpu-smoke`` it exits 0
saying so.

    python benchmarks/hf_gpu.py                 # on the GPU machine
    python benchmarks/hf_gpu.py --cpu-smoke     # anywhere
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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

    result = tempfile.mktemp(dir=tmp, suffix=".pt")
    spawn_local(_entry, 1, (fn_name, args, kw, free_port(), result, cpu), timeout=timeout, what=fn_name)
    out = torch.load(result, weights_only=False)
    if not out["ok"]:
        raise RuntimeError(f"{fn_name}: {out['error']}\n{out['tb']}")
    return out["value"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _oracle(cpu: bool) -> dict:
    from benchmarks.scenarios.fsdp import train_single

    model, _, clipped = train_single("llama", STEPS, device=None if cpu else "cuda")
    return {"params": {k: p.detach().cpu().clone() for k, p in model.named_parameters()}, "clipped": clipped}


def scenarios(tmp: str, cpu: bool) -> list[dict]:
    oracle = _oracle(cpu)
    rows: list[dict] = []

    def row(name: str, fn) -> None:
        try:
            r = fn()
            r["ok"] = bool(r.pop("pass"))
        except Exception as e:  # noqa: BLE001  (one failing scenario must not hide the others)
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000]}
        rows.append({"scenario": name, **r})
        print(json.dumps(rows[-1]), flush=True)

    for sdt in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        def acc_row(sdt=sdt):
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
        row(f"accelerate-{sdt}", acc_row)

    def torch_row():
        path = os.path.join(tmp, "full.pt")
        a = _run("torch_full_state_worker", STEPS, SAVE_AT, path, False, tmp=tmp, cpu=cpu)
        b = _run("torch_full_state_worker", STEPS, SAVE_AT, path, True, tmp=tmp, cpu=cpu)
        d = _max_diff(a["params"], b["params"])
        c = a["checks"]
        return {"checks": c, "resume_max_abs_diff": d,
                "max_abs_diff_vs_single_gpu": _max_diff(a["params"], oracle["params"]),
                "pass": d == 0.0 and c["groups_plain"] and c["state_on_cpu"] and c["full_shapes"]}
    row("torch-full-state-cpu-offload", torch_row)

    plain = {}

    for sdt in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        def trainer_row(sdt=sdt):
            out = os.path.join(tmp, f"tr_{sdt}")
            if "params" not in plain:
                plain.update(_trainer(tmp, os.path.join(tmp, "tr_plain"), None, cpu))
            a = _trainer(tmp, out, sdt, cpu, save_steps=SAVE_AT)
            b = _trainer(tmp, out + "_res", sdt, cpu, resume=os.path.join(out, f"checkpoint-{SAVE_AT}"))
            d_plain, d_resume = _max_diff(a["params"], plain["params"]), _max_diff(a["params"], b["params"])
            return {"layout": a["layout"], "device": a["device"], "max_abs_diff_vs_trainer_without_fsdp": d_plain,
                    "resume_max_abs_diff": d_resume, "resume_losses_equal": b["losses"] == a["losses"][SAVE_AT:],
                    "global_step": b["global_step"],
                    "pass": a["layout"] == "Shard0Layout" and d_plain <= TOL and d_resume == 0.0}
        if cpu and sdt == "FULL_STATE_DICT":     # see tests/test_hf_fsdp2.py: hangs with torch's AdamW too
            rows.append({"scenario": f"trainer-{sdt}", "ok": True,
                         "skipped": "CPU smoke: Trainer's FULL_STATE_DICT save on accelerate's forced-CPU FSDP path "
                                    "leaves ranks in different collectives with any optimizer (GPU only)"})
            continue
        row(f"trainer-{sdt}", trainer_row)
    ds_oracle = _ds_oracle(cpu)
    for stage, route in ((1, "config"), (2, "configure_optimizers")):
        def lightning_row(stage=stage, route=route):
            ck = os.path.join(tmp, f"lightning_{stage}_{route}")
            a = _run("lightning_ds:lightning_ds_worker", stage, STEPS, route, ck, SAVE_AT, False, tmp=tmp, cpu=cpu)
            b = _run("lightning_ds:lightning_ds_worker", stage, STEPS, route, ck, SAVE_AT, True, tmp=tmp, cpu=cpu)
            got = {k[len("model."):]: v for k, v in a["params"].items()}
            d_oracle, d_resume = _max_diff(got, ds_oracle), _max_diff(a["params"], b["params"])
            return {"zero_stage": a["zero_stage"], "layout": a["layout"], "cuda": a["is_cuda"],
                    "max_abs_diff_vs_single_gpu": d_oracle, "resume_max_abs_diff": d_resume,
                    "resume_losses_equal": b["losses"] == a["losses"][SAVE_AT:], "heads_clipped_last": a["clipped"],
                    "pass": d_oracle <= TOL and d_resume == 0.0 and a["zero_stage"] == stage}
        row(f"lightning-deepspeed-zero{stage}-{route}", lightning_row)
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
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/hf_fsdp2_h200.json; "
                                                 "--cpu-smoke: a temporary file)")
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("hf_gpu.py: no CUDA device; run it on the GPU machine, or use --cpu-smoke to check the script")
        return {"skipped": "no CUDA device"}
    from benchmarks._common import environment

    with tempfile.TemporaryDirectory() as tmp:
        rows = scenarios(tmp, cpu=args.cpu_smoke)
    payload = {"benchmark": "hf_fsdp2", "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "steps": STEPS,
               "save_at": SAVE_AT, "tolerance": TOL,
               "environment": environment(("transformers", "accelerate", "deepspeed")), "rows": rows,
               "all_ok": all(r["ok"] for r in rows)}
    out = args.out or (os.path.join(tempfile.gettempdir(), "hf_fsdp2_cpu_smoke.json") if args.cpu_smoke
                       else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf_fsdp2_h200.json"))
    with open(out, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"wrote {out}: all_ok={payload['all_ok']}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main().get("all_ok", True) else 1)
