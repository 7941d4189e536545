"""Fixed training runs whose losses and final parameters must not change under a refactor.

Each run is ``launch/train.py`` (single process or ``torchrun`` W=2, gloo on CPU) for a few steps
with QK-Clip at a low tau (so heads are clipped) and writes its per-step losses and the SHA-256 of
the final parameters (``param_sha256``). ``--record`` writes them to a JSON; ``--compare`` re-runs
and reports any difference, bit for bit:

    python benchmarks/fixed_runs.py --record benchmarks/results/fixed_runs_cpu.json
    python benchmarks/fixed_runs.py --compare benchmarks/results/fixed_runs_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--steps", "8", "--batch-size", "4", "--seq-len", "64", "--eval-every", "0", "--eval-batches", "1",
          "--qk-clip-tau", "0.5", "--warmup-steps", "2", "--no-progress", "--log-every", "100", "--device", "cpu"]
RUNS = {
    "single": (1, []),
    "ddp_w2": (2, []),
    "owned_w2": (2, ["--grad-reduction", "optimizer"]),
    "deepspeed_zero2_bf16_w2": (2, ["--deepspeed_config", "configs/zero2_bf16.json"]),
    "fsdp_w2": (2, ["--fsdp"]),
}


def run(name: str, port: int) -> dict:
    nproc, extra = RUNS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "log.json")
        cmd = [sys.executable, "launch/train.py"]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={port}", "launch/train.py"]
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_SKIP_CUDA_CHECK="1")
        subprocess.run(cmd + COMMON + extra + ["--out", out], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        log = json.loads(Path(out).read_text())
    return {"losses": [r["loss"] for r in log["steps"]], "param_sha256": log["param_sha256"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="JSON", help="run and write the results")
    mode.add_argument("--compare", metavar="JSON", help="run and compare with recorded results")
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="a subset of the runs")
    ap.add_argument("--port", type=int, default=29611)
    args = ap.parse_args()
    names = args.only or list(RUNS)
    results = {n: run(n, args.port + i) for i, n in enumerate(names)}
    if args.record:
        Path(args.record).write_text(json.dumps({"args": COMMON, "runs": results}, indent=1))
        print(f"wrote {args.record}")
        return 0
    recorded = json.loads(Path(args.compare).read_text())["runs"]
    bad = [n for n in names if results[n] != recorded[n]]
    for n in names:
        print(f"{n:28s} {'identical' if n not in bad else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
