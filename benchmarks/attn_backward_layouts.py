"""Which output-gradient layout PyTorch's cuDNN / flash attention backward accept, on HF's layout.

HF hands attention q, k, v as transposed [B, S, H, D] views and gets back a gradient laid out
[B, S, H, D] for a [B, H, S, D] output. The fused attention+max forward allocates O like q; this
script feeds the backward ops dO in O's layout ("matched", what the library does) and in a
[B, H, S, D]-contiguous copy ("contiguous", what it did before), and records the relative error of
dq, dk, dv against fp32 SDPA; also torch's own bf16 SDPA backward with either dO layout. JSON into benchmarks/results/ (or --out).

    python benchmarks/attn_backward_layouts.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    from _common import environment, write_json

    from dist_muonclip.kernels import attention_max as am

    B, H, Hkv, S, D = 2, 32, 8, 1024, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)  # noqa: E731
    q, k, v, do = mk(H), mk(Hkv), mk(Hkv), mk(H)
    scale = D ** -0.5
    out, lse, _ = am.attention_forward_with_max_triton(q, k, v, scale=scale, causal=True)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale, enable_gqa=True)
    ref.backward(do.float())
    refs = [t.grad.double() for t in (qf, kf, vf)]
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    rows = []
    for op in ("cudnn", "flash"):
        for layout, dout in (("matched", am.match_grad_layout(do, out)), ("contiguous", do.contiguous())):
            try:
                if op == "cudnn":
                    dq, dk, dv = am.cudnn_backward(dout, q, k, v, out, lse, True, scale)[:3]
                else:
                    kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
                    dq, dk, dv = am.flash_backward(dout, q, kk, vv, out, lse, True, scale, None)[:3]
                    dk = dk.view(B, Hkv, H // Hkv, S, D).sum(2)
                    dv = dv.view(B, Hkv, H // Hkv, S, D).sum(2)
                errs = [rel(a, b) for a, b in zip((dq, dk, dv), refs)]
                rows.append({"backward": op, "dout_layout": layout, "rel_err_dq_dk_dv": errs})
            except RuntimeError as e:  # noqa: PERF203
                rows.append({"backward": op, "dout_layout": layout, "error": str(e)[:300]})
            print("[attn-bwd]", rows[-1], flush=True)
    for layout, dout in (("matched", am.match_grad_layout(do, out)), ("contiguous", do.contiguous())):
        qb, kb, vb = (t.detach().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True).backward(dout)
        errs = [rel(t.grad, b) for t, b in zip((qb, kb, vb), refs)]
        rows.append({"backward": "torch_sdpa_bf16", "dout_layout": layout, "rel_err_dq_dk_dv": errs})
        print("[attn-bwd]", rows[-1], flush=True)
    payload = {"env": environment(), "shape": [B, H, Hkv, S, D], "rows": rows}
    write_json(os.path.join(args.out, "attn_backward_layouts.json"), payload)
    return payload


if __name__ == "__main__":
    main()
