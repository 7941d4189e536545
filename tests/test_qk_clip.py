"""QK-Clip: forward -> clip -> same forward again, checked with an independent float64 oracle
(tests/test_tracker.py: q/k recomputed from each module's inputs and weights), for MHA, GQA
(both policies), MLA (with and without q_lora_rank) and QK-norm models built from HF configs."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from dist_muonclip.qk_clip import QKClipConfig, QKClipper, pack_s_max
from tests.test_tracker import (
    attention_modules,
    build_model,
    capture_inputs,
    make_batch,
    oracle_from_inputs,
    oracle_max_logits,
)

transformers = pytest.importorskip("transformers")

# Oracle (float64) vs fp32 model: relative error ~1e-6 (tests/test_tracker.py); 1e-5 leaves margin.
RTOL = 1e-5


def _head_rows(module, head: int) -> list[tuple[torch.Tensor, slice]]:
    """(param, rows) of the query projection belonging to ``head`` (to make it exceed tau)."""
    if hasattr(module, "kv_b_proj"):
        q = module.q_proj if module.q_proj is not None else module.q_b_proj
        blk = module.qk_head_dim
        return [(q.weight, slice(head * blk, (head + 1) * blk))]
    d = module.head_dim
    out = [(module.q_proj.weight, slice(head * d, (head + 1) * d))]
    if module.q_proj.bias is not None:
        out.append((module.q_proj.bias, slice(head * d, (head + 1) * d)))
    return out


@torch.no_grad()
def inflate(model, heads_per_layer: dict[int, list[int]], factor: float = 25.0) -> None:
    mods = attention_modules(model)
    for li, heads in heads_per_layer.items():
        for h in heads:
            for p, rows in _head_rows(mods[li], h):
                p[rows] *= factor


def pick_tau(s0: torch.Tensor, inflated: dict[int, list[int]]) -> float:
    """A tau strictly between the inflated heads' max logits and all the others'."""
    mask = torch.zeros_like(s0, dtype=torch.bool)
    for li, heads in inflated.items():
        mask[li, heads] = True
    lo, hi = s0[~mask].max().item(), s0[mask].min().item()
    assert hi > 2 * lo, (lo, hi)  # the inflation made a clear gap
    return math.sqrt(lo * hi)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


INFLATED = {0: [0], 1: [3]}  # GQA 4/2: group 0 of layer 0 and group 1 of layer 1 get one hot head


@pytest.mark.parametrize("family, alpha", [("llama", 0.5), ("mistral", 0.5), ("qwen2", 0.5), ("deepseek_v3", 0.5),
                                           ("deepseek_v3_lora", 0.5), ("qwen2", 0.3), ("deepseek_v3", 0.3)])
def test_post_clip_reforward_every_head_at_most_tau(family, alpha):
    """The clip acts per layer on that layer's logits for that layer's inputs: re-running every
    attention layer on the inputs of the recorded forward, every head is <= tau, clipped heads sit
    on tau, the others are unchanged. In a full re-forward layer 0 sees the same inputs (exact);
    deeper layers see inputs shifted by the clip of the layers below (QK-Clip bounds the logits of
    the step it measured, arXiv 2507.20534 Alg. 1), so only layer 0 is compared exactly there
    (the tiny MLA model's layer 1 lands ~4% above tau: a documented property of QK-Clip, not a
    rounding error). Qwen2's q/k biases are made non-zero (they start at zero), so a bias row left
    unscaled would move the clipped heads off tau; alpha = 0.3 pins which side gets eta^alpha."""
    model = build_model(family).train()
    if family == "qwen2":
        with torch.no_grad():
            for m in attention_modules(model):
                m.q_proj.bias.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
                m.k_proj.bias.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(4))
    inflate(model, INFLATED)
    ids, pad = make_batch()
    inputs = capture_inputs(model, ids, pad)
    s0 = oracle_from_inputs(model, inputs, pad)
    tau = pick_tau(s0, INFLATED)
    clipper = QKClipper(model, {"tau": tau, "alpha": alpha})
    before = snapshot(model)
    model(input_ids=ids, attention_mask=pad)  # the training forward: the tracker records here
    s = clipper.max_logits()
    torch.testing.assert_close(s.double(), s0, rtol=RTOL, atol=0)
    clipper.apply_(s)
    s1 = oracle_from_inputs(model, inputs, pad)  # same per-layer inputs, clipped weights

    clipped = s0 > tau
    assert clipped.sum() == 2
    assert (s1 <= tau * (1 + RTOL)).all(), (s1, tau)
    # clipped heads land exactly on tau (every logit of head h is multiplied by eta_h) ...
    torch.testing.assert_close(s1[clipped], torch.full_like(s1[clipped], tau), rtol=RTOL, atol=0)
    # ... heads under tau keep their logits
    torch.testing.assert_close(s1[~clipped], s0[~clipped], rtol=RTOL, atol=0)
    # full re-forward through the model
    s_full = oracle_max_logits(model, ids, pad)
    torch.testing.assert_close(s_full[0], s1[0], rtol=RTOL, atol=0)

    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    mods = attention_modules(model)
    if family.startswith("deepseek"):
        # MLA: only the query projection and kv_b_proj; the shared RoPE key (kv_a_proj_with_mqa),
        # q_a_proj, norms and values are never touched.
        q = "q_b_proj" if family.endswith("lora") else "q_proj"
        assert changed == {f"model.layers.{i}.self_attn.{w}.weight" for i in (0, 1) for w in (q, "kv_b_proj")}
        for li, (layer, heads) in enumerate(INFLATED.items()):
            m = mods[layer]
            h = heads[0]
            eta = tau / s0[layer, h].item()
            nope, rope, v = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
            pre = f"model.layers.{layer}.self_attn."
            qb, qa = before[pre + q + ".weight"], after[pre + q + ".weight"]
            kvb, kva = before[pre + "kv_b_proj.weight"], after[pre + "kv_b_proj.weight"]
            blk, kblk = nope + rope, nope + v
            # q_C by eta^alpha, q_R by eta, k_C by eta^(1 - alpha), v untouched
            torch.testing.assert_close(qa[h * blk: h * blk + nope], qb[h * blk: h * blk + nope] * eta ** alpha)
            torch.testing.assert_close(qa[h * blk + nope:(h + 1) * blk], qb[h * blk + nope:(h + 1) * blk] * eta)
            torch.testing.assert_close(kva[h * kblk: h * kblk + nope],
                                       kvb[h * kblk: h * kblk + nope] * eta ** (1 - alpha))
            assert torch.equal(kva[h * kblk + nope:(h + 1) * kblk], kvb[h * kblk + nope:(h + 1) * kblk])
            others = [r for r in range(qb.shape[0]) if not h * blk <= r < (h + 1) * blk]
            assert torch.equal(qa[others], qb[others])  # other heads bit for bit
    else:
        allowed = {f"model.layers.{i}.self_attn.{w}.{t}" for i in (0, 1) for w in ("q_proj", "k_proj")
                   for t in ("weight", "bias")}
        assert changed <= allowed
        if family == "qwen2":  # MHA: the hot head's q rows and bias by eta^alpha, k's by eta^(1-alpha)
            d = mods[0].head_dim
            for layer, heads in INFLATED.items():
                h, pre = heads[0], f"model.layers.{layer}.self_attn."
                eta = tau / s0[layer, h].item()
                rows = slice(h * d, (h + 1) * d)
                for w, power in (("q_proj", alpha), ("k_proj", 1 - alpha)):
                    for t in ("weight", "bias"):
                        key = pre + f"{w}.{t}"
                        torch.testing.assert_close(after[key][rows], before[key][rows] * eta ** power)
        cfg = model.config
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        d = mods[0].head_dim
        for layer, heads in INFLATED.items():
            hot_group = heads[0] // g
            pre = f"model.layers.{layer}.self_attn."
            for kvh in range(cfg.num_key_value_heads):
                rows = slice(kvh * d, (kvh + 1) * d)
                untouched = kvh != hot_group
                assert torch.equal(before[pre + "k_proj.weight"][rows], after[pre + "k_proj.weight"][rows]) == untouched
                for qh in range(kvh * g, (kvh + 1) * g):
                    qrows = slice(qh * d, (qh + 1) * d)
                    same = torch.equal(before[pre + "q_proj.weight"][qrows], after[pre + "q_proj.weight"][qrows])
                    # exact policy: heads of an untouched group are bit-identical; in the hot group
                    # the cold heads' q rows are compensated (logits unchanged, checked above).
                    assert same == untouched


def test_gqa_conservative_policy_never_scales_up_and_bounds_every_head():
    model = build_model("llama").train()
    inflate(model, INFLATED)
    ids, pad = make_batch()
    s0 = oracle_max_logits(model, ids, pad)
    tau = pick_tau(s0, INFLATED)
    clipper = QKClipper(model, {"tau": tau, "gqa_policy": "conservative", "alpha": 0.3})
    inputs = capture_inputs(model, ids, pad)  # (no_grad: not recorded by the tracker)
    model(input_ids=ids, attention_mask=pad)  # the training forward
    s = clipper.max_logits()
    scales = clipper.row_scales(s)
    assert all((sc <= 1).all() for _, sc in scales)
    clipper.apply_(s)
    s1 = oracle_from_inputs(model, inputs, pad)
    eta = torch.where(s0 > tau, tau / s0, torch.ones_like(s0))
    assert (s1 <= tau * (1 + RTOL)).all()
    assert (s1 <= s0 * eta * (1 + RTOL)).all()  # never less clipping than MHA would give
    # the hot heads land exactly on tau: eta_h^alpha * eta_g^(1-alpha) = eta_h when h is the group min
    hot = s0 > tau
    torch.testing.assert_close(s1[hot], torch.full_like(s1[hot], tau), rtol=RTOL, atol=0)
    # a cold head in a hot group is over-clipped by eta_g^(1-alpha)
    eg = eta[0, 0].item()
    torch.testing.assert_close(s1[0, 1], s0[0, 1] * eg ** 0.7, rtol=RTOL, atol=0)


def test_qk_norm_shared_policy_scales_norm_weights_by_worst_eta():
    """Qwen3: q_norm/k_norm (RMSNorm over head_dim, one weight for all heads) follow W_q/W_k, so
    rescaling W_q does nothing; the clip must act on the norm weights (shared: worst head's eta)."""
    model = build_model("qwen3").train()
    ids, pad = make_batch()
    with torch.no_grad():
        m0 = attention_modules(model)[0]
        m0.q_norm.weight.mul_(20.0)
        m0.k_norm.weight.mul_(5.0)
    inputs = capture_inputs(model, ids, pad)
    s0 = oracle_from_inputs(model, inputs, pad)
    # the reason for the policy: halving W_q leaves the logits unchanged (RMSNorm is scale invariant;
    # only eps = 1e-6 against mean(q^2) ~ 1e-3 separates them)
    probe = copy.deepcopy(model)
    with torch.no_grad():
        attention_modules(probe)[0].q_proj.weight.mul_(0.5)
    torch.testing.assert_close(oracle_max_logits(probe, ids, pad), s0, rtol=1e-3, atol=0)

    tau = s0[0].median().item()  # some heads of layer 0 above tau, some below; layer 1 below
    assert s0[1].max() < tau
    clipper = QKClipper(model, {"tau": tau})
    assert [l.qk_norm for l in clipper.layers] == ["shared", "shared"]
    assert "model.layers.0.self_attn: mha+qk_norm(shared), heads 4/2, scales q_norm.weight, k_norm.weight" \
        in clipper.describe()
    before = snapshot(model)
    model(input_ids=ids, attention_mask=pad)
    clipper.apply_()
    s1 = oracle_from_inputs(model, inputs, pad)
    eta_min = tau / s0[0].max().item()
    assert (s1 <= tau * (1 + RTOL)).all()
    torch.testing.assert_close(s1[0], s0[0] * eta_min, rtol=RTOL, atol=0)  # whole layer by eta_min
    torch.testing.assert_close(s1[1], s0[1], rtol=RTOL, atol=0)
    changed = {n for n in before if not torch.equal(before[n], snapshot(model)[n])}
    assert changed == {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"}


def test_qk_norm_error_policy_refuses_with_message():
    model = build_model("qwen3")
    with pytest.raises(ValueError, match="QK-norm.*shared by all heads"):
        QKClipper(model, {"qk_norm_policy": "error"})
    assert model.config._attn_implementation == "sdpa"  # nothing installed


def test_row_scales_on_row_shards_and_flat_fragments_match_full_apply():
    """The layout-agnostic contract: scales applied to FSDP-style row shards or DeepSpeed-style
    flat fragments give the same parameters as apply_ on full tensors (bit for bit)."""
    model = build_model("llama").train()
    inflate(model, INFLATED)
    ids, pad = make_batch()
    clipper = QKClipper(model, {"tau": 0.5})
    model(input_ids=ids, attention_mask=pad)
    s = clipper.max_logits()
    assert (s > 0.5).any()
    ref = copy.deepcopy(model)
    ref_clip = QKClipper(ref, {"tau": 0.5}, )
    ref_clip.apply_(s.clone())
    ref_params = dict(ref.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    for p, scale in clipper.row_scales(s):
        assert scale.shape == (p.shape[0],) and scale.dtype == torch.float32
        full = p.detach().clone()
        # row shards of uneven sizes (Shard(0))
        bounds = [0, 5, 5 + p.shape[0] // 3, p.shape[0]]
        shards = [full[a:b] * scale[a:b].view(-1, 1) for a, b in itertools.pairwise(bounds)]
        # flat fragments cutting through rows (ZeRO-1/2 flat partitions)
        flat, cols = full.reshape(-1), p.shape[1]
        cut = [0, 77, 1000, flat.numel()]
        frags = [flat[a:b] * scale.repeat_interleave(cols)[a:b] for a, b in itertools.pairwise(cut)]
        want = ref_params[names[id(p)]].detach()
        assert torch.equal(torch.cat(shards), want)
        assert torch.equal(torch.cat(frags).view_as(full), want)


def test_seed_s_max_list_equals_packed_tensor_and_manual_tracking():
    model = build_model("llama").train()
    clipper = QKClipper(model, {"tau": 1.0, "track": "manual"})
    assert model.config._attn_implementation == "sdpa"  # manual: no hook
    s_max = [[torch.tensor(3.0), torch.tensor(0.5), 2.0, 0.1], torch.tensor([0.2, 0.3, 4.0, 0.9])]
    packed = pack_s_max(s_max, [4, 4])
    assert torch.equal(packed, torch.tensor([[3.0, 0.5, 2.0, 0.1], [0.2, 0.3, 4.0, 0.9]]))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    QKClipper(a, {"tau": 1.0, "track": "manual"}).step(s_max)
    QKClipper(b, {"tau": 1.0, "track": "manual"}).step(packed)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="s_max has 1 layers"):
        clipper.max_logits([[1.0] * 4])
    with pytest.raises(ValueError, match=r"s_max\[1\] has 3 values"):
        clipper.max_logits([[1.0] * 4, [1.0] * 3])


class SeedMHA(nn.Module):
    """The custom attention of efficient-muonclip's README (weight_q / weight_k), returning the
    float64 per-head max logits of its own causal scores."""

    def __init__(self, d_model=32, n_head=4):
        super().__init__()
        self.n_head, self.d_head = n_head, d_model // n_head
        self.weight_q = nn.Linear(d_model, d_model, bias=True)
        self.weight_k = nn.Linear(d_model, d_model, bias=True)

    def max_logits(self, x):
        b, s, _ = x.shape
        q = self.weight_q(x).double().view(b, s, self.n_head, -1).transpose(1, 2)
        k = self.weight_k(x).double().view(b, s, self.n_head, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        return scores.amax(dim=(0, 2, 3))


class SeedMLA(nn.Module):
    """Separate per-head q_C, k_C, q_R projections and one shared k_R (seed 001's MLA metadata)."""

    def __init__(self, d_model=32, n_head=4, dc=6, dr=4):
        super().__init__()
        self.h, self.dc, self.dr = n_head, dc, dr
        self.w_qc = nn.Linear(d_model, n_head * dc, bias=False)
        self.w_kc = nn.Linear(d_model, n_head * dc, bias=False)
        self.w_qr = nn.Linear(d_model, n_head * dr, bias=False)
        self.w_kr = nn.Linear(d_model, dr, bias=False)

    def max_logits(self, x):
        b, s, _ = x.shape
        qc = self.w_qc(x).double().view(b, s, self.h, -1).transpose(1, 2)
        kc = self.w_kc(x).double().view(b, s, self.h, -1).transpose(1, 2)
        qr = self.w_qr(x).double().view(b, s, self.h, -1).transpose(1, 2)
        kr = self.w_kr(x).double().view(b, 1, s, -1)
        scores = (qc @ kc.transpose(-1, -2) + qr @ kr.transpose(-1, -2)) / math.sqrt(self.dc + self.dr)
        return scores.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("mode", ["mha", "mla"])
def test_custom_model_explicit_layers_record_and_clip(mode):
    torch.manual_seed(0)
    layers = nn.ModuleList([SeedMHA() if mode == "mha" else SeedMLA() for _ in range(2)])
    with torch.no_grad():
        first = layers[0].weight_q if mode == "mha" else layers[0].w_qr
        first.weight[:first.weight.shape[0] // 4] *= 40  # head 0 of layer 0 hot
    meta = ({"w_q": "weight_q", "w_k": "weight_k"} if mode == "mha"
            else {"w_qc": "w_qc", "w_kc": "w_kc", "w_qr": "w_qr"})
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        s0 = torch.stack([l.max_logits(x) for l in layers])
    tau = float(s0[0, 0].detach()) / 3
    assert (s0[:, 1:] < tau).all() and s0[1].max() < tau
    clipper = QKClipper(config={"tau": tau}, layers=[dict(module=l, mode=mode, num_heads=4, **meta) for l in layers])
    for i, l in enumerate(layers):
        clipper.tracker.record(l if i else 0, l.max_logits(x).float())
    kr_before = layers[0].w_kr.weight.clone() if mode == "mla" else None
    clipper.apply_()
    with torch.no_grad():
        s1 = torch.stack([l.max_logits(x) for l in layers])
    torch.testing.assert_close(s1[0, 0], torch.tensor(tau, dtype=torch.float64), rtol=RTOL, atol=0)
    torch.testing.assert_close(s1.flatten()[1:], s0.flatten()[1:], rtol=RTOL, atol=0)
    if mode == "mla":
        assert torch.equal(layers[0].w_kr.weight, kr_before)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_configs_and_mappings_raise_naming_the_fix():
    model = build_model("llama")
    with pytest.raises(ValueError, match="num_attention_heads"):
        QKClipper(model, model_config={"num_key_value_heads": 2, "head_dim": 16})
    with pytest.raises(ValueError, match="q_proj has 64 rows but num_attention_heads \\* head_dim = 4 \\* 5"):
        QKClipper(model, model_config={"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 5})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        QKClipper(model, model_config={"num_attention_heads": 4, "num_key_value_heads": 3, "head_dim": 16})
    with pytest.raises(ValueError, match="found no attention layer.*mapping="):
        QKClipper(model, {"mapping": {"q_proj": "wq", "k_proj": "wk"}})
    with pytest.raises(ValueError, match="unknown roles \\['v_proj'\\]"):
        QKClipConfig(mapping={"v_proj": "v"})
    with pytest.raises(ValueError, match="tau"):
        QKClipConfig(tau=0.0)
    with pytest.raises(ValueError, match="alpha"):
        QKClipConfig(alpha=1.5)
    with pytest.raises(ValueError, match="unknown options \\['threshold'\\]"):
        QKClipConfig.from_any({"threshold": 3})
    assert model.config._attn_implementation == "sdpa"  # failed constructions installed nothing
    # a dict model_config (seed 000) that is right works
    c = QKClipper(model, model_config={"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    assert [l.group_size for l in c.layers] == [2, 2]
    c.close()


def test_non_finite_max_logits_raise_naming_layer_and_change_nothing():
    model = build_model("llama")
    clipper = QKClipper(model, {"tau": 1.0, "track": "manual"})
    before = snapshot(model)
    s = torch.full((2, 4), 50.0)
    s[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn heads \[2\]"):
        clipper.apply_(s)
    s[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        clipper.row_scales(s)
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    s[1, 2] = float("-inf")  # "nothing recorded" is fine: that head is left alone
    assert clipper.etas(s)[1, 2] == 1.0


def test_disabled_is_free():
    model = build_model("llama")
    clipper = QKClipper(model, {"enable": False})
    assert clipper.tracker is None and clipper.layers == [] and not clipper.enabled
    assert model.config._attn_implementation == "sdpa"
    assert clipper.row_scales(torch.ones(2, 4)) == [] and clipper.apply_() is None
    assert QKClipConfig.from_any(False).enable is False


def test_metrics_are_device_tensors_of_the_last_clip():
    model = build_model("llama").train()
    inflate(model, INFLATED)
    ids, pad = make_batch()
    clipper = QKClipper(model, {"tau": 1.0})
    assert clipper.metrics() == {}
    model(input_ids=ids, attention_mask=pad)
    s = clipper.apply_()
    m = clipper.metrics()
    assert all(isinstance(v, torch.Tensor) for v in m.values())
    n = int((s > 1.0).sum())
    assert m["qk_clip/num_heads_clipped"].item() == n and m["qk_clip/frac_heads_clipped"].item() == n / 8
    assert m["qk_clip/max_logit"].item() == s.max().item()
    assert m["qk_clip/max_logit/layer_01"].item() == s[1].max().item()
    assert m["qk_clip/min_eta"].item() == pytest.approx(1.0 / s.max().item(), rel=1e-6)


def test_wrapped_model_is_tracked_through_the_wrapper():
    """Pins: a DDP/DeepSpeed-style wrapper (the HF model under .module, no .config on the wrapper)
    must still get the attention hook and names prefixed by the wrapper."""
    model = build_model("llama").train()
    wrapper = nn.Module()
    wrapper.module = model
    clipper = QKClipper(wrapper, {"tau": 1.0})
    assert clipper.layer_names() == ["module.model.layers.0.self_attn", "module.model.layers.1.self_attn"]
    assert model.config._attn_implementation == "dist_muonclip_sdpa"
    ids, pad = make_batch()
    model(input_ids=ids, attention_mask=pad)
    torch.testing.assert_close(clipper.max_logits().double(), oracle_max_logits(model, ids, pad), rtol=RTOL, atol=0)
    clipper.close()
    assert model.config._attn_implementation == "sdpa"


def test_optimizer_clip_equals_update_then_clipper_and_nonfinite_refused():
    """dist_muonclip.MuonClip with QK-Clip == the same optimizer without it followed by
    QKClipper.apply_ on the forward's max logits (bit for bit); a NaN in s_max is refused naming
    the layer before any parameter or momentum changes."""
    from dist_muonclip import MuonClip

    ma = build_model("llama").train()
    inflate(ma, INFLATED)
    mb = copy.deepcopy(ma)
    ids, pad = make_batch()
    a = MuonClip(ma, lr=1e-3, ns_backend="torch", qk_clip={"tau": 0.5})
    b = MuonClip(mb, lr=1e-3, ns_backend="torch", qk_clip=False)
    clip_b = QKClipper(mb, {"tau": 0.5})
    for _ in range(2):
        for model, opt in ((ma, a), (mb, b)):
            model(input_ids=ids, attention_mask=pad, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        clip_b.apply_()
    assert a.qk_clipper.metrics()["qk_clip/num_heads_clipped"] > 0
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    ma(input_ids=ids, labels=ids).loss.backward()
    before = snapshot(ma)
    momenta = [s["momentum_buffer"].clone() for s in a.state.values() if "momentum_buffer" in s]
    s_max = torch.ones(2, 4)
    s_max[1, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.self_attn"):
        a.step(s_max=s_max)
    assert all(torch.equal(before[n], p) for n, p in ma.named_parameters())
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in
               zip(momenta, [s for s in a.state.values() if "momentum_buffer" in s]))


def test_explicit_mla_deepseek_layout_equals_discovery():
    """layers=[{"mode": "mla", "w_q": ..., "w_kv_b": ..., dims}] describes the same clip as the
    automatic discovery of a DeepSeek-V3 model (same params, same row scales)."""
    model = build_model("deepseek_v3_lora")
    auto = QKClipper(model, {"tau": 1.0, "track": "manual"})
    mods = attention_modules(model)
    explicit = QKClipper(config={"tau": 1.0}, layers=[
        dict(module=m, mode="mla", num_heads=4, w_q="q_b_proj", w_kv_b="kv_b_proj", qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16) for m in mods])
    s = torch.tensor([[3.0, 0.5, 2.0, 1.0], [0.1, 4.0, 0.2, 0.3]])
    ra, rb = auto.row_scales(s), explicit.row_scales(s)
    assert [p for p, _ in ra] == [p for p, _ in rb]
    for (_, x), (_, y) in zip(ra, rb):
        assert torch.equal(x, y)


def test_qk_norm_per_head_rows_olmo2_clip_like_gqa():
    """OLMo2: q_norm/k_norm span the whole projection, so their weights have per-head rows and
    the MHA/GQA rule applies to them (W_q/W_k, which the norm cancels, are left alone)."""
    model = build_model("olmo2").train()
    with torch.no_grad():
        for li, heads in INFLATED.items():
            w = attention_modules(model)[li].q_norm.weight
            for h in heads:
                w[h * 16:(h + 1) * 16] *= 25.0
    ids, pad = make_batch()
    inputs = capture_inputs(model, ids, pad)
    s0 = oracle_from_inputs(model, inputs, pad)
    tau = pick_tau(s0, INFLATED)
    clipper = QKClipper(model, {"tau": tau})
    assert [l.qk_norm for l in clipper.layers] == ["per_head", "per_head"]
    before = snapshot(model)
    model(input_ids=ids, attention_mask=pad)
    clipper.apply_()
    s1 = oracle_from_inputs(model, inputs, pad)
    hot = s0 > tau
    assert (s1 <= tau * (1 + RTOL)).all()
    torch.testing.assert_close(s1[hot], torch.full_like(s1[hot], tau), rtol=RTOL, atol=0)
    torch.testing.assert_close(s1[~hot], s0[~hot], rtol=RTOL, atol=0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {f"model.layers.{i}.self_attn.{w}.weight" for i in (0, 1) for w in ("q_norm", "k_norm")}


def test_user_mapping_discovers_custom_names_and_clips_like_explicit_layers():
    """Seed 000's clipping_layers_mapping: attention modules whose projections are named
    weight_q / weight_k are found by the mapping (with head counts from a dict model_config) and
    clipped exactly as when the same layers are given explicitly; the hot head lands on tau."""
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([SeedMHA() for _ in range(2)])
    with torch.no_grad():
        model.blocks[1].weight_q.weight[8:16] *= 40  # head 1 of layer 1 hot
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        s0 = torch.stack([b.max_logits(x) for b in model.blocks])
    tau = float(s0[1, 1]) / 3
    assert (s0.flatten().sort().values[-2] < tau).item()  # only that head is above tau
    explicit = copy.deepcopy(model)
    mapped = QKClipper(model, {"tau": tau, "track": "manual", "mapping": {"q_proj": "weight_q", "k_proj": "weight_k"}},
                       model_config={"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8})
    assert [l.name for l in mapped.layers] == ["blocks.0", "blocks.1"]
    mapped.step(s0.float())
    QKClipper(config={"tau": tau, "track": "manual"},
              layers=[dict(module=b, mode="mha", num_heads=4, w_q="weight_q", w_k="weight_k")
                      for b in explicit.blocks]).step(s0.float())
    for p, q in zip(model.parameters(), explicit.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        s1 = torch.stack([b.max_logits(x) for b in model.blocks])
    torch.testing.assert_close(s1[1, 1], torch.tensor(tau, dtype=torch.float64), rtol=RTOL, atol=0)
    cold = torch.ones_like(s0, dtype=torch.bool)
    cold[1, 1] = False
    torch.testing.assert_close(s1[cold], s0[cold], rtol=RTOL, atol=0)
