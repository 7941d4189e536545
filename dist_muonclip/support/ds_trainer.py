"""A tiny DeepSpeed trainer: what the launchers, their tests and the benchmarks run.

Not part of the optimizer library (moved out of :mod:`dist_muonclip.integrations.deepspeed`):
it builds a tiny Llama from a config (no download), feeds it deterministic token sequences that
are identical at every world size, and trains it with MuonClip from a DeepSpeed JSON config::

    python -m dist_muonclip.support.ds_trainer --deepspeed_config configs/zero1.json --steps 10
    python -m dist_muonclip.deepspeed --deepspeed_config configs/zero1.json --steps 10   # same

under the ``deepspeed`` launcher, ``torchrun``, ``mpirun`` (via ``python -m
dist_muonclip.launch_env``), SLURM or alone.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..integrations.launch_env import leave_process_group
from ..integrations.deepspeed import (deepspeed_client, disable_shm_comm, full_state_dict, initialize,
                                      load_checkpoint, load_config, save_checkpoint)

__all__ = ["tiny_llama", "global_batch", "train_engine", "main"]


def tiny_llama(args: Any) -> nn.Module:
    import transformers as tf

    torch.manual_seed(args.seed)
    cfg = tf.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.hidden_size * 3 // 2,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(128, args.seq_len), attn_implementation="eager")
    return tf.AutoModelForCausalLM.from_config(cfg)


def global_batch(step: int, args: Any) -> Tensor:
    """The global batch of ``step``: identical for every world size (rank r takes its rows)."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step)
    # learnable sequences: each row is an arithmetic progression mod vocab (random start, stride 1..4)
    start = torch.randint(0, args.vocab_size, (args.global_batch, 1), generator=g)
    stride = torch.randint(1, 5, (args.global_batch, 1), generator=g)
    return (start + stride * torch.arange(args.seq_len)) % args.vocab_size


def train_engine(engine: Any, batch_for_step: Callable[[int], Tensor], *, steps: int, start: int = 0,
                 log: Callable[[str], None] | None = None) -> list[float]:
    """Train a causal LM DeepSpeed engine for ``steps`` steps; ``batch_for_step(t)`` gives this
    rank's token ids ``[micro_batch * grad_accum, seq]``. Returns the global mean loss per step.

    The loop is DeepSpeed's: ``engine(...)``, ``engine.backward(loss)``, ``engine.step()`` per
    micro batch (DeepSpeed steps the optimizer at the accumulation boundary).
    """
    gas = engine.gradient_accumulation_steps()
    losses = []
    for t in range(start, start + steps):
        ids = batch_for_step(t)
        total = torch.zeros(())
        for micro in ids.chunk(gas):
            loss = engine(input_ids=micro, labels=micro).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float() / gas
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(float(total))
        if log is not None:
            log(f"step {t + 1}/{start + steps} loss {losses[-1]:.4f} lr {engine.get_lr()[0]:.3g}")
    return losses


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m dist_muonclip.support.ds_trainer --deepspeed_config configs/zero1.json --steps 10``.

    Trains a tiny Llama (built from a config, no download) on deterministic random tokens with
    MuonClip from the config's optimizer section. Works under the ``deepspeed`` launcher,
    ``torchrun``, ``mpirun`` (via ``python -m dist_muonclip.launch_env``) or alone. Rank 0 writes
    ``--out`` (losses, world size, a parameter checksum).
    """
    import argparse

    import deepspeed

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all ranks")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON log written by rank 0")
    p.add_argument("--save-dir", default=None, help="save a checkpoint at the end (save_checkpoint)")
    p.add_argument("--resume-dir", default=None, help="resume from save_checkpoint output (any world size)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")))
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required (e.g. configs/zero1.json)")
    if os.environ.get("DIST_MUONCLIP_DS_SHM", "1") == "0":
        disable_shm_comm()
    owns_group = not dist.is_initialized()
    if owns_group:
        deepspeed.init_distributed()
    result = _main_run(p, args)
    if owns_group:
        # A process group still alive at interpreter exit can abort in gloo's thread teardown
        # ("terminate called without an active exception"): leave together, then destroy.
        # (Not on an exception: the other ranks may never reach the barrier.)
        leave_process_group()
    return result


def _main_run(p: Any, args: Any) -> dict[str, Any]:
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = load_config(args.deepspeed_config)
    gas = int(cfg.get("gradient_accumulation_steps", 1))
    if args.global_batch % (world * gas):
        p.error(f"--global-batch {args.global_batch} must be divisible by world size x accumulation = {world * gas}")
    cfg["train_batch_size"] = args.global_batch
    cfg["train_micro_batch_size_per_gpu"] = args.global_batch // (world * gas)
    args.deepspeed_config = None
    model = tiny_llama(args)
    engine, *_ = initialize(args=args, model=model, config=cfg)
    start = 0
    if args.resume_dir:
        load_checkpoint(engine, args.resume_dir)
        start = int(engine.global_steps)
    per = args.global_batch // world

    def batch(t: int) -> Tensor:
        return global_batch(t, args)[rank * per:(rank + 1) * per]

    say = print if rank == 0 else None
    losses = train_engine(engine, batch, steps=args.steps - start, start=start, log=say)
    if args.save_dir:
        save_checkpoint(engine, args.save_dir, tag=f"step{args.steps}")
    masters = full_state_dict(engine)["masters"]
    result = {"world_size": world, "layout": deepspeed_client(engine).layout_name, "start": start, "losses": losses,
              "checksum": {k: float(v.double().sum()) for k, v in masters.items()},
              "zero_stage": engine.zero_optimization_stage(), "bf16": bool(engine.bfloat16_enabled())}
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result




if __name__ == "__main__":
    main()
