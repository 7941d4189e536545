"""Tensor parallel (issue 17): ``parallelize_module`` alone and under FSDP2, read from the DTensors.

Regression pinned: a model whose every parameter is ``ColwiseParallel``-sharded (``(Shard(0),)`` on
a 1-D tp mesh) was read by ``MuonClip(model)`` as FSDP2; its QK-Clip then reduced max logits of
different heads (TP ranks hold different heads) into one. ``MuonClip(model)`` now tells the two
apart by what ``fully_shard`` manages (``FSDPModule`` subtrees) and by placements FSDP2 alone never
makes, and reads tensor parallel as :class:`dist_muonclip.tp_layout.TensorParallelLayout`. Runs
on gloo CPU processes against the single-process oracle (fp32 NS, QK-Clip clipping heads).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch.distributed.tensor.parallel")

from tests import _fsdp_workers as F
from tests.dist_utils import run_distributed, values


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))


def tp_acceptance_worker(rank: int, world: int) -> dict:
    """``MuonClip(model)`` on TP, FSDP x TP, FSDP2 and explicit-override models: the layout's class
    name when accepted, the error text when refused."""
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
    attempt("colwise_all_clip_norm", m, max_grad_norm=1.0)
    m = parallelize_module(_mlp(), tp, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    attempt("colwise_rowwise", m)
    m = _mlp()
    fsdp.fully_shard_model(m, init_device_mesh("cpu", (world,)), blocks=[])
    attempt("fsdp", m)                              # FSDP2 on a 1-D mesh: still Shard0Layout
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    m = parallelize_module(_mlp(), mesh2["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()})
    fully_shard(m, mesh=mesh2["dp"])                # FSDP x TP: managed by fully_shard, TP placements
    attempt("fsdp_tp", m)
    m = F.build_model("deepseek_v3")                # 3 heads on 2 tp ranks
    parallelize_module(m, tp, tp_plan(m))
    attempt("heads_not_divisible", m, qk_clip=F.QK["deepseek_v3"])
    return out


def test_tensor_parallel_is_read_as_tensor_parallel(tmp_path):
    outs = values(run_distributed(tp_acceptance_worker, 2, tmp_path=tmp_path, timeout=300))
    for rank, out in enumerate(outs):             # every rank decides alike (no rank hangs in a collective)
        assert out == outs[0], rank
    out = outs[0]
    for case in ("colwise_all", "colwise_rowwise", "fsdp_tp"):
        assert out[case] == "TensorParallelLayout", (case, out[case])
    assert out["fsdp"] == "Shard0Layout"                         # FSDP2 is not mistaken for TP
    assert out["colwise_all_override"] == "Shard0Layout"       # explicit layout= stays the override
    assert out["colwise_all_clip_norm"].startswith("ValueError") and "max_grad_norm" in out["colwise_all_clip_norm"]
    assert out["heads_not_divisible"].startswith("ValueError") and "divisible by 2" in out["heads_not_divisible"]


# ------------------------------------------------------------------ training against the oracle

def build_tp_model(kind: str) -> nn.Module:
    """The scenario models of tests/test_meshes (GQA llama: 4 q / 2 kv heads; MLA DeepSeek-V3 with
    MoE) with heads divisible by tp=2 (MLA: 4 heads instead of 3) and a 96-wide MLP."""
    from benchmarks.scenarios.tiny_hf import tiny_model

    kw = dict(F.MODEL_KW[kind], intermediate_size=96)   # torch's RowwiseParallel fails on uneven 93 columns
    if kind == "deepseek_v3":
        kw.update(num_attention_heads=4, num_key_value_heads=4)
    return tiny_model(kind, seed=0, **kw)


def tp_plan(model: nn.Module) -> dict:
    """Megatron-style plan: q/k/v (MLA: q_b, kv_b) and MLP gate/up ColwiseParallel, o/down
    RowwiseParallel; embeddings, norms, MLA's down projections, routed experts stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj"):
            plan[name] = ColwiseParallel()
        elif leaf in ("o_proj", "down_proj") and ".experts" not in name:
            plan[name] = RowwiseParallel()
    return plan


class _SumRopeKeyGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces (over tp) the gradient of the trailing ``qk_rope``
    columns of MLA's ``kv_a_proj_with_mqa`` output: the shared rope key feeds every head, and under
    TP each rank's heads give only their part of its gradient (the ``k_pass`` columns go through
    the ColwiseParallel ``kv_b_proj``, whose input gradient TP already sums). A TP-plan detail of
    HF's plain-tensor MLA (torchtitan keeps it a DTensor), not the optimizer's business."""

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.clone()
        part = g[..., ctx.start:].contiguous()
        dist.all_reduce(part, group=ctx.group)
        g[..., ctx.start:] = part
        return g, None, None


def train_tp_single(kind: str, steps: int, extra: dict | None = None):
    from dist_muonclip import MuonClip

    model = build_tp_model(kind)
    opt = MuonClip(model, qk_clip=F.QK[kind], **{**F.OPT_KW, **(extra or {})})
    clipped = []
    for t in range(steps):
        ids = F.global_batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, clipped


def tp_train_worker(rank: int, world: int, kind: str, steps: int, mesh_shape: tuple, save_dir: str | None = None,
                    load_dir: str | None = None, start: int = 0, names: tuple | None = None,
                    extra: dict | None = None) -> dict:
    """``parallelize_module`` on the tp axis (and ``fully_shard`` on dp for a 2-D mesh), then
    ``MuonClip(model)`` with no layout: it must read tensor parallel from the DTensors.
    ``names=("dp",)``: FSDP2 only (a DCP load target). Optional DCP save / load of the model and
    the optimizer state (keyed by FQN; the mesh shape may differ between the two)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from dist_muonclip import MuonClip, fsdp
    from dist_muonclip.comm import CommAccountant

    names = names or (("tp",) if len(mesh_shape) == 1 else ("dp", "tp"))
    mesh = init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=names)
    dp = mesh_shape[names.index("dp")] if "dp" in names else 1
    dp_rank = mesh.get_coordinate()[names.index("dp")] if "dp" in names else 0
    model = build_tp_model(kind)
    if "tp" in names:
        tp_mesh = mesh["tp"] if len(names) > 1 else mesh
        parallelize_module(model, tp_mesh, tp_plan(model))
        for name, m in model.named_modules():
            if name.endswith("kv_a_proj_with_mqa"):
                kv_start, group = model.config.kv_lora_rank, tp_mesh.get_group()
                m.register_forward_hook(lambda _m, _i, out, s=kv_start, g=group: _SumRopeKeyGrad.apply(out, s, g))
    if "dp" in names and (dp > 1 or "tp" not in names):
        fsdp.fully_shard_model(model, mesh["dp"] if len(names) > 1 else mesh)
    acc = CommAccountant()
    opt = MuonClip(model, qk_clip=F.QK[kind], accountant=acc, **{**F.OPT_KW, **(extra or {})})
    clipped = F.dcp_train_steps(model, opt, acc, lambda t: F.local_batch(t, dp_rank, dp), start, steps,
                                load_dir=load_dir, save_dir=save_dir)
    return {"params": F._full_params(model), "clipped": clipped, "acc": acc.totals(),
            "layout": type(opt.layout).__name__, "opt_world": opt.world_size,
            "placements": {n: str(tuple(p.placements)) for n, p in model.named_parameters()
                           if hasattr(p, "placements")},
            "state_numel": sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")}


def _assert_cost_model_exact(outs, dp: int, tp: int) -> None:
    """The optimizer's bytes per rank and tag (over STEPS steps) and its state elements equal
    :func:`dist_muonclip.tools.cost_model_tp.predict_fsdp_tp` exactly (llama: no stacked experts)."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    from dist_muonclip.tools.cost_model import specs_from_model
    from dist_muonclip.tools.cost_model_tp import predict_fsdp_tp

    model = build_tp_model("llama")
    plan = {n + ".weight": "col" if isinstance(st, ColwiseParallel) else "row" for n, st in tp_plan(model).items()}
    cfg = model.config
    pred = predict_fsdp_tp(specs_from_model(model), dp, tp, plan, grad_bytes=4, ns_bytes=4,   # fp32 NS
                           num_logits=cfg.num_hidden_layers * cfg.num_attention_heads)
    for rank, out in enumerate(outs):
        got = {tag: v["bytes"] for tag, v in out["acc"].items()}
        assert got == {tag: STEPS * b for tag, b in pred["bytes_per_rank"][rank].items()}, (rank, got, pred)
        assert out["state_numel"] == pred["state_numel_per_rank"][rank], rank


STEPS = 4
# fp32 everywhere; TP runs differ from the oracle in the summation order of the row-parallel
# all-reduces and of FSDP's reduce-scatter (~1e-7 relative per step), amplified by Newton-Schulz
# and momentum to ~1e-5 on O(0.1) weights (as tests/test_meshes.py)
ATOL, RTOL = 5e-5, 1e-4


@pytest.mark.parametrize("kind", ["llama", "deepseek_v3"])
def test_tp_matches_single_process(kind, tmp_path):
    """TP over 2 ranks vs the single-process oracle, QK-Clip clipping heads on every step."""
    want, want_clipped = train_tp_single(kind, STEPS)
    outs = values(run_distributed(tp_train_worker, 2, kind, STEPS, (2,), tmp_path=tmp_path, timeout=600))
    assert min(want_clipped) > 0, want_clipped            # tau is low enough that heads clip
    if kind == "llama":
        _assert_cost_model_exact(outs, 1, 2)
    for rank, out in enumerate(outs):
        assert out["layout"] == "TensorParallelLayout" and out["opt_world"] == 2
        assert out["clipped"] == want_clipped, (rank, out["clipped"], want_clipped)
        assert out["params"].keys() == want.keys()
        for k in want:
            torch.testing.assert_close(out["params"][k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["llama", pytest.param("deepseek_v3", marks=pytest.mark.full)])
def test_fsdp_x_tp_2x2_matches_single_process(kind, tmp_path):
    """FSDP2 on dp=2 over TP on tp=2 (W=4, a (dp, tp) mesh): each matrix is assembled on its owner
    from pieces cut on both axes ((_StridedShard(0), Shard(0)), (Shard(0), Shard(1)),
    and (Shard(0),) on the dp sub-mesh for what TP left alone); max logits reduced over dp, heads kept
    per tp rank."""
    want, want_clipped = train_tp_single(kind, STEPS)
    outs = values(run_distributed(tp_train_worker, 4, kind, STEPS, (2, 2), tmp_path=tmp_path, timeout=900))
    assert min(want_clipped) > 0, want_clipped
    if kind == "llama":
        _assert_cost_model_exact(outs, 2, 2)
    placements = set(outs[0]["placements"].values())
    assert {"(_StridedShard(dim=0, sf=2), Shard(dim=0))", "(Shard(dim=0), Shard(dim=1))",
            "(Shard(dim=0),)"} <= placements, placements
    for rank, out in enumerate(outs):
        assert out["layout"] == "TensorParallelLayout" and out["opt_world"] == 4
        assert out["clipped"] == want_clipped, (rank, out["clipped"], want_clipped)
        for k in want:
            torch.testing.assert_close(out["params"][k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.full
def test_dcp_fsdp_x_tp_2x2_resumes_on_fsdp_1x4_and_4x1(tmp_path):
    """DCP across mesh shapes with TP, optimizer state included: half the steps on FSDP x TP 2x2,
    saved (DTensor state with 2-D placements); the other half loaded on FSDP2 over 4 ranks (no
    TP) and on FSDP x TP 4x1: the result equals the oracle after all steps."""
    half = STEPS // 2
    want, want_clipped = train_tp_single("llama", STEPS)
    ckpt = str(tmp_path / "ckpt")
    values(run_distributed(tp_train_worker, 4, "llama", half, (2, 2), ckpt, tmp_path=tmp_path / "save", timeout=900))
    for label, shape, names in (("fsdp_1x4", (4,), ("dp",)), ("fsdp_x_tp_4x1", (4, 1), ("dp", "tp"))):
        outs = values(run_distributed(tp_train_worker, 4, "llama", half, shape, None, ckpt, half, names,
                                      tmp_path=tmp_path / label, timeout=900))
        for rank, out in enumerate(outs):
            assert out["clipped"] == want_clipped[half:], (label, rank, out["clipped"])
            for k in want:
                torch.testing.assert_close(out["params"][k], want[k], atol=ATOL, rtol=RTOL,
                                           msg=lambda m, k=k, label=label: f"{label} {k}: {m}")


@pytest.mark.full
def test_tp_ns_split_heads_matches_single_process(tmp_path):
    """``ns_split="heads"`` under TP (W=2): the owner assembles the whole q/k/v/o matrix and cuts it
    into heads as on every layout; equals the single-process run with the same split."""
    extra = {"ns_split": "heads"}
    want, want_clipped = train_tp_single("llama", STEPS, extra)
    outs = values(run_distributed(tp_train_worker, 2, "llama", STEPS, (2,), None, None, 0, None, extra,
                                  tmp_path=tmp_path, timeout=600))
    for rank, out in enumerate(outs):
        assert out["clipped"] == want_clipped, (rank, out["clipped"])
        for k in want:
            torch.testing.assert_close(out["params"][k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


def fsdp_shard1_worker(rank: int, world: int, steps: int) -> dict:
    """FSDP2 alone with column shards (``shard_placement_fn`` -> ``Shard(1)`` for 2-D weights) on a
    1-D mesh: no parallelize_module, every rank computes every head on its own data."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from dist_muonclip import MuonClip

    mesh = init_device_mesh("cpu", (world,))
    model = build_tp_model("llama")
    fn = lambda p: Shard(1) if p.ndim == 2 else Shard(0)   # noqa: E731
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=fn)
    opt = MuonClip(model, qk_clip=F.QK["llama"], **F.OPT_KW)
    clipped = []
    for t in range(steps):
        ids = F.local_batch(t, rank, world)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clipped.append(opt.metrics().get("qk_clip/num_heads_clipped", 0.0))
    return {"params": F._full_params(model), "clipped": clipped, "layout": type(opt.layout).__name__,
            "head_shard": opt.layout.head_shard}


def test_fsdp2_column_shards_read_without_head_split(tmp_path):
    """FSDP2 with ``Shard(1)`` placements (W=2) is read by TensorParallelLayout with
    ``heads_split=False`` (the tracker records all heads, not a tp block) and matches the oracle."""
    want, want_clipped = train_tp_single("llama", STEPS)
    outs = values(run_distributed(fsdp_shard1_worker, 2, STEPS, tmp_path=tmp_path, timeout=600))
    for rank, out in enumerate(outs):
        assert out["layout"] == "TensorParallelLayout" and out["head_shard"] is None
        assert out["clipped"] == want_clipped, (rank, out["clipped"])
        for k in want:
            torch.testing.assert_close(out["params"][k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")
