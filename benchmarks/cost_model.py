#!/usr/bin/env python
"""Predicted per-rank cost of one optimizer step up to W=1024 (dist_muonclip.cost_model).

    python benchmarks/cost_model.py                               # Llama-3 8B/70B, Qwen2.5-72B, DeepSeek-V3
    python benchmarks/cost_model.py --config my_hf_config.json --worlds 64 256 1024
    python benchmarks/cost_model.py --validate benchmarks/results/scaling_quick.json   # exit 1 beyond 5%

Prints, per model and W: NS ms per rank (busiest rank), GB sent per rank, optimizer-state GB per
rank, communication ms, estimated optimizer-step ms and its overhead vs DeepSpeed ZeRO-1 AdamW.
Hardware numbers: :data:`dist_muonclip.cost_model.HARDWARE` (NS rate measured on H100, link
bandwidths assumed; see there). Writes ``benchmarks/results/cost_model_predictions.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["MODELS", "ENGINE_MAP", "REL_TOL", "engine_for", "dtype_kwargs", "validate", "main"]

#: Public HF configs (architecture numbers only; no download).
MODELS = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "qwen2.5-72b": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, first_k_dense_replace=3,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128),
}
ENGINES = ("muonclip_zero1", "muonclip_optimizer", "muonclip_fsdp2", "ds_muon_zero1", "adamw_zero1", "muonclip_zero3",
           "ds_muon_zero3", "adamw_zero3")


#: benchmark engine name -> cost-model engine (fp32 runs; see :func:`engine_for`)
ENGINE_MAP = {"muonclip_ddp": "muonclip_ddp", "muonclip_optimizer": "muonclip_optimizer", "adamw_ddp": "adamw_ddp",
              "adamw_ds_zero1": "adamw_zero1", "ds_muon_zero1": "ds_muon_zero1", "muonclip_ds_zero0": "muonclip_ddp",
              "muonclip_ds_zero1": "muonclip_zero1", "muonclip_ds_zero2": "muonclip_zero1",
              "muonclip_fsdp2": "muonclip_fsdp2", "adamw_fsdp2": "adamw_fsdp2",
              "muonclip_ds_zero3": "muonclip_zero3", "adamw_ds_zero3": "adamw_zero3", "ds_muon_zero3": "ds_muon_zero3"}
#: mesh engines of benchmarks/scaling.py: HSDP (``replicas`` from the row's mesh), FSDP x TP
#: (:func:`dist_muonclip.tools.cost_model_tp.predict_fsdp_tp`, see :func:`_validate_tp_row`)
ENGINE_MAP.update({"muonclip_hsdp": "muonclip_hsdp", "muonclip_fsdp_tp": "muonclip_fsdp_tp",
                   "adamw_fsdp_tp": "adamw_fsdp_tp"})
#: The acceptance bound of issue 8 for bytes and optimizer-state bytes.
REL_TOL = 0.05


def engine_for(engine: str, precision: str = "fp32") -> str:
    """The cost-model engine of a benchmark engine run at ``precision`` (bf16 DeepSpeed ZeRO-0 keeps
    fp32 master slices: its own model engine)."""
    if precision == "bf16" and engine == "muonclip_ds_zero0":
        return "muonclip_zero0_bf16"
    return ENGINE_MAP[engine]


def dtype_kwargs(engine: str, precision: str = "fp32") -> dict[str, int]:
    """Bytes per element the cost model should use for how ``engine`` ran (benchmarks/scaling.py's
    precision options). The measured state is the optimizer's own tensors, so DeepSpeed's fp32
    masters (``master_bytes``) are left out."""
    from dist_muonclip.cost_model import MIXED_BF16

    if precision != "bf16":
        return {}
    if engine.startswith(("muonclip_ds", "adamw_ds", "ds_muon")):
        return {**MIXED_BF16, "master_bytes": 0}     # DeepSpeed bf16: bf16 params/grads, fp32 state
    if engine.endswith("fsdp2"):
        return {"param_bytes": 2, "grad_bytes": 4}   # bf16 all-gathers, fp32 reduce-scatter and shards
    return {}                                        # autocast: fp32 params, grads and state


def _rel(pred: float, meas: float) -> float:
    return abs(pred - meas) / max(1.0, abs(meas))


def _validate_rows(rows: list[dict], models: dict[str, dict], *, precision: str, wire: bool) -> list[dict]:
    """Per-rank rows of benchmarks/scaling.py (also inside multi_gpu.py's ``scale`` section)."""
    from dist_muonclip.cost_model import predict, specs_from_model
    from dist_muonclip.models import build_model

    specs: dict[str, tuple] = {}
    out = []
    for r in rows:
        if not r.get("ok") or r["engine"] not in ENGINE_MAP:
            continue
        prec = r.get("precision") or precision
        cfg = models[r["size"]]
        cfg = cfg.get("config", cfg)
        if r["size"] not in specs:
            model = build_model(cfg, attn_implementation="eager")
            specs[r["size"]] = (specs_from_model(model),
                                sum(b.numel() * b.element_size() for b in model.buffers()))
        sp, buffers = specs[r["size"]]
        if r["engine"].endswith("_fsdp_tp"):
            out.append(_validate_tp_row(r, sp, cfg, prec))
            continue
        # DDP broadcasts buffers at every forward: seen by wire-level counts (not by older accountant runs)
        p = predict(sp, r["world_size"], engine_for(r["engine"], prec), rank=r["rank"],
                    num_logits=cfg["num_hidden_layers"] * cfg["num_attention_heads"],
                    buffer_bytes=(buffers if (wire or r.get("comm_counted") == "wire") and r["engine"].endswith("ddp")
                                  else 0),
                    replicas=(r.get("mesh") or {}).get("replicate", 1), zero3=r.get("zero_optimization"),
                    **dtype_kwargs(r["engine"], prec))
        out.append({"engine": r["engine"], "size": r["size"], "world_size": r["world_size"], "rank": r["rank"],
                    "precision": prec, **({"mesh": r["mesh"]} if r.get("mesh") else {}),
                    "bytes_measured": r["bytes"], "bytes_predicted": p["bytes"]["total"],
                    "bytes_rel_err": _rel(p["bytes"]["total"], r["bytes"]),
                    "state_measured": r["state_bytes"], "state_predicted": p["state_bytes"],
                    "state_rel_err": _rel(p["state_bytes"], r["state_bytes"]),
                    "ns_flops_measured": r["ns_flops"], "ns_flops_predicted": p["ns_flops"]})
    return out


def _validate_tp_row(r: dict, specs: list, cfg: dict, precision: str) -> dict:
    """One FSDP x TP row against :func:`predict_fsdp_tp` with the row's plan, mesh and tokens: every
    byte on the wire (the optimizer's tagged collectives, TP's activation all-reduces, FSDP2's
    traffic over dp), the optimizer's bytes alone, the state, NS FLOPs per rank."""
    from dist_muonclip.tools.cost_model_tp import predict_fsdp_tp

    if precision != "fp32":
        raise ValueError(f"{r['engine']} rows are validated for fp32 runs only, got {precision!r}")
    mesh, rank = r["mesh"], r["rank"]
    p = predict_fsdp_tp(specs, mesh["dp"], mesh["tp"], r["tp_plan"], grad_bytes=4, ns_bytes=2,
                        num_logits=cfg["num_hidden_layers"] * cfg["num_attention_heads"],
                        tokens=r["micro_batch"] * r["seq"], optimizer=r["engine"].split("_")[0])
    pred = p["bytes_per_rank"][rank]
    opt_meas = sum(v["bytes"] for k, v in r["comm"].items() if "[" in k)     # MuonClip's tagged collectives
    opt_pred = sum(v for k, v in pred.items() if "[" in k)
    state = p["state_numel_per_rank"][rank] * 4
    return {"engine": r["engine"], "size": r["size"], "world_size": r["world_size"], "rank": rank,
            "precision": precision, "mesh": mesh,
            "bytes_measured": r["bytes"], "bytes_predicted": sum(pred.values()),
            "bytes_rel_err": _rel(sum(pred.values()), r["bytes"]),
            "optimizer_bytes_measured": opt_meas, "optimizer_bytes_predicted": opt_pred,
            "state_measured": r["state_bytes"], "state_predicted": state,
            "state_rel_err": _rel(state, r["state_bytes"]),
            "ns_flops_measured": r["ns_flops"], "ns_flops_predicted": p["ns_flops_per_rank"][rank]}


def _ds_compare_config(meta: dict) -> dict:
    """The model of benchmarks/ds_muon_compare.py: from ``meta["model_config"]`` when recorded,
    else from its description ("llama hidden 64 x 2 layers, vocab 128, ...") and the script's
    fixed choices (intermediate 3/2 hidden, 4 heads, 2 KV heads, 128 positions)."""
    import re

    if isinstance(meta.get("model_config"), dict):
        return dict(meta["model_config"])
    m = re.search(r"hidden (\d+) x (\d+) layers, vocab (\d+)", meta.get("model", ""))
    if m is None:
        raise ValueError(f"cannot tell the model of this ds_muon_compare JSON (meta.model={meta.get('model')!r})")
    hidden, layers, vocab = (int(x) for x in m.groups())
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 3 // 2,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "tie_word_embeddings": False}


def _validate_ds_compare(payload: dict) -> list[dict]:
    """benchmarks/ds_muon_compare.py rows: bytes per step summed over ranks (every collective,
    DeepSpeed's included), Newton-Schulz runs per step summed over ranks."""
    from dist_muonclip.cost_model import predict, specs_from_config

    cfg = _ds_compare_config(payload.get("meta", {}))
    specs = specs_from_config(cfg)              # the script's vocabulary (128) is below build_model's minimum
    out = []
    for r in payload["rows"]:
        engine = "muonclip_zero1" if r["optimizer"] == "muonclip" else "ds_muon_zero1"
        w = r["world_size"]
        p = predict(specs, w, engine, num_logits=0)      # qk_clip=False there: no max logits in the preflight
        measured_runs = r.get("ns_matrices_per_step")
        out.append({"engine": engine, "optimizer": r["optimizer"], "zero_stage": r.get("zero_stage"), "world_size": w,
                    "bytes_measured_all_ranks": r["bytes_per_step_all_ranks"],
                    "bytes_predicted_all_ranks": sum(p["bytes_per_rank"]),
                    "bytes_rel_err": _rel(sum(p["bytes_per_rank"]), r["bytes_per_step_all_ranks"]),
                    "ns_runs_measured": measured_runs[-1] if measured_runs else None,
                    "ns_runs_predicted": sum(p["ns_matrices_per_rank"])})
    return out


def validate(path: str) -> dict:
    """Predicted vs measured bytes / optimizer-state bytes / NS work for every measured row of a
    results JSON: ``scaling_*.json`` (benchmarks/scaling.py), ``multi_gpu_*.json`` (its ``scale``
    rows) or ``ds_muon_compare*.json``. Returns ``{"format", "rows", "worst_rel_err_bytes",
    "worst_rel_err_state"}``."""
    payload = json.loads(Path(path).read_text())
    if "scale" in payload and isinstance(payload["scale"], dict):          # multi_gpu.py
        sc = payload["scale"]
        rows = _validate_rows(sc["rows"], sc["models"], precision=(sc.get("options") or {}).get("precision", "fp32"),
                              wire=sc.get("bytes_counted") == "wire")
        fmt = "multi_gpu"
    elif "meta" in payload and payload.get("rows") and "optimizer" in payload["rows"][0]:   # ds_muon_compare.py
        rows = _validate_ds_compare(payload)
        fmt = "ds_muon_compare"
    else:                                                                   # scaling.py
        rows = _validate_rows(payload["rows"], payload["models"],
                              precision=(payload.get("args") or {}).get("precision") or "fp32",
                              wire=payload.get("bytes_counted") == "wire")
        fmt = "scaling"
    return {"format": fmt, "rows": rows,
            "worst_rel_err_bytes": max((r["bytes_rel_err"] for r in rows), default=0.0),
            "worst_rel_err_state": max((r.get("state_rel_err", 0.0) for r in rows), default=0.0)}


def measure_gpu(out_dir: str, layers: int = 2, steps: int = 6) -> dict:
    """Time prediction vs a measured single-GPU run: a Llama-3-8B-shaped model with ``layers``
    blocks, MuonClip at W=1 (Triton NS when available), phases timed by the profiler's CUDA events.
    Compares the measured ``ns`` phase with the model's NS time and the measured optimizer
    state / parameter bytes with the model's."""
    import platform

    import torch

    from dist_muonclip import MuonClip
    from dist_muonclip.cost_model import predict, specs_from_model
    from dist_muonclip.models import build_model
    from dist_muonclip.profiler import StepProfiler

    cfg = dict(MODELS["llama3-8b"], num_hidden_layers=layers, max_position_embeddings=256)
    model = build_model(cfg, attn_implementation="sdpa", vocab_size=256).cuda()
    opt = MuonClip(model, lr=1e-3, ns_backend="auto", qk_clip=False)
    prof = StepProfiler(None, model=model, print_summary=False).attach(opt)
    for t in range(steps):
        ids = torch.randint(0, 256, (2, 128), device="cuda", generator=None)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    prof.close()
    recs = prof.records[2:]                     # warm-up: first steps compile Triton kernels
    ns_ms = sorted(r["phases_s"].get("ns", 0.0) for r in recs)[len(recs) // 2] * 1e3
    specs = specs_from_model(model)
    rows = {}
    for hw in ("h100", "h100_torch"):
        p = predict(specs, 1, "muonclip_ddp", hardware=hw)
        rows[hw] = {"ns_ms_predicted": p["time_s"]["ns"] * 1e3, "ratio_measured_over_predicted":
                    ns_ms / (p["time_s"]["ns"] * 1e3)}
    p = predict(specs, 1, "muonclip_ddp")
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
           "model": f"llama3-8b shapes, {layers} layers", "num_params": p["num_params"],
           "ns_backend": opt.param_groups[0]["ns_backend"], "ns_ms_measured_median": ns_ms,
           "phases_ms_median": {k: sorted(r["phases_s"].get(k, 0.0) for r in recs)[len(recs) // 2] * 1e3
                                for k in recs[-1]["phases_s"]},
           "predictions": rows, "state_bytes_measured": recs[-1]["memory"]["optimizer_state"],
           "state_bytes_predicted": p["state_bytes"], "memory": recs[-1]["memory"], "steps": recs}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "cost_model_gpu_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "steps"}, indent=1))
    return res


#: models priced on 2-D meshes (dp x tp, replicas x shard; tp / shard = 8: one node)
MESH_MODELS = ("llama3-8b", "llama3-70b")


def _mesh_tables(models: dict[str, dict]) -> dict:
    """FSDP x TP and HSDP predictions (:func:`dist_muonclip.tools.cost_model_tp.mesh_table`) for
    the dense models of :data:`MESH_MODELS` among ``models``, printed as a table."""
    from dist_muonclip.tools.cost_model_tp import mesh_table

    out = {}
    for name in (m for m in MESH_MODELS if m in models):
        rows = out[name] = mesh_table(models[name])
        print(f"\n### {name} on 2-D meshes (GiB per rank and step; 8192 tokens per dp rank)\n")
        print("| mesh | engine | optimizer GiB | model GiB | state GiB | NS TFLOP |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mesh']} | {r['engine']} | {r['optimizer_GiB_per_rank']:.2f} | {r['model_GiB_per_rank']:.2f} "
                  f"| {r['state_GiB_per_rank']:.2f} | {r['ns_TFLOP_per_rank']:.1f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    from dist_muonclip.cost_model import HARDWARE, format_table, scaling_table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--config", default=None, help="an HF config.json to price instead of --models")
    p.add_argument("--worlds", nargs="+", type=int, default=[8, 64, 256, 1024])
    p.add_argument("--engines", nargs="+", default=list(ENGINES))
    p.add_argument("--hardware", default="h100", choices=list(HARDWARE))
    p.add_argument("--validate", nargs="+", default=None, metavar="JSON",
                   help="results to compare predictions with (scaling_*.json, multi_gpu_*.json, "
                   "ds_muon_compare*.json); exits 1 when bytes or state are off by more than 5%%")
    p.add_argument("--validation-out", default=None, metavar="DIR",
                   help="where to write cost_model_validation_<name>.json (default: beside --out; 'none': not written)")
    p.add_argument("--measure-gpu", default=None, metavar="OUT_DIR",
                   help="time check on one GPU (Llama-3-8B shapes, 2 layers); writes cost_model_gpu_check.json")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cost_model_predictions.json"))
    args = p.parse_args(argv)
    if args.measure_gpu:
        measure_gpu(args.measure_gpu)
        return 0
    if args.validate:
        worst = 0.0
        for path in args.validate:
            res = validate(path)
            rows = res["rows"]
            worst = max(worst, res["worst_rel_err_bytes"], res["worst_rel_err_state"])
            bad = [r for r in rows if max(r["bytes_rel_err"], r.get("state_rel_err", 0.0)) > REL_TOL]
            print(f"{path} ({res['format']}): {len(rows)} measured rows; worst relative error bytes "
                  f"{res['worst_rel_err_bytes']:.2e}, state {res['worst_rel_err_state']:.2e}"
                  + (f"; {len(bad)} rows beyond {REL_TOL:.0%}" if bad else ""))
            for r in bad[:20]:
                print("   beyond tolerance:", json.dumps(r))
            if args.validation_out != "none":
                out_dir = Path(args.validation_out) if args.validation_out else Path(args.out).parent
                out = out_dir / f"cost_model_validation_{Path(path).stem}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"source": os.path.basename(path), "format": res["format"],
                                           "tolerance": REL_TOL, **{k: v for k, v in res.items() if k != "format"}},
                                          indent=1))
                print(f"wrote {out}")
        if worst > REL_TOL:
            print(f"FAILED: a prediction is off by more than {REL_TOL:.0%} (bytes or state)")
            return 1
        return 0
    models = {"custom": json.loads(Path(args.config).read_text())} if args.config else {m: MODELS[m] for m in args.models}
    payload = {"hardware": vars(HARDWARE[args.hardware]), "engines": args.engines, "tables": {}}
    for name, cfg in models.items():
        rows = scaling_table(cfg, args.worlds, engines=args.engines, hardware=args.hardware)
        payload["tables"][name] = rows
        print(f"\n### {name} ({rows[0]['num_params'] / 1e9:.2f}B parameters, {HARDWARE[args.hardware].name})\n")
        print(format_table(rows))
    payload["meshes"] = _mesh_tables(models)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
