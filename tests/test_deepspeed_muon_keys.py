"""A model tagged with DeepSpeed Muon's ``param.use_muon`` and a section written with DeepSpeed
Muon's keys, under ``"type": "MuonClip"``, trains at ZeRO-0/1/2 and equals, bit for bit, the same
run written with MuonClip's own names (W=2, one process spawn for the three stages)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from tests import _ds_workers as D  # noqa: E402
from tests.dist_utils import run_distributed, values  # noqa: E402

STEPS = 3


def test_tagged_model_with_deepspeed_keys_equals_own_names_zero0123(tmp_path):
    """Regression (issue 14): the tagged model crashed at the first ``engine.backward`` under
    ZeRO-1/2 with ``KeyError: 'momentum'`` (DeepSpeed ran its own Muon update for tagged
    parameters because the client optimizer's class name contained "muon"), and the split
    ignored the tags. Now both spellings give identical fp32 masters and model parameters, at
    ZeRO-0/1/2 and ZeRO-3 (fp32 masters only there: the module's parameters are partitioned)."""
    from tests._tiny_hf import tiny_model

    init = {k: p.detach().clone() for k, p in tiny_model("llama", seed=0).named_parameters()}
    outs = values(run_distributed(D.ds_tags_worker, 2, (0, 1, 2, 3), STEPS, tmp_path=tmp_path, timeout=600))
    for rank, out in enumerate(outs):
        for stage in (0, 1, 2, 3):
            tagged, own = out[stage, "deepspeed_keys"], out[stage, "own_names"]
            assert tagged["losses"] == own["losses"], (rank, stage)
            for k in own["params"]:
                assert torch.equal(tagged["params"][k], own["params"][k]), (rank, stage, k)
            assert tagged["lp"].keys() == own["lp"].keys()
            for k in own["lp"]:
                assert torch.equal(tagged["lp"][k], own["lp"][k]), (rank, stage, k)
            # the tags decided the split, and say so
            row = next(line for line in tagged["split"].splitlines() if line.startswith(D.TAGGED_TO_ADAMW))
            assert "AdamW" in row and row.rstrip().endswith("tag"), row
            # training moved every weight (the comparison is not between two untouched models)
            for k, p0 in init.items():
                assert not torch.equal(tagged["params"][k], p0), (stage, k)
    # every rank holds the same replicated result
    for k in outs[0][0, "own_names"]["params"]:
        assert torch.equal(outs[0][2, "own_names"]["params"][k], outs[1][2, "own_names"]["params"][k]), k


def test_client_class_name_keeps_deepspeed_off_its_own_muon_path():
    """DeepSpeed 0.19's ZeRO-1/2 optimizer runs its own Muon update for parameters tagged
    ``use_muon`` when ``"muon" in type(optimizer).__name__.lower()`` (stage_1_and_2.py,
    ``_is_muon_group``), which crashed tagged models with ``KeyError: 'momentum'``. Pins the
    condition and that our client stays outside it."""
    import inspect

    from deepspeed.runtime.zero import stage_1_and_2

    from dist_muonclip.deepspeed import DeepSpeedClient, DeepSpeedMuonClip

    src = inspect.getsource(stage_1_and_2.DeepSpeedZeroOptimizer._is_muon_group)
    assert "'muon' in self.optimizer.__class__.__name__.lower()" in src, src
    assert DeepSpeedMuonClip is DeepSpeedClient and "muon" not in DeepSpeedClient.__name__.lower()
