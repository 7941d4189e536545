"""Seed-compatible entry points (dist_muonclip.compat): each is checked against the library
objects it stands for (same seeds, same data, parameters compared bit for bit), plus the
seed-000 TensorBoard logging and the documented differences."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from dist_muonclip import MuonClip as CoreMuonClip
from dist_muonclip.compat import Muon, MuonClip, MuonConfig, QKClip, muon_config_kwargs
from dist_muonclip.qk_clip import QKClipConfig, QKClipper
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
