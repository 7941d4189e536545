"""dist_muonclip.hf at ZeRO-3 and with optimizer offload: DeepSpeed's own ``deepspeed.initialize``
with ``"type": "MuonClip"`` and HF Trainer with a DeepSpeed JSON at ``"stage": 3`` (models built
under ``deepspeed.zero.Init``), ``offload_optimizer: {"device": "cpu"}`` at stages 1-3.

Oracles: the single-process runs of tests/test_hf.py (``train_single`` for deepspeed.initialize, a
one-process MuonClipTrainer without DeepSpeed for Trainer); bit-equality for resume.
"""
from __future__ import annotations

import pytest

from dist_muonclip.launch_env import free_port
from tests import _ds_workers as D
from tests import _hf_workers as H
from tests import _hf_zero3_workers as Z
from tests.dist_utils import run_distributed, values
from tests.test_hf import STEPS, _check_against_oracle, _close, _equal, _n_muon, ds_oracle  # noqa: F401 (fixture)

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")


# --------------------------------------------------------------------------------------------
# DeepSpeed's own deepspeed.initialize
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_deepspeed_initialize_zero3_json_type_matches_single_process(ds_oracle, tmp_path):
    """``deepspeed.initialize`` (DeepSpeed's) at ZeRO-3 on a zero.Init model with ``"type":
    "MuonClip"`` and WarmupLR from the JSON: W=2 equals the one-process oracle, Newton-Schulz once
    per Muon matrix per step over both ranks, the scheduler drives both parts, QK-Clip clips."""
    outs = values(run_distributed(Z.ds_native_zero3_worker, 2, STEPS, "config", tmp_path=tmp_path))
    assert all(o["layout"] == "zero3_partitions" and o["world_size"] == 2 for o in outs)
    assert outs[0]["n_muon"] == _n_muon()        # full shapes seen: every matrix on Muon
    for o in outs:
        _close(o["params"], ds_oracle(True))
    assert sum(o["ns"] for o in outs) == STEPS * _n_muon()
    for t, lrs in enumerate(outs[0]["lrs"]):
        f = D.warmup_factor(t)
        assert lrs == pytest.approx([0.02 * f, 0.01 * f])
    assert outs[0]["metrics"]["qk_clip/num_heads_clipped"] > 0


@pytest.mark.slow
@pytest.mark.full
def test_deepspeed_initialize_zero3_offload_wraps_an_instance(ds_oracle, tmp_path):
    """A MuonClip instance (built under ``dist_muonclip.hf.full_shapes``) as DeepSpeed's client at
    ZeRO-3 with ``offload_optimizer`` cpu: DeepSpeed's "use DeepSpeedCPUAdam" refusal does not
    fire, and the run equals the oracle."""
    outs = values(run_distributed(Z.ds_native_zero3_worker, 2, STEPS, "instance", True, tmp_path=tmp_path))
    for o in outs:
        assert o["layout"] == "zero3_partitions" and o["state_devices"] == ["cpu"]
        _close(o["params"], ds_oracle(False))
    assert sum(o["ns"] for o in outs) == STEPS * _n_muon()


def test_instance_built_on_partitioned_model_is_refused(tmp_path):
    """A MuonClip built on a zero.Init model outside ``full_shapes`` saw empty parameters (no
    Muon matrix): refused before DeepSpeed starts, naming the fix."""
    out = values(run_distributed(Z.ds_native_zero3_worker, 1, 1, "bare_instance", tmp_path=tmp_path))[0]
    assert out["error"] and "full_shapes" in out["error"] and "zero.Init" in out["error"]


# --------------------------------------------------------------------------------------------
# HF Trainer (torchrun-like processes)
# --------------------------------------------------------------------------------------------

def _trainer(world: int, tmp_path, name: str, **kw) -> list[dict]:
    return values(H.run_torchrun_like(Z.trainer_zero3_call, world, str(tmp_path / name / "out"), kw,
                                      tmp_path=tmp_path / name / "res", port=free_port()))


@pytest.fixture(scope="module")
def trainer_oracle(tmp_path_factory):
    """One process, no DeepSpeed, MuonClipTrainer, the whole global batch of 8 per step."""
    root = tmp_path_factory.mktemp("trainer_oracle_z3")
    return values(H.run_torchrun_like(H.trainer_call, 1, str(root / "oracle" / "out"),
                                      dict(max_steps=STEPS, route="subclass", per_device=8),
                                      tmp_path=root / "oracle" / "res", port=free_port()))[0]


@pytest.mark.slow
def test_trainer_zero3_json_matches_single_process(trainer_oracle, tmp_path):
    """Trainer with ``TrainingArguments(deepspeed=cfg)``, ``"stage": 3``, the model built under
    zero.Init (Trainer's HfDeepSpeedConfig), every HF value "auto", gradient accumulation 2: W=2
    equals the one-process Trainer without DeepSpeed; Newton-Schulz once per optimizer step."""
    outs = _trainer(2, tmp_path, "run", max_steps=STEPS, per_device=2, gas=2)
    assert all(o["zero_init"] and o["layout"] == "zero3_partitions" for o in outs)
    _check_against_oracle(outs, trainer_oracle)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.full), pytest.param(2, marks=pytest.mark.full),
                                   3])
def test_trainer_offload_optimizer_matches_single_process(stage, trainer_oracle, tmp_path):
    """Trainer + ``offload_optimizer: {"device": "cpu"}`` at stage 1/2/3 through MuonClipTrainer
    (a MuonClip instance routed to DeepSpeed): equals the one-process oracle, state on the CPU."""
    outs = _trainer(2, tmp_path, "run", max_steps=STEPS, stage=stage, offload=True, route="subclass")
    assert all(o["state_devices"] == ["cpu"] for o in outs)
    assert outs[0]["layout"] == ("zero3_partitions" if stage == 3 else "flat_fragments(zero)")
    _check_against_oracle(outs, trainer_oracle)


@pytest.mark.slow
def test_trainer_zero3_save_steps_and_resume_bit_identical(tmp_path):
    """ZeRO-3 (zero.Init) with the scheduler from the JSON: ``save_steps=2`` writes DeepSpeed
    checkpoints and ``resume_from_checkpoint`` continues to the same parameters, bit for bit."""
    full = _trainer(2, tmp_path, "full", max_steps=STEPS, save_steps=2, scheduler=True)
    assert "checkpoint-2" in full[0]["files"]
    ckpt = str(tmp_path / "full" / "out" / "checkpoint-2")
    resumed = _trainer(2, tmp_path, "resumed", max_steps=STEPS, scheduler=True, resume=ckpt)
    for a, b in zip(full, resumed):
        _equal(a["params"], b["params"])
        assert b["num_steps"] == STEPS
    assert sum(b["ns"] for b in resumed) == (STEPS - 2) * _n_muon()
    assert resumed[0]["losses"] == full[0]["losses"][2:]


def test_engine_modes_refused_with_the_fix():
    """The parsed engine config goes through the same rules as our initialize: offload_param,
    partial offload and fp16 are refused; stage 3 and offload_optimizer cpu are accepted."""
    from types import SimpleNamespace as NS

    from dist_muonclip.integrations.hf_deepspeed import check_engine_modes

    def engine(stage=3, fp16=False, off=None, ratio=1.0, param=None):
        return NS(zero_optimization_stage=lambda: stage, fp16_enabled=lambda: fp16,
                  zero_offload_optimizer=lambda: None if off is None else NS(device=off, ratio=ratio),
                  zero_offload_param=lambda: None if param is None else NS(device=param))

    check_engine_modes(engine())
    check_engine_modes(engine(off="cpu"))
    check_engine_modes(engine(stage=1, off="cpu"))
    for bad, words in [(engine(param="cpu"), "offload_param"), (engine(off="cpu", ratio=0.5), "ratio"),
                       (engine(off="nvme"), "device='nvme'"), (engine(fp16=True), "bf16"),
                       (engine(stage=0, off="cpu"), "stage 1, 2 or 3")]:
        with pytest.raises(ValueError, match=words):
            check_engine_modes(bad)
