"""Low-tau QK-Clip demo on CPU: the same tiny Llama trained twice with dist_muonclip.MuonClip,
once with QK-Clip at a deliberately low tau and once without clipping, recording the max
attention logit of every step's forward pass (the tracker runs in both: the unclipped run uses
tau = inf-like 1e30, so it measures without ever clipping).

The task is an induction/copy task (the second half of each sequence repeats the first half),
which needs sharp attention and therefore drives the max logits up quickly.

    python benchmarks/qk_clip_demo.py --tau 5 --steps 300
    # -> runs/qk_clip_demo/qk_clip_demo.json and .png beside it (the paths are printed)
    python benchmarks/qk_clip_demo.py --out benchmarks/results/qk_clip_demo.json   # refresh the committed result

The same comparison with the training entry point: ``launch/train.py --qk-clip-tau 5`` vs
``launch/train.py --no-qk-clip`` (max logits are in the --out JSON as max_logit_per_layer).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "runs" / "qk_clip_demo" / "qk_clip_demo.json"


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


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="result JSON; the plot goes beside it with the suffix .png (default: %(default)s; "
                   "the committed result is benchmarks/results/qk_clip_demo.json)")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.out.suffix != ".json":
        raise SystemExit(f"--out {args.out}: give the result JSON's path (ending in .json); the PNG goes beside it")
    png = args.out.with_suffix(".png")
    if args.replot:
        with open(args.out) as f:
            result = json.load(f)
        plot(result, str(png))
        print(f"wrote {png}")
        return result

    import torch
    import transformers

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks._common import git_commit

    torch.set_num_threads(args.threads)
    clipped, free = run(args, args.tau), run(args, None)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "transformers": transformers.__version__, "commit": git_commit(), "clipped": clipped, "unclipped": free}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, str(png))
    peak_c = max(r["max_logit"] for r in clipped["rows"])
    peak_f = max(r["max_logit"] for r in free["rows"])
    print(f"peak max logit: clipped {peak_c:.2f} (tau {args.tau}), unclipped {peak_f:.2f}")
    print(f"wrote {args.out} and {png}")
    return result


if __name__ == "__main__":
    main()
