"""DeepSpeed integration: config validation, ZeRO-0/1/2 x fp32/bf16 against the single-process
oracle on W = 2 and 4 gloo processes, Newton-Schulz once per matrix, checkpoints across world sizes."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from dist_muonclip.deepspeed import (MUONCLIP_OPTIONS, QK_CLIP_OPTIONS, parse_muonclip_section,  # noqa: E402
                                     prepare_config)
from tests import _ds_workers as D  # noqa: E402
from tests.dist_utils import run_distributed, values  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
# fp32 tolerance: ns_dtype=float32 everywhere; the runs differ from the oracle only in gradient
# summation order (DeepSpeed's all-reduce / reduce-scatter vs one process's batch sum, ~1e-7
# relative), which Newton-Schulz, QK-Clip and 10 steps of momentum amplify to ~1e-6 on O(0.1)
# weights (measured: <= 1e-6). Same bound as tests/test_distributed.py.
ATOL, RTOL = 5e-5, 1e-4
# bf16 tolerance, relative to how far training moved each parameter (||theta_T - theta_0|| of the
# oracle): DeepSpeed runs forward/backward in bf16 (relative rounding 2^-8) while the oracle is fp32.
# ~1% gradient noise, amplified by 10 steps of Newton-Schulz, sign-sensitive AdamW updates of rare
# embedding rows and QK-Clip at tau=0.1. Measured over the 4 bf16 configs: per parameter median
# 2.0%, worst 10.4% at W=2 and 12.6% at W=4 (an o_proj, the matrix that moves least); over the whole
# model 3.4-3.5% at W=2 and 3.9-4.0% at W=4. Bounds at ~1.6x and 2x the worst measurements; a lost,
# doubled or mis-scaled update of a whole matrix is >= 50% of its movement.
BF16_REL = 0.2
BF16_REL_MODEL = 0.08


# ------------------------------------------------------------------ config parsing (no processes)

def _section(**params):
    return {"type": "MuonClip", "params": {"lr": 0.01, **params}}


def test_parse_accepts_every_documented_key():
    """Every key of the generated schema, with a non-default value of its kind, parses."""
    params = {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "ns_steps": 4,
              "ns_coefficients": [[3.4445, -4.775, 2.0315]], "ns_backend": "torch", "ns_dtype": "float32",
              "ns_eps": 1e-7, "adjust_lr_fn": "original", "adamw_lr": None, "adamw_betas": [0.9, 0.99],
              "adamw_eps": 1e-8, "adamw_weight_decay": 0.01, "qk_clip": {"tau": 50, "alpha": 0.5},
              "model_config": None, "muon_patterns": ["*.mlp.*"], "adamw_patterns": [], "skip_nonfinite": True,
              "adamw_foreach": None, "adamw_fused": False, "shard_adamw": True, "log_dir": None, "log_every": 2,
              "verbose": False, "ns_split": "heads"}
    assert set(params) == set(MUONCLIP_OPTIONS)
    kw = parse_muonclip_section({"type": "MuonClip", "params": params})
    assert kw["adamw_betas"] == (0.9, 0.99) and kw["ns_coefficients"] == [(3.4445, -4.775, 2.0315)]
    assert kw["ns_split"] == "heads"


@pytest.mark.parametrize("params, exc, words", [
    ({"momentun": 0.9}, ValueError, ["optimizer.params", "'momentun'", "did you mean 'momentum'"]),
    ({"betas": [0.9, 0.95], "adamw_betas": [0.9, 0.9]}, ValueError, ["'betas'", "'adamw_betas'", "keep one"]),
    ({"max_grad_norm": 1.0}, ValueError, ["optimizer.params.max_grad_norm", "gradient_clipping"]),
    ({"ns_steps": 5.5}, TypeError, ["optimizer.params.ns_steps", "an integer"]),
    ({"nesterov": "yes"}, TypeError, ["optimizer.params.nesterov", "true or false"]),
    ({"adamw_betas": [0.9]}, TypeError, ["optimizer.params.adamw_betas"]),
    ({"qk_clip": {"taus": 10}}, ValueError, ["optimizer.params.qk_clip", "'taus'", "'tau'"]),
    ({"qk_clip": {"tau": "big"}}, TypeError, ["optimizer.params.qk_clip.tau"]),
])
def test_parse_rejects_with_the_key_name(params, exc, words):
    with pytest.raises(exc) as err:
        parse_muonclip_section(_section(**params))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_bad_sections_and_unsupported_modes():
    with pytest.raises(ValueError, match="optimizer.params.lr is required"):
        parse_muonclip_section({"type": "MuonClip", "params": {}})
    with pytest.raises(ValueError, match="unknown key 'param'"):
        parse_muonclip_section({"type": "MuonClip", "param": {"lr": 1}})
    with pytest.raises(ValueError) as err:
        prepare_config({"optimizer": _section(), "zero_optimization": {"stage": 4}})
    msg = str(err.value)
    assert "stage=4" in msg and "use 0, 1, 2 or 3" in msg
    with pytest.raises(ValueError, match="offload_optimizer"):
        prepare_config({"optimizer": _section(), "zero_optimization": {"stage": 2,
                                                                      "offload_optimizer": {"device": "nvme"}}})
    with pytest.raises(ValueError, match="use \"bf16\""):
        prepare_config({"optimizer": _section(), "fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="no 'optimizer' section"):
        prepare_config({"zero_optimization": {"stage": 1}})
    with pytest.raises(ValueError, match="not 'MuonClip'"):
        prepare_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.raises(ValueError, match="remove one of them"):
        prepare_config({"optimizer": _section()}, has_optimizer=True)


def test_prepare_config_strips_section_and_allows_client_optimizer():
    cfg, kw = prepare_config({"optimizer": _section(momentum=0.9), "zero_optimization": {"stage": 2}})
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
    assert kw == {"lr": 0.01, "momentum": 0.9}


def test_shipped_configs_parse_and_reference_documents_every_key():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "zero*.json")))
    names = {os.path.basename(f) for f in files}
    assert {"zero0.json", "zero1.json", "zero2.json", "zero0_bf16.json", "zero1_bf16.json",
            "zero2_bf16.json"} <= names
    for f in files:
        cfg, kw = prepare_config(f)
        stage = int(os.path.basename(f)[4])
        assert cfg["zero_optimization"]["stage"] == stage
        assert ("bf16" in f) == bool(cfg.get("bf16", {}).get("enabled", False))
        assert kw["lr"] > 0 and "scheduler" in cfg
    ref = open(os.path.join(ROOT, "configs", "REFERENCE.md")).read()
    for key in list(MUONCLIP_OPTIONS) + list(QK_CLIP_OPTIONS):
        assert f"`{key}`" in ref, key


def test_qk_clip_keys_match_qkclipconfig():
    """Pins the config schema to the QK-Clip dataclass: a new field must be documented here too."""
    import dataclasses

    qk = pytest.importorskip("dist_muonclip.qk_clip")
    assert {f.name for f in dataclasses.fields(qk.QKClipConfig)} == set(QK_CLIP_OPTIONS)


# ------------------------------------------------------------------ training against the oracle

@pytest.fixture(scope="module")
def oracle_run():
    """The single-process run: (parameters after STEPS steps, pre-clip global norm per step)."""
    norms: list[float] = []
    model, _ = D.train_single(STEPS, scheduler=True, norms=norms)
    return {k: v.detach().clone() for k, v in model.named_parameters()}, norms


@pytest.fixture(scope="module")
def oracle(oracle_run):
    return oracle_run[0]


@pytest.fixture(scope="module")
def w2_run(tmp_path_factory):
    """``get(stage, bf16) -> (outs, checkpoint dir)``: the W=2, 10-step run of a config (WarmupLR
    scheduler, accountant on, checkpoint saved after step 5), launched once per module and shared
    by the equivalence tests (W=2 case) and the checkpoint test (the uninterrupted run it resumes
    from and compares with). Saving is off the trajectory: the W=2 resume continues it bit for bit."""
    cache: dict = {}

    def get(stage, bf16):
        if (stage, bf16) not in cache:
            root = tmp_path_factory.mktemp(f"w2_zero{stage}_{bf16}")
            ckpt = str(root / "ckpt")
            outs = values(run_distributed(D.ds_train_worker, 2, stage, STEPS, bf16, None, True, False, True, ckpt, 5,
                                          tmp_path=root / "run"))
            cache[stage, bf16] = outs, ckpt
        return cache[stage, bf16]

    return get


def _muon_names():
    from dist_muonclip import MuonClip
    from tests._tiny_hf import tiny_model

    model = tiny_model("llama", seed=0)
    opt = MuonClip(model, lr=0.01, qk_clip=False)
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in opt.param_groups if g["use_muon"] for p in g["params"]]


def _assert_close(got, want, atol, rtol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fp32_matches_single_process(stage, world, oracle_run, w2_run, tmp_path):
    """fp32, ns_dtype=float32, QK-Clip active, gradient clipping and a WarmupLR scheduler from the
    config: parameters after 10 steps equal the one-process run on the same global batch."""
    oracle, oracle_norms = oracle_run
    if world == 2:
        outs = w2_run(stage, False)[0]
    else:
        outs = values(run_distributed(D.ds_train_worker, world, stage, STEPS, False, None, True, False, True,
                                      tmp_path=tmp_path))
    layout = {0: "replicated", 1: "flat_fragments(zero)", 2: "flat_fragments(zero)"}[stage]
    assert outs[0]["layout"] == layout
    for out in outs:
        _assert_close(out["params"], oracle, ATOL, RTOL)
    # clipping guard: DeepSpeed's pre-clip global norm is above gradient_clipping on every step,
    # so the clip really scales the raw gradient before orthogonalization (with a norm below the
    # threshold, clipping the update instead, or not at all, would pass unnoticed); and it is the
    # oracle's norm (rel 1e-5: fp32 reduction order, ~1e-7 measured)
    for out in outs:
        assert all(n > D.CLIP for n in out["norms"]), out["norms"]
        assert out["norms"] == pytest.approx(oracle_norms, rel=1e-5)
    if world == 4 and stage:
        # at W=4 DeepSpeed's partitions cut Muon matrices: fragments really cross ranks (the
        # all-to-all path is exercised, not trivially empty)
        assert outs[0]["moved_elems"] > 0
    # QK-Clip really clipped (tau below the tiny model's logits)
    assert outs[0]["metrics"].get("qk_clip/num_heads_clipped", 0) > 0
    # the scheduler drives both parts: Muon lr 0.02 and AdamW lr 0.01 keep their ratio
    for t, lrs in enumerate(outs[0]["lrs"]):
        f = D.warmup_factor(t)
        assert lrs == pytest.approx([0.02 * f, 0.01 * f]), (t, lrs)
    # every Muon matrix orthogonalized exactly once per step, summed over all ranks
    n_muon = len(_muon_names())
    assert sum(sum(o["ns_matrices"]) for o in outs) == STEPS * n_muon
    if stage:
        # accountant: the fragments not on a matrix's owner travel to it once (fp32 momentum) and
        # the update fragments come back once (fp32 here): nothing else, nothing twice
        fp32 = 4
        for tag in ("all_to_all[muon_to_owner]", "all_to_all[muon_from_owner]"):
            sent = sum(o["acc"].get(tag, {"bytes": 0})["bytes"] for o in outs)
            assert sent == STEPS * outs[0]["moved_elems"] * fp32, (tag, sent)
        assert all(o["acc_steps"] == STEPS for o in outs)
    # optimizer state is sharded, not replicated (ZeRO-1 memory)
    total = sum(o["state_numel"] for o in outs)
    if not stage:   # whole matrices per owner (LPT on NS FLOPs): balanced in time, not in bytes
        assert max(o["state_numel"] for o in outs) <= 1.6 * total / world
        return
    # ZeRO-1/2: DeepSpeed partitions the Muon group and the AdamW group separately, so every rank
    # holds 1/W of each kind (the last rank's partition carries the alignment padding: DeepSpeed pads
    # a group's flat buffer to a multiple of 2 * W elements) ...
    for kind in ("muon", "adamw"):
        n = sum(o["local_elems"][kind] for o in outs)
        assert all(abs(o["local_elems"][kind] - n / world) <= 2 * world for o in outs), \
            (kind, [o["local_elems"][kind] for o in outs])
    # ... and its state is exactly one momentum word per Muon element and two AdamW moments per
    # AdamW element it holds: balanced state (one group would give the embedding's and the
    # output head's ranks twice the others' state)
    for o in outs:
        assert o["state_numel"] == o["local_elems"]["muon"] + 2 * o["local_elems"]["adamw"]
    assert max(o["state_numel"] for o in outs) <= 1.01 * total / world


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage, bf16, layout", [
    (0, True, "master_slices"),                       # FP16_UnfusedOptimizer: fp32 master per parameter
    (1, True, "flat_fragments(zero)"),                # ZeRO-1, bf16 gradient accumulation
    (1, "fp32_accum", "flat_fragments(bf16)"),        # BF16_Optimizer (fp32 gradient accumulation)
    (2, True, "flat_fragments(zero)"),
])
def test_bf16_tracks_fp32_oracle(stage, bf16, layout, world, oracle, w2_run, tmp_path):
    """bf16 forward/backward with fp32 masters tracks the fp32 single-process run. At W=4 the
    partitions (or master slices) cut two Muon matrices, whose fragments travel to their owners."""
    from tests._tiny_hf import tiny_model

    if world == 2:
        outs = w2_run(stage, bf16)[0]
    else:
        outs = values(run_distributed(D.ds_train_worker, world, stage, STEPS, bf16, None, True, False, True,
                                      tmp_path=tmp_path))
    assert outs[0]["layout"] == layout
    init = {k: v.detach() for k, v in tiny_model("llama", seed=0).named_parameters()}
    err2 = moved2 = 0.0
    for k, want in oracle.items():
        moved = (want - init[k]).norm()
        err = (outs[0]["params"][k] - want).norm()
        assert err <= BF16_REL * moved, f"{k}: error {err:.3g} vs movement {moved:.3g}"
        err2, moved2 = err2 + float(err) ** 2, moved2 + float(moved) ** 2
    assert err2 ** 0.5 <= BF16_REL_MODEL * moved2 ** 0.5, (err2 ** 0.5, moved2 ** 0.5)
    # the fp32 masters of all ranks are identical (one update per element, gathered)
    for out in outs[1:]:
        for k in outs[0]["params"]:
            assert torch.equal(outs[0]["params"][k], out["params"][k]), k
    assert outs[0]["metrics"].get("qk_clip/num_heads_clipped", 0) > 0
    if world == 4:
        # fragments really cross ranks and travel: the all-to-all path is not trivially empty
        assert outs[0]["moved_elems"] > 0
        assert sum(o["acc"].get("all_to_all[muon_to_owner]", {"bytes": 0})["bytes"] for o in outs) > 0


@pytest.mark.slow
def test_instance_path_matches_single_process(oracle, tmp_path):
    """optimizer=MuonClip(...) built before deepspeed.initialize works at ZeRO-2 like the config path."""
    outs = values(run_distributed(D.ds_train_worker, 2, 2, STEPS, False, None, True, True, tmp_path=tmp_path))
    for out in outs:
        _assert_close(out["params"], oracle, ATOL, RTOL)


def test_instance_path_value_errors():
    """Wrong uses of the instance path are refused with what to do, before any process group or
    DeepSpeed engine exists (no half-initialized state left behind)."""
    import torch.distributed as dist

    from dist_muonclip import MuonClip
    from dist_muonclip.comm import CommAccountant
    from dist_muonclip.deepspeed import initialize
    from tests._tiny_hf import tiny_model

    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    opt = MuonClip(model, lr=0.01, qk_clip=False)
    cfg = {"train_batch_size": 2, "zero_optimization": {"stage": 2}}
    cases = [
        (dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=cfg), TypeError,
         ["dist_muonclip.MuonClip instance", "SGD", "deepspeed.initialize for other optimizers"]),
        (dict(model=other, optimizer=opt, config=cfg), ValueError,
         ["parameters that are not the model's", "same model"]),
        (dict(model=model, optimizer=opt, config=cfg, accountant=CommAccountant()), ValueError,
         ["accountant=", "MuonClip(model, ..., accountant=acc)"]),
        (dict(model=model, optimizer=opt, config={**cfg, "optimizer": _section()}), ValueError,
         ["MuonClip", "remove one of them"]),
        (dict(model=model, optimizer=opt, config={**cfg, "optimizer": {"type": "AdamW", "params": {}}}), ValueError,
         ["'AdamW'", "remove the section"]),
        (dict(model=model, optimizer=opt, config={**cfg, "zero_optimization": {"stage": 3, "offload_param": {
            "device": "cpu"}}}), ValueError, ["zero_optimization.offload_param", "remove it"]),
    ]
    for kwargs, exc, words in cases:
        with pytest.raises(exc) as err:
            initialize(**kwargs)
        for w in words:
            assert w in str(err.value), (w, str(err.value))
        assert not (dist.is_available() and dist.is_initialized())
    assert not opt.state


# ------------------------------------------------------------------ checkpoints

# bf16 resume at another world size: W=4 reduces the bf16 gradients in another order than the
# uninterrupted W=2 run (2^-8 relative rounding), which Newton-Schulz, QK-Clip and AdamW carry
# through the 5 resumed steps: measured <= 11.4% (an o_proj) of the distance the uninterrupted run
# moved each parameter in those steps. A resume that lost momentum or AdamW moments, or restarted
# the scheduler, changes the update direction itself (an error comparable to the movement).
BF16_RESUME_REL = 0.25


@pytest.mark.slow
@pytest.mark.parametrize("stage, bf16", [(0, False), (1, False), (2, False), (0, True), (1, True), (2, True)])
def test_checkpoint_save_at_2_resume_at_2_and_4(stage, bf16, oracle, w2_run, tmp_path):
    """Save after 5 of 10 steps at W=2 (engine checkpoint + full-state export); resume at W=2
    through engine.load_checkpoint (DeepSpeed's own files) and at W=4 through load_checkpoint: the
    trajectory continues as if uninterrupted. Both loads restore the fp32 masters bit for bit and
    leave the model's (bf16) parameters equal to the masters rounded; the W=2 resume reproduces the
    uninterrupted run bit for bit. fp32 runs also equal the single-process oracle; the bf16 one
    (configs/zero1_bf16.json's setup: ZeRO-1, bf16) resumed at W=4 tracks the uninterrupted run
    within bf16 tolerance."""
    full, ckpt = w2_run(stage, bf16)
    same = values(run_distributed(D.ds_train_worker, 2, stage, STEPS - 5, bf16, None, True, False, False, None, None,
                                  ckpt, 5, True, tmp_path=tmp_path / "b"))
    four = values(run_distributed(D.ds_train_worker, 4, stage, STEPS - 5, bf16, None, True, False, False, None, None,
                                  ckpt, 5, False, tmp_path=tmp_path / "c"))
    ref = full[0]
    assert ref["lp_mismatch"] == []
    for out in same + four:
        for k, want in ref["saved_params"].items():           # masters restored exactly
            assert torch.equal(out["loaded_params"][k], want), k
        assert out["lp_mismatch_after_load"] == [] and out["lp_mismatch"] == [], out["lp_mismatch_after_load"]
        assert out["lrs"] == ref["lrs"][5:]                   # the scheduler resumed where it was saved
    for out in same:   # same world size, same reduction order: bit-identical continuation
        for k in ref["params"]:
            assert torch.equal(out["params"][k], ref["params"][k]), k
            assert torch.equal(out["lp_params"][k], ref["lp_params"][k]), k
    if not bf16:
        for out in full + same + four:
            _assert_close(out["params"], oracle, ATOL, RTOL)
        return
    for out in four:
        for k, want in ref["params"].items():
            err = (out["params"][k] - want).norm()
            moved = (want - ref["saved_params"][k]).norm()
            assert err <= BF16_RESUME_REL * moved, f"{k}: error {err:.3g} vs movement after the save {moved:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("stage, bf16, layout", [
    (0, False, "replicated"),                         # engine clip_fp32_gradients path (the regression)
    (0, True, "master_slices"),                       # FP16_UnfusedOptimizer's overflow check
    (1, True, "flat_fragments(zero)"),                # DeepSpeedZeroOptimizer, bf16
    (1, "fp32_accum", "flat_fragments(bf16)"),        # BF16_Optimizer's invalid-norm check
    (2, False, "flat_fragments(zero)"),               # DeepSpeedZeroOptimizer, fp32
])
def test_nonfinite_gradient_never_poisons_state(stage, bf16, layout, tmp_path):
    """An inf gradient on one rank, gradient_clipping on: the whole step is skipped, as DeepSpeed
    skips an overflow step. Momentum, AdamW moments and fp32 masters stay bit-identical, the
    engine counts it in ``skipped_steps`` (``was_step_applied`` False, global norm inf) and does not
    advance the scheduler; the other four steps train.

    Pins the ZeRO-0 fp32 failure: DeepSpeed's clip_grad_norm_ saw an infinite norm and multiplied
    every gradient by 0, so MuonClip skipped only the poisoned matrix while every other parameter
    took a zero-gradient step (momentum decayed by mu, AdamW moments decayed, weight decay moved
    the weights) and ``skipped_steps`` stayed 0."""
    outs = values(run_distributed(D.ds_nonfinite_worker, 2, stage, bf16, tmp_path=tmp_path))
    for o in outs:
        assert o["layout"] == layout
        assert o["num_state"] > 0
        assert o["state_unchanged"] and o["masters_unchanged"], o
        assert o["finite"] and o["state_finite"] and o["moved"], o
        assert o["applied"] == [True, True, False, True, True], o["applied"]
        assert o["skipped_steps"] == 1 and o["scheduler_steps"] == 4 and o["muonclip_steps"] == 4, o
        # the norm DeepSpeed reports: inf on the skipped step, finite on the others
        assert o["norms"][2] == float("inf"), o["norms"]
        assert all(n is not None and 0 < n < float("inf") for i, n in enumerate(o["norms"]) if i != 2), o["norms"]


def test_flat_fragments_layout_maps_deepspeed_partitions():
    """Three matrices flattened like DeepSpeed (with 2 elements of alignment padding after the
    first), cut into 3 equal partitions: ranges tile each matrix, local views are the right
    slices of this rank's partition, the owner hint is the rank holding the largest fragment."""
    from dist_muonclip.deepspeed import FlatFragmentsLayout

    shapes = [(3, 4), (5, 2), (2, 6)]                 # 12, 10, 12 elements
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    offsets = [0, 14, 24]                             # 12 + 2 padding, 10, 12 -> 36 = 3 x 12
    flat_all = torch.zeros(36)
    for p, o in zip(params, offsets):
        flat_all[o:o + p.numel()] = p.detach().reshape(-1)
    for rank in range(3):
        part = flat_all[rank * 12:(rank + 1) * 12].clone()
        part.grad = part * 10
        lay = FlatFragmentsLayout(params, offsets, 12, rank, 3, part)
        lay.validate(params, {p: f"p{i}" for i, p in enumerate(params)}, 3, rank)
        assert lay.ranges(params[0]) == [[(0, 12)], [], []]
        assert lay.ranges(params[1]) == [[], [(0, 10)], []]
        assert lay.ranges(params[2]) == [[], [], [(0, 12)]]
        assert lay.fragments(params[1]) == [(1, 2, 10)]
        for i, p in enumerate(params):
            a_b = lay.ranges(p)[rank]
            local = lay.local_param(p)
            want = p.detach().reshape(-1)[a_b[0][0]:a_b[0][1]] if a_b else torch.empty(0)
            assert torch.equal(local, want)
            assert torch.equal(lay.local_grad(p), want * 10)
            assert lay.owner_hint(p) == i
        lay.local_param(params[rank]).mul_(0)         # views write into the partition (matrix r fills it)
        assert part.abs().sum() == 0
    # cut matrices, no padding: partitions of 12 on 3 ranks put p2 (22..34) on rank 1 (2) and 2 (10);
    # partitions of 10 on 4 ranks cut all three
    lay = FlatFragmentsLayout(params, [0, 12, 22], 12, 0, 3, torch.zeros(12))
    assert lay.ranges(params[2]) == [[], [(0, 2)], [(2, 12)]] and lay.owner_hint(params[2]) == 2
    lay10 = FlatFragmentsLayout(params, [0, 12, 22], 10, 0, 4, torch.zeros(10))
    assert lay10.ranges(params[0]) == [[(0, 10)], [(10, 12)], [], []]
    assert lay10.ranges(params[1]) == [[], [(0, 8)], [(8, 10)], []]
    assert lay10.owner_hint(params[0]) == 0 and lay10.owner_hint(params[1]) == 1
    assert lay10.fragments(params[2]) == [(2, 2, 8), (3, 0, 4)] and lay10.owner_hint(params[2]) == 2


def test_args_and_config_together_are_refused():
    import argparse

    from dist_muonclip.deepspeed import initialize

    with pytest.raises(ValueError, match="pass one"):
        initialize(args=argparse.Namespace(deepspeed_config="a.json"), model=torch.nn.Linear(2, 2), config={})


@pytest.mark.slow
def test_deepspeed_config_argument_path(tmp_path):
    """--deepspeed_config FILE through deepspeed.add_config_arguments, a configs/ file edited to
    W=2 batch sizes: initialize(args=...) reads the MuonClip section from the file. Also: an
    out-of-range value (momentum 1.5) is refused naming the config path."""
    cfg = json.load(open(os.path.join(ROOT, "configs", "zero1.json")))
    cfg["optimizer"]["params"]["momentum"] = 0.9
    cfg["train_batch_size"] = D.GLOBAL_BATCH
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    outs = values(run_distributed(D.ds_args_worker, 2, str(path), tmp_path=tmp_path / "run"))
    for o in outs:
        err = o.pop("value_error")
        assert err is not None and "DeepSpeed config optimizer.params" in err and "momentum" in err, err
        assert o == {"layout": "flat_fragments(zero)", "stage": 1, "opt_is_engine_optimizer": True,
                     "momentum": 0.9, "args_untouched": True, "stepped": True}


@pytest.mark.slow
def test_moe_experts_on_flat_fragments_match_single_process(tmp_path):
    """Tiny DeepSeek-V3 (MLA + fused experts [4, m, n]) on ZeRO-2 at W=2 and W=4: stacked experts
    are cut along DeepSpeed's partitions (whole experts owned where they lie, cut experts chunks of
    their own) and the run equals the single process at the fp32 tolerance of the dense tests."""
    from tests import _ds_moe_workers as M

    model, _ = M.moe_single(STEPS)
    want = {k: v.detach().clone() for k, v in model.named_parameters()}
    for world in (2, 4):
        outs = values(run_distributed(M.ds_moe_worker, world, 2, STEPS, tmp_path=tmp_path / f"w{world}"))
        assert outs[0]["layout"] == "flat_fragments(zero)"
        for out in outs:
            _assert_close(out["params"], want, ATOL, RTOL)
        # experts move only where a partition boundary cuts through one: at most one expert matrix
        # per stacked parameter and boundary (W - 1 boundaries)
        per = outs[0]["expert_matrix_numel"]
        assert per and outs[0]["moved_expert_elems"] <= (world - 1) * sum(per.values())
        if world == 4:
            assert any("[" in n for n in outs[0]["owners"] if "mlp.experts." in n)   # a stack was cut
        assert outs[0]["metrics"].get("qk_clip/num_heads_clipped", 0) > 0
