"""HF Trainer with MuonClip under DDP (torchrun), no DeepSpeed.

    torchrun --nproc_per_node 2 examples/trainer_ddp.py --save-steps 10

:class:`dist_muonclip.hf.MuonClipTrainer` builds MuonClip inside ``create_optimizer``: after
accelerate created the process group (ZeRO-1: each matrix orthogonalized by one owner rank) and
before DDP wraps the model (MuonClip reads the parameter names for its Muon/AdamW split and
QK-Clip). Its ``lr``/``weight_decay``/AdamW betas and eps come from TrainingArguments. Checkpoints
hold MuonClip's full state, gathered from every rank: ``--resume`` works at any world size.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_muonclip.hf as hf  # noqa: E402
from common import Progressions, digest, tiny_llama, shutdown, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="runs/trainer_ddp")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint directory (saved at any world size)")
    p.add_argument("--result", default=None, help="write <result>.rank<r>.json (losses, weight digest)")
    args = p.parse_args()

    import torch
    from transformers import TrainerCallback, TrainingArguments

    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.per_device_batch,
        learning_rate=args.lr, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, report_to=[], seed=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 1,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    losses = []

    class Log(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = hf.MuonClipTrainer(model=tiny_llama(), args=targs, train_dataset=Progressions(), callbacks=[Log()],
                                 muonclip_kwargs={"adamw_lr": 0.003, "qk_clip": {"tau": 100.0}})
    trainer.train(resume_from_checkpoint=args.resume)
    inner = hf.muonclip_optimizer(trainer)
    write_result(args.result, targs.process_index, {
        "losses": losses, "digest": digest(dict(trainer.model.named_parameters())),
        "world_size": inner.world_size, "num_steps": inner.num_steps})
    shutdown()


if __name__ == "__main__":
    main()
