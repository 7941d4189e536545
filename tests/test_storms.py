"""Non-finite storms (issue 18): seeded NaN/inf gradients on random ranks, steps and parameters, a
whole step of them and inf max logits; each run equals the one-process run that skipped the same
things (benchmarks/scenarios/storms.py), skipped parameters keep their state, the others step."""
from __future__ import annotations

import pytest
import torch

from benchmarks.scenarios import storms as S
from tests.dist_utils import run_distributed, values

ATOL, RTOL = 5e-5, 1e-4
STEPS = 6


def _storm(seed: int, world: int) -> dict:
    model = S.build_model(S.KIND)
    cfg = model.config
    return S.schedule(seed, STEPS, world, [n for n, _ in model.named_parameters()], cfg.num_hidden_layers,
                      cfg.num_attention_heads)


def _check(outs: list[dict], storm: dict) -> dict:
    names = list(outs[0]["params"])
    skipped = {t: set().union(*(set(o["poisoned"][t]) for o in outs)) for t in range(STEPS)}
    whole = storm["whole_step"]
    assert skipped[whole["step"]] == set(names), "the whole-step storm poisons every parameter"
    want, want_clipped = S.oracle(storm, skipped)
    want_params = {n: p.detach() for n, p in want.named_parameters()}
    for o in outs:
        assert o["state_finite"], "non-finite values reached the optimizer state"
        for n in names:
            torch.testing.assert_close(o["params"][n], want_params[n], atol=ATOL, rtol=RTOL,
                                       msg=lambda m, n=n: f"{n}: {m}")
        assert o["clipped"] == pytest.approx(want_clipped), "QK-Clip clipped other heads than the oracle"
    for n in names:                    # replicas identical
        assert all(torch.equal(o["params"][n], outs[0]["params"][n]) for o in outs), n
    targets = set(outs[0]["clip_targets"])
    for t in range(STEPS):
        for o in outs:
            # skipped: optimizer state untouched on every rank; weights too, except QK-Clip's rescale
            assert skipped[t] <= set(o["same_state"][t]), (t, skipped[t] - set(o["same_state"][t]))
            assert skipped[t] - targets <= set(o["same_weight"][t]), t
            if skipped[t]:
                assert any("non-finite gradient" in m for m in o["warned"][t]), (t, o["warned"][t])
            if t in storm["logits"]:
                assert any("max attention logits" in m for m in o["warned"][t]), (t, o["warned"][t])
        # the others step: each changed its state on some rank
        stepped = set().union(*(set(names) - set(o["same_state"][t]) for o in outs))
        assert stepped == set(names) - skipped[t], (t, (set(names) - skipped[t]) ^ stepped)
    assert sum(want_clipped) > 0, "tau too high: QK-Clip never acted"
    return {"skipped": {t: len(v) for t, v in skipped.items()}, "logit_steps": sorted(storm["logits"])}


@pytest.mark.parametrize("mode", ["ddp", "owned", "fsdp"])
def test_storm_w2_matches_oracle_that_skipped_the_same(mode, tmp_path):
    storm = _storm(seed=18, world=2)
    outs = values(run_distributed(S.storm_worker, 2, mode, storm, tmp_path=tmp_path))
    _check(outs, storm)


@pytest.mark.parametrize("mode,seed", [("owned", 7), pytest.param("fsdp", 11, marks=pytest.mark.full),
                                       pytest.param("ddp", 23, marks=pytest.mark.full)])
def test_storm_w4_matches_oracle_that_skipped_the_same(mode, seed, tmp_path):
    storm = _storm(seed=seed, world=4)
    outs = values(run_distributed(S.storm_worker, 4, mode, storm, tmp_path=tmp_path))
    _check(outs, storm)


def test_schedule_is_seeded_and_covers_every_kind():
    a, b = _storm(3, 2), _storm(3, 2)
    assert a == b and a != _storm(4, 2)
    assert a["grads"] and a["logits"] and a["whole_step"]["step"] not in a["logits"]
    values_used = {repr(v) for per in a["grads"].values() for lst in per.values() for _, v in lst}
    assert values_used <= {"nan", "inf", "-inf"}


def test_inf_logits_with_skip_nonfinite_false_raise_before_any_change():
    """skip_nonfinite=False keeps the strict behaviour: a non-finite tracked max logit raises
    ValueError naming the layer, nothing changed."""
    from dist_muonclip import MuonClip

    model = S.build_model(S.KIND)
    opt = MuonClip(model, qk_clip=S.QK[S.KIND], skip_nonfinite=False, **S.OPT_KW)
    ids = S.global_batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.qk_clipper.tracker.values()[1, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"non-finite max attention logits in layer\(s\) \['model\.layers\.1"):
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not opt.state or all(not s for s in opt.state.values())
