"""Worker for test_checkpoint: train, save, or load and continue, in a fresh process."""
from __future__ import annotations

import sys

import torch

from dist_muonclip import MuonClip
from tests._tiny_hf import tiny_model


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(100 + step))


def train(model, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def build(seed: int):
    model = tiny_model("llama", seed=seed)
    opt = MuonClip(model, lr=0.01, adamw_lr=0.003)
    return model, opt


if __name__ == "__main__":
    mode, path, n1, n2 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.use_deterministic_algorithms(True)
    if mode == "save":
        model, opt = build(seed=0)
        train(model, opt, 0, n1)
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path + ".ckpt")
    elif mode == "resume":
        model, opt = build(seed=123)  # different init: everything must come from the checkpoint
        ckpt = torch.load(path + ".ckpt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        train(model, opt, n1, n1 + n2)
        torch.save(model.state_dict(), path + ".resumed")
    elif mode == "straight":
        model, opt = build(seed=0)
        train(model, opt, 0, n1 + n2)
        torch.save(model.state_dict(), path + ".straight")
