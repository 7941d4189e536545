"""Accuracy table of the Newton-Schulz schedules against the exact polar factor (CPU, float64 oracle).

For each test spectrum, schedule, step count and operand dtype, orthogonalize a matrix
G = U diag(s) V^T and report, against U V^T computed in float64:

    max_sigma_dev = max_i |sigma_i(out) - 1|          (how far from orthogonal)
    rel_polar_err = ||out - U V^T||_F / ||U V^T||_F    (distance to the polar factor)
    min_sigma / max_sigma of the output                (Jordan's band)

Writes one JSON row per configuration to benchmarks/results/ns_accuracy_cpu.json (with torch
version and git commit). Usage:

    python benchmarks/ns_accuracy.py [--size 256] [--steps 3 4 5 6 7 8] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from _common import git_commit
from dist_muonclip.newton_schulz import orthogonalize


def _spectra(r: int) -> dict[str, torch.Tensor]:
    return {
        "flat_0.5_1": torch.linspace(0.5, 1.0, r, dtype=torch.float64),
        "log_1e-1_1": torch.logspace(-1, 0, r, dtype=torch.float64),
        "log_3e-3_1": torch.logspace(math.log10(3e-3), 0, r, dtype=torch.float64),
        "log_1e-3_1": torch.logspace(-3, 0, r, dtype=torch.float64),
        "log_1e-5_1": torch.logspace(-5, 0, r, dtype=torch.float64),
        # gradient-like: a few large directions on top of a noise floor
        "spiked_8_over_noise": torch.cat([torch.logspace(1, 0, 8, dtype=torch.float64),
                                          torch.full((r - 8,), 0.05, dtype=torch.float64)]),
    }


def _matrix(m: int, n: int, s: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(s) @ v.T, u @ v.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="matrices are size x (3/2 size)")
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    parser.add_argument("--schedules", nargs="+", default=["jordan", "polar_express", "cans"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ns_accuracy_cpu.json"))
    args = parser.parse_args()

    m, n = args.size, args.size * 3 // 2
    rows = []
    for spec_name, s in _spectra(m).items():
        g, polar = _matrix(m, n, s, seed=0)
        s_rel_min = float(s.min() / s.norm())
        for dtype in (torch.bfloat16, torch.float64):
            for name in args.schedules:
                for steps in args.steps:
                    t0 = time.perf_counter()
                    out = orthogonalize(g, coefficients=name, steps=steps, dtype=dtype).double()
                    sv = torch.linalg.svdvals(out)
                    rows.append({
                        "spectrum": spec_name, "sigma_min_over_frobenius": s_rel_min,
                        "kappa": float(s.max() / s.min()), "shape": [m, n],
                        "dtype": str(dtype).removeprefix("torch."), "schedule": name, "steps": steps,
                        "max_sigma_dev": float((sv - 1).abs().max()),
                        "rel_polar_err": float((out - polar).norm() / polar.norm()),
                        "min_sigma": float(sv.min()), "max_sigma": float(sv.max()),
                        "seconds_cpu": time.perf_counter() - t0,
                    })
    meta = {"device": "cpu", "platform": platform.platform(), "torch": torch.__version__,
            "git_commit": git_commit(), "size": [m, n]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    # compact console table: rel_polar_err at each step count, bf16
    for spec_name in _spectra(m):
        print(f"\n{spec_name}  (bf16 rel_polar_err|max_sigma_dev at steps {' '.join(map(str, args.steps))})")
        for name in args.schedules:
            cells = [f"{r['rel_polar_err']:.3f}|{r['max_sigma_dev']:.3f}" for r in rows
                     if r["spectrum"] == spec_name and r["schedule"] == name and r["dtype"] == "bfloat16"]
            print(f"  {name:14s} " + "  ".join(cells))
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
