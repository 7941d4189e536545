"""ZeRO-1 MuonClip on W gloo processes against the single-process oracle, plus accounting."""
from __future__ import annotations

import math

import pytest
import torch

from tests import _dist_workers as W
from tests.dist_utils import run_distributed, values

STEPS = 10
# Tolerance: fp32 NS (ns_dtype="float32") everywhere; the only difference from the oracle is the
# summation order of gradient reductions (~1e-7 relative per step), which Newton-Schulz and 10
# steps of momentum amplify to at most ~1e-5 on O(0.1) weights.
ATOL, RTOL = 5e-5, 1e-4


@pytest.fixture(scope="module")
def oracle():
    model, opt = W.train_single(STEPS)
    assert opt.metrics()["qk_clip/num_heads_clipped"] > 0   # the clip is active in these runs
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")


def test_max_grad_norm_optimizer_owned(tmp_path):
    """Clipping the global norm when no rank holds the whole reduced gradient (one scalar
    all-reduce of squares) equals the single-process clipped run."""
    kw = {"max_grad_norm": 0.3}
    want_model, want_opt = W.train_single(4, **kw)
    assert want_opt.metrics()["grad_norm"] > 0.3   # the clip acts
    outs = values(run_distributed(W.train_worker, 2, "optimizer", 4, "llama", kw, tmp_path=tmp_path))
    _assert_same_params(outs[0]["params"], {k: v.detach() for k, v in want_model.state_dict().items()})


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["ddp", "optimizer"])
def test_matches_single_process(world, mode, oracle, tmp_path):
    outs = values(run_distributed(W.train_worker, world, mode, STEPS, tmp_path=tmp_path))
    for r, out in enumerate(outs):
        _assert_same_params(out["params"], oracle)
        if r:
            for k in out["params"]:   # replicas stay bit-identical: every rank applies the same update
                assert torch.equal(out["params"][k], outs[0]["params"][k]), k
    # ZeRO-1 memory: optimizer state is split, not replicated
    single_state = sum(out["state_numel"] for out in outs)
    assert max(out["state_numel"] for out in outs) <= 1.5 * single_state / world


def test_world_size_one_process_group(oracle, tmp_path):
    (out,) = values(run_distributed(W.train_worker, 1, "optimizer", STEPS, tmp_path=tmp_path))
    _assert_same_params(out["params"], oracle)


def _muon_adamw_numel():
    model, opt = W.build()
    muon = sum(p.numel() for g in opt.param_groups if g["use_muon"] for p in g["params"])
    adamw = sum(p.numel() for g in opt.param_groups if not g["use_muon"] for p in g["params"])
    return muon, adamw


@pytest.mark.parametrize("world", [2, 4])
def test_accounting_ddp_and_optimizer_owned(world, tmp_path):
    """Bytes on the wire, summed over ranks and steps, per the ring model of comm.py."""
    steps = 2
    ddp = values(run_distributed(W.train_worker, world, "ddp", steps, tmp_path=tmp_path / "ddp"))
    own = values(run_distributed(W.train_worker, world, "optimizer", steps, tmp_path=tmp_path / "own"))
    muon, adamw = _muon_adamw_numel()
    fp32 = 4

    def total(outs, kind):
        return sum(o["acc"].get(kind, {"bytes": 0})["bytes"] for o in outs)

    ddp_allreduce = total(ddp, "all_reduce")
    assert ddp_allreduce == pytest.approx(steps * world * 2 * (world - 1) / world * (muon + adamw) * fp32)
    # DDP mode: the optimizer adds exactly one all-gather of the Muon updates (fp32 here) and of
    # the AdamW slices (chunk padded to a multiple of W: at most W-1 elements)
    chunk = math.ceil(adamw / world)
    assert total(ddp, "all_gather[muon_gather]") + total(ddp, "all_to_all[muon_gather]") == pytest.approx(
        steps * (world - 1) * muon * fp32)
    assert total(ddp, "all_gather[adamw_gather]") == pytest.approx(steps * world * (world - 1) * chunk * fp32)
    # optimizer-owned reduction: reduce-to-owner + gather == one DDP all-reduce, within 5%
    own_bytes = sum(total(own, k) for k in ("all_to_all[muon_reduce]", "all_gather[muon_gather]",
                                            "all_to_all[muon_gather]", "reduce_scatter[adamw_reduce]",
                                            "all_gather[adamw_gather]"))
    assert own_bytes == pytest.approx(ddp_allreduce, rel=0.05)
    assert all(o["num_steps"] == steps for o in own)


def test_more_ranks_than_matrices(tmp_path):
    """4 ranks, 3 Muon matrices: some ranks own nothing and still take part in every collective."""
    outs = values(run_distributed(W.missing_grad_worker, 4, 3, tmp_path=tmp_path))
    # oracle: one process, gradient = mean over the 4 ranks' losses (b's gradient only from rank 0)
    from dist_muonclip import MuonClip

    model = W._TwoBranch()
    opt = MuonClip(model, lr=0.05, ns_dtype="float32", ns_backend="torch")
    for t in range(3):
        for r in range(4):
            (model(W.branch_inputs(t, r), use_b=(r == 0)) / 4).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for out in outs:
        _assert_same_params(out, model.state_dict())


def test_mismatched_plans_raise_on_every_rank(tmp_path):
    res = run_distributed(W.mismatch_worker, 2, tmp_path=tmp_path, timeout=120)
    for r in res:
        assert not r["ok"]
        assert "model.layers.0.mlp.gate_proj.weight" in r["error"] and "differ across ranks" in r["error"]


def test_nonfinite_gradient_on_one_rank_skips_everywhere(tmp_path):
    outs = values(run_distributed(W.nonfinite_worker, 2, tmp_path=tmp_path))
    for o in outs:
        assert o["c_unchanged"] and o["c_state_unchanged"] and o["a_changed"] and o["warned"]
    for k in outs[0]["params"]:
        assert torch.equal(outs[0]["params"][k], outs[1]["params"][k])


def test_failing_rank_does_not_hang_the_others(tmp_path):
    res = run_distributed(W.failing_rank_worker, 2, tmp_path=tmp_path, timeout=120)
    assert not res[1]["ok"] and "sparse gradient" in res[1]["error"]
    assert not res[0]["ok"] and "another rank failed" in res[0]["error"]


def test_checkpoint_save_at_2_resume_at_1_and_4(tmp_path):
    """Full state saved at W=2 after 5 steps; resumed at W=4 (DDP) and W=1 (one process)."""
    first = values(run_distributed(W.train_worker, 2, "ddp", 5, "llama", None, True, tmp_path=tmp_path / "a"))
    ckpt = first[0]["checkpoint"]
    oracle_model, _ = W.train_single(10)
    want = {k: v.detach() for k, v in oracle_model.state_dict().items()}
    four = values(run_distributed(W.train_worker, 4, "optimizer", 5, "llama", None, False, ckpt, 5,
                                  tmp_path=tmp_path / "b"))
    _assert_same_params(four[0]["params"], want)
    model, opt = W.build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    W.train_single(5, start=5, model=model, opt=opt)
    _assert_same_params(model.state_dict(), want)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layout_on_arbitrary_fragments(world, oracle, tmp_path):
    """The sharded engine (all-to-all of pieces to owners and back) on cuts that split rows,
    are uneven and sometimes empty, equals the single-process oracle; the full state dict
    assembled from pieces equals the oracle's state."""
    outs = values(run_distributed(W.flat_layout_worker, world, STEPS, tmp_path=tmp_path))
    for out in outs:
        _assert_same_params(out["params"], oracle)
    model, opt = W.train_single(STEPS)
    want = opt.state_dict()["state"]
    got = outs[0]["state"]["state"]
    assert got.keys() == want.keys()
    for name in want:
        for k in want[name]:
            torch.testing.assert_close(got[name][k].float(), want[name][k].float(), atol=ATOL, rtol=RTOL)
    muon, _ = _muon_adamw_numel()
    gathered = sum(o["acc"]["all_to_all[muon_gather]"]["bytes"] for o in outs)
    # every Muon element travels to its owner at most once per step (fp32), less what owners hold
    assert gathered <= STEPS * muon * 4


def test_add_param_group_replans_on_every_rank(tmp_path):
    """A group added after construction is planned, reduced and stepped like the others."""
    outs = values(run_distributed(W.add_group_worker, 2, 3, tmp_path=tmp_path))
    assert outs[0]["owners"] == outs[1]["owners"] and "c.weight" in outs[0]["owners"]
    from dist_muonclip import MuonClip

    model = W._TwoBranch()
    opt = MuonClip(model, lr=0.05, ns_dtype="float32", ns_backend="torch")
    for t in range(3):
        for r in range(2):
            (model(W.branch_inputs(t, r), use_b=True) / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for out in outs:
        _assert_same_params(out["params"], model.state_dict())


# --------------------------------------------------------------------------- MoE: stacked experts
EXPERTS = ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj")   # [4, m, n] each


def _matrix_dims(t):
    from dist_muonclip.param_split import matrix_shape

    return matrix_shape(t.shape, "batch" if t.ndim > 2 else "matrix")


@pytest.fixture(scope="module")
def moe_oracle():
    model, opt = W.train_single(STEPS, "deepseek_v3")
    assert opt.metrics()["qk_clip/num_heads_clipped"] > 0
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["ddp", "optimizer"])
def test_moe_experts_split_over_owners_match_single_process(world, mode, moe_oracle, tmp_path):
    """DeepSeek-V3 (MLA + fused MoE experts [4, m, n]): each stacked parameter is cut into
    min(4, W) chunks of experts with owners of their own, and the run still equals the single
    process (same tolerance as the dense model: only reduction order differs)."""
    outs = values(run_distributed(W.train_worker, world, mode, STEPS, "deepseek_v3", tmp_path=tmp_path))
    for r, out in enumerate(outs):
        _assert_same_params(out["params"], moe_oracle)
        if r:
            for k in out["params"]:
                assert torch.equal(out["params"][k], outs[0]["params"][k]), k
    owners = outs[0]["owners"]
    used = set()
    for name in EXPERTS:
        chunks = sorted(n for n in owners if n.startswith(name + "["))
        assert len(chunks) == min(4, world) and name not in owners, chunks
        used |= {owners[c] for c in chunks}
    assert len(used) > 1                     # the experts of one layer are orthogonalized on several ranks
    # and the busiest rank carries no more NS work than with one owner per stacked parameter
    from dist_muonclip.plan import MatrixItem, build_plan
    whole: dict[str, MatrixItem] = {}
    for n in owners:
        base = n.split("[")[0]
        k, m_, n_ = _matrix_dims(outs[0]["params"][base])
        whole[base] = MatrixItem(base, 0, k, m_, n_, "torch.float32")
    assert max(outs[0]["loads"]) <= max(build_plan(list(whole.values()), world).loads)
    single_state = sum(out["state_numel"] for out in outs)
    assert max(out["state_numel"] for out in outs) <= 1.5 * single_state / world


def test_moe_checkpoint_save_at_2_resume_at_4_and_1(tmp_path):
    """Momentum of expert chunks is saved by its owners as pieces of the full parameter: saved at
    W=2 (chunks of 2 experts), resumed at W=4 (chunks of 1, other owners) and W=1 (no chunks)."""
    first = values(run_distributed(W.train_worker, 2, "ddp", 5, "deepseek_v3", None, True, tmp_path=tmp_path / "a"))
    ckpt = first[0]["checkpoint"]
    for name in EXPERTS:     # the full state holds the whole [4, m, n] momentum of each stacked parameter
        assert ckpt["optim"]["state"][name]["momentum_buffer"].shape == ckpt["model"][name].shape
    oracle_model, _ = W.train_single(10, "deepseek_v3")
    want = {k: v.detach() for k, v in oracle_model.state_dict().items()}
    four = values(run_distributed(W.train_worker, 4, "optimizer", 5, "deepseek_v3", None, False, ckpt, 5,
                                  tmp_path=tmp_path / "b"))
    _assert_same_params(four[0]["params"], want)
    model, opt = W.build("deepseek_v3")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    W.train_single(5, "deepseek_v3", start=5, model=model, opt=opt)
    _assert_same_params(model.state_dict(), want)
