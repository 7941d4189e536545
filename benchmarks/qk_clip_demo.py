"""Low-tau QK-Clip demo on CPU: the same tiny Llama trained twice with dist_muonclip.MuonClip,
once with QK-Clip at a deliberately low tau and once without clipping, recording the max
attention logit of every step's forward pass (the tracker runs in both: the unclipped run uses
tau = inf-like 1e30, so it measures without ever clipping).

The task is an induction/copy task (the second half of each sequence repeats the first half),
which needs sharp attention and therefore drives the max logits up quickly.

    python benchmarks/qk_clip_demo.py --tau 5 --steps 300
    # -> benchmarks/results/qk_clip_demo.json and benchmarks/results/qk_clip_demo.png

The same comparison with the training entry point: ``launch/train.py --qk-clip-tau 5`` vs
``launch/train.py --no-qk-clip`` (max logits are in the --out JSON as max_logit_per_layer).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time


def build(args):
    import torch
    import transformers

    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def batches(args):
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    half = args.seq // 2
    while True:
        first = torch.randint(0, args.vocab, (args.batch, half), generator=g)
        yield torch.cat([first, first], dim=1)


def run(args, tau: float | None) -> dict:
    import torch

    from dist_muonclip import MuonClip

    model = build(args).train()
    qk = {"tau": tau if tau is not None else 1e30}  # "no clip": track only
    opt = MuonClip(model, lr=args.lr, weight_decay=0.0, ns_backend="torch", qk_clip=qk)
    data = batches(args)
    rows = []
    t0 = time.time()
    for step in range(args.steps):
        ids = next(data)
        labels = ids.clone()
        labels[:, : args.seq // 2] = -100  # only the copied half is predictable
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m = opt.qk_clipper.metrics()
        host = torch.stack([loss.detach(), m["qk_clip/max_logit"], m["qk_clip/num_heads_clipped"]]).tolist()
        rows.append({"step": step + 1, "loss": host[0], "max_logit": host[1], "heads_clipped": host[2]})
        if (step + 1) % args.log_every == 0:
            print(f"tau={tau} step {step + 1}: loss {host[0]:.3f} max logit {host[1]:.2f} clipped {host[2]:.0f}",
                  flush=True)
    opt.qk_clipper.close()
    return {"tau": tau, "rows": rows, "seconds": time.time() - t0}


def plot(result: dict, path: str) -> None:
    """Max logit (log scale) and loss per step, both runs side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["args"]
    clipped, free, tau = result["clipped"], result["unclipped"], a["tau"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for res, label, color in ((free, "no QK-Clip", "tab:red"), (clipped, f"QK-Clip tau={tau:g}", "tab:blue")):
        steps = [r["step"] for r in res["rows"]]
        ax.plot(steps, [r["max_logit"] for r in res["rows"]], label=label, color=color)
        bx.plot(steps, [r["loss"] for r in res["rows"]], label=label, color=color)
    ax.axhline(tau, color="gray", linestyle="--", linewidth=1, label="tau")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max attention logit (forward, before clip)")
    ax.set_title("Max logit over all layers and heads")
    ax.legend()
    bx.set_xlabel("step")
    bx.set_ylabel("training loss")
    bx.set_title("Loss (copy task)")
    bx.legend()
    fig.suptitle(f"tiny Llama (hidden {a['hidden']}, {a['layers']} layers, GQA {a['heads']}/{a['kv_heads']}), "
                 f"MuonClip lr {a['lr']}, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tau", type=float, default=5.0, help="QK-Clip threshold of the clipped run")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON in --out")
    args = p.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "qk_clip_demo.json")) as f:
            plot(json.load(f), os.path.join(args.out, "qk_clip_demo.png"))
        return

    import torch

    torch.set_num_threads(args.threads)
    clipped, free = run(args, args.tau), run(args, None)
    os.makedirs(args.out, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = None
    import transformers

    result = {"args": vars(args), "device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "transformers": transformers.__version__, "commit": commit, "clipped": clipped, "unclipped": free}
    with open(os.path.join(args.out, "qk_clip_demo.json"), "w") as f:
        json.dump(result, f, indent=1)

    plot(result, os.path.join(args.out, "qk_clip_demo.png"))
    peak_c = max(r["max_logit"] for r in clipped["rows"])
    peak_f = max(r["max_logit"] for r in free["rows"])
    print(f"peak max logit: clipped {peak_c:.2f} (tau {args.tau}), unclipped {peak_f:.2f}")


if __name__ == "__main__":
    main()
