"""PyTorch Lightning with MuonClip under its DDP strategy (torchrun or Lightning's own launcher).

    torchrun --nproc_per_node 2 examples/lightning_ddp.py --save-every 4
    torchrun --nproc_per_node 2 examples/lightning_ddp.py --resume runs/lightning_ddp/step=4.ckpt

``configure_optimizers`` returns a MuonClip built on the inner HF model: Lightning calls it after
the process group exists (ZeRO-1 over the DDP ranks) and MuonClip reads the HF model's parameter
names and attention layers (QK-Clip). Lightning gathers every optimizer's ``state_dict()`` on all
ranks before rank 0 writes a checkpoint, which is what MuonClip's collective full state needs, so
nothing else is required. The data loader records how far into the epoch it got, so a resumed
run reads exactly the batches the uninterrupted one reads.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Progressions, digest, tiny_llama, shutdown, write_result  # noqa: E402


class _ResumableMixin:
    """A DataLoader Lightning can resume mid-epoch: it saves how many batches of the epoch were
    read (``state_dict``) and skips them on the next pass after ``load_state_dict``. Without it
    Lightning restarts the epoch's data on resume (and says so)."""

    def __iter__(self):
        skip, self._skip = getattr(self, "_skip", 0), 0
        it = super().__iter__()
        for _ in range(skip):
            next(it)
        self._seen = skip
        for batch in it:
            self._seen += 1
            yield batch

    def state_dict(self) -> dict:
        return {"seen": getattr(self, "_seen", 0)}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state["seen"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="runs/lightning_ddp")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=4, help="steps per epoch; a checkpoint after each")
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--resume", default=None, help="a .ckpt written by this script")
    p.add_argument("--result", default=None, help="write <result>.rank<r>.json (losses, weight digest)")
    args = p.parse_args()

    import lightning as L
    import torch
    import torch.distributed as dist

    from dist_muonclip import MuonClip

    class ResumableLoader(_ResumableMixin, torch.utils.data.DataLoader):
        pass

    world = int(os.environ.get("WORLD_SIZE", "1"))

    class LitLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            mean = loss.detach().clone()
            if dist.is_initialized():
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            self.losses.append(float(mean))
            return loss

        def configure_optimizers(self):
            # after the process group exists; on the HF model (names, attention layers for QK-Clip)
            return MuonClip(self.model, lr=args.lr, adamw_lr=0.003, weight_decay=0.1, qk_clip={"tau": 100.0})

    data = Progressions(n=args.steps * args.per_device_batch * world)    # one epoch
    rank = int(os.environ.get("RANK", "0"))
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = ResumableLoader(data, batch_size=args.per_device_batch, sampler=sampler)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=args.output_dir, filename="{step}", save_top_k=-1,
                                               every_n_train_steps=args.save_every)
    L.seed_everything(0)
    lit = LitLM()
    trainer = L.Trainer(accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=world,
                        strategy="ddp" if world > 1 else "auto", max_steps=args.steps, gradient_clip_val=1.0,
                        callbacks=[ckpt], logger=False, use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, loader, ckpt_path=args.resume)
    opt = trainer.optimizers[0]
    write_result(args.result, trainer.global_rank, {
        "losses": lit.losses, "digest": digest(dict(lit.model.named_parameters())),
        "world_size": opt.world_size, "num_steps": opt.num_steps, "global_step": trainer.global_step})
    shutdown()


if __name__ == "__main__":
    main()
