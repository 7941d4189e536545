"""DeepSpeed ZeRO-3 with MuonClip (issue 16): the partition layout, and gloo runs at W=2 / W=4
against the single-process oracle (fp32 Newton-Schulz, QK-Clip clipping heads, gradient clipping)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from tests import _ds_workers as D  # noqa: E402
from tests.dist_utils import run_distributed, values  # noqa: E402

STEPS = 4
# fp32 tolerance: ns_dtype=float32; the runs differ from the oracle only in gradient summation
# order (DeepSpeed's reduce-scatter vs one process's batch sum, ~1e-7 relative), which
# Newton-Schulz, QK-Clip and 4 steps of momentum amplify to ~1e-6 on O(0.1) weights (measured
# worst 5.2e-7 at W=2). Same bound as tests/test_deepspeed.py.
ATOL, RTOL = 5e-5, 1e-4
# bf16: forward/backward in bf16 (relative rounding 2^-8) while the oracle is fp32; bounds
# relative to how far the oracle moved each parameter, as in tests/test_deepspeed.py (measured
# values in test_bf16_tracks_fp32_oracle's docstring). A lost, doubled or mis-scaled update of a
# whole matrix is >= 50% of its movement.
BF16_REL = 0.2
BF16_REL_MODEL = 0.08

# the W=2 scenarios, all in one spawn (DeepSpeed's import dominates a spawn's time)
W2_SCENARIOS = {
    "fp32": dict(steps=STEPS),
    # built under deepspeed.zero.Init; sub_group_size cuts each param group into several fp32
    # sub-group partitions (DeepSpeed steps the client once per sub-group)
    "fp32_zero_init_subgroups": dict(steps=STEPS, zero_init=True, sub_group_size=6000),
    "bf16_zero_init": dict(steps=STEPS, zero_init=True, bf16=True),
    # 4 micro-batches of 1 per rank instead of 1 of 4
    "fp32_accum4": dict(steps=STEPS, micro=1),
    # offload_optimizer: {"device": "cpu"} at ZeRO-3, -2, -1, and ZeRO-2 without it
    "z3_offload": dict(steps=STEPS, offload=True),
    "z2": dict(steps=STEPS, stage=2),
    "z2_offload": dict(steps=STEPS, stage=2, offload=True),
    "z1_offload": dict(steps=STEPS, stage=1, offload=True),
    # tiny DeepSeek-V3: MLA attention and fused experts [E, m, n], each stack cut across ranks
    # (tau 0.05: below its max logits, ~0.078 after 4 steps, so MLA heads are clipped)
    "moe": dict(steps=STEPS, kind="deepseek_v3", params={"qk_clip": {"tau": 0.05}}),
}


def _muon_count() -> int:
    from dist_muonclip import MuonClip
    from tests._tiny_hf import tiny_model

    opt = MuonClip(tiny_model("llama", seed=0), lr=0.01, qk_clip=False)
    return sum(len(g["params"]) for g in opt.param_groups if g["use_muon"])


@pytest.fixture(scope="module")
def oracle():
    model, _ = D.train_single(STEPS)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def w2(tmp_path_factory):
    outs = values(run_distributed(D.zero3_worker, 2, list(W2_SCENARIOS.values()),
                                  tmp_path=tmp_path_factory.mktemp("zero3_w2"), timeout=600))
    return {name: [o[i] for o in outs] for i, name in enumerate(W2_SCENARIOS)}


def _assert_close(got, want, atol, rtol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def _check_fp32_run(outs, oracle, world, layout="zero3_partitions"):
    n_muon = _muon_count()
    assert outs[0]["layout"] == layout
    for out in outs:
        _assert_close(out["params"], oracle, ATOL, RTOL)
    # every Muon matrix orthogonalized exactly once per optimizer step, summed over the ranks
    for t in range(STEPS):
        assert sum(o["ns_per_step"][t] for o in outs) == n_muon, [o["ns_per_step"] for o in outs]
    if layout == "zero3_partitions":   # ZeRO-3 cuts every matrix across all ranks: pieces travel to owners
        assert outs[0]["moved_elems"] > 0
    # QK-Clip really clipped (tau below the tiny model's logits), on the rows each rank holds
    assert outs[0]["metrics"].get("qk_clip/num_heads_clipped", 0) > 0


def test_zero3_layout_maps_partitions():
    """Pure bookkeeping: DeepSpeed's per-parameter partitions (``ceil(numel / W)`` each, padded,
    concatenated per sub-group) tile every parameter exactly once, local views are the right
    slices of the flat fp32 partition, and the gradient of a sub-group survives DeepSpeed
    dropping it (stash)."""
    from dist_muonclip.integrations.deepspeed_zero3 import Zero3PartitionsLayout

    W = 4
    shapes = [(6, 5), (3,), (2, 2), (1,)]     # 30 (pad 2), 3 (pad 1), 4, 1 (ranks 1-3 empty)
    full = [torch.randn(s) for s in shapes]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_shape, p.ds_numel, p.ds_tensor = torch.Size(s), int(torch.tensor(s).prod()), None
        params.append(p)
    for rank in range(W):
        parts = []
        for f in full:
            ps = -(-f.numel() // W)
            piece = f.reshape(-1)[rank * ps:(rank + 1) * ps]
            parts.append(torch.cat([piece, torch.zeros(ps - piece.numel())]))
        flats = [torch.cat(parts[:2]), torch.cat(parts[2:])]
        flats[0].grad = flats[0].detach() * 2
        layout = Zero3PartitionsLayout([params[:2], params[2:]], flats, rank, W)
        names = {p: f"p{i}" for i, p in enumerate(params)}
        layout.validate(params, names, W, rank)       # ranges tile each parameter exactly once
        for p, f in zip(params, full):
            local = torch.cat([f.reshape(-1)[a:b] for a, b in layout.ranges(p)[rank]] or [torch.empty(0)])
            assert torch.equal(layout.local_param(p), local)
            assert layout.full_shape(p) == f.shape
        layout.stash_grad(0)
        flats[0].grad = None
        assert torch.equal(layout.local_grad(params[0]), 2 * layout.local_param(params[0]))
        assert layout.local_grad(params[2]) is None
        layout.clear_stash()
        assert layout.local_grad(params[0]) is None
    assert layout.ranges(params[3]) == [[(0, 1)], [], [], []]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["fp32", "fp32_zero_init_subgroups"])
def test_zero3_fp32_matches_single_process(scenario, w2, oracle):
    """ZeRO-3 at W=2 (model built plainly, or under zero.Init with several sub-groups per param
    group): parameters after 4 steps equal the one-process run on the same global batch; each
    Muon matrix orthogonalized once per step."""
    outs = w2[scenario]
    _check_fp32_run(outs, oracle, 2)
    if scenario == "fp32_zero_init_subgroups":
        assert outs[0]["num_sub_groups"] > 2      # really stepped sub-group by sub-group


@pytest.mark.slow
def test_zero3_grad_accumulation_orthogonalizes_once_per_step(w2, oracle):
    """4 micro-batches of 1 per rank equal 1 micro-batch of 4 (and the oracle), and Newton-Schulz
    runs once per optimizer step, not once per micro-batch (DeepSpeed's Muon bug #8443/#8600)."""
    _check_fp32_run(w2["fp32_accum4"], oracle, 2)
    for a, b in zip(w2["fp32_accum4"], w2["fp32"]):
        _assert_close(a["params"], b["params"], ATOL, RTOL)


@pytest.mark.slow
def test_zero3_bf16_tracks_fp32_oracle(w2, oracle):
    """bf16 under zero.Init with fp32 masters tracks the fp32 single-process run within the bf16
    bounds; the masters of both ranks are identical."""
    from tests._tiny_hf import tiny_model

    outs = w2["bf16_zero_init"]
    assert outs[0]["layout"] == "zero3_partitions"
    init = {k: v.detach() for k, v in tiny_model("llama", seed=0).named_parameters()}
    err2 = moved2 = 0.0
    for k, want in oracle.items():
        moved = (want - init[k]).norm()
        err = (outs[0]["params"][k] - want).norm()
        assert err <= BF16_REL * moved, f"{k}: error {err:.3g} vs movement {moved:.3g}"
        err2, moved2 = err2 + float(err) ** 2, moved2 + float(moved) ** 2
    assert err2 ** 0.5 <= BF16_REL_MODEL * moved2 ** 0.5, (err2 ** 0.5, moved2 ** 0.5)
    for k in outs[0]["params"]:
        assert torch.equal(outs[0]["params"][k], outs[1]["params"][k]), k
    n_muon = _muon_count()
    assert all(sum(o["ns_per_step"][t] for o in outs) == n_muon for t in range(STEPS))


@pytest.mark.slow
@pytest.mark.full
def test_zero3_w4_matches_single_process(oracle, tmp_path):
    """W=4 representative: zero.Init, fp32, every matrix cut in four."""
    outs = values(run_distributed(D.zero3_worker, 4, [dict(steps=STEPS, zero_init=True)], tmp_path=tmp_path,
                                  timeout=600))
    _check_fp32_run([o[0] for o in outs], oracle, 4)


# ------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def ckpt_w2(tmp_path_factory):
    """At W=2: a ZeRO-3 run of 4 steps saving after step 2 and a ZeRO-2 one the same; then
    resumes from step 2: ZeRO-3 natively (engine.load_checkpoint), ZeRO-3 from the ZeRO-2
    full-state export, ZeRO-2 from the ZeRO-3 export."""
    root = tmp_path_factory.mktemp("zero3_ckpt")
    z3, z2 = str(root / "z3"), str(root / "z2")
    runs = [dict(stage=3, steps=STEPS, save_dir=z3, save_at=2),
            dict(stage=2, steps=STEPS, save_dir=z2, save_at=2),
            dict(stage=3, steps=STEPS - 2, start=2, resume="native", resume_dir=z3),
            dict(stage=3, steps=STEPS - 2, start=2, resume="full", resume_dir=z2),
            dict(stage=2, steps=STEPS - 2, start=2, resume="full", resume_dir=z3)]
    outs = values(run_distributed(D.zero3_ckpt_worker, 2, runs, tmp_path=root / "run", timeout=600))
    return outs, z3


@pytest.mark.slow
def test_zero3_native_checkpoint_resumes_bit_identically(ckpt_w2):
    """engine.save_checkpoint / engine.load_checkpoint at the same world size: the resumed run
    ends bit-identical to the uninterrupted one (momentum, AdamW moments, fp32 partitions)."""
    outs, _ = ckpt_w2
    for o in outs:
        full, resumed = o[0]["params"], o[2]["params"]
        for k in full:
            assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_zero3_full_state_export_crosses_stages(ckpt_w2):
    """The full-state export moves training between ZeRO-2 and ZeRO-3: resuming either way
    continues the source run (the stages differ only in gradient summation order: fp32 bound)."""
    outs, _ = ckpt_w2
    for o in outs:
        _assert_close(o[3]["params"], o[1]["params"], ATOL, RTOL)    # ZeRO-2 ckpt -> ZeRO-3
        _assert_close(o[4]["params"], o[0]["params"], ATOL, RTOL)    # ZeRO-3 ckpt -> ZeRO-2
        # the ZeRO-2 model's parameters were refreshed from the loaded masters (fp32: equal)
        for k, v in o[4]["lp"].items():
            assert torch.equal(v, o[4]["params"][k].view_as(v)), k


@pytest.mark.slow
@pytest.mark.full
def test_zero3_full_state_export_resumes_at_another_world_size(ckpt_w2, tmp_path):
    """The ZeRO-3 export saved at W=2 resumes at W=4 (ZeRO-3) and continues the W=2 run."""
    outs, z3 = ckpt_w2
    res = values(run_distributed(D.zero3_ckpt_worker, 4, [dict(stage=3, steps=STEPS - 2, start=2, resume="full",
                                                               resume_dir=z3)], tmp_path=tmp_path, timeout=600))
    for o in res:
        _assert_close(o[0]["params"], outs[0][0]["params"], ATOL, RTOL)


# ------------------------------------------------------------------ optimizer offload

@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_optimizer_cpu_equals_non_offloaded(stage, w2, oracle):
    """offload_optimizer: {"device": "cpu"}: MuonClip's state lives with DeepSpeed's fp32
    partitions in CPU memory, and the run equals the non-offloaded one (and the oracle)."""
    outs = w2[f"z{stage}_offload"]
    _check_fp32_run(outs, oracle, 2, "zero3_partitions" if stage == 3 else "flat_fragments(zero)")
    ref = w2["fp32"] if stage == 3 else w2["z2"]
    for o, r in zip(outs, ref):
        assert o["state_devices"] == ["cpu"] and o["partition_devices"] == ["cpu"]
        # the same partitions and the same update; DeepSpeed reduces and accumulates offloaded
        # gradients through other buffers (another fp32 summation order at ZeRO-3), hence the
        # fp32 bound rather than bit equality (measured max |difference| after 4 steps: 4.3e-7 at
        # ZeRO-1/2 against ZeRO-2, 2.7e-7 at ZeRO-3)
        _assert_close(o["params"], r["params"], ATOL, RTOL)


@pytest.mark.parametrize("zero, words", [
    ({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}},
     ["offload_optimizer.device='nvme'", "use \"device\": \"cpu\""]),
    ({"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}, ["ratio=0.5", "remove ratio"]),
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, ["needs ZeRO stage 1, 2 or 3"]),
    ({"stage": 3, "offload_param": {"device": "cpu"}}, ["offload_param", "remove it"]),
])
def test_bad_offload_configs_name_the_fix(zero, words):
    from dist_muonclip.deepspeed import prepare_config

    section = {"type": "MuonClip", "params": {"lr": 0.01}}
    with pytest.raises(ValueError) as err:
        prepare_config({"optimizer": section, "zero_optimization": zero})
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    with pytest.raises(ValueError, match="use \"bf16\""):
        prepare_config({"optimizer": section, "zero_optimization": {"stage": 3}, "fp16": {"enabled": True}})
    cfg, _ = prepare_config({"optimizer": section, "zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "cpu"}}})
    assert cfg["zero_force_ds_cpu_optimizer"] is False and cfg["zero_allow_untested_optimizer"] is True


@pytest.mark.slow
def test_zero3_moe_stacked_experts_match_single_process(w2):
    """Tiny DeepSeek-V3 (MLA QK-Clip, stacked experts [4, m, n]) at ZeRO-3, W=2: ZeRO-3 cuts each
    expert stack in two, the plan splits it at the cut into chunks of whole experts (so no expert
    travels) and the run equals the single-process one; each expert matrix orthogonalized once
    per step (the oracle's count)."""
    import dist_muonclip.ns_split as engmod
    from dist_muonclip import MuonClip
    from tests._tiny_hf import tiny_model

    calls = []
    real = engmod.orthogonalize
    engmod.orthogonalize = lambda x, **kw: (calls.append(int(x.shape[0]) if x.ndim == 3 else 1), real(x, **kw))[1]
    try:
        model = tiny_model("deepseek_v3", seed=0)
        opt = MuonClip(model, **{**D.MC_PARAMS, "qk_clip": {"tau": 0.05}})
        D.train_single(STEPS, model=model, opt=opt)
    finally:
        engmod.orthogonalize = real
    want = {k: v.detach().clone() for k, v in model.named_parameters()}
    outs = w2["moe"]
    assert outs[0]["layout"] == "zero3_partitions"
    for out in outs:
        _assert_close(out["params"], want, ATOL, RTOL)
    per_step = sum(calls) // STEPS
    assert all(sum(o["ns_per_step"][t] for o in outs) == per_step for t in range(STEPS))
    assert outs[0]["metrics"].get("qk_clip/num_heads_clipped", 0) > 0


@pytest.mark.slow
def test_cost_model_predicts_zero3_bytes_and_state(w2):
    """The cost model's ``muonclip_zero3`` row predicts, per rank and step, exactly what the
    accountant measured at W=2: the pieces to owners (fp32 momentum) and the updates back (fp32
    NS here), the preflight all-reduce, and the optimizer state (one momentum word per local Muon
    element, two moments per local AdamW element). DeepSpeed's own ZeRO-3 traffic is modeled only."""
    from dist_muonclip.tools.cost_model import predict, specs_from_model
    from tests._tiny_hf import tiny_config, tiny_model

    cfg = tiny_config("llama")
    specs = specs_from_model(tiny_model("llama", seed=0))
    outs = w2["fp32"]
    for r, o in enumerate(outs):
        assert o["acc_steps"] == STEPS
        p = predict(specs, 2, "muonclip_zero3", rank=r, ns_bytes=4,
                    num_logits=cfg.num_hidden_layers * cfg.num_attention_heads)
        for tag in ("all_to_all[muon_to_owner]", "all_to_all[muon_from_owner]", "all_reduce[preflight]"):
            assert o["acc"][tag]["bytes"] == p["bytes"][tag] * STEPS, (r, tag)
        assert o["state_numel"] * 4 == p["state_bytes"], r
    assert sum(predict(specs, 2, "muonclip_zero3")["ns_matrices_per_rank"]) == _muon_count()


def test_ns_device_hook_is_honoured_and_numerics_unchanged():
    """``Layout.ns_device`` (the offload hook: Newton-Schulz on the accelerator) is asked for every
    owned bucket; answering a device (here "cpu", the one this box has) runs NS there through the
    copy path and leaves the numbers bit-identical to the default (``None``: where the matrix is)."""
    from dist_muonclip import MuonClip
    from tests._tiny_hf import tiny_model

    runs = []
    for hooked in (False, True):
        model = tiny_model("llama", seed=0)
        opt = MuonClip(model, lr=0.02, ns_dtype="float32", ns_backend="torch", qk_clip=False)
        asked = []
        if hooked:
            def ns_device(t, _asked=asked):
                _asked.append(tuple(t.shape))
                return torch.device("cpu", 0)   # != the matrices' device("cpu"): the copy path runs
            opt.layout.ns_device = ns_device
        for t in range(3):
            ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(t))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append(({k: p.detach().clone() for k, p in model.named_parameters()}, asked))
    (plain, _), (hooked_params, asked) = runs
    assert asked, "the engine never asked the layout where to run Newton-Schulz"
    assert torch.device("cpu", 0) != torch.device("cpu")
    assert all(torch.equal(plain[k], hooked_params[k]) for k in plain)
