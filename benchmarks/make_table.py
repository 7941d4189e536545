"""Markdown tables (README / NOTES) from benchmarks/results/{ns_kernels,max_logit}{suffix}.json.

    python benchmarks/make_table.py [--dir benchmarks/results] [--suffix _h200]
"""
from __future__ import annotations

import argparse
import json
import os


def ns_table(d: dict) -> str:
    env = d["env"]
    lines = [f"NS5 ({d['schedule']}, bf16), {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['git_commit'][:10]}; measured bf16 matmul ceiling {d['ceiling_tflops']:.0f} TFLOP/s. "
             "Times in ms (median, CUDA events" + ("; every method once per round, median of "
                                                  f"{len(next(iter(d['rows'][0]['rounds_ms'].values())))} interleaved rounds"
                                                  if d["rows"] and "rounds_ms" in d["rows"][0] else "")
             + "); x = speed-up over torch eager; err = relative error vs float64 NS "
             "of the same coefficients, over torch eager's.", "",
             "| case | torch eager | torch.compile | Triton (auto) | x eager | Triton standard | Triton Gram | floor | err / eager |"
             + (" Triton fp16 (ms, err / eager) |" if any("triton_fp16" in r["ms"] for r in d["rows"]) else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if any("triton_fp16" in r["ms"] for r in d["rows"]) else "")]
    for r in d["rows"]:
        ms = r["ms"]
        comp = f"{ms['torch_compile']:.2f}" if "torch_compile" in ms else "-"
        eager = ms["torch_eager"]
        lines.append(f"| {r['case']} | {eager:.2f} | {comp} | **{ms['triton']:.2f}** | **{eager / ms['triton']:.2f}x** | "
                     f"{ms['triton_standard']:.2f} | {ms['triton_gram']:.2f} | {r['floor_ms']:.2f} | "
                     f"{r['rel_err'].get('triton_over_eager', float('nan')):.2f} |"
                     + (f" {ms['triton_fp16']:.2f}, {r['rel_err'].get('triton_fp16_over_eager', float('nan')):.2f} |"
                        if "triton_fp16" in ms else ""))
    if d.get("ill_conditioned"):
        lines += ["", "Ill-conditioned inputs (singular values 1 .. 1e-4), error over torch eager's:", "",
                  "| shape | schedule | standard | Gram | auto |", "|---|---|---|---|---|"]
        for r in d["ill_conditioned"]:
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['schedule']} | {r['standard_over_eager']:.2f} | "
                         f"{r['gram_over_eager']:.2f} | {r['auto_over_eager']:.2f} |")
    return "\n".join(lines)


def ml_table(d: dict) -> str:
    env = d["env"]
    lines = [f"Max-logit tracking, causal, 32 heads / 8 KV heads, d=128, bf16, {env['device']}, torch {env['torch']}, "
             f"triton {env['triton']}, commit {env['git_commit'][:10]}. ms (median); % = added to SDPA fwd+bwd. "
             "SDPA, fused and SDPA + kernel: interleaved rounds, median of rounds (where the JSON has them).", "",
             "| B, S | SDPA fwd+bwd | fused attention+max (fwd+bwd) | SDPA + Triton max-logit kernel | "
             "Triton max-logit kernel alone | chunked torch | materialized | FlexAttention+max_scores (fwd+bwd) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        ms = dict(r["ms"], **r.get("paired_ms", {}))
        base = ms["sdpa_fwd_bwd"]

        def cell(key):
            return f"{ms[key]:.2f} (+{100 * (ms[key] / base - (1 if key.endswith('with_max') else 0)):.0f}%)" if key in ms else "-"

        fused = (f"{ms['fused_fwd_bwd_with_max']:.2f} (**+{100 * (ms['fused_fwd_bwd_with_max'] / base - 1):.1f}%**)"
                 if "fused_fwd_bwd_with_max" in ms else "-")
        alone = f"{ms['triton_max_logit']:.3f} (+{100 * ms['triton_max_logit'] / base:.1f}%)"
        step = (f"{ms['sdpa_fwd_bwd_plus_triton']:.2f} (+{100 * (ms['sdpa_fwd_bwd_plus_triton'] / base - 1):.1f}%)"
                if "sdpa_fwd_bwd_plus_triton" in ms else "-")
        chunk = f"{ms['chunked_torch']:.2f} (+{100 * ms['chunked_torch'] / base:.0f}%)"
        mat = f"{ms['materialized']:.2f} (+{100 * ms['materialized'] / base:.0f}%)" if "materialized" in ms else "-"
        flex = (f"{ms['flex_fwd_bwd_with_max']:.2f} (+{100 * (ms['flex_fwd_bwd_with_max'] / base - 1):.0f}%)"
                if "flex_fwd_bwd_with_max" in ms else "-")
        lines.append(f"| {r['B']}, {r['S']} | {base:.2f} | {fused} | {step} | {alone} | {chunk} | {mat} | {flex} |")
    errs = [r.get("max_rel_err_vs_float64") for r in d["rows"] if r.get("max_rel_err_vs_float64") is not None]
    if errs:
        lines += ["", f"Max-logit kernel vs float64 reference: max relative error {max(errs):.1e} (fp32 accumulation)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--suffix", default="", help="file-name suffix of the run, e.g. _h200")
    args = p.parse_args()
    for name, fn in ((f"ns_kernels{args.suffix}.json", ns_table), (f"max_logit{args.suffix}.json", ml_table)):
        path = os.path.join(args.dir, name)
        if os.path.exists(path):
            with open(path) as f:
                print(fn(json.load(f)))
                print()


if __name__ == "__main__":
    main()
