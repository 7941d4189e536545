"""PyTorch Lightning's DeepSpeed strategy with MuonClip: ``configure_optimizers`` returning a MuonClip
instance, or the DeepSpeed config naming ``"type": "MuonClip"``; ZeRO-1/2 over 2 gloo ranks equals
the single-process oracle (``benchmarks.scenarios.deepspeed.train_single``: whole global batch,
raw-gradient clipping at 1.0, QK-Clip active); a Lightning checkpoint resumes bit-identically.

CPU limit (Lightning's, not ours): ``DeepSpeedStrategy`` refuses non-CUDA accelerators.
:func:`benchmarks.scenarios.lightning_ds.strategy` skips its two device checks and passes the local
rank as ``device_rank`` (module doc there); the config handling, ``deepspeed.initialize`` call,
step loop and checkpoints are Lightning's. benchmarks/hf_gpu.py runs the unmodified strategy on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from tests import _hf_workers as H
from tests.dist_utils import values

pytest.importorskip("deepspeed")
pytest.importorskip("lightning")
pytest.importorskip("transformers")

from benchmarks.scenarios import deepspeed as D  # noqa: E402
from benchmarks.scenarios import lightning_ds as LD  # noqa: E402
from dist_muonclip.launch_env import free_port  # noqa: E402

STEPS = 4
# fp32 (ns_dtype=float32): W=2 differs from the oracle only in gradient summation order; same bound
# and reason as tests/test_hf.py and tests/test_deepspeed.py
ATOL, RTOL = 5e-5, 1e-4


@pytest.fixture(scope="module")
def oracle():
    model, _ = D.train_single(STEPS)
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _by_hf_name(params: dict) -> dict:
    """Master weights keyed by the HF model's names: the adapter keys them by DeepSpeed's module,
    the LightningModule, whose names carry its attribute prefix ``model.``."""
    assert all(k.startswith("model.") for k in params), sorted(params)[:3]
    return {k[len("model."):]: v for k, v in params.items()}


def _run(tmp_path, name: str, *args) -> list[dict]:
    return values(H.run_torchrun_like(LD.lightning_ds_worker, 2, *args, tmp_path=tmp_path / name, port=free_port(),
                                      timeout=300))


@pytest.mark.slow
@pytest.mark.parametrize("stage, route", [(2, "configure_optimizers"), (1, "config"),
                                          pytest.param(1, "configure_optimizers", marks=pytest.mark.full),
                                          pytest.param(2, "config", marks=pytest.mark.full)])
def test_lightning_deepspeed_matches_single_process(stage, route, oracle, tmp_path):
    outs = _run(tmp_path, "run", stage, STEPS, route)
    from dist_muonclip import split_parameters
    from tests._tiny_hf import tiny_model

    # both routes split as on the bare HF model: the config route builds MuonClip on the
    # LightningModule, where the head is "model.lm_head" (AdamW, with no adamw_patterns)
    want_muon = sorted(f"model.{i.name}" for i in split_parameters(tiny_model("llama")) if i.use_muon)
    for o in outs:
        assert o["muon_params"] == want_muon and "model.lm_head.weight" not in o["muon_params"]
        assert o["zero_stage"] == stage and o["layout"] == "flat_fragments(zero)" and o["world_size"] == 2
        assert o["micro_batch"] == 4 and o["clip"] == 1.0          # filled by Lightning from loader / Trainer
        assert o["num_steps"] == o["global_step"] == STEPS and o["clipped"] > 0
        got = _by_hf_name(o["params"])
        assert got.keys() == oracle.keys()
        for k in oracle:
            torch.testing.assert_close(got[k], oracle[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")
    assert all(torch.equal(outs[0]["params"][k], outs[1]["params"][k]) for k in outs[0]["params"])


@pytest.mark.slow
def test_lightning_deepspeed_checkpoint_resume_bit_identical(tmp_path):
    """Lightning's checkpoint (``engine.save_checkpoint`` through ``ModelCheckpoint``) after 2 of 4
    steps at ZeRO-2, ``fit(ckpt_path=...)`` in fresh processes: bit-identical to the run that went on."""
    ckpt = str(tmp_path / "ckpt")
    full = _run(tmp_path, "full", 2, STEPS, "configure_optimizers", ckpt, 2, False)
    res = _run(tmp_path, "res", 2, STEPS, "configure_optimizers", ckpt, 2, True)
    for a, b in zip(full, res):
        assert b["global_step"] == STEPS and b["losses"] == a["losses"][2:]
        assert a["params"].keys() == b["params"].keys()
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
