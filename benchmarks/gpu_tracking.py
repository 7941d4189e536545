"""Max-logit tracking at model and attention level on one GPU (issue 19): Mistral-shaped
sliding-window and DeepSeek-V3-shaped MLA models, tracked vs untracked.

    python benchmarks/gpu_tracking.py --model mistral --out benchmarks/results/sliding_window_h200.json \
        [--profile-dir DIR] [--layers 4] [--seq 4096] [--batch 1] [--window 1024]
    python benchmarks/gpu_tracking.py --model deepseek_v3 --out benchmarks/results/mla_h200.json

(Named gpu_sliding_window.py at commit e6f6401, which measured sliding_window_h200.json.)

Model level, bf16, SDPA, forward + backward of the LM loss, interleaved rounds of

    untracked   no tracking installed (HF's SDPA)
    torch_max   SDPA + the chunked torch max (where the glue sent Mistral's sliding-window
                calls before commit dff3a3b)
    kernel_max  SDPA + the Triton max-logit kernel (the fallback; MLA's path before this change)
    fused       the fused attention+max kernel (window / split head dims)

ratios per round against ``untracked`` (median over rounds). mistral: 4 Mistral-7B-shaped
layers (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 32000, sliding_window).
deepseek_v3: dense DeepSeek-V3-shaped MLA layers (hidden 7168, 128 heads, q_lora 1536,
kv_lora 512, q/k head 128 + 64, v head 128, MLP 18432, vocab 32000). Attention level: the same
attention alone, fwd+bwd, SDPA (as HF calls it) vs SDPA + kernel vs fused, do_bench medians.
``--profile-dir`` writes torch.profiler tables of one step per variant. Exactness: the fused
record vs the float64 chunked max of the same q, k (a spy keeps each layer's q, k); attention
outputs / gradients vs fp32 SDPA on a 2048-position prefix.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_model(kind: str, layers: int, seq: int, window: int):
    import transformers

    if kind == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(
            vocab_size=32000, hidden_size=7168, intermediate_size=18432, num_hidden_layers=layers,
            num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=layers,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, n_group=1, topk_group=1,
            max_position_embeddings=max(seq, 8192), attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.DeepseekV3ForCausalLM(cfg)
        return model.to(torch.bfloat16).train()
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=max(seq, 8192),
            attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg)
        return model.to(torch.bfloat16).train()
    cfg = transformers.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=window,
        max_position_embeddings=max(seq, 8192), attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.MistralForCausalLM(cfg)
    return model.to(torch.bfloat16).train()


def segment_lengths(seq: int) -> list[int]:
    """Packed-batch segments: three documents of uneven length filling ``seq``."""
    a, b = seq // 4, seq // 3
    return [a, b, seq - a - b]


def make_batch(args) -> dict:
    """Model inputs for ``--form``: plain causal; ``padded`` (left padding of ``seq // 8``
    tokens on every sample, labels -100 there); ``packed`` (``segment_lengths`` documents per
    row, position ids restarting per document and the block-diagonal causal 4-D bool mask that
    HF's sdpa models take as is: transformers 5.17 does not derive it from position ids)."""
    g = torch.Generator("cuda").manual_seed(1)
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda", generator=g)
    batch = dict(input_ids=ids, labels=ids.clone())
    if args.form == "padded":
        mask = torch.ones_like(ids)
        mask[:, : args.seq // 8] = 0
        batch["attention_mask"] = mask
        batch["labels"][mask == 0] = -100
    elif args.form == "packed":
        pos = torch.cat([torch.arange(n, device="cuda") for n in segment_lengths(args.seq)])
        batch["position_ids"] = pos[None].expand(args.batch, -1)
        seg = torch.repeat_interleave(torch.arange(3, device="cuda"),
                                      torch.tensor(segment_lengths(args.seq), device="cuda"))
        i = torch.arange(args.seq, device="cuda")
        block = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
        batch["attention_mask"] = block[None, None].expand(args.batch, 1, -1, -1)
    return batch


def attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


class Variant:
    """Install / remove one tracking configuration on the model."""

    def __init__(self, name, model):
        self.name, self.model, self.tracker, self.handle = name, model, None, None

    def __enter__(self):
        from dist_muonclip.integrations import transformers_attention as hfa
        from dist_muonclip.tracker import MaxLogitTracker

        if self.name == "untracked":
            return self
        mods = attention_modules(self.model)
        heads = self.model.config.num_attention_heads
        self.tracker = MaxLogitTracker([heads] * len(mods), modules=mods, device="cuda",
                                       backend="torch" if self.name == "torch_max" else "auto")
        hfa.FUSED_ATTENTION = self.name not in ("torch_max", "kernel_max")
        self.handle = self.tracker.install_hf(self.model)
        return self

    def __exit__(self, *exc):
        from dist_muonclip.integrations import transformers_attention as hfa

        hfa.FUSED_ATTENTION = True
        if self.handle is not None:
            self.handle.remove()


def step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def time_steps(model, batch, n):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step(model, batch)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def model_level(args, env) -> dict:
    model = build_model(args.model, args.layers, args.seq, args.window)
    batch = make_batch(args)
    names = ["untracked", "torch_max", "kernel_max", "fused"] if args.model == "mistral" else \
        ["untracked", "kernel_max", "fused"]
    window = args.window if args.model == "mistral" else None
    for name in names:  # warm-up: compile kernels, cuDNN / flash plans
        with Variant(name, model):
            for _ in range(2):
                step(model, batch)
    torch.cuda.synchronize()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate order against drift
        for name in order:
            with Variant(name, model):
                times[name].append(time_steps(model, batch, args.steps))
        print(f"[trk] round {r}: " + " ".join(f"{n} {times[n][-1]:.2f}" for n in names), flush=True)
    ratios = {n: statistics.median(t / u for t, u in zip(times[n], times["untracked"])) for n in names}
    # exactness at model scale: the fused record vs the float64 max of the same layers' q, k
    exact = check_exact(model, batch, window)
    if args.profile_dir:
        profile(model, batch, args.profile_dir, names)
    c = model.config
    return {"shape": dict(model=args.model, layers=args.layers, batch=args.batch, seq=args.seq, window=window,
                          hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                          dtype="bf16"),
            "ms_median": {n: statistics.median(t) for n, t in times.items()}, "ms_rounds": times,
            "ratio_vs_untracked_median": ratios, "exact": exact}


def check_exact(model, batch, window) -> dict:
    """Per layer: the fused path's record vs the chunked float64 max of the q, k it saw."""
    from dist_muonclip.kernels import attention_max as am
    from dist_muonclip.tracker import max_logits_torch

    seen = []
    real = am.attention_with_max_logits

    def spy(q, k, v, **kw):
        seen.append((q.detach().clone(), k.detach().clone(), kw))
        return real(q, k, v, **kw)

    with Variant("fused", model) as var:
        am.attention_with_max_logits = spy  # the glue looks the kernel up at each call
        try:
            step(model, batch)
        finally:
            am.attention_with_max_logits = real
        got = var.tracker.values().clone()
    worst = 0.0
    for layer, (q, k, kw) in enumerate(seen):
        mask = kw.get("attention_mask")
        ref = max_logits_torch(q.double(), k.double(), scale=kw["scale"], causal=True, sliding_window=window,
                               attention_mask=None if mask is None else mask & torch.ones(
                                   q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril(),
                               chunk_size=1 << 24)
        worst = max(worst, ((got[layer].double() - ref).abs() / ref.abs()).max().item())
    return {"fused_calls": len(seen), "windows": sorted({kw.get("window") for *_, kw in seen}, key=str),
            "with_mask": sum(kw.get("attention_mask") is not None for *_, kw in seen),
            "max_rel_err_vs_float64": worst}


def profile(model, batch, out_dir, names):
    from torch.profiler import ProfilerActivity, profile as prof

    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        with Variant(name, model):
            step(model, batch)
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                step(model, batch)
                torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
            f.write(table)
        print(f"[trk] profile {name}\n" + "\n".join(table.splitlines()[:18]), flush=True)


def exactness(q, k, v, do, scale, window, n, attention_mask=None) -> dict:
    """Fused vs references on the first ``n`` positions (a causal window's prefix is itself a
    causal-window attention): output and gradients vs fp32 SDPA with the mask on the same bf16
    inputs, max logits vs the float64 chunked max."""
    import torch.nn.functional as F

    from dist_muonclip.kernels.attention_max import attention_with_max_logits
    from dist_muonclip.tracker import max_logits_torch

    q, k, v = (t.detach()[:, :, :n].clone().requires_grad_() for t in (q, k, v))
    do = do[:, :, :n]
    pos = torch.arange(n, device="cuda")
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    if attention_mask is not None:
        mask = mask & attention_mask
    out, mx = attention_with_max_logits(q, k, v, scale=scale, causal=True, window=window,
                                        attention_mask=attention_mask)
    B, H = q.shape[0], q.shape[1]
    keep = mask.expand(B, 1, n, n)
    seen = keep.any(-1).expand(B, H, n)  # padded query rows see nothing: output 0, no gradient
    do = do * seen[..., None]
    grads = torch.autograd.grad(out, (q, k, v), do)
    # the fp32 reference lets unseen rows attend to themselves (no NaN); their dO is 0
    ref_keep = keep | (~keep.any(-1, keepdim=True) & torch.eye(n, dtype=torch.bool, device=q.device))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=ref_keep, scale=scale, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), do.float())
    ref_mx = max_logits_torch(q.detach().double(), k.detach().double(), scale=scale, attention_mask=keep)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    return dict(exact_prefix=n, out_rel_err_vs_fp32=rel(out[seen], ref_out[seen]),
                unseen_rows_zero=bool((out[~seen] == 0).all()),
                grad_rel_err_vs_fp32=[rel(a, b) for a, b in zip(grads, ref_grads)],
                max_rel_err_vs_float64=((mx.double() - ref_mx).abs() / ref_mx.abs()).max().item())


def attention_level(args) -> list[dict]:
    import torch.nn.functional as F

    from _common import median_ms
    from dist_muonclip.kernels.attention_max import attention_with_max_logits
    from dist_muonclip.kernels.max_logit import max_logits_triton

    if args.model == "mistral":
        H, Hkv, D, DV, window, scale = 32, 8, 128, 128, args.window, 128 ** -0.5
    elif args.model == "llama":
        H, Hkv, D, DV, window, scale = 32, 8, 128, 128, None, 128 ** -0.5
    else:
        H, Hkv, D, DV, window, scale = 128, 128, 192, 128, None, 192 ** -0.5
    rows = []
    for B in args.attn_batch:
        for S in args.attn_seq:
            g = torch.Generator("cuda").manual_seed(S + B)
            mk = lambda h, d: torch.randn(B, S, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)  # noqa: E731
            q, k, v = mk(H, D).requires_grad_(), mk(Hkv, D).requires_grad_(), mk(Hkv, DV).requires_grad_()
            do = torch.randn(B, H, S, DV, device="cuda", dtype=torch.bfloat16, generator=g)
            pos = torch.arange(S, device="cuda")
            mask = pos[None, :] <= pos[:, None]
            if window is not None:
                mask = mask & (pos[None, :] > pos[:, None] - window)
            if args.form == "padded":
                mask = mask & (pos >= S // 8)[None, :]
            elif args.form == "packed":
                seg = torch.repeat_interleave(torch.arange(3, device="cuda"),
                                              torch.tensor(segment_lengths(S), device="cuda"))
                mask = mask & (seg[:, None] == seg[None, :])
            if window is None and args.form == "plain":
                mask, sdpa_kw, fused_mask = None, dict(is_causal=True), None
            else:  # what HF hands sdpa: the 4-D bool mask
                mask = mask[None, None].expand(B, 1, S, S).contiguous()
                sdpa_kw = dict(attn_mask=mask)
                fused_mask = mask if args.form != "plain" else None

            def sdpa():
                F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **sdpa_kw).backward(do)

            def sdpa_kernel():
                out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **sdpa_kw)
                max_logits_triton(q.detach(), k.detach(), scale=scale, causal=True, attention_mask=mask)
                out.backward(do)

            def fused():
                attention_with_max_logits(q, k, v, scale=scale, causal=True, window=window,
                                          attention_mask=fused_mask)[0].backward(do)

            def fused_fwd():
                with torch.no_grad():
                    attention_with_max_logits(q, k, v, scale=scale, causal=True, window=window,
                                              attention_mask=fused_mask)

            def sdpa_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **sdpa_kw)

            row = dict(batch=B, seq=S, heads=H, kv_heads=Hkv, head_dim=D, v_head_dim=DV, window=window,
                       form=args.form, **exactness(q, k, v, do, scale, window, 2048,
                                                   None if fused_mask is None else fused_mask[..., :2048, :2048]))
            fns = dict(sdpa=sdpa, sdpa_kernel=sdpa_kernel, fused=fused, sdpa_fwd=sdpa_fwd, fused_fwd=fused_fwd)
            times = {n: [] for n in fns}
            for _ in range(args.attn_rounds):
                for n, fn in fns.items():
                    times[n].append(median_ms(fn, warmup_ms=25, rep_ms=100))
            row["ms_median"] = {n: statistics.median(t) for n, t in times.items()}
            row["ratio_vs_sdpa_median"] = {n: statistics.median(a / b for a, b in zip(times[n], times["sdpa"]))
                                           for n in ("sdpa_kernel", "fused")}
            print(f"[trk] attn {row}", flush=True)
            rows.append(row)
            q.grad = k.grad = v.grad = None
            del q, k, v, do, mask
            torch.cuda.empty_cache()
    return rows


MLA_FWD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=4),
]


def sweep_forward(args) -> dict:
    """Forward-kernel tile configurations for the model's head dims (B = 1 and 4 at the largest
    S), timed with do_bench; the fastest (sum of medians) is used for the rest of the run."""
    from _common import median_ms
    from dist_muonclip.kernels import attention_max as am

    H, D, DV = (128, 192, 128) if args.model == "deepseek_v3" else (32, 128, 128)
    S = max(args.attn_seq)
    rows = []
    for cfg in MLA_FWD_CONFIGS:
        tot, per = 0.0, {}
        am.FWD_CONFIG_OVERRIDE = cfg
        try:
            for B in (1, 4):
                mk = lambda d: torch.randn(B, S, H, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # noqa: E731
                q, k, v = mk(D), mk(D), mk(DV)
                ms = median_ms(lambda: am.attention_forward_with_max_triton(q, k, v, scale=D ** -0.5, causal=True),
                               warmup_ms=25, rep_ms=100)
                per[B] = ms
                tot += ms
        except Exception as e:  # noqa: BLE001 - a config over the shared-memory budget fails to compile
            per, tot = {"error": str(e)[:200]}, float("inf")
        rows.append(dict(config=cfg, ms=per, total=tot))
        print(f"[trk] fwd sweep {cfg} {per}", flush=True)
    best = min(rows, key=lambda r: r["total"])
    am.FWD_CONFIG_OVERRIDE = best["config"]
    return {"seq": S, "rows": rows, "best": best["config"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--model", choices=["mistral", "deepseek_v3", "llama"], default="mistral")
    p.add_argument("--form", choices=["plain", "padded", "packed"], default="plain",
                   help="the batch: plain causal, left-padded, or packed documents")
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
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--sweep-forward", action="store_true", help="sweep the fused forward's tiles first, then use the best")
    args = p.parse_args(argv)
    from _common import environment, write_json

    env = environment()
    print(f"[trk] {env}", flush=True)
    result = {"env": env, "args": vars(args)}
    if args.sweep_forward:
        result["forward_sweep"] = sweep_forward(args)
    if not args.skip_model:
        result["model"] = model_level(args, env)
        print(f"[trk] model {result['model']['ms_median']} ratios {result['model']['ratio_vs_untracked_median']} "
              f"exact {result['model']['exact']}", flush=True)
        torch.cuda.empty_cache()
    if not args.skip_attention:
        result["attention"] = attention_level(args)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
