"""N-D device meshes (issue 17): the layout read from the DTensor parameters, HSDP.

Every scenario runs on gloo CPU processes against the single-process oracle (fp32 Newton-Schulz,
QK-Clip rescaling heads on every step) on a GQA (llama) and an MLA + MoE (DeepSeek-V3) model.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")

from tests import _fsdp_workers as F
from tests.dist_utils import run_distributed, values

STEPS = 6
# Tolerance as in test_fsdp: fp32 everywhere; the sharded runs differ from the oracle only in the
# summation order of the gradient reduce-scatter / all-reduce (~1e-7 relative per step), which
# Newton-Schulz and a few steps of momentum amplify to ~1e-5 on O(0.1) weights.
ATOL, RTOL = 5e-5, 1e-4
KINDS = ("llama", "deepseek_v3")


def _assert_same_params(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def oracles():
    out = {}
    for kind in KINDS:
        model, _, clipped = F.train_single(kind, STEPS)
        out[kind] = ({k: v.detach().clone() for k, v in model.named_parameters()}, clipped)
    return out


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    """One spawn per world size: ``runs[world][name]`` = per-rank outputs of
    :func:`tests._fsdp_workers.mesh_train_worker`."""
    tmp = tmp_path_factory.mktemp("mesh_runs")
    ckpt = str(tmp / "hsdp_ckpt")
    w = "mesh_train_worker"
    half = STEPS // 2
    plan = {
        2: {**{f"fsdp_{k}": (w, (k, STEPS, (2,), "auto")) for k in KINDS},
            "fsdp_heads": (w, ("llama", STEPS, (2,), "auto", None, None, 0, {"ns_split": "heads"})),
            "fsdp_gpt2": (w, ("gpt2", STEPS, (2,), "auto"))},
        4: {**{f"hsdp_{k}": (w, (k, STEPS, (2, 2), "auto")) for k in KINDS},
            "hsdp_make": (w, ("llama", STEPS, (2, 2), "make")),
            "save_2x2": (w, ("llama", half, (2, 2), "auto", ckpt)),
            "load_1x4": (w, ("llama", half, (4,), "auto", None, ckpt, half)),
            "load_4x1": (w, ("llama", half, (4, 1), "auto", None, ckpt, half))},
    }
    runs = {}
    for world, calls in plan.items():
        outs = values(run_distributed(F.calls_worker, world, list(calls.values()), tmp_path=tmp / f"w{world}",
                                      timeout=900))
        runs[world] = {name: [o[i] for o in outs] for i, name in enumerate(calls)}
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_fully_shard_without_layout_matches_single_process(kind, oracles, mesh_runs):
    """``MuonClip(model)`` on a fully_shard'ed model (no layout, no process group: read from the
    DTensors) equals one process on the global batch, clipping the same heads each step; the
    state is this rank's rows only. Regression: this raised 'DTensor ... layout is Replicated'."""
    want, clipped = oracles[kind]
    assert all(c > 0 for c in clipped), clipped            # the clip is really active
    for out in mesh_runs[2][f"fsdp_{kind}"]:
        assert out["layout"] == "Shard0Layout" and out["opt_world"] == 2
        _assert_same_params(out["params"], want)
        assert out["clipped"] == clipped
        assert out["state_numel"] == out["expected_state_numel"]


@pytest.mark.parametrize("kind", KINDS)
def test_hsdp_2x2_matches_single_process_replicas_bit_identical(kind, oracles, mesh_runs):
    """HSDP (fully_shard on a (replicate=2, shard=2) mesh, layout read from the parameters):
    parameters equal the oracle; the two replica groups hold bit-identical shards and momentum
    (each orthogonalizes its own copy from identical all-reduced gradients and globally reduced
    max logits); momentum lives on the local rows; the optimizer's own traffic per rank is
    exactly pure FSDP's at W=2 plus the preflight on all 4 ranks (nothing else crosses the
    replicate axis)."""
    want, clipped = oracles[kind]
    outs = mesh_runs[4][f"hsdp_{kind}"]
    by_coord = {o["coord"]: o for o in outs}
    for out in outs:
        assert out["layout"] == "Shard0Layout" and out["opt_world"] == 2 and out["opt_rank"] == out["coord"][1]
        _assert_same_params(out["params"], want)
        assert out["clipped"] == clipped                   # S reduced over all 4 ranks: the same heads
        assert out["state_numel"] == out["expected_state_numel"]
    for s in range(2):
        a, b = by_coord[(0, s)], by_coord[(1, s)]
        for n in a["local_params"]:
            assert torch.equal(a["local_params"][n], b["local_params"][n]), n
        for key in a["local_state"]:
            assert torch.equal(a["local_state"][key], b["local_state"][key]), key
        fsdp = mesh_runs[2][f"fsdp_{kind}"][s]["acc"]
        acc = a["acc"]
        assert set(acc) == {"all_to_all[muon_to_owner]", "all_to_all[muon_from_owner]", "all_reduce[preflight]"}
        for tag in ("all_to_all[muon_to_owner]", "all_to_all[muon_from_owner]"):
            assert acc[tag]["bytes"] == fsdp[tag]["bytes"], tag


def test_hsdp_make_muonclip_equals_auto(mesh_runs):
    """``fsdp.make_muonclip`` on the 2-D mesh builds the same layout as ``MuonClip(model)``:
    bit-identical parameters."""
    for a, b in zip(mesh_runs[4]["hsdp_make"], mesh_runs[4]["hsdp_llama"]):
        for n in a["local_params"]:
            assert torch.equal(a["local_params"][n], b["local_params"][n]), n


@pytest.mark.parametrize("shape", ["1x4", "4x1"])
def test_dcp_saved_on_2x2_resumes_on_other_mesh_shapes(shape, oracles, mesh_runs):
    """A DCP checkpoint of an HSDP 2x2 run after 3 steps, loaded on a 1-D mesh of 4 and on a
    (replicate=4, shard=1) mesh, continues to the oracle's parameters after 6 steps (momentum and
    AdamW moments re-sharded by DCP)."""
    want, clipped = oracles["llama"]
    for out in mesh_runs[4][f"load_{shape}"]:
        _assert_same_params(out["params"], want)
        assert out["clipped"] == clipped[STEPS // 2:]


def test_ns_split_heads_under_fsdp_matches_single_process(mesh_runs):
    """``ns_split="heads"`` on FSDP2 row shards (W=2: k_proj's 2 KV heads of 16 rows, one per
    rank; o_proj split by columns across shards of rows) equals the single-process run with the
    same option: the owner assembles the whole matrix, then cuts it into heads."""
    from dist_muonclip import MuonClip

    model = F.build_model("llama")
    opt = MuonClip(model, qk_clip=F.QK["llama"], ns_split="heads", **F.OPT_KW)
    model, _, clipped = F.train_single("llama", STEPS, model=model, opt=opt)
    want = {k: v.detach().clone() for k, v in model.named_parameters()}
    for out in mesh_runs[2]["fsdp_heads"]:
        _assert_same_params(out["params"], want)
        assert out["clipped"] == clipped


@pytest.mark.parametrize("kind", KINDS)
def test_cost_model_predicts_hsdp_optimizer_bytes_exactly(kind, mesh_runs):
    """``cost_model.predict(..., "muonclip_hsdp", replicas=2)`` gives each rank's measured
    ``muon_to_owner`` / ``muon_from_owner`` / ``preflight`` bytes of the 2 x 2 run exactly, and
    the optimizer state of its local rows (uneven shards, MoE stacks; FSDP2's own collectives are not counted by the
    accountant, so ``all_reduce[replicate]`` and the FSDP2 gathers are predictions only)."""
    from dist_muonclip.cost_model import predict, specs_from_model

    model = F.build_model(kind)
    cfg = model.config
    specs = specs_from_model(model)
    for r, out in enumerate(mesh_runs[4][f"hsdp_{kind}"]):
        pred = predict(specs, 4, "muonclip_hsdp", replicas=2, rank=r, ns_bytes=4,   # ns_dtype="float32"
                       num_logits=cfg.num_hidden_layers * cfg.num_attention_heads)
        for tag, measured in out["acc"].items():
            assert pred["bytes"][tag] == measured["bytes"] / STEPS, (r, tag)
        assert pred["state_bytes"] == 4 * out["state_numel"], r    # fp32 state of the exact uneven row shards
        assert pred["bytes"]["all_reduce[replicate]"] > 0


def test_fused_qkv_gpt2_under_fsdp_matches_single_process(mesh_runs):
    """GPT-2's fused ``c_attn`` is a transposed Conv1D ``[in, 3 * hidden]``: under FSDP2 its rows
    (input features) are sharded and QK-Clip scales q/k *columns* of every local row. W=2 equals
    the single-process run with the same heads clipped on every step."""
    model, _, clipped = F.train_single("gpt2", STEPS)
    # the clip is active: 8 heads on step 0, then every step but the one right after that first
    # clip (which leaves every head on tau; the next update lands them just under it)
    assert clipped[0] == 8 and sum(c > 0 for c in clipped) >= STEPS - 1, clipped
    want = {k: v.detach().clone() for k, v in model.named_parameters()}
    for out in mesh_runs[2]["fsdp_gpt2"]:
        _assert_same_params(out["params"], want)
        assert out["clipped"] == clipped
