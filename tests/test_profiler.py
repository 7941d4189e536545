"""StepProfiler: phases, bytes, NS FLOPs and memory per step, traces, summary.

Oracles: NS FLOPs from the parameter shapes (ns_flops per Muon matrix), storage sizes computed
by hand (numel x element size), the CommAccountant of a run without a profiler, and the
analytic cost model for W=2 bytes.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from dist_muonclip import MuonClip
from dist_muonclip.newton_schulz import ns_flops
from dist_muonclip.profiler import PHASES, StepProfiler, load_trace, profile_optimizer, storage_bytes
from tests._tiny_hf import tiny_model
from tests.dist_utils import run_distributed, values


def _train(model, opt, steps, rank=0, world=1, fwd=None):
    fwd = fwd or model
    for t in range(steps):
        ids = torch.randint(0, 96, (8 // world, 16), generator=torch.Generator().manual_seed(100 + t))
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_single_process_record_contents(tmp_path, capsys):
    model = tiny_model("llama")
    opt = MuonClip(model, lr=0.01, ns_backend="torch", qk_clip={"tau": 0.1})
    out = tmp_path / "trace.json"
    with profile_optimizer(opt, out=str(out), model=model) as prof:
        _train(model, opt, 3)
    assert opt.profiler is None                       # detached at exit
    recs = prof.records
    assert [r["step"] for r in recs] == [0, 1, 2]
    # every phase a single-process step runs was timed, each with a positive duration
    for r in recs:
        assert {"preflight", "ns", "apply", "adamw", "qk_clip"} <= set(r["phases_s"]) <= set(PHASES)
        assert all(v > 0 for v in r["phases_s"].values())
        assert r["comm"] == {} and r["comm_bytes"] == 0   # one process: no collective
    # NS FLOPs: every Muon matrix once per step (oracle from the shapes)
    expected = sum(ns_flops(*sorted(p.shape), 5) for g in opt.param_groups if g["use_muon"] for p in g["params"])
    assert all(r["ns_flops"] == expected for r in recs)
    mem = recs[-1]["memory"]
    assert mem["params"] == sum(p.numel() * 4 for p in model.parameters())
    assert mem["grads"] == mem["params"]              # fp32 grads for every parameter, before zero_grad
    assert mem["optimizer_state"] == sum(t.numel() * t.element_size() for s in opt.state.values()
                                         for t in s.values() if torch.is_tensor(t))
    assert mem["peak"] >= mem["params"] + mem["grads"] + mem["optimizer_state"]
    assert mem["temporaries"] == mem["peak"] - mem["params"] - mem["grads"] - mem["optimizer_state"]
    # trace files
    data = json.loads(out.read_text())
    assert data["world_size"] == 1 and len(data["steps"]) == 3
    with open(tmp_path / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[1]["ns_flops"]) == expected and "phase_s.ns" in rows[0]
    printed = capsys.readouterr().out
    assert "NS GFLOP on this rank" in printed and "adamw" in printed


def test_constructor_path_and_existing_accountant():
    """MuonClip(..., profiler=prof) + prof.attach(opt); an existing accountant is reused."""
    from dist_muonclip.comm import CommAccountant

    model = tiny_model("llama")
    prof = StepProfiler(print_summary=False)
    acc = CommAccountant()
    opt = MuonClip(model, lr=0.01, ns_backend="torch", profiler=prof, accountant=acc)
    prof.attach(opt)
    prof.attach(opt)                                  # idempotent
    assert prof.accountant is acc
    _train(model, opt, 2)
    prof.close()
    assert len(prof.records) == 2 and "ns" in prof.records[0]["phases_s"]


def test_storage_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 10)
    assert storage_bytes([a, a[2:], a.view(-1), None, torch.zeros(3, dtype=torch.float64)]) == 400 + 24


def test_bad_input():
    with pytest.raises(ValueError, match="out="):
        StepProfiler("trace.txt")
    with pytest.raises(TypeError, match="optimizer"):
        StepProfiler().attach(object())
    model = tiny_model("llama")
    opt1 = MuonClip(model, lr=0.01)
    prof = StepProfiler().attach(opt1)
    with pytest.raises(ValueError, match="already attached"):
        prof.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def _ddp_worker(rank, world, out):
    from torch import nn

    from dist_muonclip.comm import ddp_accounting_hook

    model = tiny_model("llama")
    opt = MuonClip(model, lr=0.01, ns_backend="torch", qk_clip={"tau": 0.1})
    with profile_optimizer(opt, out=out, model=model, print_summary=False) as prof:
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(prof.accountant, ddp_accounting_hook)
        _train(model, opt, 3, rank, world, fwd=ddp)
    scalars = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                  if torch.is_tensor(t) and t.ndim == 0)
    return prof.records, scalars


def test_two_ranks_ddp_trace_matches_cost_model(tmp_path):
    """Per-rank bytes (DDP all-reduce + optimizer collectives) equal the analytic model, per step;
    each rank's NS FLOPs are those of the matrices it owns; load_trace merges both ranks."""
    from dist_muonclip.cost_model import predict, specs_from_model

    out = str(tmp_path / "t.json")
    outs = values(run_distributed(_ddp_worker, 2, out, tmp_path=tmp_path / "res", timeout=240))
    recs = [o[0] for o in outs]
    model = tiny_model("llama")
    specs = specs_from_model(model)
    cfg = model.config
    total_flops = sum(ns_flops(*sorted(s.shape), 5) for s in specs if s.use_muon)
    assert sum(r[-1]["ns_flops"] for r in recs) == total_flops    # each matrix once across ranks
    for rank, rr in enumerate(recs):
        p = predict(specs, 2, "muonclip_ddp", rank=rank,
                    num_logits=cfg.num_hidden_layers * cfg.num_attention_heads)
        for r in rr:
            assert r["comm_bytes"] == pytest.approx(p["bytes"]["total"], abs=1e-6)
            assert r["comm"]["all_reduce"]["bytes"] == pytest.approx(p["bytes"]["all_reduce"])
            assert r["ns_flops"] == p["ns_flops"]
        # the model prices tensor state; the profiler also holds AdamW's 0-d step counters
        assert rr[-1]["memory"]["optimizer_state"] == p["state_bytes"] + outs[rank][1]
    merged = load_trace(out)
    assert sorted((r["rank"], r["step"]) for r in merged) == [(r, s) for r in range(2) for s in range(3)]
