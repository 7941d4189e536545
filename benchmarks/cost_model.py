#!/usr/bin/env python
"""Predicted per-rank cost of one optimizer step up to W=1024 (dist_muonclip.cost_model).

    python benchmarks/cost_model.py                               # Llama-3 8B/70B, Qwen2.5-72B, DeepSeek-V3
    python benchmarks/cost_model.py --config my_hf_config.json --worlds 64 256 1024
    python benchmarks/cost_model.py --validate benchmarks/results/scaling_quick.json

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

__all__ = ["MODELS", "validate", "main"]

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
ENGINES = ("muonclip_zero1", "muonclip_optimizer", "muonclip_fsdp2", "ds_muon_zero1", "adamw_zero1")


def validate(path: str) -> list[dict]:
    """Predicted vs measured bytes / state / NS FLOPs for every row of a scaling JSON."""
    from dist_muonclip.cost_model import predict, specs_from_model
    from dist_muonclip.models import build_model

    engine_map = {"muonclip_ddp": "muonclip_ddp", "muonclip_optimizer": "muonclip_optimizer",
                  "adamw_ddp": "adamw_ddp", "adamw_ds_zero1": "adamw_zero1", "ds_muon_zero1": "ds_muon_zero1",
                  "muonclip_ds_zero0": "muonclip_ddp", "muonclip_ds_zero1": "muonclip_zero1",
                  "muonclip_ds_zero2": "muonclip_zero1"}
    payload = json.loads(Path(path).read_text())
    specs, out = {}, []
    for r in payload["rows"]:
        if not r.get("ok") or r["engine"] not in engine_map:
            continue
        cfg = payload["models"][r["size"]]["config"]
        if r["size"] not in specs:
            specs[r["size"]] = specs_from_model(build_model(cfg, attn_implementation="eager"))
        p = predict(specs[r["size"]], r["world_size"], engine_map[r["engine"]], rank=r["rank"],
                    num_logits=cfg["num_hidden_layers"] * cfg["num_attention_heads"])
        out.append({"engine": r["engine"], "size": r["size"], "world_size": r["world_size"], "rank": r["rank"],
                    "bytes_measured": r["bytes"], "bytes_predicted": p["bytes"]["total"],
                    "state_measured": r["state_bytes"], "state_predicted": p["state_bytes"],
                    "ns_flops_measured": r["ns_flops"], "ns_flops_predicted": p["ns_flops"]})
    return out


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


def main(argv: list[str] | None = None) -> int:
    from dist_muonclip.cost_model import HARDWARE, format_table, scaling_table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--config", default=None, help="an HF config.json to price instead of --models")
    p.add_argument("--worlds", nargs="+", type=int, default=[8, 64, 256, 1024])
    p.add_argument("--engines", nargs="+", default=list(ENGINES))
    p.add_argument("--hardware", default="h100", choices=list(HARDWARE))
    p.add_argument("--validate", default=None, help="a scaling_*.json to compare predictions with")
    p.add_argument("--measure-gpu", default=None, metavar="OUT_DIR",
                   help="time check on one GPU (Llama-3-8B shapes, 2 layers); writes cost_model_gpu_check.json")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cost_model_predictions.json"))
    args = p.parse_args(argv)
    if args.measure_gpu:
        measure_gpu(args.measure_gpu)
        return 0
    if args.validate:
        rows = validate(args.validate)
        worst = max(abs(r["bytes_predicted"] - r["bytes_measured"]) / max(1.0, r["bytes_measured"]) for r in rows)
        worst_state = max(abs(r["state_predicted"] - r["state_measured"]) / max(1.0, r["state_measured"]) for r in rows)
        print(f"{len(rows)} measured rows: worst relative error bytes {worst:.2e}, state {worst_state:.2e}")
        out = Path(args.out).with_name(f"cost_model_validation_{Path(args.validate).stem}.json")
        out.write_text(json.dumps({"source": os.path.basename(args.validate), "worst_rel_err_bytes": worst,
                                   "worst_rel_err_state": worst_state, "rows": rows}, indent=1))
        print(f"wrote {out}")
        return 0
    models = {"custom": json.loads(Path(args.config).read_text())} if args.config else {m: MODELS[m] for m in args.models}
    payload = {"hardware": vars(HARDWARE[args.hardware]), "engines": args.engines, "tables": {}}
    for name, cfg in models.items():
        rows = scaling_table(cfg, args.worlds, engines=args.engines, hardware=args.hardware)
        payload["tables"][name] = rows
        print(f"\n### {name} ({rows[0]['num_params'] / 1e9:.2f}B parameters, {HARDWARE[args.hardware].name})\n")
        print(format_table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
