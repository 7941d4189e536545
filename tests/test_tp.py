"""Tensor-parallel DTensors (issue 17, item 3): never taken for FSDP2 rows.

Regression pinned: a model whose every parameter is ``ColwiseParallel``-sharded (``(Shard(0),)`` on
a 1-D tp mesh) was read by ``MuonClip(model)`` as FSDP2 and accepted; its QK-Clip would then have
reduced max logits of different heads (TP ranks hold different heads) into one. ``MuonClip(model)``
now tells the two apart by what ``fully_shard`` manages (``FSDPModule`` subtrees) and refuses
tensor parallel by name until a TP layout exists; FSDP2 stays accepted, an explicit ``layout=``
stays the override. Runs on 2 gloo CPU processes.
"""
from __future__ import annotations

import pytest
from torch import nn

pytest.importorskip("torch.distributed.tensor.parallel")

from tests.dist_utils import run_distributed, values


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))


def tp_acceptance_worker(rank: int, world: int) -> dict:
    """``MuonClip(model)`` on TP, FSDP x TP, FSDP2 and explicit-override models: the error text
    (or the layout's class name when accepted) per case."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from dist_muonclip import MuonClip, fsdp

    out: dict = {}

    def attempt(label, model, **kw):
        try:
            out[label] = type(MuonClip(model, lr=0.01, **kw).layout).__name__
        except (ValueError, TypeError) as e:
            out[label] = f"{type(e).__name__}: {e}"

    tp = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    m = parallelize_module(_mlp(), tp, {"0": ColwiseParallel(), "1": ColwiseParallel()})
    attempt("colwise_all", m)                       # every parameter (Shard(0),): the wrongly accepted case
    attempt("colwise_all_override", m, layout=fsdp.Shard0Layout(tp), process_group=tp.get_group())
    m = parallelize_module(_mlp(), tp, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    attempt("colwise_rowwise", m)
    m = _mlp()
    fsdp.fully_shard_model(m, init_device_mesh("cpu", (world,)), blocks=[])
    attempt("fsdp", m)                              # FSDP2 on a 1-D mesh: still read from the DTensors
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    m = parallelize_module(_mlp(), mesh2["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()})
    fully_shard(m, mesh=mesh2["dp"])                # FSDP x TP: managed by fully_shard, TP placements
    out["fsdp_tp_placements"] = [str(tuple(p.placements)) for p in m.parameters()]
    attempt("fsdp_tp", m)
    return out


def test_tensor_parallel_is_not_taken_for_fsdp2(tmp_path):
    outs = values(run_distributed(tp_acceptance_worker, 2, tmp_path=tmp_path, timeout=300))
    for rank, out in enumerate(outs):             # every rank decides alike (no rank hangs in a collective)
        assert out == outs[0], rank
    out = outs[0]
    for case in ("colwise_all", "colwise_rowwise"):
        assert out[case].startswith("ValueError") and "'0.weight'" in out[case], out[case]
        assert "fully_shard" in out[case] and "tensor parallel" in out[case], out[case]
    assert "Shard(dim=0)" in out["colwise_all"] and "2 such parameters" in out["colwise_all"]
    assert out["colwise_all_override"] == "Shard0Layout"       # explicit layout= stays the override
    assert out["fsdp"] == "Shard0Layout"                         # FSDP2 is not mistaken for TP
    # FSDP x TP: managed by fully_shard but placed on the tp axis too: refused by the placement check
    assert out["fsdp_tp"].startswith("ValueError") and "tensor-parallel" in out["fsdp_tp"], out["fsdp_tp"]
