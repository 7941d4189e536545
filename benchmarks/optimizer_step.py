"""Optimizer step on one GPU, per phase: MuonClip.step vs a fused AdamW step on the same parameters.

Model: the issue's 1.13B Llama-3-8B-shaped stack (4 blocks of hidden 4096, 32/8 heads of 128,
MLP 14336, vocab 32000, untied embeddings + head), fp32 masters, gradients present, QK-Clip off.
No forward pass: gradients are fixed random tensors, so every variant steps the same inputs.

Per variant: the median step time over ``--steps`` timed steps (CUDA events around ``step()``),
the median per phase (the engine's ``phase(name)`` hooks, CUDA events), and the non-Newton-Schulz
part = step - ``ns`` phase. Goal (issue 19): non-NS <= 1.3 x the fused AdamW step.

    python benchmarks/optimizer_step.py --out DIR [--steps 10] [--commit SHA] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections import defaultdict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import environment  # noqa: E402
from dist_muonclip import MuonClip  # noqa: E402

HIDDEN, KV, MLP, VOCAB, LAYERS = 4096, 1024, 14336, 32000, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.up_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.down_proj = nn.Linear(MLP, HIDDEN, bias=False)
        self.input_norm = nn.Parameter(torch.ones(HIDDEN))
        self.post_norm = nn.Parameter(torch.ones(HIDDEN))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.Parameter(torch.ones(HIDDEN))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)


class _Event:
    """``torch.cuda.Event`` or, off CUDA (smoke runs), a wall clock with the same methods."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.e = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.t = 0.0

    def record(self) -> None:
        if self.cuda:
            self.e.record()
        else:
            import time
            self.t = time.perf_counter()

    def elapsed_time(self, other: "_Event") -> float:
        return self.e.elapsed_time(other.e) if self.cuda else (other.t - self.t) * 1e3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseTimer:
    """The engine's profiler hook: CUDA events per phase, summed per step."""

    def __init__(self) -> None:
        self.events: list[tuple[str, _Event, _Event]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        a, b = _Event(), _Event()
        a.record()
        try:
            yield
        finally:
            b.record()
            self.events.append((name, a, b))

    def take(self) -> dict[str, float]:
        _sync()
        out: dict[str, float] = defaultdict(float)
        for name, a, b in self.events:
            out[name] += a.elapsed_time(b)
        self.events.clear()
        return dict(out)


def time_steps(step, steps: int, timer: PhaseTimer | None = None, warmup: int = 3) -> dict:
    for _ in range(warmup):
        step()
    _sync()
    if timer is not None:
        timer.take()
    totals, phases = [], defaultdict(list)
    for _ in range(steps):
        a, b = _Event(), _Event()
        a.record()
        step()
        b.record()
        _sync()
        totals.append(a.elapsed_time(b))
        if timer is not None:
            for k, v in timer.take().items():
                phases[k].append(v)
    rec = {"step_ms": statistics.median(totals), "step_ms_all": totals}
    if phases:
        rec["phases_ms"] = {k: statistics.median(v) for k, v in phases.items()}
        rec["other_ms"] = rec["step_ms"] - sum(rec["phases_ms"].values())
        ns = [t - p for t, p in zip(totals, phases.get("ns", [0.0] * len(totals)))]
        rec["non_ns_ms"] = statistics.median(ns)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run with --device cpu)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.tiny:
        global HIDDEN, KV, MLP, VOCAB
        HIDDEN, KV, MLP, VOCAB = 64, 16, 128, 100
    torch.manual_seed(0)
    model = Model().to(args.device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    n_params = sum(p.numel() for p in params)
    rec: dict = {"model": f"Llama-3-8B-shaped, {LAYERS} blocks, vocab {VOCAB}, fp32, untied", "params": n_params,
                 "env": environment(), "variants": {}}
    if args.commit:
        rec["env"]["git_commit"] = args.commit
    print(f"params {n_params / 1e9:.3f}B", flush=True)

    def adamw_baseline(ps, name):
        opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=args.device == "cuda")
        r = time_steps(opt.step, args.steps)
        rec["variants"][name] = r
        print(name, f"{r['step_ms']:.2f} ms", flush=True)
        del opt

    adamw_baseline(params, "fused_adamw_all")
    muon_ids = set()
    for variant, kw in [("muonclip_default", {}), ("muonclip_adamw_fused", {"adamw_fused": args.device == "cuda"})]:
        timer = PhaseTimer()
        opt = MuonClip(model, lr=1e-4, weight_decay=0.1, qk_clip=False, profiler=timer, **kw)
        r = time_steps(opt.step, args.steps, timer)
        r["non_ns_over_fused_adamw"] = r["non_ns_ms"] / rec["variants"]["fused_adamw_all"]["step_ms"]
        rec["variants"][variant] = r
        print(variant, json.dumps({k: v for k, v in r.items() if k != "step_ms_all"}), flush=True)
        muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
        if variant == "muonclip_adamw_fused":   # per-bucket NS times (the cost model's per-shape rates)
            from dist_muonclip.newton_schulz import orthogonalize
            g0 = next(g for g in opt.param_groups if g["use_muon"])
            ns_kw = dict(coefficients=g0["ns_coefficients"], steps=g0["ns_steps"], dtype=g0["ns_dtype"],
                         eps=g0["ns_eps"], backend=g0["ns_backend"])
            rows = []
            for b in opt.plan.buckets:
                x = torch.randn(len(b.names), b.m, b.n, device=args.device)
                t = time_steps(lambda: orthogonalize(x, **ns_kw), max(3, args.steps // 2))
                rows.append({"m": b.m, "n": b.n, "k": len(b.names), "ms": t["step_ms"]})
                del x
            rec["ns_buckets"] = rows
            print("ns buckets", rows, flush=True)
        if args.profile and variant == "muonclip_adamw_fused":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                opt.step()
                _sync()
            with open(os.path.join(args.out, "optimizer_step_h200_profile.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        del opt
        if args.device == "cuda":
            torch.cuda.empty_cache()
    adamw_baseline([p for p in params if id(p) not in muon_ids], "fused_adamw_adamw_part_only")
    adamw_baseline([p for p in params if id(p) in muon_ids], "fused_adamw_muon_part_only")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "optimizer_step_h200.json"), "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
