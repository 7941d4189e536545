"""accelerate's DeepSpeed plugin with MuonClip named in the JSON, in a script that never imports
transformers: ``import dist_muonclip.hf``, ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(
hf_ds_config=cfg))`` and ``accelerator.prepare(model, DummyOptim(...))`` on a plain torch LM.

accelerate fills the config's ``"auto"`` lr and weight_decay from ``DummyOptim`` and calls
``deepspeed.initialize`` without an optimizer; the DeepSpeed hooks of ``dist_muonclip.hf`` build
MuonClip inside our DeepSpeed adapter. Run by tests/test_hf_accelerate.py on the CPU (one process:
accelerate counts one process under DeepSpeed on CPU, so W=1 is the honest variant there) and by
``benchmarks/hf_gpu.py`` on a GPU (accelerate's real DeepSpeed path). The oracle is the plain
MuonClip on the same model and batches (:func:`train_single`).

    python -m benchmarks.scenarios.accelerate_ds OUT.pt [--steps N]   # one process, W=1
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

VOCAB, DIM, HIDDEN, SEQ, BATCH = 64, 32, 64, 12, 4
# "auto": filled by accelerate from DummyOptim (DUMMY); the rest is MuonClip's own (fp32
# Newton-Schulz: the run differs from the oracle only in kernel / summation order)
JSON_PARAMS: dict[str, Any] = {"lr": "auto", "weight_decay": "auto", "adamw_lr": 0.005, "momentum": 0.9,
                               "adamw_betas": [0.85, 0.97], "adamw_eps": 1e-7, "ns_dtype": "float32",
                               "ns_backend": "torch", "qk_clip": False}
DUMMY = {"lr": 0.03, "weight_decay": 0.05}
# what MuonClip must end up with: JSON values, "auto" ones from DummyOptim
WANT = {"lr": 0.03, "weight_decay": 0.05, "adamw_lr": 0.005, "momentum": 0.9, "adamw_betas": (0.85, 0.97),
        "adamw_eps": 1e-7}


class PlainLM(nn.Module):
    """A torch-only causal LM: embedding, two residual MLP blocks, a norm, an untied ``lm_head``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))
                                    for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b(h)
        logits = self.lm_head(self.norm(h))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def build_model() -> PlainLM:
    torch.manual_seed(0)
    return PlainLM()


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(500 + step))


def ds_config(stage: int, route: str = "config", offload: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                           "zero_optimization": {"stage": stage}, "steps_per_print": 10_000}
    if route == "config":
        cfg["optimizer"] = {"type": "MuonClip", "params": dict(JSON_PARAMS)}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def train_single(steps: int, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Oracle: plain MuonClip with the hyperparameters the JSON + DummyOptim describe."""
    from dist_muonclip import MuonClip

    model = build_model().to(device or "cpu")
    kw = {k: v for k, v in JSON_PARAMS.items() if v != "auto"}
    opt = MuonClip(model, **{**kw, **DUMMY})
    for t in range(steps):
        model(batch(t).to(device or "cpu")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters()}


def accelerate_ds_worker(rank: int, world: int, steps: int, stage: int = 2, route: str = "config",
                         offload: bool = False) -> dict[str, Any]:
    """One rank of accelerate + DeepSpeed plugin (see module doc). ``route``: ``"config"`` (the JSON
    names MuonClip, ``DummyOptim`` carries lr / weight_decay) or ``"instance"`` (no optimizer section,
    ``accelerator.prepare(model, MuonClip(model, ...))``); ``offload``: ``offload_optimizer`` cpu.
    Returns the fp32 master weights after ``steps`` steps, what accelerate built, and what was
    imported and patched before accelerate's DeepSpeed plugin started."""
    import accelerate.accelerator as acc_mod
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    import dist_muonclip.hf as hf
    from dist_muonclip import MuonClip
    from dist_muonclip.deepspeed import disable_shm_comm
    from dist_muonclip.integrations.deepspeed import DeepSpeedMuonClip

    # the user's script up to here imported accelerate and dist_muonclip.hf, never transformers
    before = {"transformers_imported": "transformers" in sys.modules, "patched": hf.patched(),
              "offload_map_patched": acc_mod.map_pytorch_optim_to_deepspeed.__module__.startswith("dist_muonclip.")}
    disable_shm_comm()
    # ACCELERATE_USE_CPU (set by CPU runs of other accelerate scenarios) makes accelerate drop the
    # DeepSpeed plugin for plain DDP; on CPU accelerate picks DeepSpeed without it
    os.environ.pop("ACCELERATE_USE_CPU", None)
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(stage, route, offload)))
    model = build_model().to(acc.device)     # an instance is built on the parameters DeepSpeed will hold
    if route == "config":
        opt_in = DummyOptim(model.parameters(), **DUMMY)
    else:
        opt_in = MuonClip(model, **{**{k: v for k, v in JSON_PARAMS.items() if v != "auto"}, **DUMMY})
    engine, opt = acc.prepare(model, opt_in)
    inner = hf.muonclip_optimizer(engine)
    groups = [{k: (tuple(v) if isinstance(v, list) else v) for k, v in g.items() if k != "params"}
              for g in inner.param_groups]
    muon_ids = {id(p) for g in inner.param_groups if g["use_muon"] for p in g["params"]}
    muon_names = sorted(n for n, p in engine.module.named_parameters() if id(p) in muon_ids)
    losses = []
    for t in range(steps):
        loss = engine(batch(t).to(acc.device))
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    client = engine.basic_optimizer
    masters = {k: v.detach().cpu().clone() for k, v in client.full_state_dict()["masters"].items()}
    return {"params": masters, "losses": losses, "groups": groups, "muon_names": muon_names, "before": before,
            "adapter": type(client).__name__, "is_adapter": isinstance(client, DeepSpeedMuonClip),
            "is_instance": route != "instance" or inner is opt_in,
            "inner": type(inner).__name__, "layout": client.layout_name, "world_size": inner.world_size,
            "num_steps": inner.num_steps, "zero_stage": engine.zero_optimization_stage(),
            "offload": bool(engine.zero_offload_optimizer()),
            "distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
            "device": str(acc.device), "describe_split": inner.describe_split(),
            # accelerate 1.16's DeepSpeed plugin imports transformers itself (DeepSpeedPlugin.select ->
            # set_deepspeed_weakref -> transformers.integrations.HfDeepSpeedConfig)
            "transformers_imported_after": "transformers" in sys.modules}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="one-process accelerate + DeepSpeed plugin run (see module doc)")
    ap.add_argument("out", help="torch.save path of the worker's result")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--route", choices=("config", "instance"), default="config")
    ap.add_argument("--offload", action="store_true")
    args = ap.parse_args(argv)
    from dist_muonclip.launch_env import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    out = accelerate_ds_worker(0, 1, args.steps, args.stage, args.route, args.offload)
    torch.save(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
