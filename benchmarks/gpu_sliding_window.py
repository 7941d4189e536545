"""Max-logit tracking on a Mistral-shaped sliding-window model (issue 19): why it cost +106%, and
what it costs with the window in the fused attention+max kernel.

    python benchmarks/gpu_sliding_window.py --out benchmarks/results/sliding_window_h200.json \
        [--profile-dir DIR] [--layers 4] [--seq 4096] [--batch 1] [--window 1024]

Model level: a 4-layer Mistral-7B-shaped model (hidden 4096, 32 query / 8 KV heads of 128,
MLP 14336, vocab 32000), bf16, SDPA, forward + backward of the LM loss, interleaved rounds of

    untracked   no tracking installed (HF's SDPA with its 4-D sliding-window mask)
    torch_max   tracking as before this change: SDPA with the mask + the chunked torch max
                (the glue sent every sliding-window call there)
    kernel_max  SDPA with the mask + the Triton max-logit kernel reading the mask
    fused       the fused attention+max kernel with the window (this change)

ratios per round against ``untracked`` (median over rounds). Attention level: the same
attention alone (B, S from the lists), fwd+bwd, SDPA-with-mask vs fused, CUDA events
(do_bench median). ``--profile-dir`` writes torch.profiler tables of one tracked step of
``torch_max`` and ``fused``. Exactness: the fused record vs the float64 chunked max of the same
q, k (a hook keeps each layer's q, k).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_model(layers: int, seq: int, window: int):
    import transformers

    cfg = transformers.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=window,
        max_position_embeddings=max(seq, 8192), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.MistralForCausalLM(cfg)
    return model.to(torch.bfloat16).train()


def attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


class Variant:
    """Install / remove one tracking configuration on the model."""

    def __init__(self, name, model):
        self.name, self.model, self.tracker, self.handle = name, model, None, None

    def __enter__(self):
        from dist_muonclip.integrations import transformers_attention as hfa
        from dist_muonclip.tracker import MaxLogitTracker

        self._saved = hfa._fused_attention
        if self.name == "untracked":
            return self
        mods = attention_modules(self.model)
        self.tracker = MaxLogitTracker([32] * len(mods), modules=mods, device="cuda",
                                       backend="torch" if self.name == "torch_max" else "auto")
        if self.name in ("torch_max", "kernel_max"):
            hfa._fused_attention = lambda: None
        self.handle = self.tracker.install_hf(self.model)
        return self

    def __exit__(self, *exc):
        from dist_muonclip.integrations import transformers_attention as hfa

        hfa._fused_attention = self._saved
        if self.handle is not None:
            self.handle.remove()


def step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def time_steps(model, ids, n):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step(model, ids)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def model_level(args, env) -> dict:
    model = build_model(args.layers, args.seq, args.window)
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    names = ["untracked", "torch_max", "kernel_max", "fused"]
    for name in names:  # warm-up: compile kernels, cuDNN / flash plans
        with Variant(name, model):
            for _ in range(2):
                step(model, ids)
    torch.cuda.synchronize()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate order against drift
        for name in order:
            with Variant(name, model):
                times[name].append(time_steps(model, ids, args.steps))
        print(f"[sw] round {r}: " + " ".join(f"{n} {times[n][-1]:.2f}" for n in names), flush=True)
    ratios = {n: statistics.median(t / u for t, u in zip(times[n], times["untracked"])) for n in names}
    # exactness at model scale: the fused record vs the float64 max of the same layers' q, k
    exact = check_exact(model, ids, args.window)
    if args.profile_dir:
        profile(model, ids, args.profile_dir)
    return {"shape": dict(layers=args.layers, batch=args.batch, seq=args.seq, window=args.window, hidden=4096,
                          heads=32, kv_heads=8, head_dim=128, dtype="bf16"),
            "ms_median": {n: statistics.median(t) for n, t in times.items()}, "ms_rounds": times,
            "ratio_vs_untracked_median": ratios, "exact": exact}


def check_exact(model, ids, window) -> dict:
    """Per layer: the fused path's record vs the chunked float64 max of the q, k it saw."""
    from dist_muonclip.integrations import transformers_attention as hfa
    from dist_muonclip.tracker import max_logits_torch

    seen = []
    real = hfa._fused_attention()

    def spy(q, k, v, **kw):
        seen.append((q.detach().clone(), k.detach().clone(), kw))
        return real(q, k, v, **kw)

    saved = hfa._fused_attention
    with Variant("fused", model) as var:
        hfa._fused_attention = lambda: spy
        try:
            step(model, ids)
        finally:
            hfa._fused_attention = saved
        got = var.tracker.values().clone()
    worst = 0.0
    for layer, (q, k, kw) in enumerate(seen):
        ref = max_logits_torch(q.double(), k.double(), scale=kw["scale"], causal=True, sliding_window=window,
                               chunk_size=1 << 24)
        worst = max(worst, ((got[layer].double() - ref).abs() / ref.abs()).max().item())
    return {"fused_calls": len(seen), "windows": sorted({kw.get("window") for *_, kw in seen}, key=str),
            "max_rel_err_vs_float64": worst}


def profile(model, ids, out_dir):
    from torch.profiler import ProfilerActivity, profile as prof

    os.makedirs(out_dir, exist_ok=True)
    for name in ("torch_max", "fused", "untracked"):
        with Variant(name, model):
            step(model, ids)
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                step(model, ids)
                torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
            f.write(table)
        print(f"[sw] profile {name}\n" + "\n".join(table.splitlines()[:18]), flush=True)


def exactness(q, k, v, do, scale, window, n) -> dict:
    """Fused vs references on the first ``n`` positions (a causal window's prefix is itself a
    causal-window attention): output and gradients vs fp32 SDPA with the mask on the same bf16
    inputs, max logits vs the float64 chunked max."""
    import torch.nn.functional as F

    from dist_muonclip.kernels.attention_max import attention_with_max_logits
    from dist_muonclip.tracker import max_logits_torch

    q, k, v = (t.detach()[:, :, :n].clone().requires_grad_() for t in (q, k, v))
    do = do[:, :, :n]
    pos = torch.arange(n, device="cuda")
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    out, mx = attention_with_max_logits(q, k, v, scale=scale, causal=True, window=window)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=scale, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), do.float())
    ref_mx = max_logits_torch(q.detach().double(), k.detach().double(), scale=scale, causal=True,
                              sliding_window=window)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    return dict(exact_prefix=n, out_rel_err_vs_fp32=rel(out, ref_out),
                grad_rel_err_vs_fp32=[rel(a, b) for a, b in zip(grads, ref_grads)],
                max_rel_err_vs_float64=((mx.double() - ref_mx).abs() / ref_mx.abs()).max().item())


def attention_level(args) -> list[dict]:
    import torch.nn.functional as F

    from _common import median_ms
    from dist_muonclip.kernels.attention_max import attention_with_max_logits
    from dist_muonclip.kernels.max_logit import max_logits_triton

    rows = []
    for B in args.attn_batch:
        for S in args.attn_seq:
            g = torch.Generator("cuda").manual_seed(S + B)
            mk = lambda h: torch.randn(B, S, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)  # noqa: E731
            q, k, v = mk(32).requires_grad_(), mk(8).requires_grad_(), mk(8).requires_grad_()
            do = torch.randn(B, 32, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            pos = torch.arange(S, device="cuda")
            mask = ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - args.window))[None, None].expand(B, 1, S, S).contiguous()
            scale = 128 ** -0.5

            def sdpa():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
                out.backward(do)

            def sdpa_kernel():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
                max_logits_triton(q.detach(), k.detach(), scale=scale, causal=True, attention_mask=mask)
                out.backward(do)

            def fused():
                out, _ = attention_with_max_logits(q, k, v, scale=scale, causal=True, window=args.window)
                out.backward(do)

            def fused_fwd():
                with torch.no_grad():
                    attention_with_max_logits(q, k, v, scale=scale, causal=True, window=args.window)

            def sdpa_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

            row = dict(batch=B, seq=S, window=args.window, **exactness(q, k, v, do, scale, args.window, 2048))
            times = {n: [] for n in ("sdpa", "sdpa_kernel", "fused", "sdpa_fwd", "fused_fwd")}
            fns = dict(sdpa=sdpa, sdpa_kernel=sdpa_kernel, fused=fused, sdpa_fwd=sdpa_fwd, fused_fwd=fused_fwd)
            for _ in range(args.attn_rounds):
                for n, fn in fns.items():
                    times[n].append(median_ms(fn, warmup_ms=25, rep_ms=100))
            row["ms_median"] = {n: statistics.median(t) for n, t in times.items()}
            row["ratio_vs_sdpa_median"] = {n: statistics.median(a / b for a, b in zip(times[n], times["sdpa"]))
                                           for n in ("sdpa_kernel", "fused")}
            print(f"[sw] attn {row}", flush=True)
            rows.append(row)
            q.grad = k.grad = v.grad = None
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--profile-dir", help="write torch.profiler tables here")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--attn-batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--attn-seq", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    p.add_argument("--attn-rounds", type=int, default=3)
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args(argv)
    from _common import environment, write_json

    env = environment()
    print(f"[sw] {env}", flush=True)
    result = {"env": env, "args": vars(args)}
    if not args.skip_model:
        result["model"] = model_level(args, env)
        print(f"[sw] model {result['model']['ms_median']} ratios {result['model']['ratio_vs_untracked_median']} "
              f"exact {result['model']['exact']}", flush=True)
        torch.cuda.empty_cache()
    result["attention"] = attention_level(args)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
