"""DeepSpeed with a fused-MoE model (tiny DeepSeek-V3) on W gloo processes (module-level for spawn)."""
from __future__ import annotations

import torch

from tests._dist_workers import local_batch
from tests._ds_workers import MC_PARAMS, _fp32_params, _setup, ds_config, layout_name, qk_clip_params
from tests._tiny_hf import tiny_model


def moe_single(steps: int):
    """Single-process oracle on the whole global batch (gradient clipping as DeepSpeed's config)."""
    from dist_muonclip import MuonClip
    from tests._ds_workers import train_single

    model = tiny_model("deepseek_v3", seed=0)
    opt = MuonClip(model, **{**MC_PARAMS, **qk_clip_params()})
    return train_single(steps, model=model, opt=opt)


def ds_moe_worker(rank: int, world: int, stage: int, steps: int):
    _setup()
    from dist_muonclip.deepspeed import initialize, muonclip_optimizer

    model = tiny_model("deepseek_v3", seed=0)
    engine, *_ = initialize(model=model, config=ds_config(stage, world))
    inner = muonclip_optimizer(engine)
    for t in range(steps):
        ids = local_batch(t, rank, world)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    # elements of the stacked experts held by a rank other than their chunk's owner (they travel)
    moved, per = 0, {}
    for name, owner in inner.plan.owners.items():
        base = name.split("[")[0]
        if "mlp.experts." not in base:
            continue
        unit = inner.engine.units.by_name[name]
        per[base] = unit[0].numel() if unit.ndim == 3 else unit.numel() // unit.shape[0]
        moved += sum(b - a for r, rs in enumerate(inner.engine.units.ranges(unit)) if r != owner for a, b in rs)
    return {"params": _fp32_params(engine), "owners": dict(inner.plan.owners), "moved_expert_elems": moved,
            "expert_matrix_numel": per,
            "layout": layout_name(engine), "metrics": inner.metrics(),
            "state_numel": sum(t.numel() for s in inner.state.values() for t in s.values()
                               if isinstance(t, torch.Tensor) and t.ndim > 0)}
