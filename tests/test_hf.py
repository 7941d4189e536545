"""dist_muonclip.hf: MuonClip named in a DeepSpeed JSON through deepspeed.initialize, HF Trainer and
accelerate; Trainer under DDP (torchrun-like processes) with checkpoints and resume.

Oracles: the single-process run on the same global batch (``tests._ds_workers.train_single`` for
``deepspeed.initialize``; a one-process ``MuonClipTrainer`` without DeepSpeed for every Trainer
mode), bit-equality for resume at the same world size, replica equality across ranks.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from tests import _ds_workers as D
from tests import _hf_workers as H
from tests.dist_utils import run_distributed, values

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

# Ports of this file: 29950-29999 (one per spawned run, so parallel sessions never collide on them)
PORT = iter(range(29950, 30000))

# fp32 tolerance (ns_dtype=float32 everywhere): the runs differ from the oracle only in gradient
# summation order (all-reduce / reduce-scatter over 2 ranks vs one process's batch sum, ~1e-7
# relative), which Newton-Schulz, QK-Clip and a few steps of momentum amplify; measured <= 2e-7 on
# these runs. Same bound as tests/test_deepspeed.py.
ATOL, RTOL = 5e-5, 1e-4
STEPS = 4


def _close(got: dict, want: dict, atol: float = ATOL, rtol: float = RTOL) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"not bit-identical: {bad[:5]}"


def _n_muon() -> int:
    from dist_muonclip import MuonClip
    from tests._tiny_hf import tiny_model

    opt = MuonClip(tiny_model("llama", seed=0), lr=0.01, qk_clip=False)
    return sum(len(g["params"]) for g in opt.param_groups if g["use_muon"])


# --------------------------------------------------------------------------------------------
# No process group
# --------------------------------------------------------------------------------------------

def test_import_paths_and_install_is_idempotent():
    """``import dist_muonclip.hf`` is the integration module; a second install() patches nothing twice."""
    import deepspeed.runtime.engine as ds_engine

    import dist_muonclip.hf as hf
    import dist_muonclip.integrations.hf as ihf

    assert hf is ihf and hf.is_installed()
    init = ds_engine.DeepSpeedEngine.__init__
    hf.install()
    assert ds_engine.DeepSpeedEngine.__init__ is init


def test_muonclip_kwargs_maps_hf_names_and_refuses_unfilled_auto():
    """HF's AdamW spellings ``betas``/``eps`` are MuonClip's ``adamw_betas``/``adamw_eps``; an
    ``"auto"`` nobody filled raises naming the key; the section itself is not modified."""
    import dist_muonclip.hf as hf

    params = {"lr": 0.02, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}
    kw = hf.muonclip_kwargs(params)
    assert kw == {"lr": 0.02, "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-6, "weight_decay": 0.1}
    assert "betas" in params          # caller's dict untouched
    with pytest.raises(ValueError, match=r"'betas' and 'adamw_betas'"):
        hf.muonclip_kwargs({"lr": 0.02, "betas": [0.9, 0.95], "adamw_betas": [0.9, 0.95]})
    with pytest.raises(ValueError, match=r"\['lr', 'weight_decay'\] are \"auto\""):
        hf.muonclip_kwargs({"lr": "auto", "weight_decay": "auto"})
    with pytest.raises(ValueError, match="did you mean 'momentum'"):
        hf.muonclip_kwargs({"lr": 0.02, "momentun": 0.9})


def test_trainer_config_process_fills_auto_from_training_arguments(tmp_path):
    """HF fills lr/betas/eps/weight_decay; the hook also fills adamw_* "auto" values, checks
    adamw_betas against adam_beta1/2 like HF checks betas, and lets adamw_lr differ."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    import dist_muonclip.hf  # noqa: F401

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.03, weight_decay=0.05, adam_beta1=0.8,
                             adam_beta2=0.9, adam_epsilon=1e-7, use_cpu=True, report_to=[])
    cfg = {"optimizer": {"type": "MuonClip", "params": {
        "lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto", "adamw_lr": "auto",
        "adamw_weight_decay": "auto"}}}
    hc = HfTrainerDeepSpeedConfig(cfg)
    hc.trainer_config_process(args)
    assert hc.config["optimizer"]["params"] == {"lr": 0.03, "weight_decay": 0.05, "betas": [0.8, 0.9], "eps": 1e-7,
                                                "adamw_lr": 0.03, "adamw_weight_decay": 0.05}
    cfg = {"optimizer": {"type": "MuonClip", "params": {"lr": "auto", "adamw_betas": [0.9, 0.95], "adamw_lr": 0.01}}}
    hc = HfTrainerDeepSpeedConfig(cfg)
    hc.trainer_config_process(args)
    assert hc.mismatches == ["- ds optimizer.params.adamw_betas=[0.9, 0.95] vs hf adam_beta1+adam_beta2=[0.8, 0.9]"]
    # another optimizer type is left to HF alone
    cfg = {"optimizer": {"type": "AdamW", "params": {"adamw_lr": "auto"}}}
    hc = HfTrainerDeepSpeedConfig(cfg)
    hc.trainer_config_process(args)
    assert hc.config["optimizer"]["params"] == {"adamw_lr": "auto"}


def test_check_process_group_warns_or_raises_only_when_the_group_is_missing():
    """Regression (issue 15): MuonClip built with WORLD_SIZE=2 before the process group silently ran
    single-process per rank. The check warns (strict: raises) in exactly that situation."""
    import dist_muonclip.hf as hf

    with pytest.warns(hf.DistributedNotReadyWarning, match="WORLD_SIZE=2"):
        assert hf.check_process_group(env={"WORLD_SIZE": "2"}) is not None
    with pytest.raises(RuntimeError, match="Build it after the process group exists"):
        hf.check_process_group(env={"WORLD_SIZE": "4"}, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.check_process_group(env={"WORLD_SIZE": "1"}) is None
        assert hf.check_process_group(env={}) is None
        assert hf.check_process_group(object(), env={"WORLD_SIZE": "2"}) is None   # explicit group given


def test_mixin_rejects_non_dict_options(tmp_path):
    import dist_muonclip.hf as hf
    from tests._tiny_hf import tiny_model

    with pytest.raises(TypeError, match="muonclip_kwargs must be a dict"):
        hf.MuonClipTrainer(model=tiny_model("llama"), args=H._args(str(tmp_path), max_steps=1, per_device=2),
                           muonclip_kwargs=[("lr", 0.1)])


# --------------------------------------------------------------------------------------------
# DeepSpeed's own deepspeed.initialize
# --------------------------------------------------------------------------------------------

def test_deepspeed_initialize_refusals(tmp_path):
    """Every unsupported or ambiguous call raises before training, naming the fix."""
    out = values(run_distributed(H.ds_refusals_worker, 1, tmp_path=tmp_path, port=next(PORT)))[0]
    assert out["zero3"].startswith("ValueError") and "offload_param" in out["zero3"]
    assert out["offload"].startswith("ValueError") and "offload_optimizer.ratio" in out["offload"]
    assert out["auto"].startswith("ValueError") and "['weight_decay'] are \"auto\"" in out["auto"]
    assert "'betas' and 'adamw_betas'" in out["both_spellings"]
    assert out["bad_value"].startswith("ValueError") and "optimizer.params" in out["bad_value"] \
        and "momentum" in out["bad_value"]
    assert "remove one of them" in out["instance_and_section"]
    assert "scheduler was built on the MuonClip instance" in out["instance_scheduler"]


@pytest.fixture(scope="module")
def ds_oracle():
    cache = {}

    def get(scheduler: bool):
        if scheduler not in cache:
            model, _ = D.train_single(STEPS, params=H.QK, scheduler=scheduler)
            cache[scheduler] = {k: p.detach().clone() for k, p in model.named_parameters()}
        return cache[scheduler]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.full), pytest.param(1, marks=pytest.mark.full), 2])
def test_deepspeed_initialize_with_json_type_matches_single_process(stage, ds_oracle, tmp_path):
    """``deepspeed.initialize`` (DeepSpeed's, not ours) with ``"type": "MuonClip"``, WarmupLR from the
    JSON, gradient clipping and QK-Clip clipping: W=2 equals the one-process oracle; every Muon
    matrix is orthogonalized exactly once per step over both ranks; the scheduler drives both parts."""
    outs = values(run_distributed(H.ds_native_worker, 2, stage, STEPS, "config", tmp_path=tmp_path,
                                  port=next(PORT)))
    assert outs[0]["layout"] == ("replicated" if stage == 0 else "flat_fragments(zero)")
    assert all(o["world_size"] == 2 for o in outs)
    for o in outs:
        _close(o["params"], ds_oracle(True))
    assert sum(o["ns"] for o in outs) == STEPS * _n_muon()
    for t, lrs in enumerate(outs[0]["lrs"]):
        f = D.warmup_factor(t)
        assert lrs == pytest.approx([0.02 * f, 0.01 * f])
    assert outs[0]["metrics"]["qk_clip/num_heads_clipped"] > 0


@pytest.mark.slow
@pytest.mark.full
def test_deepspeed_initialize_wraps_a_plain_muonclip_instance(ds_oracle, tmp_path):
    """Regression (issue 15): a plain MuonClip as DeepSpeed's client optimizer at ZeRO-2 failed at
    step 1 (DeepSpeed steps one narrowed param group at a time). Now it is wrapped in the adapter:
    same numerics as the oracle, and the MuonClip stepping is the caller's instance."""
    outs = values(run_distributed(H.ds_native_worker, 2, 2, STEPS, "instance", tmp_path=tmp_path, port=next(PORT)))
    assert all(o["is_instance"] and o["layout"] == "flat_fragments(zero)" for o in outs)
    for o in outs:
        _close(o["params"], ds_oracle(False))
    assert sum(o["ns"] for o in outs) == STEPS * _n_muon()


# --------------------------------------------------------------------------------------------
# HF Trainer (torchrun-like processes: Trainer/accelerate create the process group)
# --------------------------------------------------------------------------------------------

def _trainer(world: int, tmp_path, name: str, **kw) -> list[dict]:
    return values(H.run_torchrun_like(H.trainer_call, world, str(tmp_path / name / "out"), kw,
                                      tmp_path=tmp_path / name / "res", port=next(PORT)))


@pytest.fixture(scope="module")
def trainer_oracle(tmp_path_factory):
    """One process, no DeepSpeed, MuonClipTrainer, the whole global batch of 8 per step."""
    root = tmp_path_factory.mktemp("trainer_oracle")
    return _trainer(1, root, "oracle", max_steps=STEPS, route="subclass", per_device=8)[0]


def _check_against_oracle(outs: list[dict], oracle: dict) -> None:
    _equal(outs[0]["params"], outs[1]["params"])               # replicas identical
    for o in outs:
        _close(o["params"], oracle["params"])
        assert o["world_size"] == 2
        assert o["num_steps"] == o["global_step"] == STEPS      # one MuonClip step per optimizer step
        # Trainer's schedule drives both parts. Recorded after each optimizer step: without
        # DeepSpeed the groups already hold the next step's lr; the DeepSpeed adapter copies its
        # lr into MuonClip when it steps, so there step t shows the lr it used (step 0: warmup's 0)
        # (rel 1e-12: the same float formula evaluated on both sides)
        want = oracle["lrs"] if o["layout"] == "ddp" else [[0.0, 0.0]] + oracle["lrs"][:-1]
        torch.testing.assert_close(torch.tensor(o["lrs"], dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert sum(o["ns"] for o in outs) == oracle["ns"] == STEPS * _n_muon()
    clipped = [m["qk_clip/num_heads_clipped"] for m in outs[0]["metrics"]]
    assert sum(clipped) > 0, clipped


@pytest.mark.slow
@pytest.mark.parametrize("stage, gas", [pytest.param(0, 1, marks=pytest.mark.full),
                                        pytest.param(1, 1, marks=pytest.mark.full), (2, 2)])
def test_trainer_deepspeed_json_matches_single_process(stage, gas, trainer_oracle, tmp_path):
    """Regression (issue 15: "MuonClip is not a supported DeepSpeed Optimizer"). Trainer with
    ``TrainingArguments(deepspeed=cfg)`` naming MuonClip, every HF value "auto", Trainer's lr
    scheduler: W=2 equals the one-process Trainer without DeepSpeed. ZeRO-2 runs with gradient
    accumulation 2 (per-device batch 2): Newton-Schulz still runs once per optimizer step."""
    outs = _trainer(2, tmp_path, "run", max_steps=STEPS, stage=stage, per_device=4 // gas, gas=gas)
    assert outs[0]["layout"] == ("replicated" if stage == 0 else "flat_fragments(zero)")
    assert outs[0]["opt_params"]["lr"] == 0.02 and outs[0]["opt_params"]["betas"] == [0.9, 0.95]
    _check_against_oracle(outs, trainer_oracle)


@pytest.mark.slow
def test_trainer_deepspeed_save_steps_and_resume_bit_identical(tmp_path):
    """ZeRO-2 with the scheduler from the JSON: ``save_steps=2`` writes DeepSpeed checkpoints, and
    ``resume_from_checkpoint`` continues to the same parameters, bit for bit (CPU)."""
    full = _trainer(2, tmp_path, "full", max_steps=STEPS, stage=2, save_steps=2, scheduler=True)
    assert "checkpoint-2" in full[0]["files"]
    ckpt = str(tmp_path / "full" / "out" / "checkpoint-2")
    resumed = _trainer(2, tmp_path, "resumed", max_steps=STEPS, stage=2, scheduler=True, resume=ckpt)
    for a, b in zip(full, resumed):
        _equal(a["params"], b["params"])
        assert b["num_steps"] == STEPS
    assert sum(b["ns"] for b in resumed) == (STEPS - 2) * _n_muon()
    assert resumed[0]["losses"] == full[0]["losses"][2:]


@pytest.mark.slow
@pytest.mark.full
def test_trainer_deepspeed_routes_optimizers_argument(trainer_oracle, tmp_path):
    """Regression (issue 15): ``Trainer(optimizers=(MuonClip(model), None))`` with DeepSpeed was
    silently replaced by AdamW. Now the instance is what DeepSpeed steps (ZeRO-1 partitions)."""
    outs = _trainer(2, tmp_path, "run", max_steps=STEPS, stage=1, route="instance")
    assert all(o["is_user_instance"] for o in outs)
    assert outs[0]["layout"] == "flat_fragments(zero)"
    _check_against_oracle(outs, trainer_oracle)


@pytest.mark.slow
@pytest.mark.full
def test_trainer_deepspeed_refuses_a_scheduler_on_the_instance(tmp_path):
    """optimizers=(MuonClip, scheduler) under DeepSpeed: the scheduler would drive the wrong object; raise."""
    res = H.run_torchrun_like(H.trainer_call, 1, str(tmp_path / "out"), {"stage": 1, "route": "instance+scheduler"},
                              tmp_path=tmp_path / "res", port=next(PORT))
    assert not res[0]["ok"] and "lr_scheduler_type" in res[0]["error"], res[0].get("error")


@pytest.mark.slow
def test_trainer_ddp_checkpoints_never_hang_and_resume_at_2_and_1(trainer_oracle, tmp_path):
    """Regression (issue 15): under DDP any Trainer checkpoint deadlocked (Trainer calls the
    collective ``state_dict()`` on rank 0 only), and a MuonClip built before the process group ran
    single-process per rank. Here the instance is built before TrainingArguments (no group yet):
    it is moved onto the group (W=2, each matrix orthogonalized once), ``save_steps=2`` saves, the
    run equals the oracle; resuming from checkpoint-2 at W=2 (through the optimizer_cls_and_kwargs
    factory) is bit-identical, and at W=1 matches within the fp32 tolerance."""
    full = _trainer(2, tmp_path, "full", max_steps=STEPS, route="instance", save_steps=2)
    assert all(o["is_user_instance"] for o in full)
    _check_against_oracle(full, trainer_oracle)
    ckpt = str(tmp_path / "full" / "out" / "checkpoint-2")
    assert os.path.exists(os.path.join(ckpt, "optimizer.pt"))
    res2 = _trainer(2, tmp_path, "res2", max_steps=STEPS, route="factory", resume=ckpt)
    for a, b in zip(full, res2):
        _equal(a["params"], b["params"])
        assert b["num_steps"] == STEPS
    res1 = _trainer(1, tmp_path, "res1", max_steps=STEPS, route="subclass", per_device=8, resume=ckpt)[0]
    _close(res1["params"], full[0]["params"])
    assert res1["num_steps"] == STEPS and res1["losses"] == pytest.approx(full[0]["losses"][2:], rel=1e-5)


@pytest.mark.slow
@pytest.mark.full
def test_accelerate_deepspeed_plugin_with_dummy_optim_matches_single_process(ds_oracle, tmp_path):
    """accelerate + DeepSpeed plugin + ``DummyOptim``, JSON naming MuonClip with "auto" lr and
    weight_decay: ZeRO-2 over 2 ranks equals the one-process oracle (each rank feeds its rows by
    hand; accelerate's own CPU limit, one process counted under DeepSpeed, is asserted so that a
    fixed accelerate shows up here)."""
    pytest.importorskip("accelerate")
    outs = values(H.run_torchrun_like(H.accelerate_ds_worker, 2, STEPS, tmp_path=tmp_path, port=next(PORT)))
    for o in outs:
        assert o["world_size"] == 2 and o["layout"] == "flat_fragments(zero)" and o["num_steps"] == STEPS
        assert o["lr"] == [0.02, 0.01]          # "auto" lr filled from DummyOptim; adamw_lr from the JSON
        _close(o["params"], ds_oracle(False))
    assert sum(o["ns"] for o in outs) == STEPS * _n_muon()
    assert all(o["num_processes"] == 1 for o in outs)
