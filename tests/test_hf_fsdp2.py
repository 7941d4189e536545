"""accelerate / HF Trainer with FSDP2: MuonClip built on the plain model, then the framework shards
the model and swaps the optimizer's parameters for DTensors (``import dist_muonclip.hf`` makes
MuonClip follow through :meth:`MuonClip.rebind_params`), and the frameworks' own checkpoints.

Oracles: the one-process run of the fsdp scenario (``benchmarks.scenarios.fsdp.train_single``) and
our own ``fully_shard_model`` + ``make_muonclip`` path at W=2; bit-equality for resume.

CPU limit (accelerate's, not ours): accelerate enables FSDP only for GPU-like distributed types, so
:func:`benchmarks.scenarios.hf_fsdp2.make_accelerator` flips the state's ``distributed_type`` to
FSDP (asserted below, so a fixed accelerate shows up); everything after it is accelerate's own
``prepare`` / ``save_fsdp_*`` / ``load_fsdp_*``. Trainer with ``fsdp_version=2`` and the real GPU
path run in ``benchmarks/hf_gpu.py`` (docs/hf.md).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.scenarios import fsdp as F
from tests import _hf_workers as H
from tests.dist_utils import run_distributed, values

pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from benchmarks.scenarios import hf_fsdp2 as S  # noqa: E402  (needs accelerate)
from dist_muonclip import MuonClip  # noqa: E402
from dist_muonclip.launch_env import free_port  # noqa: E402

STEPS = 4
# fp32 (ns_dtype=float32): W=2 differs from the one-process oracle only in gradient summation order
# (reduce-scatter of two half-batch means vs one batch mean, ~1e-7 relative), amplified by
# Newton-Schulz, QK-Clip and momentum over 4 steps; same bound as tests/test_fsdp.py
ATOL, RTOL = 5e-5, 1e-4


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def oracle():
    model, _, clipped = F.train_single("llama", STEPS)
    return {k: p.detach().clone() for k, p in model.named_parameters()}, clipped


def _swap_params(model: nn.Module, opt: MuonClip, fn) -> dict:
    """What fully_shard + accelerate's switch do, in one process: every module parameter replaced by
    a new Parameter (``fn(p)``), and the optimizer's groups pointed at the new ones by position."""
    mapping = {}
    for mod in list(model.modules()):
        for name, p in list(mod.named_parameters(recurse=False)):
            mapping[p] = nn.Parameter(fn(p.detach()))
            setattr(mod, name, mapping[p])
    for g in opt.param_groups:
        g["params"] = [mapping[p] for p in g["params"]]
    return mapping


def test_rebind_params_follows_swapped_parameters_like_the_oracle(oracle):
    """Regression for the swap: after the framework replaced every parameter (same shapes), the
    optimizer updates the new tensors, keeps their names and QK-Clips their heads; four
    steps equal the oracle bit for bit (same process, same math, only the tensors moved)."""
    model = F.build_model("llama")
    opt = MuonClip(model, qk_clip=F.QK["llama"], **F.OPT_KW)
    assert opt.rebind_params() is False                  # nothing swapped: nothing to do
    names = [opt.param_name(p) for g in opt.param_groups for p in g["params"]]
    _swap_params(model, opt, torch.clone)
    assert opt.rebind_params() is True
    assert [opt.param_name(p) for g in opt.param_groups for p in g["params"]] == names
    _, _, clipped = F.train_single("llama", STEPS, model=model, opt=opt)
    assert all(c > 0 for c in clipped) and clipped == oracle[1]        # QK-Clip acted on the new tensors
    _equal({k: p.detach() for k, p in model.named_parameters()}, oracle[0])


def test_rebind_params_refuses_before_changing_anything():
    """After a step the state belongs to the old tensors: refused, naming the fix; a changed shape
    or group length is refused too; the optimizer keeps its old bindings."""
    model = F.build_model("llama")
    opt = MuonClip(model, qk_clip=F.QK["llama"], **F.OPT_KW)
    bound = [list(g["params"]) for g in opt.param_groups]
    F.train_single("llama", 1, model=model, opt=opt)
    _swap_params(model, opt, torch.clone)
    with pytest.raises(ValueError, match="already stepped.*build a new MuonClip"):
        opt.rebind_params()
    assert all(opt.param_name(p) for g in bound for p in g)              # old names still bound
    fresh = MuonClip(model, qk_clip=False, **F.OPT_KW)
    fresh.param_groups[0]["params"] = fresh.param_groups[0]["params"][:-1]
    with pytest.raises(ValueError, match="changed length"):
        fresh.rebind_params()
    fresh = MuonClip(model, qk_clip=False, **F.OPT_KW)
    g = fresh.param_groups[0]
    g["params"] = [nn.Parameter(torch.zeros(3, 3))] + g["params"][1:]
    with pytest.raises(ValueError, match="changed shape"):
        fresh.rebind_params()


def test_import_wraps_accelerates_fsdp2_switch():
    import accelerate.accelerator as acc_mod
    from accelerate.utils import fsdp_utils

    import dist_muonclip.hf  # noqa: F401

    for fn in (acc_mod.fsdp2_switch_optimizer_parameters, fsdp_utils.fsdp2_switch_optimizer_parameters):
        assert getattr(fn, "__wrapped__", None) is not None and fn.__code__.co_filename.endswith("hf_fsdp.py")


@pytest.mark.slow
def test_accelerate_fsdp2_prepare_after_optimizer_matches_single_process_and_fully_shard(oracle, tmp_path):
    """``accelerator.prepare(model, MuonClip(model))`` with FSDP2 at W=2: MuonClip built Replicated
    over 2 ranks moves to the Shard0 layout; 4 steps equal the one-process oracle and our own
    ``fully_shard_model`` + ``make_muonclip`` run; replicas identical; param_groups plain values."""
    outs = values(H.run_torchrun_like(S.accelerate_fsdp2_call, 2, STEPS, {}, tmp_path=tmp_path / "acc",
                                      port=free_port()))
    ours = values(run_distributed(F.fsdp_train_worker, 2, "llama", STEPS, tmp_path=tmp_path / "ours"))
    for o in outs:
        assert o["forced"]                       # accelerate's CPU gate (module doc); False on a GPU
        assert o["before"] == {"layout": "Replicated", "world_size": 2}
        assert o["layout"] == "Shard0Layout" and o["world_size"] == 2 and o["same_optimizer"]
        assert o["num_steps"] == STEPS and o["metrics"]["qk_clip/num_heads_clipped"] > 0
        assert all(S._plain(v) for g in o["group_values"] for v in g.values())
        _close(o["params"], oracle[0])
        _close(o["params"], ours[0]["params"])
    _equal(outs[0]["params"], outs[1]["params"])


@pytest.mark.slow
@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_accelerate_fsdp2_checkpoint_resume_bit_identical(state_dict_type, tmp_path):
    """accelerate's own ``save_fsdp_model`` / ``save_fsdp_optimizer`` after 2 of 4 steps (DCP for
    SHARDED_STATE_DICT, one ``torch.load(weights_only=True)`` file for FULL_STATE_DICT), then
    ``load_fsdp_*`` in fresh processes and 2 more steps: bit-identical to the run that went on."""
    ckpt = str(tmp_path / "ckpt")
    kw = {"save_at": 2, "ckpt_dir": ckpt, "state_dict_type": state_dict_type}
    full = values(H.run_torchrun_like(S.accelerate_fsdp2_call, 2, STEPS, kw, tmp_path=tmp_path / "a",
                                      port=free_port()))
    res = values(H.run_torchrun_like(S.accelerate_fsdp2_call, 2, STEPS, {**kw, "resume": True},
                                     tmp_path=tmp_path / "b", port=free_port()))
    for a, b in zip(full, res):
        _equal(a["params"], b["params"])
        assert b["losses"] == a["losses"][2:]


@pytest.mark.slow
def test_torch_full_state_dict_cpu_offload_round_trip(tmp_path):
    """torch's ``get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)`` on MuonClip after
    accelerate's FSDP2 prepare: rank 0 gets full-shape CPU tensors and plain param_groups, the file
    loads with ``weights_only=True``, ``set_optimizer_state_dict(broadcast_from_rank0=True)`` in
    fresh processes resumes bit-identically."""
    path = str(tmp_path / "full.pt")
    a = values(H.run_torchrun_like(S.torch_full_state_worker, 2, STEPS, 2, path, False, tmp_path=tmp_path / "a",
                                   port=free_port()))
    b = values(H.run_torchrun_like(S.torch_full_state_worker, 2, STEPS, 2, path, True, tmp_path=tmp_path / "b",
                                   port=free_port()))
    c = a[0]["checks"]
    assert c["layout"] == "Shard0Layout" and c["rank_has_state"] and not a[1]["checks"]["rank_has_state"]
    assert c["groups_plain"] and c["state_on_cpu"] and c["full_shapes"] and c["num_state"] == c["num_params"]
    for x, y in zip(a, b):
        _equal(x["params"], y["params"])


# --------------------------------------------------------------------------------------------
# HF Trainer with fsdp_config={"version": 2}: MuonClipTrainer builds MuonClip on the plain model in
# create_optimizer, accelerate's prepare shards it and swaps the parameters, Trainer's own FSDP
# checkpoint (save_fsdp_model / save_fsdp_optimizer) saves and resumes
# --------------------------------------------------------------------------------------------

def _trainer(world: int, tmp_path, name: str, **kw) -> list[dict]:
    return values(H.run_torchrun_like(H.trainer_call, world, str(tmp_path / name / "out"), kw,
                                      tmp_path=tmp_path / name / "res", port=free_port(), timeout=300))


@pytest.mark.slow
def test_trainer_fsdp2_matches_single_process_and_resumes_bit_identical(tmp_path):
    """``MuonClipTrainer`` + ``TrainingArguments(fsdp=..., fsdp_config={"version": 2})`` at W=2 (the
    route HF allows with FSDP: ``optimizers=`` is refused there): MuonClip ends on the Shard0
    layout, each matrix is orthogonalized once per step, QK-Clip clips, the run equals the
    one-process Trainer oracle (global batch 8, no FSDP), Trainer's FSDP checkpoint at step 2
    resumes in fresh processes bit-identically, and param_groups hold plain values only.

    Trainer's FULL_STATE_DICT checkpoint is not run here: on this forced-CPU path Trainer's save
    (``save_model``'s full gather, then ``save_fsdp_model``) leaves the ranks in different
    collectives with torch's own AdamW as well (a hang that is not MuonClip's); accelerate's
    FULL_STATE_DICT save/load and torch's full_state_dict helpers are tested above, and
    benchmarks/hf_gpu.py runs Trainer's FULL_STATE_DICT path on a GPU."""
    state_dict_type = "SHARDED_STATE_DICT"
    from tests.test_hf import _n_muon

    oracle = _trainer(1, tmp_path, "oracle", max_steps=STEPS, route="subclass", per_device=8)[0]
    full = _trainer(2, tmp_path, "full", max_steps=STEPS, route="subclass", fsdp=state_dict_type, save_steps=2)
    _equal(full[0]["params"], full[1]["params"])
    for o in full:
        assert o["layout"] == "Shard0Layout" and o["world_size"] == 2
        assert o["num_steps"] == o["global_step"] == STEPS
        assert all(S._plain(v) for g in o["opt_params"] for v in g.values())
        _close(o["params"], oracle["params"])
        torch.testing.assert_close(torch.tensor(o["lrs"], dtype=torch.float64),     # same float formula
                                   torch.tensor(oracle["lrs"], dtype=torch.float64), rtol=1e-12, atol=0)
    assert sum(o["ns"] for o in full) == oracle["ns"] == STEPS * _n_muon()
    assert sum(m["qk_clip/num_heads_clipped"] for m in full[0]["metrics"]) > 0
    ckpt = tmp_path / "full" / "out" / "checkpoint-2"
    assert ckpt.is_dir()
    res = _trainer(2, tmp_path, "res", max_steps=STEPS, route="subclass", fsdp=state_dict_type, resume=str(ckpt))
    for a, b in zip(full, res):
        _equal(a["params"], b["params"])
        assert b["global_step"] == STEPS and b["losses"] == a["losses"][2:]


def test_gpu_script_skips_cleanly_without_a_gpu(capsys):
    from benchmarks import hf_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run")
    assert hf_gpu.main([]) == {"skipped": "no CUDA device"}
    assert "--cpu-smoke" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.full
def test_gpu_script_cpu_smoke_reports_every_scenario(tmp_path):
    """benchmarks/hf_gpu.py --cpu-smoke: every scenario row passes with the numbers the tests above
    guarantee (W=1 here: equal to the single-process runs, resume bit-identical)."""
    from benchmarks import hf_gpu

    out = tmp_path / "smoke.json"
    payload = hf_gpu.main(["--cpu-smoke", "--out", str(out)])
    assert payload["all_ok"] and out.exists()
    rows = {r["scenario"]: r for r in payload["rows"]}
    assert list(rows) == hf_gpu.row_names() == [
        "accelerate-SHARDED_STATE_DICT", "accelerate-FULL_STATE_DICT", "torch-full-state-cpu-offload",
        "trainer-SHARDED_STATE_DICT", "trainer-FULL_STATE_DICT", "lightning-deepspeed-zero1-config",
        "lightning-deepspeed-zero2-configure_optimizers", "accelerate-deepspeed-zero2-config",
        "accelerate-deepspeed-zero1-instance"]
    for name in ("accelerate-SHARDED_STATE_DICT", "accelerate-FULL_STATE_DICT"):
        r = rows[name]
        assert r["layout"] == "Shard0Layout" and r["resume_max_abs_diff"] == 0.0 and r["resume_losses_equal"]
        assert r["max_abs_diff_vs_single_gpu"] <= hf_gpu.TOL and r["qk_clip_heads_clipped_last"] > 0
    assert rows["trainer-SHARDED_STATE_DICT"]["max_abs_diff_vs_trainer_without_fsdp"] <= hf_gpu.TOL
    assert "skipped" in rows["trainer-FULL_STATE_DICT"]
    for name in ("lightning-deepspeed-zero1-config", "lightning-deepspeed-zero2-configure_optimizers"):
        assert rows[name]["resume_max_abs_diff"] == 0.0 and rows[name]["max_abs_diff_vs_single_gpu"] <= hf_gpu.TOL
    for name in ("accelerate-deepspeed-zero2-config", "accelerate-deepspeed-zero1-instance"):
        r = rows[name]
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["optimizer"] == "DeepSpeedClient(MuonClip)"
        assert r["max_abs_diff_vs_single_gpu"] <= hf_gpu.TOL and not r["transformers_imported_before_accelerator"]
    assert payload["environment"]["git_commit"]


def test_gpu_script_selects_rows_and_bounds_each_row(tmp_path, capsys):
    """``--only`` picks rows by name (a term that selects nothing fails before anything runs);
    ``--row-timeout`` kills a row over its budget, reports it failed, and the next row still runs."""
    from benchmarks import hf_gpu

    names = hf_gpu.row_names()
    assert hf_gpu.select(names, "lightning") == ["lightning-deepspeed-zero1-config",
                                                 "lightning-deepspeed-zero2-configure_optimizers"]
    assert hf_gpu.select(names, "lightning-*-config, accelerate-deepspeed") == [
        "lightning-deepspeed-zero1-config", "accelerate-deepspeed-zero2-config", "accelerate-deepspeed-zero1-instance"]
    assert hf_gpu.select(names, None) == names
    with pytest.raises(ValueError, match="--only 'nothing' selects no row"):
        hf_gpu.main(["--cpu-smoke", "--only", "nothing"])
    assert hf_gpu.main(["--list"])["rows"] == names and "lightning-deepspeed-zero1-config" in capsys.readouterr().out
    rows = hf_gpu.scenarios(str(tmp_path), cpu=True, only="accelerate-deepspeed", row_timeout=1.5)
    assert [r["scenario"] for r in rows] == ["accelerate-deepspeed-zero2-config", "accelerate-deepspeed-zero1-instance"]
    for r in rows:        # a spawned process needs more than 1.5 s to import torch, accelerate and deepspeed
        assert not r["ok"] and "Timeout" in r["error"] and r["seconds"] < 30, r
