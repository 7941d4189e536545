"""HF Trainer + DeepSpeed JSON naming MuonClip: the only change to a Trainer script is one import.

    torchrun --nproc_per_node 2 examples/trainer_deepspeed.py --deepspeed examples/ds_zero2_muonclip.json

The JSON's ``"optimizer": {"type": "MuonClip", "params": {"lr": "auto", ...}}`` is built by
DeepSpeed itself once ``dist_muonclip.hf`` is imported; "auto" values come from
TrainingArguments; the schedule is Trainer's (or the JSON's "scheduler" section). Checkpoints are
DeepSpeed's (``--save-steps``); ``--resume`` continues from one.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_muonclip.hf as hf  # noqa: E402  (the one line: DeepSpeed learns "type": "MuonClip")
from common import Progressions, digest, tiny_llama, shutdown, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON naming MuonClip")
    p.add_argument("--output-dir", default="runs/trainer_deepspeed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--result", default=None, help="write <result>.rank<r>.json (losses, weight digest)")
    args = p.parse_args()

    from transformers import Trainer, TrainerCallback, TrainingArguments

    if os.environ.get("DIST_MUONCLIP_DS_SHM", "1") == "0":     # CPU CI: skip DeepSpeed's shm op build
        from dist_muonclip.deepspeed import disable_shm_comm
        disable_shm_comm()
    targs = TrainingArguments(
        output_dir=args.output_dir, deepspeed=args.deepspeed, max_steps=args.steps,
        per_device_train_batch_size=args.per_device_batch, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, report_to=[], seed=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 1,
        use_cpu=not __import__("torch").cuda.is_available(), disable_tqdm=True)
    losses, clipped = [], []

    class Log(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, a, state, control, optimizer=None, **kw):
            clipped.append(hf.unwrap_optimizer(optimizer).metrics().get("qk_clip/num_heads_clipped", 0.0))

    trainer = Trainer(model=tiny_llama(), args=targs, train_dataset=Progressions(), callbacks=[Log()])
    trainer.train(resume_from_checkpoint=args.resume)
    engine = trainer.model_wrapped
    masters = engine.basic_optimizer.full_state_dict()["masters"]    # fp32 weights (a collective)
    inner = hf.muonclip_optimizer(engine)
    write_result(args.result, targs.process_index, {
        "losses": losses, "digest": digest(masters), "world_size": inner.world_size, "num_steps": inner.num_steps,
        "layout": engine.basic_optimizer.layout_name, "heads_clipped": clipped})
    shutdown()


if __name__ == "__main__":
    main()
