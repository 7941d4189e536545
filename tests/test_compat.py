"""Seed-compatible entry points (dist_muonclip.compat): each is checked against the library
objects it stands for (same seeds, same data, parameters compared bit for bit), against float64
reimplementations of the seeds' optimizers (tests/_seed_reference.py), and through the seeds' own
examples (examples/seeds/); plus the seed-000 TensorBoard logging and the documented differences
(docs/compat.md)."""
from __future__ import annotations

import copy
import math
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dist_muonclip import MuonClip as CoreMuonClip
from dist_muonclip.compat import Muon, MuonClip, MuonConfig, QKClip, muon_config_kwargs
from dist_muonclip.param_split import split_parameters
from dist_muonclip.qk_clip import QKClipConfig, QKClipper
from tests import _seed_reference as seed_reference
from tests.test_qk_clip import SeedMHA, SeedMLA
from tests.test_tracker import build_model, make_batch

META = {"w_q": "weight_q", "w_k": "weight_k"}


def _seed_model(mode: str = "mha", seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList([SeedMHA() if mode == "mha" else SeedMLA() for _ in range(2)])


def _loss_and_s_max(layers, x):
    """A loss touching every projection, and seed-style s_max (list of per-layer tensors)."""
    loss = 0.0
    for l in layers:
        for mod in l.children():
            loss = loss + mod(x).pow(2).mean()
    with torch.no_grad():
        s_max = [l.max_logits(x).float() for l in layers]
    return loss, s_max


def test_muon_config_maps_every_field():
    cfg = MuonConfig(unified_lr=False, lr=1.0, lr_muon=0.02, lr_adam=3e-4, muon_beta=0.9, muon_decay=0.1,
                     ns_steps=6, adam_betas=(0.8, 0.9), adam_decay=0.01, adam_eps=1e-9,
                     clipping_layers_mapping={"q_proj": "wq", "k_proj": "wk"}, clipping_threshold=30.0,
                     clipping_alpha=0.4, cans_ortho=True)
    kw = muon_config_kwargs(cfg)
    qk = kw.pop("qk_clip")
    assert kw == dict(lr=0.02, adamw_lr=3e-4, momentum=0.9, weight_decay=0.1, ns_steps=6, ns_coefficients="cans",
                      adjust_lr_fn="rms_0.4", adamw_betas=(0.8, 0.9), adamw_eps=1e-9,
                      adamw_weight_decay=0.01)
    assert isinstance(qk, QKClipConfig) and (qk.tau, qk.alpha) == (30.0, 0.4)
    assert qk.mapping == {"q_proj": "wq", "k_proj": "wk"}
    unified = muon_config_kwargs(MuonConfig(lr=5e-3, enable_clipping=False))
    assert unified["lr"] == unified["adamw_lr"] == 5e-3 and unified["qk_clip"] is False
    with pytest.warns(UserWarning, match="estimate_lower_bound"):
        muon_config_kwargs(MuonConfig(estimate_lower_bound=True))
    with pytest.raises(TypeError, match="enable_clipping"):
        muon_config_kwargs(MuonConfig(enable_clipping="yes"))
    with pytest.raises(TypeError, match="MuonConfig"):
        muon_config_kwargs({"lr": 1.0})


@pytest.mark.parametrize("config_kind", ["dict", "hf"])
def test_seed000_muonclip_equals_core_optimizer_and_logs_to_tensorboard(tmp_path, config_kind):
    pytest.importorskip("tensorboard")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model_a = build_model("llama").train()
    model_b = copy.deepcopy(model_a)
    # seed 000 takes the model's HF config or a dict with the head counts: both work
    model_config = ({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16} if config_kind == "dict"
                    else model_a.config)
    cfg = MuonConfig(lr=2e-3, clipping_threshold=0.08, log_dir=str(tmp_path))
    a = MuonClip(model_a, model_config, cfg)  # no model.train() after it: tracking is already on
    b = CoreMuonClip(model_b, model_config=model_config, **muon_config_kwargs(cfg))
    ids, pad = make_batch()
    clipped = 0.0
    for _ in range(3):
        for model, opt in ((model_a, a), (model_b, b)):
            model(input_ids=ids, attention_mask=pad, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        clipped += a.metrics()["qk_clip/num_heads_clipped"]
    assert clipped > 0  # tau=0.08 sits inside the init logit range: the clip really acted
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    a.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("qk_clip/max_logit")] == [1, 2, 3]
    assert "muon_update_rms" in acc.Tags()["scalars"] and "qk_clip/min_eta" in acc.Tags()["scalars"]


@pytest.mark.parametrize("mode", ["mha", "mla"])
def test_seed001_muonclip_step_s_max_equals_core_plus_clipper(mode):
    meta = META if mode == "mha" else {"w_qc": "w_qc", "w_kc": "w_kc", "w_qr": "w_qr"}
    la, lb = _seed_model(mode), _seed_model(mode)
    x = torch.randn(2, 10, 32)
    a = MuonClip(params=[p for l in la for p in l.parameters()], attention_params=list(la), mode=mode,
                 metadata=meta, n_head=4, lr=0.02, momentum=0.95, rank=0, world_size=1, tau=0.6)
    b = CoreMuonClip([{"params": [p for l in lb for p in l.parameters() if p.ndim >= 2], "use_muon": True},
                      {"params": [p for l in lb for p in l.parameters() if p.ndim < 2], "use_muon": False}],
                     lr=0.02, momentum=0.95, weight_decay=0.01, adjust_lr_fn="original", qk_clip=False)
    clip_b = QKClipper(config={"tau": 0.6, "track": "manual"},
                       layers=[dict(module=l, mode=mode, num_heads=4, **meta) for l in lb])
    n_clipped = 0
    for _ in range(3):
        loss, s_max = _loss_and_s_max(la, x)
        loss.backward()
        a.step(s_max)  # positional s_max, as in efficient-muonclip
        a.zero_grad()
        n_clipped += int(a.metrics()["qk_clip/num_heads_clipped"])
        loss, s_max = _loss_and_s_max(lb, x)
        loss.backward()
        b.step()
        b.zero_grad()
        clip_b.apply_(clip_b.max_logits(s_max))
    assert n_clipped > 0
    for pa, pb in zip(la.parameters(), lb.parameters()):
        assert torch.equal(pa, pb)


def test_seed001_muon_plus_qkclip_equals_muonclip():
    la, lb = _seed_model(), _seed_model()
    x = torch.randn(2, 10, 32)
    a = MuonClip(params=[p for l in la for p in l.parameters()], attention_params=list(la), mode="mha",
                 metadata=META, n_head=4, lr=0.02, momentum=0.95, rank=0, world_size=1, tau=0.6)
    muon = Muon([p for l in lb for p in l.parameters()], lr=0.02, momentum=0.95, rank=0, world_size=1)
    qkclip = QKClip(attention_params=list(lb), mode="mha", metadata=META, n_head=4, tau=0.6, rank=0, world_size=1)
    n_clipped = 0
    for _ in range(2):
        loss, s_max = _loss_and_s_max(la, x)
        loss.backward()
        a.step(s_max)
        a.zero_grad()
        loss, s_max = _loss_and_s_max(lb, x)
        loss.backward()
        muon.step()
        qkclip.step(s_max)
        muon.zero_grad()
        n_clipped += int(qkclip.metrics()["qk_clip/num_heads_clipped"])
    for pa, pb in zip(la.parameters(), lb.parameters()):
        assert torch.equal(pa, pb)
    assert n_clipped > 0


def test_seed001_gqa_metadata_and_alpha_split_differs_from_seed():
    """Documented fixes: GQA key heads via metadata num_kv_heads (seed 001 cut W_k into n_head
    blocks), and the key side gets eta^(1-alpha) (seed 001 used eta^alpha on both sides)."""
    torch.manual_seed(0)
    attn = nn.Module()
    attn.wq, attn.wk = nn.Linear(32, 32, bias=False), nn.Linear(32, 16, bias=False)  # 4 q heads, 2 kv heads of 8
    with pytest.raises(ValueError, match="num_key_value_heads \\* head_dim"):
        QKClip([attn], "mha", {"w_q": "wq", "w_k": "wk"}, n_head=4)
    qk = QKClip([attn], "mha", {"w_q": "wq", "w_k": "wk", "num_kv_heads": 2}, n_head=4, tau=1.0, alpha=0.25)
    wq, wk = attn.wq.weight.clone(), attn.wk.weight.clone()
    qk.step([[4.0, 1.0, 0.5, 0.5]])  # head 0: eta = 1/4; group 0 = heads 0, 1
    eta = 0.25
    torch.testing.assert_close(attn.wk.weight[:8], wk[:8] * eta ** 0.75)  # k side: eta^(1-alpha)
    torch.testing.assert_close(attn.wq.weight[:8], wq[:8] * eta ** 0.25)  # q: eta_h / eta_g^(1-alpha)
    torch.testing.assert_close(attn.wq.weight[8:16], wq[8:16] * eta ** -0.75)  # cold head: logits unchanged
    assert torch.equal(attn.wk.weight[8:], wk[8:]) and torch.equal(attn.wq.weight[16:], wq[16:])


def test_seed_api_bad_input():
    layers = _seed_model()
    params = [p for l in layers for p in l.parameters()]
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        MuonClip(params=params, lr=0.02, rank=0, world_size=2)
    with pytest.raises(ValueError, match="missing \\['w_k'\\]"):
        QKClip(list(layers), "mha", {"w_q": "weight_q"}, n_head=4)
    with pytest.raises(ValueError, match="mode must be 'mha' or 'mla'"):
        QKClip(list(layers), "gqa", META, n_head=4)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        QKClip(list(layers), "mha", {"w_q": "weight_q", "w_k": "weight_key"}, n_head=4)
    with pytest.raises(ValueError, match="float\\('inf'\\) turns clipping off"):
        MuonClip(params, list(layers), "mha", META, 4, tau=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_heads'"):
        MuonClip(params, list(layers), "mha", META, n_heads=4)   # seed 001's own name is n_head
    opt = MuonClip(params=params, attention_params=list(layers), mode="mha", metadata=META, n_head=4, lr=0.02)
    with pytest.raises(ValueError, match="s_max has 1 layers"):
        opt.step([[1.0] * 4])
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda: calls.append(1))  # a callable is a closure, as in torch.optim
    assert calls == [1]


def _s_max_of_rank(rank: int) -> list[list[float]]:
    return [[3.0, 0.5, 2.0 if rank == 0 else 0.1, 1.0], [0.2, 4.0 if rank == 1 else 0.3, 0.2, 0.3]]


def _qkclip_worker(rank: int, world_size: int) -> list[torch.Tensor]:
    layers = _seed_model()
    qk = QKClip(list(layers), "mha", META, n_head=4, tau=1.0, rank=rank, world_size=world_size)
    qk.step(_s_max_of_rank(rank))
    return [p.detach().clone() for p in layers.parameters()]


@pytest.mark.slow
def test_seed001_qkclip_two_ranks_all_reduce_max(tmp_path):
    """world_size=2 over gloo: each rank passes its local s_max, both apply the clip of the
    element-wise max (= a single process given that max), so replicas stay identical."""
    from tests.dist_utils import run_distributed, values

    out = values(run_distributed(_qkclip_worker, 2, tmp_path=tmp_path, timeout=120))
    ref_layers = _seed_model()
    s0, s1 = torch.tensor(_s_max_of_rank(0)), torch.tensor(_s_max_of_rank(1))
    QKClip(list(ref_layers), "mha", META, n_head=4, tau=1.0).step(torch.maximum(s0, s1))
    for rank_params in out:
        for p, ref in zip(rank_params, ref_layers.parameters()):
            assert torch.equal(p, ref)


def test_seed001_metadata_dotted_parameter_names_and_nan_refused():
    """metadata may name a Linear ("weight_q") or a parameter by dotted path ("weight_q.weight");
    a parameter name scales that tensor only (its bias is not reached). NaN s_max -> ValueError
    naming the layer, nothing changed (the optimizer's preflight check)."""
    la, lb = _seed_model(), _seed_model()
    for layers in (la, lb):
        for l in layers:
            l.weight_q.bias = None
            l.weight_k.bias = None
    s_max = [[4.0, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 9.0]]
    QKClip(list(la), "mha", META, n_head=4, tau=1.0).step(s_max)
    QKClip(list(lb), "mha", {"w_q": "weight_q.weight", "w_k": "weight_k.weight"}, n_head=4, tau=1.0).step(s_max)
    for pa, pb in zip(la.parameters(), lb.parameters()):
        assert torch.equal(pa, pb)
    opt = MuonClip(params=[p for l in la for p in l.parameters()], attention_params=list(la), mode="mha",
                   metadata=META, n_head=4, lr=0.02)
    before = [p.clone() for p in la.parameters()]
    with pytest.raises(ValueError, match=r"attention_params\[1\]"):
        opt.step([[1.0] * 4, [1.0, float("nan"), 1.0, 1.0]])
    assert all(torch.equal(a, b) for a, b in zip(before, la.parameters()))


# --------------------------------------------------------------------------- the seeds' own examples
# examples/seeds/ holds the seeds' example scripts and README examples, changed only in their
# import lines (plus offline model/tokenizer stand-ins and the glue a README leaves to the
# reader, each line marked). Each runs twice: as shipped, against dist_muonclip.compat, and with
# its import lines pointed at tests/_seed_reference.py (the seeds' algorithms in float64). The
# final parameters are compared.
EXAMPLES_DIR = pathlib.Path(__file__).resolve().parent.parent / "examples" / "seeds"
# example -> (its "model" is bf16, the seed's algorithm differs from ours in the parameter split)
SEED_EXAMPLES = {
    "muon_clip_test.py": (True, True),
    "muon_clip_readme.py": (False, True),
    "efficient_muonclip_readme.py": (False, False),
    "efficient_muonclip_readme_separate.py": (False, False),
}


def _run_example(name: str, *, reference: bool, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """Run one example (as shipped, or against the reference); return its globals and each
    parameter's value before the first optimizer step touched it (a global step pre-hook)."""
    path = EXAMPLES_DIR / name
    src = path.read_text()
    if reference:
        src, n = re.subn(r"^from dist_muonclip\.compat import ([\w, ]+)", r"from tests._seed_reference import \1",
                         src, flags=re.M)
        assert n >= 1 and "import dist_muonclip" not in src and "from dist_muonclip" not in src
    run_dir = tmp_path / ("ref" if reference else "ours")
    run_dir.mkdir(exist_ok=True)
    monkeypatch.chdir(run_dir)          # seed 000 writes TensorBoard events to ./logs
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    init: dict = {}

    def snapshot(opt, args, kwargs):
        for g in opt.param_groups:
            for p in g["params"]:
                init.setdefault(p, p.detach().clone())

    handle = register_optimizer_step_pre_hook(snapshot)
    ns = {"__name__": "__main__", "__file__": str(path)}
    torch.manual_seed(0)                # the seed-000 test script builds its model unseeded
    try:
        exec(compile(src, str(path), "exec"), ns)
    finally:
        handle.remove()
    return ns, init


def _muon_split(model):
    return {i.param for i in split_parameters(model) if i.use_muon}


# Largest |ours - reference| allowed, as a fraction of the parameter's total change in the run.
# fp32 NS vs float64: NS rounding plus the gradients of weights a few ulps apart, which AdamW
# (torch's own on both sides in seed 001's examples) normalises into visible differences where
# gradients are tiny: measured up to 6.8e-5 (LayerNorm weights; Muon matrices <= 3.9e-5), so 2e-4.
# It still catches a wrong factor (0.2 vs 0.4 scale: 1.0) or a missing weight decay of 0.01 at
# lr 0.02 (6.7e-4 of q_proj's change). bf16 NS (shipped default, as torch.optim.Muon): bf16
# operands carry 2^-8 relative error per product; measured up to 0.13 of the change (AdamW-updated
# LayerNorm weights again; Muon matrices less): 0.3, still far below a factor-2 scale error.
_REL_TOL = {"float32": 2e-4, "shipped": 0.3}
# plus rounding of the weight itself: we round twice per step (decay, then update; torch.optim.Muon's
# order), the reference once from float64: up to 2 ulps of |W| per step, 3 steps
_ULPS = 6


@pytest.mark.parametrize("ns_dtype", ["shipped", "float32"])
@pytest.mark.parametrize("name", sorted(SEED_EXAMPLES))
def test_seed_examples_run_unchanged_and_match_the_seed_algorithm(name, ns_dtype, tmp_path, monkeypatch):
    """Each seed example runs with only its import line changed, and its parameters equal a
    float64 reimplementation of the seed's optimizer run through the same script.

    "shipped": our defaults (bf16 Newton-Schulz, as torch.optim.Muon); "float32": NS in fp32 (the
    seeds' precision for fp32 models; our ns_dtype default patched for the run), where the only
    difference left is fp32-vs-fp64 rounding. Seed 000's parameter split is aligned to ours in
    the reference (the split is a documented difference, docs/compat.md)."""
    bf16_model, split_differs = SEED_EXAMPLES[name]
    if split_differs:
        monkeypatch.setattr(seed_reference, "MUON_PARAMS", _muon_split)
    with monkeypatch.context() as m:
        if ns_dtype == "float32":
            m.setitem(CoreMuonClip.__init__.__kwdefaults__, "ns_dtype", torch.float32)
        ours, init_ours = _run_example(name, reference=False, tmp_path=tmp_path, monkeypatch=monkeypatch)
    ref, init_ref = _run_example(name, reference=True, tmp_path=tmp_path, monkeypatch=monkeypatch)
    if split_differs:     # seed 000's clip is another algorithm (docs/compat.md): neither side may clip
        opt = ours["optimizer"]
        cfg = ours.get("muon_config") or ours["muonconfig"]
        assert opt.metrics()["qk_clip/max_logit"] < 0.1 * cfg.clipping_threshold
    worst, changed = 0.0, 0
    pairs = list(zip(ours["model"].named_parameters(), ref["model"].parameters()))
    assert len(pairs) == len(init_ours) == len(init_ref) > 0
    for (pname, a), b in pairs:
        a0, b0 = init_ours[a], init_ref[b]
        assert torch.equal(a0, b0), f"{pname}: the two runs started apart"
        change = (b.double() - b0.double()).abs().max().item()
        changed += change > 0     # bf16 weights: an update under half an ulp rounds away (both sides)
        err = (a.double() - b.double()).abs().max().item()
        slack = _ULPS * torch.finfo(b.dtype).eps * b.double().abs().max().item()
        assert err <= _REL_TOL[ns_dtype] * change + slack, f"{name} {pname}: |diff| {err:.3g}, change {change:.3g}"
        worst = max(worst, err / max(change, 1e-30))
    assert changed >= len(pairs) // 2, "most parameters must move, or there is nothing to compare"
    if split_differs:
        ours["optimizer"].close()       # its TensorBoard writer, before tmp_path goes
    print(f"{name} [{ns_dtype}]: worst |ours - seed| / change = {worst:.2e}")


# --------------------------------------------------------------------------- seed defaults and signatures
def test_seed000_muon_config_takes_the_seeds_step_0_4_sqrt_max_dim():
    """Regression (issue 14): compat scaled seed 000's Muon update by 0.2 sqrt(max(m, n)) where
    the seed uses 0.4 sqrt(max(m, n)) (muon_update in its utils.py), so the same MuonConfig took
    half the step. Oracle: the seed's update in float64 (tests/_seed_reference.py), one step from
    zero momentum with fp32 NS. Tolerance, relative to the step: 2e-5 for fp32 NS rounding
    (measured <= 1e-5) plus 5e-7 / ||V||_F: the seed normalises by ||V|| + 1e-7, we by
    max(||V||, 1e-7) as torch.optim.Muon (docs/compat.md), a relative 1e-7 / ||V|| change of the NS
    input that 5 quintic iterations amplify up to 2.3x here (k_proj, ||V|| = 8.5e-4: 2.8e-4).
    The 0.2 scale was off by 0.5 of the step."""
    model = build_model("llama").train()
    ref_model = copy.deepcopy(model)
    cfg = MuonConfig(lr=1e-3, muon_decay=0.1, enable_clipping=False, log_max_logits=False)
    opt = MuonClip(model, None, cfg, ns_dtype=torch.float32)
    assert all(g["adjust_lr_fn"] == "rms_0.4" for g in opt.param_groups if g["use_muon"])
    ids, pad = make_batch()
    model(input_ids=ids, attention_mask=pad, labels=ids).loss.backward()
    ref_model(input_ids=ids, attention_mask=pad, labels=ids).loss.backward()
    w0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt.step()
    seen = 0
    for (name, p), rp in zip(model.named_parameters(), ref_model.parameters()):
        if not any(p is q for g in opt.param_groups if g["use_muon"] for q in g["params"]):
            continue
        g = rp.grad.double()
        v = g + 0.95 * ((1 - 0.95) * g - g)              # nesterov from zero momentum
        o = seed_reference.ns64(v)
        want = w0[name] * (1 - 1e-3 * 0.1) - 1e-3 * 0.4 * math.sqrt(max(p.shape)) * o
        step = (want - w0[name]).abs().max().item()
        err = (p.double() - want).abs().max().item()
        tol = 2e-5 + 5e-7 / v.norm().item()
        assert err <= tol * step + 4 * 2 ** -24 * w0[name].abs().max().item(), (name, err, step)
        seen += 1
    assert seen >= 7     # q, k, v, o, gate, up, down of each layer
    opt.close()


def test_seed001_signature_positional_order_and_defaults():
    """Regression (issue 14): compat's seed-001 MuonClip was keyword-only (the seed's positional
    call raised TypeError), required lr (seed default 0.02) and had no weight decay (seed default
    0.01); Muon likewise. Each positional argument must land where the seed put it."""
    layers = _seed_model()
    params = [p for l in layers for p in l.parameters() if p.ndim >= 2]
    opt = MuonClip(params, list(layers), "mha", META, 4)
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"], g["ns_steps"], g["adjust_lr_fn"]) == \
        (0.02, 0.01, 0.95, True, 5, "original")
    assert (opt.qk_clipper.config.tau, opt.qk_clipper.config.alpha) == (100.0, 0.5)
    opt = MuonClip(params, list(layers), "mha", META, 4, 0.05, 0.03, 0.9, False, 6, 3.0, 0.25, 0, 1)
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"], g["ns_steps"]) == (0.05, 0.03, 0.9, False, 6)
    assert (opt.qk_clipper.config.tau, opt.qk_clipper.config.alpha) == (3.0, 0.25)
    m = Muon(params, 0.05, 0.03, 0.9, False, 6, 0, 1)
    g = m.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"], g["ns_steps"]) == (0.05, 0.03, 0.9, False, 6)
    g = Muon(params).param_groups[0]
    assert (g["lr"], g["weight_decay"]) == (0.02, 0.01)


def test_seed001_step_equals_float64_reference_with_clip_acting():
    """compat.MuonClip(params, attention_params, ...) with seed defaults vs the seed's algorithm
    in float64 (tests/_seed_reference.py), fp32 NS, 3 steps, the clip acting (tau 0.6, alpha 0.5
    where the seed's eta^alpha on both sides is exact; no q/k biases: the seed does not scale
    them). Tolerance 1e-4 of the run's change: fp32 NS rounding, the seed's NS normalisation by
    ||V|| + 1e-7 and its tau / (s + 1e-6) (relative 1e-6 / s on eta), see the test above."""
    la, lb = _seed_model(), _seed_model()
    for layer in (*la, *lb):     # the seed clips weights only; we scale the q/k biases too (docs/compat.md)
        layer.weight_q.bias = layer.weight_k.bias = None
    x = torch.randn(2, 10, 32)
    w0 = [p.detach().double().clone() for p in la.parameters()]
    ours = MuonClip([p for l in la for p in l.parameters() if p.ndim >= 2], list(la), "mha", META, 4, tau=0.6,
                    ns_dtype=torch.float32)
    ref = seed_reference.MuonClip([p for l in lb for p in l.parameters() if p.ndim >= 2], list(lb), "mha", META, 4,
                                  tau=0.6, rank=0, world_size=1)
    clipped = 0
    for _ in range(3):
        for layers, opt in ((la, ours), (lb, ref)):
            loss, s_max = _loss_and_s_max(layers, x)
            loss.backward()
            opt.step(s_max)
            opt.zero_grad()
        clipped += int(ours.metrics()["qk_clip/num_heads_clipped"])
    assert clipped > 0
    for a, b, p0 in zip(la.parameters(), lb.parameters(), w0):
        if a.ndim < 2:
            continue
        change = (b.double() - p0).abs().max().item()
        assert (a.double() - b.double()).abs().max().item() <= 1e-4 * change


def test_seed001_tau_inf_turns_clipping_off():
    """Regression (issue 14): tau=float("inf") (the seeds' clip-off: eta = min(1, inf) = 1) was
    rejected. MuonClip with tau=inf steps exactly like one without attention_params, whatever
    s_max says; QKClip(tau=inf).step leaves the weights as they were."""
    la, lb = _seed_model(), _seed_model()
    x = torch.randn(2, 10, 32)
    a = MuonClip([p for l in la for p in l.parameters()], list(la), "mha", META, 4, tau=float("inf"))
    b = MuonClip([p for l in lb for p in l.parameters()])
    assert a.qk_clipper is None
    for layers, opt in ((la, a), (lb, b)):
        loss, _ = _loss_and_s_max(layers, x)
        loss.backward()
        opt.step([[1e6] * 4, [1e6] * 4])
    for pa, pb in zip(la.parameters(), lb.parameters()):
        assert torch.equal(pa, pb)
    before = [p.detach().clone() for p in la.parameters()]
    QKClip(list(la), "mha", META, 4, tau=float("inf")).step([[1e6] * 4, [1e6] * 4])
    assert all(torch.equal(p, q) for p, q in zip(before, la.parameters()))
