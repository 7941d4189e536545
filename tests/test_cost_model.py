"""The analytic cost model (dist_muonclip.cost_model) against measurements and known counts.

Oracles: the parameter lists HF builds (tiny models of every supported family), the published
parameter counts of Llama-3 8B / 70B, the bytes and optimizer-state bytes measured by
benchmarks/scaling.py with the real CommAccountant / wire tap (committed JSON), and one fresh
W=2 gloo run measured here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_muonclip.cost_model import ENGINES, MIXED_BF16, predict, scaling_table, specs_from_config, specs_from_model
from tests._tiny_hf import tiny_model
from tests.dist_utils import run_distributed, values

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# benchmark engine name -> cost-model engine name
ENGINE_MAP = {"muonclip_ddp": "muonclip_ddp", "muonclip_optimizer": "muonclip_optimizer", "adamw_ddp": "adamw_ddp",
              "adamw_ds_zero1": "adamw_zero1", "ds_muon_zero1": "ds_muon_zero1", "muonclip_ds_zero0": "muonclip_ddp",
              "muonclip_ds_zero1": "muonclip_zero1", "muonclip_ds_zero2": "muonclip_zero1",
              "muonclip_fsdp2": "muonclip_fsdp2"}
# bf16 runs (DeepSpeed bf16: bf16 params and gradients, fp32 masters): ZeRO-0 keeps full fp32 masters
# and MuonClip slices them (MasterSliceLayout), a different engine for the model
ENGINE_MAP_BF16 = {**ENGINE_MAP, "muonclip_ds_zero0": "muonclip_zero0_bf16"}
# The acceptance bound. Our engines match to the byte; DeepSpeed adds a few bytes per
# step (a 1-float overflow/loss all-reduce) that the model leaves out.
REL_TOL = 0.05

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral", "deepseek_v3"])
def test_config_specs_equal_the_built_model(kind):
    """Names, shapes, Muon/AdamW split and matrix counts from the config equal HF's model."""
    model = tiny_model(kind)
    built = [(s.name, s.shape, s.use_muon, s.num_matrices) for s in specs_from_model(model)]
    analytic = [(s.name, s.shape, s.use_muon, s.num_matrices) for s in specs_from_config(model.config.to_dict())]
    assert sorted(analytic) == sorted(built)


def test_llama3_parameter_counts():
    """Published counts: Llama-3-8B 8,030,261,248 and Llama-3-70B 70,553,706,496 parameters."""
    assert sum(s.numel for s in specs_from_config(LLAMA3_8B)) == 8_030_261_248
    assert sum(s.numel for s in specs_from_config(LLAMA3_70B)) == 70_553_706_496


def _measured_rows():
    rows = []
    for path in sorted(RESULTS.glob("scaling_*.json")):
        payload = json.loads(path.read_text())
        for r in payload["rows"]:
            bf16 = (r.get("precision") or (payload.get("args") or {}).get("precision")) == "bf16"
            if r.get("ok") and r["engine"] in ENGINE_MAP and (not bf16 or r["engine"].startswith("muonclip_ds")):
                rows.append((payload["models"][r["size"]]["config"], r, bf16))
    return rows


def test_predictions_match_every_measured_configuration():
    """Bytes per rank and optimizer-state bytes per rank within 5% of every committed measurement
    (W = 1, 2, 4; every model size; every engine the benchmark ran, DeepSpeed's included; in
    practice within 8 bytes); NS FLOPs per rank of every MuonClip engine exact."""
    from dist_muonclip.models import build_model

    rows = _measured_rows()
    assert len(rows) >= 30, "benchmarks/results/scaling_quick.json is missing or incomplete"
    specs, checked = {}, set()
    for cfg, r, bf16 in rows:
        key = json.dumps(cfg, sort_keys=True)
        if key not in specs:
            specs[key] = specs_from_model(build_model(cfg, attn_implementation="eager"))
        # bf16: bf16 parameters and gradients on the wire, fp32 state; the measured state is the
        # optimizer's own tensors, so the fp32 masters DeepSpeed keeps are left out of the prediction
        kw = {**MIXED_BF16, "master_bytes": 0} if bf16 else {}
        p = predict(specs[key], r["world_size"], (ENGINE_MAP_BF16 if bf16 else ENGINE_MAP)[r["engine"]],
                    rank=r["rank"], num_logits=cfg["num_hidden_layers"] * cfg["num_attention_heads"], **kw)
        where = f"{r['engine']} {r['size']} W={r['world_size']} rank {r['rank']}"
        assert p["bytes"]["total"] == pytest.approx(r["bytes"], rel=REL_TOL, abs=16), where
        assert p["state_bytes"] == pytest.approx(r["state_bytes"], rel=REL_TOL), where
        if r["engine"].startswith("muonclip"):
            assert p["ns_flops"] == r["ns_flops"], where        # same owners, same ns_flops convention
        if r["engine"] in ("muonclip_ddp", "muonclip_optimizer", "adamw_ddp"):
            assert p["bytes"]["total"] == pytest.approx(r["bytes"], abs=1e-6), where   # no DeepSpeed extras
        checked.add((r["engine"], r["world_size"], bf16))
    assert {w for _, w, _ in checked} >= {1, 2, 4}
    assert {("muonclip_ds_zero0", 4, True), ("muonclip_ds_zero1", 4, True)} <= checked   # scaling_ds_bf16.json


def _fresh_worker(rank, world):
    from benchmarks.scaling import run_engine

    return {e: run_engine(rank, world, e, "tiny", 2) for e in ("muonclip_ddp", "muonclip_optimizer", "adamw_ddp")}


def test_fresh_w2_run_matches(tmp_path):
    """A new W=2 gloo measurement (not the committed JSON) agrees with the prediction exactly."""
    from benchmarks.scaling import model_config
    from dist_muonclip.models import build_model

    outs = values(run_distributed(_fresh_worker, 2, tmp_path=tmp_path, timeout=240))
    cfg = model_config("tiny")
    specs = specs_from_model(build_model(cfg, attn_implementation="eager"))
    for rank, out in enumerate(outs):
        for engine, m in out.items():
            p = predict(specs, 2, engine, rank=rank, num_logits=cfg["num_hidden_layers"] * cfg["num_attention_heads"])
            assert m["bytes"] == pytest.approx(p["bytes"]["total"], abs=1e-6), engine
            assert m["state_bytes"] == p["state_bytes"], engine
            assert m["ns_flops"] == p["ns_flops"], engine


def test_muonclip_orthogonalizes_each_matrix_once_and_shards_state():
    """Across ranks the NS work adds up to one run per matrix at every W, and the Muon state is
    split (sum over ranks = one momentum per Muon parameter)."""
    specs = specs_from_config(LLAMA3_8B)
    muon_numel = sum(s.numel for s in specs if s.use_muon)
    one = predict(specs, 1, "muonclip_ddp")["ns_flops_total"]
    for w in (8, 256, 1024):
        p = predict(specs, w, "muonclip_zero1")
        assert p["ns_flops_total"] == one
        assert sum(p["state_bytes_per_rank"]) == pytest.approx((muon_numel + 2 * (p["num_params"] - muon_numel)) * 4)


def test_table_up_to_1024_and_bad_input():
    rows = scaling_table(LLAMA3_70B, [8, 1024], engines=("muonclip_zero1", "adamw_zero1"))
    assert {(r["world_size"], r["engine"]) for r in rows} == {(w, e) for w in (8, 1024)
                                                              for e in ("muonclip_zero1", "adamw_zero1")}
    # state per rank shrinks as 1/W under ZeRO-1
    st = {(r["world_size"], r["engine"]): r["state_GB_per_rank"] for r in rows}
    assert st[(1024, "adamw_zero1")] == pytest.approx(st[(8, "adamw_zero1")] * 8 / 1024, rel=1e-3)
    with pytest.raises(ValueError, match="engine"):
        predict(specs_from_config(LLAMA3_8B), 8, "zero9")
    with pytest.raises(ValueError, match="world_size"):
        predict(specs_from_config(LLAMA3_8B), 0, ENGINES[0])
