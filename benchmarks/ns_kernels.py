"""Newton-Schulz benchmark: Triton kernels vs torch eager vs torch.compile, side by side.

    python benchmarks/ns_kernels.py [--cases 4096x4096,llama3_8b_block] [--no-compile] [--sweep]

Times each case with CUDA events (median, triton.testing.do_bench; every method once per round,
``--rounds`` interleaved rounds, median of rounds), reports ms, speed-up over
torch eager, effective TFLOP/s (standard NS FLOPs / time) and the fraction of the measured bf16
matmul ceiling that the kernels' own FLOPs reach; relative error of each method vs a float64 NS
of the same coefficients. Writes JSON (+ PNG) with device, versions and git commit.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_muonclip.newton_schulz import JORDAN_COEFFICIENTS, polar_express_schedule  # noqa: E402

JORDAN = [JORDAN_COEFFICIENTS] * 5
# Polar Express as the library runs it: 5 iterations, a different (a, b, c) each, safety factor
# folded in (tests/test_newton_schulz.py checks it against the published coefficients).
POLAR_EXPRESS = polar_express_schedule(5)

# case name -> [((rows, cols), count)]: same-shape matrices form one batched bucket.
CASES = {
    "1024x1024": [((1024, 1024), 1)],
    "4096x4096": [((4096, 4096), 1)],
    "8192x8192": [((8192, 8192), 1)],
    "4096x14336": [((4096, 14336), 1)],
    "14336x4096": [((14336, 4096), 1)],
    "bucket_32x1024x1024": [((1024, 1024), 32)],
    # Llama-3-8B decoder block: q, o (4096^2), k, v (1024x4096), gate, up (14336x4096), down (4096x14336).
    "llama3_8b_block": [((4096, 4096), 2), ((1024, 4096), 2), ((14336, 4096), 2), ((4096, 14336), 1)],
}


def std_flops(m: int, n: int, steps: int) -> int:
    m, n = min(m, n), max(m, n)
    return steps * (4 * m * m * n + 2 * m**3)


def sym_flops(m: int, n: int, steps: int) -> int:
    m, n = min(m, n), max(m, n)
    return steps * (3 * m * m * n + m**3)


def gram_flops(m: int, n: int, steps: int, restart_every: int) -> int:
    """FLOPs the Gram kernels execute (symmetric products counted at half)."""
    m, n = min(m, n), max(m, n)
    f = m * m * n  # A_0
    since = 0
    have_q = False
    for k in range(steps):
        if restart_every and since == restart_every:
            f += 2 * m * m * n + m * m * n
            since, have_q = 0, False
        f += m**3  # P
        if have_q:
            f += m**3
        have_q = True
        since += 1
        if k + 1 < steps:
            f += 2 * m**3
    return f + 2 * m * m * n


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_cases(args, env, ceiling) -> list[dict]:
    from _common import median_ms
    from dist_muonclip.kernels import newton_schulz as nsk
    from dist_muonclip.kernels.reference import newton_schulz_reference

    sched = JORDAN if args.schedule == "jordan" else POLAR_EXPRESS
    steps = len(sched)
    eager = lambda x: newton_schulz_reference(x, sched, dtype=torch.bfloat16)  # noqa: E731
    # one graph per bucket shape: raise dynamo's recompile limit so no shape falls back to eager
    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(newton_schulz_reference, dynamic=False) if args.compile else None
    methods = {
        "torch_eager": lambda bucket: [eager(x) for x in bucket.unbind(0)] if bucket.shape[0] > 1 else eager(bucket[0]),
        "torch_eager_batched": lambda bucket: eager(bucket),
        "triton": lambda bucket: nsk.newton_schulz_triton(bucket, sched, restart_every=args.restart_every),
        "triton_standard": lambda bucket: nsk.newton_schulz_triton(bucket, sched, method="standard"),
        "triton_gram": lambda bucket: nsk.newton_schulz_triton(bucket, sched, method="gram",
                                                             restart_every=args.restart_every),
        # opt-in fp16 operands (same tensor-core rate, finer rounding); "auto" method
        "triton_fp16": lambda bucket: nsk.newton_schulz_triton(bucket, sched, restart_every=args.restart_every,
                                                             compute_dtype=torch.float16),
    }
    if compiled is not None:
        methods["torch_compile"] = lambda bucket: compiled(bucket, sched, dtype=torch.bfloat16)
    rows = []
    for name in args.cases:
        spec = CASES[name]
        torch.manual_seed(0)
        buckets = [torch.randn(count, *shape, device="cuda") for shape, count in spec]
        flops_std = sum(std_flops(*shape, steps) * count for shape, count in spec)
        flops_sym = sum(sym_flops(*shape, steps) * count for shape, count in spec)
        flops_gram = sum(gram_flops(*shape, steps, args.restart_every) * count for shape, count in spec)
        # Accuracy: first matrix of each bucket vs float64 NS of the same coefficients.
        errs: dict[str, float] = {}
        broken: set[str] = set()
        for (shape, count), bucket in zip(spec, buckets):
            ref = newton_schulz_reference(bucket[:2].double(), sched, dtype=torch.float64)
            for mname, fn in methods.items():
                if mname == "torch_eager_batched" or mname in broken:
                    continue
                try:
                    out = fn(bucket)
                except Exception as err:  # noqa: BLE001 - report, keep the other methods
                    print(f"[ns] {name} {mname} failed: {err!r}"[:400], flush=True)
                    broken.add(mname)
                    continue
                out = torch.stack(out) if isinstance(out, list) else out
                out = out.reshape(count, *shape)[:2]
                e = rel_err(out, ref)
                errs[mname] = max(errs.get(mname, 0.0), e)
            del ref
        if "triton" in errs:
            errs["triton_over_eager"] = errs["triton"] / errs["torch_eager"]
            errs["triton_gram_over_eager"] = errs["triton_gram"] / errs["torch_eager"]
            errs["triton_standard_over_eager"] = errs["triton_standard"] / errs["torch_eager"]
            if "triton_fp16" in errs:
                errs["triton_fp16_over_eager"] = errs["triton_fp16"] / errs["torch_eager"]
        row = {"case": name, "shapes": [[list(s), c] for s, c in spec], "schedule": args.schedule,
               "steps": steps, "flops_standard": flops_std, "flops_symmetric": flops_sym,
               "floor_ms": flops_sym / (ceiling * 1e12) * 1e3, "rel_err": errs, "ms": {}}
        # Interleaved rounds (every method once per round, median of rounds): the GPU's clock
        # drifts by a few percent over a run, which would otherwise land on whichever method
        # happened to be timed in a slow stretch.
        timed = [m for m in methods if not ((m == "torch_eager_batched" and all(c == 1 for _, c in spec))
                                            or m in broken)]
        row["rounds_ms"] = {m: [] for m in timed}
        for _ in range(args.rounds):
            for mname in timed:
                fn = methods[mname]
                row["rounds_ms"][mname].append(
                    median_ms(lambda: [fn(b) for b in buckets], warmup_ms=args.warmup, rep_ms=args.rep))
        row["ms"] = {m: statistics.median(v) for m, v in row["rounds_ms"].items()}
        base = row["ms"]["torch_eager"]
        row["speedup_vs_eager"] = {k: base / v for k, v in row["ms"].items()}
        row["effective_tflops"] = {k: flops_std / (v * 1e-3) / 1e12 for k, v in row["ms"].items()}
        row["kernel_frac_of_ceiling"] = {
            "triton_standard": flops_sym / (row["ms"]["triton_standard"] * 1e-3) / 1e12 / ceiling,
            "triton_gram": flops_gram / (row["ms"]["triton_gram"] * 1e-3) / 1e12 / ceiling,
        }
        rows.append(row)
        ms = "  ".join(f"{k}={v:.3f}" for k, v in row["ms"].items())
        print(f"[ns] {name:22s} {ms}  | x eager: auto {row['speedup_vs_eager']['triton']:.2f} "
              f"std {row['speedup_vs_eager']['triton_standard']:.2f} gram {row['speedup_vs_eager']['triton_gram']:.2f} | err/eager triton "
              f"{errs.get('triton_over_eager', float('nan')):.2f} gram {errs.get('triton_gram_over_eager', float('nan')):.2f}"
              f" | floor {row['floor_ms']:.2f} ms", flush=True)
        del buckets
        torch.cuda.empty_cache()
    return rows


SYM_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=6),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
]


def run_ill_conditioned(args) -> list[dict]:
    """Accuracy on inputs with a decaying spectrum (sigma from 1 to 1e-4, like real momentum):
    the case where bf16 Gram NS can drift. Error / torch eager's error, both vs float64."""
    from dist_muonclip.kernels import newton_schulz as nsk
    from dist_muonclip.kernels.reference import newton_schulz_reference

    rows = []
    for (m, n) in [(1024, 4096), (4096, 14336), (2048, 2048)]:
        torch.manual_seed(1)
        U, _ = torch.linalg.qr(torch.randn(m, m, device="cuda", dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, m, device="cuda", dtype=torch.float64))
        x = (U * torch.logspace(0, -4, m, device="cuda", dtype=torch.float64)) @ V.mT
        for sname, sched in [("jordan", JORDAN), ("polar_express", POLAR_EXPRESS)]:
            ref = newton_schulz_reference(x, sched, dtype=torch.float64)
            e = rel_err(newton_schulz_reference(x.float(), sched, dtype=torch.bfloat16), ref)
            row = {"shape": [m, n], "schedule": sname, "eager_err": e}
            for meth in ("standard", "gram", "auto"):
                out = nsk.newton_schulz_triton(x.float(), sched, method=meth)
                row[f"{meth}_over_eager"] = rel_err(out, ref) / e
                try:
                    out = nsk.newton_schulz_triton(x.float(), sched, method=meth, compute_dtype=torch.float16)
                    row[f"{meth}_fp16_over_eager"] = rel_err(out, ref) / e
                except Exception as err:  # noqa: BLE001
                    print(f"[ns-ill] fp16 {meth} failed: {err!r}"[:300], flush=True)
            rows.append(row)
            print(f"[ns-ill] {m}x{n} {sname}: eager {e:.4f} standard x{row['standard_over_eager']:.2f} "
                  f"gram x{row['gram_over_eager']:.2f} auto x{row['auto_over_eager']:.2f}", flush=True)
        del U, V, x
        torch.cuda.empty_cache()
    return rows


def run_sweep(args, ceiling) -> list[dict]:
    """Per-kernel tile sweep: TFLOP/s of each config on the NS operand shapes."""
    from _common import median_ms
    from dist_muonclip.kernels import newton_schulz as nsk

    out = []
    for bt, m, n in [(1, 4096, 4096), (1, 8192, 8192), (1, 4096, 14336), (32, 1024, 1024)]:
        X = torch.randn(bt, m, n, device="cuda").bfloat16() / 50
        A = torch.empty(bt, m, m, device="cuda", dtype=torch.bfloat16)
        Bm = torch.empty_like(A)
        O = torch.empty_like(X)
        nsk.sym_product(X, out=A)
        for use_tma in args.sweep_w_tma:
          for cfg in SYM_CONFIGS:
            rec = {"bt": bt, "m": m, "n": n, "cfg": cfg, "w_tma": use_tma}
            nsk.SYM_W_VIA_TMA = use_tma
            try:
                nsk.SYM_CONFIG_OVERRIDE = cfg
                t1 = median_ms(lambda: nsk.sym_product(X, out=A), warmup_ms=50, rep_ms=200)
                t2 = median_ms(lambda: nsk.sym_product(A, None, A, out=Bm, alpha=2.0, beta=-4.0), warmup_ms=50, rep_ms=200)
                nsk.SYM_CONFIG_OVERRIDE = None
                nsk.GEMM_CONFIG_OVERRIDE = cfg
                t3 = median_ms(lambda: nsk.gemm_axpy(Bm, X, out=O, a=3.0), warmup_ms=50, rep_ms=200)
                rec.update(xxt_ms=t1, aa_ms=t2, bx_ms=t3,
                           xxt_tflops=bt * m * m * n / t1 / 1e9, aa_tflops=bt * m**3 / t2 / 1e9,
                           bx_tflops=2 * bt * m * m * n / t3 / 1e9)
            except Exception as err:  # noqa: BLE001 - a config that does not fit is a data point
                rec["error"] = repr(err)[:200]
            finally:
                nsk.SYM_CONFIG_OVERRIDE = None
                nsk.GEMM_CONFIG_OVERRIDE = None
                nsk.SYM_W_VIA_TMA = None
            out.append(rec)
            if "error" in rec:
                print(f"[sweep] {bt}x{m}x{n} tma={use_tma} {cfg} ERROR {rec['error']}", flush=True)
            else:
                print(f"[sweep] {bt}x{m}x{n} w_tma={int(use_tma)} BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} BK{cfg['BLOCK_K']} w{cfg['num_warps']} "
                      f"s{cfg['num_stages']}: XXt {rec['xxt_tflops']:.0f} AA {rec['aa_tflops']:.0f} BX {rec['bx_tflops']:.0f} TF/s", flush=True)
        # cuBLAS reference for the same products
        tx = median_ms(lambda: torch.matmul(X, X.mT), warmup_ms=50, rep_ms=200)
        tb = median_ms(lambda: torch.matmul(Bm, X), warmup_ms=50, rep_ms=200)
        out.append({"bt": bt, "m": m, "n": n, "cublas_xxt_tflops": 2 * bt * m * m * n / tx / 1e9,
                    "cublas_bx_tflops": 2 * bt * m * m * n / tb / 1e9})
        print(f"[sweep] {bt}x{m}x{n} cuBLAS XXt {out[-1]['cublas_xxt_tflops']:.0f} BX {out[-1]['cublas_bx_tflops']:.0f} TF/s", flush=True)
        del X, A, Bm, O
        torch.cuda.empty_cache()
    return out


def plot(rows: list[dict], path: str, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["torch_eager", "torch_compile", "triton_standard", "triton_gram", "triton"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.16
    for i, mth in enumerate(methods):
        vals = [r["speedup_vs_eager"].get(mth, 0.0) for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=mth)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))])
    ax.set_xticklabels([r["case"] for r in rows], rotation=20, fontsize=8)
    ax.set_ylabel("speed-up over torch eager (x)")
    ax.set_title(f"Newton-Schulz 5 steps bf16, {env['device']} (torch {env['torch']}, triton {env['triton']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--schedule", choices=["jordan", "polar_express"], default="jordan")
    p.add_argument("--restart-every", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--sweep", action="store_true", help="also sweep kernel tile configs")
    p.add_argument("--no-cases", dest="run_cases", action="store_false")
    p.add_argument("--sweep-w-tma", default="1,0", help="sym-kernel epilogue W via TMA (1) / loads (0)")
    p.add_argument("--warmup", type=float, default=100.0)
    p.add_argument("--rep", type=float, default=300.0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per case")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default="ns_kernels")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.sweep_w_tma = [bool(int(v)) for v in args.sweep_w_tma.split(",")]
    for c in args.cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    from _common import environment, matmul_ceiling_tflops, write_json

    env = environment()
    ceiling = matmul_ceiling_tflops()
    print(f"[ns] {env}  ceiling {ceiling:.0f} TFLOP/s", flush=True)
    payload = {"env": env, "ceiling_tflops": ceiling, "schedule": args.schedule, "restart_every": args.restart_every}
    if args.sweep:
        payload["sweep"] = run_sweep(args, ceiling)
    if args.run_cases:
        payload["rows"] = run_cases(args, env, ceiling)
        payload["ill_conditioned"] = run_ill_conditioned(args)
    write_json(os.path.join(args.out, f"{args.tag}.json"), payload)
    if payload.get("rows"):
        plot(payload["rows"], os.path.join(args.out, f"{args.tag}.png"), env)
    return payload


if __name__ == "__main__":
    main()
