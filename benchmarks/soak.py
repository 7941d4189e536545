#!/usr/bin/env python
"""Soak run: the quickstart model trained for many steps at W=2 (gloo, CPU) with QK-Clip clipping
every step (low tau) and checkpoints every ``--save-every`` steps, watching for slow leaks.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/soak.py --steps 2000          # spawns 2 ranks
    python benchmarks/soak.py --steps 40 --save-every 10 --out /tmp/soak.json    # quick look

What it records (rank 0 writes ``--out`` JSON and a PNG beside it):

* resident set size (``VmRSS``) of every rank every ``--sample-every`` steps, and the slope of a
  least-squares line through the samples after ``--warmup`` steps (MiB per 1,000 steps): a leak of
  one tensor per step shows as a positive slope, allocator noise as a slope near zero;
* the optimizer state this rank holds (bytes of every tensor in ``optimizer.state``): constant
  after step 1 means no state grows with the step count;
* every Python warning raised after step 1 (``warnings.catch_warnings(record=True)``);
* QK-Clip activity (heads clipped per step, from ``optimizer.metrics()``), losses;
* at the end the SHA-256 of each rank's parameters (DDP: replicas), all-gathered, which must be
  identical on every rank.

The training step is launch/train.py's (same model preset, data, schedule, MuonClip options and
checkpoint writer), so the soak exercises the code users run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (2 most recent kept)")
    p.add_argument("--qk-clip-tau", type=float, default=0.5, help="low tau: QK-Clip clips every step")
    p.add_argument("--warmup", type=int, default=200, help="steps excluded from the RSS slope")
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--port", type=int, default=29871)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak_cpu.json"))
    p.add_argument("--ckpt-dir", default=None, help="default: <out without .json>_ckpt (deleted at the end)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _state_bytes(optimizer) -> int:
    import torch

    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def _slope_per_1000(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, times 1,000 (units of ys per 1,000 steps)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def worker(opts: argparse.Namespace) -> None:
    import shutil

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from launch import train as T
    from dist_muonclip.data import batch_for_step, load_corpus, split_corpus
    from dist_muonclip.models import build_model, load_model_config

    ckpt_dir = Path(opts.ckpt_dir or str(Path(opts.out).with_suffix("")) + "_ckpt")
    args = T.parse_args(["--steps", str(opts.steps), "--qk-clip-tau", str(opts.qk_clip_tau), "--device", "cpu",
                         "--no-progress", "--eval-every", "0", "--save", str(ckpt_dir),
                         # explicit path: the preset directory lookup broke in the support/ move
                         "--model-config", str(REPO / "configs" / "models" / "llama-gqa.json"),
                         "--save-every", str(opts.save_every)])
    ctx = T.setup_distributed("cpu")
    torch.manual_seed(args.seed)
    cfg = load_model_config(args.model, path=args.model_config, overrides=args.overrides)
    model = build_model(cfg, seed=args.seed, attn_implementation=args.attn_implementation, vocab_size=256)
    engine = T.DDPEngine(model, ctx, grad_reduction=args.grad_reduction)
    optimizer = T.build_optimizer(args, model)
    base_lrs = [{k: g[k] for k in ("lr", "adamw_lr") if isinstance(g.get(k), (int, float))}
                for g in optimizer.param_groups]
    corpus = split_corpus(load_corpus(None))
    data_kw = dict(global_batch=args.batch_size, seq_len=args.seq_len, rank=ctx.rank,
                   world_size=ctx.world_size, seed=args.seed, corpus=corpus)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import git_commit

    commit = git_commit()     # the code this run imported (HEAD may move while a long soak runs)
    samples, losses, clipped, max_logits, late_warnings, saves = [], [], [], [], [], []
    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(args.steps):
            n_warn = len(caught)
            factor = T.lr_factor(step, total_steps=args.steps, warmup_steps=args.warmup_steps)
            for group, lrs in zip(optimizer.param_groups, base_lrs):   # train.py's warmup + cosine
                group.update({k: v * factor for k, v in lrs.items()})
            inputs, targets = batch_for_step(step, split="train", **data_kw)
            logits = engine.model(input_ids=inputs, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
            engine.clip_grad_norm_(args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = loss.detach().reshape(1).clone()
            dist.all_reduce(mean_loss)
            losses.append(float(mean_loss) / ctx.world_size)
            m = optimizer.metrics()
            clipped.append(float(m["qk_clip/num_heads_clipped"]))
            max_logits.append(float(m["qk_clip/max_logit"]))
            done = step + 1
            if done % opts.save_every == 0:
                path = T.save_checkpoint(ckpt_dir, step=done, model=model, optimizer=optimizer, args=args, ctx=ctx)
                saves.append(str(path.name))
                if ctx.is_main:   # keep the two most recent: the soak watches memory, not disk
                    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-2]:
                        old.unlink()
            if step >= 1:
                late_warnings += [f"step {step}: {w.category.__name__}: {w.message}" for w in caught[n_warn:]]
            if step == 0 or done % opts.sample_every == 0:
                rss = torch.tensor([float(_rss_bytes())])
                all_rss = [torch.zeros(1) for _ in range(ctx.world_size)]
                dist.all_gather(all_rss, rss)
                samples.append({"step": done, "rss_bytes": [int(r.item()) for r in all_rss],
                                "state_bytes": _state_bytes(optimizer),
                                "wall_s": time.perf_counter() - t_start})
            if ctx.is_main and done % 100 == 0:
                print(f"soak step {done}/{args.steps} loss {losses[-1]:.4f} rss "
                      f"{[r / 2**20 for r in samples[-1]['rss_bytes']]} MiB "
                      f"{time.perf_counter() - t_start:.0f}s", flush=True)
    digest = T.param_checksum(model)
    digests: list[str] = [""] * ctx.world_size
    dist.all_gather_object(digests, digest)
    metric_keys = sorted(optimizer.metrics())
    T.teardown_distributed(ctx)
    if not ctx.is_main:
        return
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    after = [s for s in samples if s["step"] > opts.warmup]
    slopes = [_slope_per_1000([s["step"] for s in after], [s["rss_bytes"][r] / 2**20 for s in after])
              for r in range(ctx.world_size)]
    states = sorted({s["state_bytes"] for s in samples if s["step"] >= 1})
    half = [s for s in samples if s["step"] > opts.steps // 2]
    slopes_half = [_slope_per_1000([s["step"] for s in half], [s["rss_bytes"][r] / 2**20 for s in half])
                   for r in range(ctx.world_size)]
    result = {
        "benchmark": "soak", "steps": args.steps, "world_size": ctx.world_size, "model": cfg.get("model_type"),
        "qk_clip_tau": args.qk_clip_tau, "save_every": opts.save_every, "warmup_steps_excluded": opts.warmup,
        "torch": torch.__version__, "git_commit": commit, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": time.perf_counter() - t_start,
        "rss_slope_mib_per_1000_steps": slopes,
        "rss_slope_mib_per_1000_steps_second_half": slopes_half,
        "rss_mib_after_warmup": [[min(s["rss_bytes"][r] for s in after) / 2**20,
                                  max(s["rss_bytes"][r] for s in after) / 2**20] for r in range(ctx.world_size)]
        if after else None,
        "optimizer_state_bytes_rank0_distinct_after_step1": states,
        "optimizer_state_constant": len(states) == 1,
        "param_sha256_per_rank": digests, "replicas_identical": len(set(digests)) == 1,
        "warnings_after_step1": late_warnings, "num_warnings_after_step1": len(late_warnings),
        "qk_clip_heads_clipped_per_step": {"min": min(clipped), "max": max(clipped),
                                          "mean": sum(clipped) / len(clipped)},
        "steps_with_a_clip": sum(c > 0 for c in clipped),
        "max_logit_before_clip_first_last": [max_logits[0], max_logits[-1]],
        "metric_keys": metric_keys, "checkpoints_written": saves,
        "loss_first_last": [losses[0], losses[-1]], "losses": losses, "samples": samples,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1))
    _plot(result, str(Path(opts.out).with_suffix(".png")))
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "samples")}, indent=1))


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [s["step"] for s in result["samples"]]
    for r in range(result["world_size"]):
        a.plot(steps, [s["rss_bytes"][r] / 2**20 for s in result["samples"]],
               label=f"rank {r} (slope {result['rss_slope_mib_per_1000_steps'][r]:+.2f} MiB/1k steps)")
    a.axvline(result["warmup_steps_excluded"], color="grey", ls=":")
    a.set_xlabel("step"); a.set_ylabel("RSS (MiB)"); a.legend(); a.set_title("resident memory")
    b.plot(range(1, len(result["losses"]) + 1), result["losses"], lw=0.6)
    b.set_xlabel("step"); b.set_ylabel("train loss"); b.set_title(
        f"W={result['world_size']}, tau {result['qk_clip_tau']}, replicas identical: {result['replicas_identical']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.worker:
        worker(opts)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opts.nproc}",
           "--master_addr=127.0.0.1", f"--master_port={opts.port}", __file__, "--worker", *(argv or sys.argv[1:])]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
