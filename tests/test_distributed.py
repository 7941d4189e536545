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


CASES = {"default": {}, "few_matrices": W.FEW_MATRICES_KW}


@pytest.fixture(scope="module")
def oracles():
    """Single-process runs per case, computed on first use: ``oracles(case)`` -> parameters."""
    cache = {}

    def get(case="default"):
        if case not in cache:
            model, opt = W.train_single(STEPS, **CASES[case])
            assert opt.metrics()["qk_clip/num_heads_clipped"] > 0   # the clip is active in these runs
            cache[case] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cache[case]
    return get


@pytest.fixture(scope="module")
def oracle(oracles):
    return oracles("default")


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


# full matrix: -m full; by default W=2 and the more-ranks-than-matrices case at W=4 for both modes
@pytest.mark.parametrize("world,case", [(2, "default"), pytest.param(4, "default", marks=pytest.mark.full),
                                        (4, "few_matrices")])
@pytest.mark.parametrize("mode", ["ddp", "optimizer"])
def test_matches_single_process(world, case, mode, oracles, tmp_path):
    """10 steps of the tiny Llama (GQA) with QK-Clip clipping heads, DDP or optimizer-owned
    reduction, equal the single process; ``few_matrices``: 3 Muon matrices on 4 ranks, so one
    rank owns none and still takes part in every collective."""
    outs = values(run_distributed(W.train_worker, world, mode, STEPS, "llama", CASES[case], tmp_path=tmp_path))
    for r, out in enumerate(outs):
        _assert_same_params(out["params"], oracles(case))
        if r:
            for k in out["params"]:   # replicas stay bit-identical: every rank applies the same update
                assert torch.equal(out["params"][k], outs[0]["params"][k]), k
    assert all(c > 0 for c in outs[0]["clipped"][1:]), outs[0]["clipped"]    # QK-Clip clips in the run
    if case == "few_matrices":
        assert len(outs[0]["owners"]) == 3 and len(set(outs[0]["owners"].values())) == 3
    # ZeRO-1 memory: optimizer state is split, not replicated
    single_state = sum(out["state_numel"] for out in outs)
    assert max(out["state_numel"] for out in outs) <= 1.5 * single_state / world
    if mode == "optimizer" and case == "default":
        _assert_reductions_overlap_backward(outs)


def _assert_reductions_overlap_backward(outs):
    """Regression: communication buckets held one matrix shape across all layers, so nothing was
    launched until layer 0's gradients existed. Now buckets follow backward order (the last
    step's buckets are rebuilt from the first backward's observed order): when the last
    gradient's hook fires, every bucket but the one holding that gradient has been launched.
    Counted from hooks, no timing."""
    for out in outs:
        trace, calls = out["hook_trace"], out["comm_bucket_calls"]
        assert len(calls) >= 3                    # bucket_cap_mb=0.05 cuts the tiny model's gradients
        assert trace[-1] == sum(calls)            # all reductions launched by the end of backward ...
        assert trace[-2] == sum(calls) - calls[-1] > 0   # ... all but the last bucket before its last gradient
        assert trace[0] < trace[-2]               # and progressively, not all at once


def test_world_size_one_process_group(oracle, tmp_path):
    (out,) = values(run_distributed(W.train_worker, 1, "optimizer", STEPS, tmp_path=tmp_path))
    _assert_same_params(out["params"], oracle)


def _muon_adamw_numel():
    model, opt = W.build()
    muon = sum(p.numel() for g in opt.param_groups if g["use_muon"] for p in g["params"])
    adamw = sum(p.numel() for g in opt.param_groups if not g["use_muon"] for p in g["params"])
    return muon, adamw


def _muon_from_owner_calls(bucket_counts):
    """Per step: one all-gather per same-shape bucket whose owners hold equal numbers of its
    matrices, else one broadcast per owner (Comm.all_gather_uneven)."""
    even = sum(len(set(c)) == 1 for c in bucket_counts)
    return {"all_gather[muon_from_owner]": even,
            "broadcast[muon_from_owner]": sum(sum(n > 0 for n in c) for c in bucket_counts if len(set(c)) > 1)}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.full)])
def test_accounting_ddp_and_optimizer_owned(world, tmp_path):
    """Bytes on the wire, summed over ranks and steps, per the byte model of comm.py; and, per
    step and rank, exactly the expected collectives (a stray one fails the test)."""
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
    assert total(ddp, "all_gather[muon_from_owner]") + total(ddp, "broadcast[muon_from_owner]") == pytest.approx(
        steps * (world - 1) * muon * fp32)
    assert total(ddp, "all_gather[adamw_gather]") == pytest.approx(steps * world * (world - 1) * chunk * fp32)
    # optimizer-owned reduction: every gradient element reaches the rank that needs it once per
    # other rank (reduce to owners and slice holders) ...
    assert total(own, "reduce[grad_reduce]") == pytest.approx(steps * (world - 1) * (muon + adamw) * fp32)
    # ... so reduce + gathers == one DDP all-reduce, within 5% (the one-time bucket-order broadcast
    # of the first step included)
    own_bytes = sum(total(own, k) for k in ("reduce[grad_reduce]", "all_gather[muon_from_owner]", "broadcast[muon_from_owner]",
                                            "all_gather[adamw_gather]", "broadcast[bucket_order]"))
    assert own_bytes == pytest.approx(ddp_allreduce, rel=0.05)
    # the collectives of every step, by kind and number of calls
    for outs, mode in ((ddp, "ddp"), (own, "optimizer")):
        for out in outs:
            assert out["num_steps"] == steps
            want = {k: n for k, n in _muon_from_owner_calls(out["bucket_counts"]).items() if n}
            want.update({"all_reduce[preflight]": 1, "all_gather[adamw_gather]": 1})
            for t, step in enumerate(out["acc_steps"]):
                if mode == "optimizer":   # one reduce per destination region of every bucket
                    want["reduce[grad_reduce]"] = sum(out["first_comm_bucket_calls" if t == 0 else "comm_bucket_calls"])
                got = {k: c["calls"] for k, c in step.items()}
                if mode == "ddp":
                    assert got.pop("all_reduce") >= 1            # DDP's own bucketed all-reduces
                elif t == 0:
                    assert got.pop("broadcast[bucket_order]") == 1   # buckets rebuilt after the first step
                assert got == want, (mode, t, got)


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
    """Regression (optimizer-owned mode): the skipped parameter's inf gradient still entered the
    global norm for max_grad_norm (grad_norm = inf, clip coefficient 0), so every other parameter
    took a zero-gradient step. An inf injected during backward on rank 1 (a tensor hook: it
    travels through the reduction) into c.weight (Muon) and c.bias (AdamW, held by rank 1's
    slice): both modes skip c on every rank with its state untouched, and everything else equals
    the one-process run in which c had no gradient that step, norm included."""
    max_norm = 0.1
    modes = ("ddp", "optimizer")
    runs = values(run_distributed(W.calls_worker, 2, [("nonfinite_worker", (m, max_norm)) for m in modes],
                                  tmp_path=tmp_path))
    want_model, want_metrics = W.nonfinite_oracle(2, max_norm)
    assert want_metrics["grad_norm"] > max_norm                  # the clip acts on the other parameters
    for i, mode in enumerate(modes):
        outs = [run[i] for run in runs]
        for o in outs:
            assert o["c_unchanged"] and o["c_state_unchanged"] and o["warned"], mode
            assert o["metrics"]["num_skipped"] == 2, mode
            # the norm of the active parameters only: fp32 sums in another order (~1e-7 relative)
            assert o["metrics"]["grad_norm"] == pytest.approx(want_metrics["grad_norm"], rel=1e-5), mode
            _assert_same_params(o["params"], want_model.state_dict())
        assert any(o["c_has_state"][0] for o in outs) and any(o["c_has_state"][1] for o in outs)  # state existed
        for k in outs[0]["params"]:
            assert torch.equal(outs[0]["params"][k], outs[1]["params"][k]), (mode, k)


def test_failing_rank_does_not_hang_the_others(tmp_path):
    res = run_distributed(W.failing_rank_worker, 2, tmp_path=tmp_path, timeout=120)
    assert not res[1]["ok"] and "sparse gradient" in res[1]["error"]
    assert not res[0]["ok"] and "another rank failed" in res[0]["error"]


def test_checkpoint_save_at_2_resume_at_1_and_4(tmp_path):
    """Saved at W=2 (DDP) after 5 steps, both ways: the full state (a collective) and each rank's
    shard (``state_dict(sharded=True)``, no communication) merged offline with
    ``merge_sharded``; the two are identical. The merged shards resume at W=4 (optimizer-owned
    reduction: other owners, other AdamW slices), the full state at W=1; 5 more steps equal the
    uninterrupted 10-step run."""
    first = values(run_distributed(W.train_worker, 2, "ddp", 5, "llama", None, True, tmp_path=tmp_path / "a"))
    ckpt = first[0]["checkpoint"]
    model, opt = W.build()
    merged = opt.merge_sharded([o["checkpoint"]["shard"] for o in first])
    assert merged["state"].keys() == ckpt["optim"]["state"].keys()
    for name, s in ckpt["optim"]["state"].items():
        assert s.keys() == merged["state"][name].keys()
        for k in s:
            assert torch.equal(merged["state"][name][k], s[k]), (name, k)
    assert merged["param_groups"] == ckpt["optim"]["param_groups"] and merged["step"] == ckpt["optim"]["step"]
    oracle_model, _ = W.train_single(10)
    want = {k: v.detach() for k, v in oracle_model.state_dict().items()}
    four = values(run_distributed(W.train_worker, 4, "optimizer", 5, "llama", None, False,
                                  {"model": ckpt["model"], "optim": merged}, 5, tmp_path=tmp_path / "b"))
    _assert_same_params(four[0]["params"], want)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    W.train_single(5, start=5, model=model, opt=opt)
    _assert_same_params(model.state_dict(), want)


@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.full), 4])
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
    gathered = sum(o["acc"]["all_to_all[muon_to_owner]"]["bytes"] for o in outs)
    # every Muon element travels to its owner at most once per step (fp32), less what owners hold
    assert gathered <= STEPS * muon * 4


def test_add_param_group_replans_on_every_rank(tmp_path):
    """A group added after construction is planned, reduced and stepped like the others:
    before the first step (optimizer-owned reduction) and after two steps (DDP mode). The
    latter adds a and c, which moves b from rank 0 to rank 1; regression for a re-plan that left
    b's momentum on its old owner (the new owner restarted from zeros): the momentum arrives
    intact and the run equals the single process."""
    cases = [("optimizer", 0, 3), ("ddp", 2, 4)]    # mode, add_at, steps
    runs = values(run_distributed(W.calls_worker, 2, [("add_group_worker", (steps, mode, add_at))
                                                      for mode, add_at, steps in cases], tmp_path=tmp_path))
    for i, (mode, add_at, steps) in enumerate(cases):
        _check_add_group([run[i] for run in runs], steps, add_at)


def _check_add_group(outs, steps, add_at):
    assert outs[0]["owners"] == outs[1]["owners"] and "c.weight" in outs[0]["owners"]
    model = W.add_group_oracle(2, steps, add_at)
    for out in outs:
        _assert_same_params(out["params"], model.state_dict())
    if add_at:
        assert outs[0]["owners_before"]["b.weight"] == 0 and outs[0]["owners"]["b.weight"] == 1
        new_owner = outs[1]
        assert outs[0]["b_momentum_after_add"] is None              # the old owner let it go
        assert new_owner["b_momentum_before"].abs().sum() > 0       # two steps of momentum ...
        assert torch.equal(new_owner["b_momentum_after_add"], new_owner["b_momentum_before"])   # ... moved intact


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


@pytest.mark.parametrize("world,mode", [(4, "ddp"), (2, "optimizer"), pytest.param(2, "ddp", marks=pytest.mark.full),
                                        pytest.param(4, "optimizer", marks=pytest.mark.full)])
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
