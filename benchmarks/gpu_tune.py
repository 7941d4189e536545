"""One device call that tunes the kernels the issue-7 goals hinge on, and times them fairly.

    python benchmarks/gpu_tune.py [--out DIR] [--skip-ns] [--skip-attn] [--rounds 3]

1. Newton-Schulz: each kernel role (X X^T, the fused b A + c A A, a X + B X) per tile config, TMA
   epilogue choice and cuBLAS for the plain product; then whole NS runs, interleaved with torch
   eager in rounds (eager, variant, eager, variant, ...), median of the rounds, so clock drift
   hits every variant alike.
2. Attention forward with the max: pointer vs TMA kernels, tile configs, warp specialization;
   each checked against the pointer kernel; then fwd + bwd against SDPA, interleaved in rounds.

Writes ``gpu_tune.json`` (device, versions, commit) and prints a short table last.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_muonclip.newton_schulz import JORDAN_COEFFICIENTS  # noqa: E402

JORDAN = [JORDAN_COEFFICIENTS] * 5

SYM_CFGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
]
GEMM_CFGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
]
SIZES = [(1, 4096, 4096), (1, 8192, 8192), (32, 1024, 1024), (1, 2048, 2048)]
NS_CASES = {
    "1024x1024": [((1024, 1024), 1)],
    "4096x4096": [((4096, 4096), 1)],
    "8192x8192": [((8192, 8192), 1)],
    "bucket_32x1024x1024": [((1024, 1024), 32)],
    "llama3_8b_block": [((4096, 4096), 2), ((1024, 4096), 2), ((14336, 4096), 2), ((4096, 14336), 1)],
}


def _cfgname(c: dict) -> str:
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}w{c['num_warps']}s{c['num_stages']}"


def _time(fn, median_ms) -> float:
    try:
        return median_ms(fn, warmup_ms=40, rep_ms=150)
    except Exception as err:  # noqa: BLE001 - a config that does not compile / fit
        print(f"  ! {err!r}"[:300], flush=True)
        return float("inf")


def ns_role_sweep(res: dict) -> dict:
    from _common import median_ms
    from dist_muonclip.kernels import newton_schulz as nsk

    best: dict = {}
    res["ns_roles"] = rows = []
    for bt, m, n in SIZES:
        torch.manual_seed(0)
        X = torch.randn(bt, m, n, device="cuda", dtype=torch.bfloat16)
        X /= X.norm(dim=(-2, -1), keepdim=True)
        A = torch.empty(bt, m, m, device="cuda", dtype=torch.bfloat16)
        Bm = torch.empty_like(A)
        O = torch.empty_like(X)
        nsk.sym_product(X, out=A)
        sym_fl = bt * m * m * n  # half of 2 m^2 n
        aa_fl = bt * m * m * m
        bx_fl = 2 * bt * m * m * n
        key = f"{bt}x{m}x{n}"
        for cfg in SYM_CFGS:
            nsk.SYM_CONFIG_OVERRIDE = cfg
            t1 = _time(lambda: nsk.sym_product(X, out=A), median_ms)
            for wt in (False, True):
                nsk.SYM_W_VIA_TMA = wt
                t2 = _time(lambda: nsk.sym_product(A, None, A, out=Bm, alpha=2.0, beta=-4.0), median_ms)
                rows.append({"size": key, "role": f"aa_wtma{int(wt)}", "cfg": cfg, "ms": t2,
                             "tflops": aa_fl / t2 / 1e9})
                best.setdefault((key, "aa"), []).append((t2, cfg, wt))
            nsk.SYM_W_VIA_TMA = None
            rows.append({"size": key, "role": "xxt", "cfg": cfg, "ms": t1, "tflops": sym_fl / t1 / 1e9})
            best.setdefault((key, "xxt"), []).append((t1, cfg, None))
            print(f"[role] {key} {_cfgname(cfg)} xxt {sym_fl / t1 / 1e9:.0f} TF/s  "
                  f"aa {min(r['tflops'] for r in rows[-3:-1]):.0f}-{max(r['tflops'] for r in rows[-3:-1]):.0f}",
                  flush=True)
        nsk.SYM_CONFIG_OVERRIDE = None
        for cfg in GEMM_CFGS:
            nsk.GEMM_CONFIG_OVERRIDE = cfg
            t3 = _time(lambda: nsk.gemm_axpy(Bm, X, out=O, a=3.0), median_ms)
            rows.append({"size": key, "role": "bx", "cfg": cfg, "ms": t3, "tflops": bx_fl / t3 / 1e9})
            best.setdefault((key, "bx"), []).append((t3, cfg, "triton"))
            print(f"[role] {key} {_cfgname(cfg)} bx {bx_fl / t3 / 1e9:.0f} TF/s", flush=True)
        nsk.GEMM_CONFIG_OVERRIDE = None
        t4 = _time(lambda: torch.baddbmm(X, Bm, X, beta=3.0, out=O), median_ms)
        rows.append({"size": key, "role": "bx", "cfg": "cublas", "ms": t4, "tflops": bx_fl / t4 / 1e9})
        best.setdefault((key, "bx"), []).append((t4, None, "cublas"))
        print(f"[role] {key} cublas bx {bx_fl / t4 / 1e9:.0f} TF/s", flush=True)
        del X, A, Bm, O
        torch.cuda.empty_cache()
    picks = {}
    for (key, role), lst in best.items():
        t, cfg, extra = min(lst, key=lambda r: r[0])
        picks[f"{key}:{role}"] = {"ms": t, "cfg": cfg, "extra": extra}
    res["ns_role_picks"] = picks
    return picks


def _tuned_configs(picks: dict):
    """Config functions choosing the per-role winner of the nearest measured size."""
    def nearest(m: int, bt: int) -> str:
        if bt > 1 and m <= 1024:
            return "32x1024x1024"
        if m <= 2048:
            return "1x2048x2048"
        return "1x4096x4096" if m <= 4096 else "1x8192x8192"

    def sym_config(m, k, fused=False):
        p = picks[f"{nearest(m, _CUR_BT[0])}:{'aa' if fused else 'xxt'}"]
        return dict(p["cfg"])

    def gemm_config(m, n, k):
        p = picks[f"{nearest(m, _CUR_BT[0])}:bx"]
        return dict(p["cfg"] or GEMM_CFGS[0])  # a cuBLAS pick has no tiles: the Triton default then

    def aa_wtma(m):
        return bool(picks[f"{nearest(m, _CUR_BT[0])}:aa"]["extra"])

    return sym_config, gemm_config, aa_wtma


_CUR_BT = [1]


def ns_end_to_end(res: dict, picks: dict | None, rounds: int) -> None:
    from _common import median_ms
    from dist_muonclip.kernels import newton_schulz as nsk
    from dist_muonclip.kernels.reference import newton_schulz_reference

    orig_sym, orig_gemm = nsk.sym_config, nsk.gemm_config
    eager = lambda x: newton_schulz_reference(x, JORDAN, dtype=torch.bfloat16)  # noqa: E731

    def setup(sym=None, gemm=None, cublas=False, wtma=None):
        nsk.sym_config = sym or orig_sym
        nsk.gemm_config = gemm or orig_gemm
        nsk.GEMM_BACKEND = "cublas" if cublas else "triton"
        nsk.SYM_W_VIA_TMA = wtma
        nsk.clear_graph_cache()  # graphs are keyed by shape, not by config

    variants = {
        "current": dict(kw={}, cfg={}),
        "nograph": dict(kw={"cuda_graph": False}, cfg={}),
        "cublas_bx": dict(kw={"cuda_graph": False}, cfg={"cublas": True}),
    }
    if picks:
        sym_c, gemm_c, aa_w = _tuned_configs(picks)
        variants["tuned"] = dict(kw={"cuda_graph": False}, cfg={"sym": sym_c, "gemm": gemm_c}, tuned=True)
        variants["tuned_cublas_bx"] = dict(kw={"cuda_graph": False}, cfg={"sym": sym_c, "gemm": gemm_c,
                                                                       "cublas": True}, tuned=True)
        variants["tuned_graph"] = dict(kw={"cuda_graph": True}, cfg={"sym": sym_c, "gemm": gemm_c}, tuned=True,
                                       only_small=True)
    res["ns_end_to_end"] = out = []
    for name, spec in NS_CASES.items():
        torch.manual_seed(0)
        buckets = [torch.randn(count, *shape, device="cuda") for shape, count in spec]
        row = {"case": name, "ms": {}, "rounds": {}, "rel_err": {}}
        small = all(s[0] * s[1] <= 2048 * 2048 for s, _ in spec)

        def run_variant(spec_v):
            cfg = dict(spec_v["cfg"])
            if spec_v.get("tuned"):
                m = min(spec[0][0])
                cfg.setdefault("wtma", aa_w(m))
            setup(**cfg)

            def fn():
                for b in buckets:
                    _CUR_BT[0] = b.shape[0]
                    nsk.newton_schulz_triton(b, JORDAN, **spec_v["kw"])
            return fn

        fns = {"torch_eager": lambda: [eager(x) for b in buckets for x in b.unbind(0)]}
        for vname, spec_v in variants.items():
            if spec_v.get("only_small") and not small:
                continue
            fns[vname] = run_variant(spec_v)
            try:  # accuracy of this variant vs float64 on the first matrix of each bucket
                errs = []
                for b in buckets:
                    _CUR_BT[0] = b.shape[0]
                    o = nsk.newton_schulz_triton(b, JORDAN, **spec_v["kw"]).float()[:1]
                    r = newton_schulz_reference(b[:1].double(), JORDAN, dtype=torch.float64)
                    e = newton_schulz_reference(b[:1], JORDAN, dtype=torch.bfloat16).double()
                    errs.append(((o.double() - r).norm() / r.norm()).item() / ((e - r).norm() / r.norm()).item())
                row["rel_err"][vname + "_over_eager"] = max(errs)
            except Exception as err:  # noqa: BLE001
                print(f"[ns] {name} {vname} failed: {err!r}"[:300], flush=True)
                fns.pop(vname)
        setup()
        for r in range(rounds):
            for vname, fn in fns.items():
                if vname != "torch_eager":
                    run_variant(variants[vname])  # restore the variant's module settings
                t = _time(fn, median_ms)
                row["rounds"].setdefault(vname, []).append(t)
                setup()
        row["ms"] = {k: statistics.median(v) for k, v in row["rounds"].items()}
        base = row["ms"]["torch_eager"]
        row["speedup_vs_eager"] = {k: base / v for k, v in row["ms"].items()}
        out.append(row)
        print(f"[ns] {name:20s} " + "  ".join(f"{k}={v:.3f}({base / v:.2f}x)" for k, v in row["ms"].items())
              + "  err/eager " + " ".join(f"{k.replace('_over_eager', '')}={v:.2f}" for k, v in row["rel_err"].items()),
              flush=True)
        del buckets
        torch.cuda.empty_cache()
    setup()


ATTN_CFGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
]


def attention(res: dict, rounds: int, shapes) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from _common import median_ms
    from dist_muonclip.kernels import attention_max as am

    H, Hkv, D = 32, 8, 128
    scale = D ** -0.5
    res["attention"] = out = []
    for B, S in shapes:
        torch.manual_seed(0)
        q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        row = {"B": B, "S": S, "H": H, "Hkv": Hkv, "D": D, "fwd": [], "rounds": {}}
        am.FWD_USE_TMA, am.FWD_CONFIG_OVERRIDE = False, None
        ref_o, ref_lse, ref_mx = am.attention_forward_with_max_triton(qd, kd, vd, scale=scale, causal=True)
        fwd = lambda: am.attention_forward_with_max_triton(qd, kd, vd, scale=scale, causal=True)  # noqa: E731
        cands = []
        for tma in (False, True):
            ws = False  # Triton's warp specialization: no gain here (triton 3.6, H100), fails at 64 x 64
            for cfg in ATTN_CFGS:
                am.FWD_USE_TMA, am.FWD_CONFIG_OVERRIDE = tma, cfg
                try:
                    o, lse, mx = fwd()
                    diff = max((o.float() - ref_o.float()).abs().max().item(), (lse - ref_lse).abs().max().item())
                    same_max = torch.equal(mx, ref_mx) or (mx - ref_mx).abs().max().item() <= 1e-6 * ref_mx.abs().max().item()
                    t = _time(fwd, median_ms)
                except Exception as err:  # noqa: BLE001
                    print(f"[attn] B{B} S{S} tma{int(tma)} ws{int(ws)} {cfg}: {err!r}"[:300], flush=True)
                    row["fwd"].append({"tma": tma, "ws": ws, "cfg": cfg, "error": repr(err)[:300]})
                    continue
                ok = diff < 2e-2 and same_max
                row["fwd"].append({"tma": tma, "ws": ws, "cfg": cfg, "ms": t, "max_diff_vs_ptr": diff,
                                   "max_logit_same": bool(same_max)})
                if ok:
                    cands.append((t, tma, ws, cfg))
                print(f"[attn] B{B} S{S} tma{int(tma)} ws{int(ws)} BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} "
                      f"w{cfg['num_warps']} s{cfg['num_stages']}: {t:.3f} ms diff {diff:.1e} max_same {same_max}",
                      flush=True)
        t_best, tma, ws, cfg = min(cands, key=lambda c: c[0])
        row["best_fwd"] = {"ms": t_best, "tma": tma, "ws": ws, "cfg": cfg}

        def sdpa_default():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            o.backward(do)

        def sdpa_cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            o.backward(do)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)

        def set_best():
            am.FWD_USE_TMA, am.FWD_CONFIG_OVERRIDE = tma, cfg

        def fused_best():
            set_best()
            o, _ = am.attention_with_max_logits(q, k, v, scale=scale, causal=True)
            o.backward(do)

        def fused_default():
            am.FWD_USE_TMA, am.FWD_CONFIG_OVERRIDE = False, None
            o, _ = am.attention_with_max_logits(q, k, v, scale=scale, causal=True)
            o.backward(do)

        def fused_fwd_best():
            set_best()
            fwd()

        fns = {"sdpa_fwd_bwd": sdpa_default, "sdpa_cudnn_fwd_bwd": sdpa_cudnn, "fused_best_fwd_bwd": fused_best,
               "fused_current_fwd_bwd": fused_default, "sdpa_fwd": sdpa_fwd, "fused_best_fwd": fused_fwd_best}
        for _ in range(rounds):
            for name, fn in fns.items():
                for t_ in (q, k, v):
                    t_.grad = None
                row["rounds"].setdefault(name, []).append(_time(fn, median_ms))
        row["ms"] = {n: statistics.median(v) for n, v in row["rounds"].items()}
        base = row["ms"]["sdpa_fwd_bwd"]
        row["overhead_vs_sdpa"] = {n: row["ms"][n] / base - 1 for n in ("fused_best_fwd_bwd", "fused_current_fwd_bwd")}
        row["overhead_vs_sdpa_cudnn"] = row["ms"]["fused_best_fwd_bwd"] / row["ms"]["sdpa_cudnn_fwd_bwd"] - 1
        out.append(row)
        print(f"[attn] B{B} S{S} best fwd tma{int(tma)} ws{int(ws)} {cfg}: " + "  ".join(
            f"{n}={v:.3f}" for n, v in row["ms"].items()) + f"  overhead {row['overhead_vs_sdpa']}", flush=True)
        am.FWD_USE_TMA, am.FWD_CONFIG_OVERRIDE = True, None
        del q, k, v, do
        torch.cuda.empty_cache()


def main() -> None:
    from _common import environment, write_json

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    p.add_argument("--skip-ns", action="store_true")
    p.add_argument("--skip-roles", action="store_true")
    p.add_argument("--skip-attn", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attn-shapes", default="1x4096,1x8192,4x4096,4x8192")
    args = p.parse_args()
    res = {"env": environment()}
    path = os.path.join(args.out, "gpu_tune.json")
    t0 = time.time()
    print(f"[tune] {res['env']}", flush=True)
    if not args.skip_attn:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.attn_shapes.split(",")]
        attention(res, args.rounds, shapes)
        write_json(path, res)
        print(f"[tune] attention done {time.time() - t0:.0f}s", flush=True)
    if not args.skip_ns:
        picks = None if args.skip_roles else ns_role_sweep(res)
        write_json(path, res)
        print(f"[tune] roles done {time.time() - t0:.0f}s", flush=True)
        for k, v in (picks or {}).items():
            print(f"[pick] {k}: {v['ms']:.4f} ms {v['cfg'] and _cfgname(v['cfg'])} {v['extra']}", flush=True)
        ns_end_to_end(res, picks, args.rounds)
        write_json(path, res)
        print(f"[tune] ns done {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
