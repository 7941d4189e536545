"""A plain accelerate training loop with MuonClip: DDP, or DeepSpeed from a JSON naming MuonClip.

    accelerate launch --num_processes 2 examples/accelerate_loop.py            # DDP
    torchrun --nproc_per_node 2 examples/accelerate_loop.py                    # the same
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --deepspeed examples/ds_zero2_muonclip.json

DDP: build MuonClip *after* ``Accelerator()`` (which creates the process group), on the unwrapped
model, then ``accelerator.prepare``. DeepSpeed: pass ``DummyOptim`` (accelerate's placeholder for
"the optimizer is in the JSON"); ``import dist_muonclip.hf`` lets DeepSpeed build MuonClip from it.
accelerate fills the JSON's "auto" lr and weight_decay from DummyOptim; "betas"/"eps" must be
numbers here (only Trainer knows adam_beta1/2), so this script overrides them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_muonclip.hf as hf  # noqa: E402
from common import Progressions, digest, tiny_llama, shutdown, write_result  # noqa: E402


def mean_over_ranks(x):
    """The loss averaged over all processes (torch.distributed directly: under DeepSpeed on CPU
    accelerate counts one process, see docs/hf.md)."""
    import torch.distributed as dist

    x = x.float().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON naming MuonClip (default: DDP)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--result", default=None, help="write <result>.rank<r>.json (losses, weight digest)")
    args = p.parse_args()

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    from dist_muonclip import MuonClip

    torch.manual_seed(0)
    model = tiny_llama()
    plugin = None
    if args.deepspeed:
        with open(args.deepspeed) as f:
            cfg = json.load(f)
        batch = args.per_device_batch
        cfg.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1, gradient_clipping=1.0)
        cfg["train_batch_size"] = batch * int(os.environ.get("WORLD_SIZE", "1"))
        cfg["optimizer"]["params"].update(betas=[0.9, 0.95], eps=1e-8)
        plugin = DeepSpeedPlugin(hf_ds_config=cfg)
        if os.environ.get("DIST_MUONCLIP_DS_SHM", "1") == "0":     # CPU CI: skip DeepSpeed's shm op build
            from dist_muonclip.deepspeed import disable_shm_comm
            disable_shm_comm()
    # cpu=True makes accelerate run DDP over gloo on CPU-only machines; with the DeepSpeed plugin it
    # would drop DeepSpeed, so there it is left to DeepSpeed's CPU accelerator
    accelerator = Accelerator(deepspeed_plugin=plugin, cpu=plugin is None and not torch.cuda.is_available())
    if plugin is None:
        # after Accelerator(): the process group exists, so MuonClip shards its work over it
        optimizer = MuonClip(model, lr=args.lr, adamw_lr=0.003, weight_decay=0.1, qk_clip={"tau": 100.0})
    else:
        optimizer = DummyOptim(model.parameters(), lr=args.lr, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(Progressions(), batch_size=args.per_device_batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses, it = [], iter(loader)
    for _ in range(args.steps):
        batch = next(it)
        loss = model(**batch).loss
        accelerator.backward(loss)
        if plugin is None:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(mean_over_ranks(loss.detach()))
    inner = hf.muonclip_optimizer(model if plugin is not None else optimizer)
    weights = (model.basic_optimizer.full_state_dict()["masters"] if plugin is not None
               else dict(accelerator.unwrap_model(model).named_parameters()))
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0   # (accelerate's process_index: see mean_over_ranks)
    write_result(args.result, rank, {
        "losses": losses, "digest": digest(weights), "world_size": inner.world_size,
        "num_steps": inner.num_steps, "num_processes": accelerator.num_processes})
    shutdown()


if __name__ == "__main__":
    main()
