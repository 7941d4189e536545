"""Max-logit tracking: the chunked torch path against materialized float64 logits, and the HF
AttentionInterface hook against an independent float64 recomputation of each model's q/k.

The helpers at the top (tiny HF models, the float64 oracle) are shared with test_qk_clip.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F

from dist_muonclip.integrations.transformers_attention import install_hf_tracking
from dist_muonclip.tracker import MaxLogitTracker, max_logits_torch

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 128, 16, 2


# ---------------------------------------------------------------------------------------------
# tiny HF models
# ---------------------------------------------------------------------------------------------
def build_model(family: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """hidden 64, 2 layers. llama: GQA 4/2; mistral: GQA + sliding window 8 (< SEQ);
    qwen2: MHA with q/k biases; qwen3: GQA + QK-norm; deepseek_v3(_lora): MLA without/with q_lora_rank."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  attn_implementation=attn)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.LlamaForCausalLM(cfg)
    if family == "mistral":
        cfg = transformers.MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=8, **common)
        return transformers.MistralForCausalLM(cfg)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=4, **common)
        return transformers.Qwen2ForCausalLM(cfg)
    if family == "qwen3":
        cfg = transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
        return transformers.Qwen3ForCausalLM(cfg)
    if family == "olmo2":  # QK-norm over the whole projection (per-head norm rows)
        cfg = transformers.Olmo2Config(num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.Olmo2ForCausalLM(cfg)
    if family in ("deepseek_v3", "deepseek_v3_lora"):
        cfg = transformers.DeepseekV3Config(
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=32 if family.endswith("lora") else None,
            rope_interleave=family.endswith("lora"), moe_intermediate_size=32, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2, **common)
        return transformers.DeepseekV3ForCausalLM(cfg)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "deepseek_v3", "deepseek_v3_lora"]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def make_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; sample 1 is left-padded by 3 tokens so padding masks matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# the float64 oracle: recompute q, k from each attention module's own inputs and weights
# ---------------------------------------------------------------------------------------------
def _lin(x, mod):
    return F.linear(x, mod.weight.double(), None if mod.bias is None else mod.bias.double())


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()


def _rope(x, cos, sin, interleave=False):
    """x [B, H, S, d]; cos/sin [B, S, d] = cat(freqs, freqs). Interleaved pairs (x0,x1),(x2,x3)
    are de-interleaved first (DeepSeek's layout)."""
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    cos, sin = cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def oracle_logits(module, hidden, pos_emb) -> torch.Tensor:
    """Float64 ``scale * q.k`` [B, H, S, S] (no mask) from the module's weights."""
    cfg = module.config
    h = hidden.double()
    cos, sin = pos_emb
    bsz, seq, _ = h.shape
    if hasattr(module, "kv_b_proj"):  # MLA
        nope, rope, vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        heads = cfg.num_attention_heads
        q = _lin(h, module.q_proj) if module.q_proj is not None else _lin(
            _rms(_lin(h, module.q_a_proj), module.q_a_layernorm), module.q_b_proj)
        q = q.view(bsz, seq, heads, nope + rope).transpose(1, 2)
        q_nope, q_rot = q[..., :nope], q[..., nope:]
        ckv = _lin(h, module.kv_a_proj_with_mqa)
        c, k_rot = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
        kv = _lin(_rms(c, module.kv_a_layernorm), module.kv_b_proj).view(bsz, seq, heads, nope + vdim).transpose(1, 2)
        k_nope = kv[..., :nope]
        inter = bool(cfg.rope_interleave)
        q_rot = _rope(q_rot, cos, sin, inter)
        k_rot = _rope(k_rot.view(bsz, 1, seq, rope), cos, sin, inter)
        logits = q_nope @ k_nope.transpose(-1, -2) + q_rot @ k_rot.transpose(-1, -2)
        return logits * module.scaling
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = module.head_dim
    q, k = _lin(h, module.q_proj), _lin(h, module.k_proj)
    whole = hasattr(module, "q_norm") and module.q_norm.weight.numel() == heads * d
    if whole:  # OLMo2: RMSNorm over the whole projection, before splitting heads
        q, k = _rms(q, module.q_norm), _rms(k, module.k_norm)
    q, k = q.view(bsz, seq, heads, d), k.view(bsz, seq, kv_heads, d)
    if hasattr(module, "q_norm") and not whole:  # Qwen3: per head, weight shared by all heads
        q, k = _rms(q, module.q_norm), _rms(k, module.k_norm)
    q, k = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    return (q @ k.transpose(-1, -2)) * module.scaling


def allowed_positions(pad_mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, S, S]: causal, key not padding, and (sliding window) q - k < window."""
    seq = pad_mask.shape[1]
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    ok = j <= i
    if window is not None:
        ok = ok & (j > i - window)
    return ok[None, None] & pad_mask.bool()[:, None, None, :]


class Capture:
    """Forward pre-hooks that keep each attention module's (hidden_states, position_embeddings)."""

    def __init__(self, modules):
        self.inputs = {}
        self.handles = [m.register_forward_pre_hook(self._hook(m), with_kwargs=True) for m in modules]

    def _hook(self, m):
        def hook(mod, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[m] = (hidden.detach(), tuple(t.detach() for t in kwargs["position_embeddings"]))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def capture_inputs(model, ids, pad_mask) -> dict:
    """Run the model once; return {attention module: (hidden_states, position_embeddings)}."""
    cap = Capture(attention_modules(model))
    try:
        model(input_ids=ids, attention_mask=pad_mask)
    finally:
        cap.remove()
    return cap.inputs


@torch.no_grad()
def oracle_from_inputs(model, inputs: dict, pad_mask) -> torch.Tensor:
    """[L, H] float64 max over allowed positions of each layer, given that layer's inputs."""
    window = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
    ok = allowed_positions(pad_mask, window)
    rows = []
    for m in attention_modules(model):
        hidden, pos = inputs[m]
        logits = oracle_logits(m, hidden, pos).masked_fill(~ok, float("-inf"))
        rows.append(logits.amax(dim=(0, 2, 3)))
    return torch.stack(rows)


def oracle_max_logits(model, ids, pad_mask) -> torch.Tensor:
    """[L, H] float64 per-head max logits of a full forward, from an independent recomputation."""
    return oracle_from_inputs(model, capture_inputs(model, ids, pad_mask), pad_mask)


# ---------------------------------------------------------------------------------------------
# chunked torch path vs materialized float64 logits
# ---------------------------------------------------------------------------------------------
def _reference(q, k, scale, keep):
    g = q.shape[1] // k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("chunk_size", [1, 37, 10**9])  # one row / ragged chunks / everything at once
@pytest.mark.parametrize("num_kv", [4, 2, 1])  # MHA, GQA, MQA
def test_chunked_matches_float64_reference_all_mask_kinds(chunk_size, num_kv):
    torch.manual_seed(0)
    b, h, s, d = 2, 4, 19, 8
    q, k = torch.randn(b, h, s, d), torch.randn(b, num_kv, s, d)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    causal = (j <= i)[None, None]
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[1, :4] = False
    bool4 = causal & pad[:, None, None, :]
    additive = torch.zeros(b, 1, s, s).masked_fill(~bool4, torch.finfo(torch.float32).min)
    per_head = torch.rand(b, h, s, s) > 0.3
    seg = torch.tensor([[0] * 7 + [1] * 12, [0] * 10 + [1] * 9])
    cases = [
        (dict(causal=False), None),
        (dict(causal=True), causal),
        (dict(attention_mask=bool4), bool4),
        (dict(attention_mask=additive), bool4),
        (dict(attention_mask=per_head), per_head),
        (dict(attention_mask=pad[:, None, None, :]), pad[:, None, None, :]),  # [B, 1, 1, K] broadcast rows
        (dict(causal=True, attention_mask=pad.long()), bool4),  # 2-D padding (flash) + causal
        (dict(causal=True, sliding_window=5), causal & (j > i - 5)[None, None]),
        (dict(causal=True, segment_ids=seg), causal & (seg[:, None, :, None] == seg[:, None, None, :])),
    ]
    for kwargs, keep in cases:
        got = max_logits_torch(q, k, scale=0.37, chunk_size=chunk_size, **kwargs)
        ref = _reference(q, k, 0.37, keep)
        assert got.dtype == torch.float32 and got.shape == (h,)
        # fp32 dot products of 8 unit normals vs float64: |err| ~ 1e-6; 1e-5 leaves margin.
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=str(kwargs))


def test_fully_masked_head_is_minus_inf_and_default_scale():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    keep = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    keep[:, 0] = True
    got = max_logits_torch(q, k, attention_mask=keep)
    assert got[1] == float("-inf")
    # scale=None means 1/sqrt(head_dim), as torch sdpa
    torch.testing.assert_close(got[0].double(), _reference(q, k, 0.5, None)[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# HF hook vs oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_tracker_matches_independent_oracle(family, attn):
    model = build_model(family, attn).train()
    mods = attention_modules(model)
    tracker = MaxLogitTracker([model.config.num_attention_heads] * len(mods), modules=mods)
    ids, pad = make_batch()
    with tracker.install_hf(model):
        assert model.config._attn_implementation == f"dist_muonclip_{attn}"
        model(input_ids=ids, attention_mask=pad)
        got = tracker.values().clone()
        tracker.reset()
        model(input_ids=ids)  # no padding: sdpa elides the mask (is_causal fast path)
        got_nopad = tracker.values().clone()
    assert model.config._attn_implementation == attn  # handle restored it
    ref = oracle_max_logits(model, ids, pad)
    ref_nopad = oracle_max_logits(model, ids, torch.ones_like(pad))
    # fp32 model (fp32 RoPE tables, fp32 matmuls over <= 24 dims) vs float64: rel err ~1e-6.
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_nopad.double(), ref_nopad, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref, ref_nopad)  # the padding case really masks something


def test_tracking_does_not_change_outputs_or_gradients():
    """Pins: the hook must be invisible to training (same loss, same grads, bit for bit)."""
    ids, pad = make_batch()
    grads = []
    for track in (False, True):
        model = build_model("llama").train()
        handle = None
        if track:
            mods = attention_modules(model)
            handle = install_hf_tracking(model, MaxLogitTracker([4, 4], modules=mods))
        out = model(input_ids=ids, attention_mask=pad, labels=ids)
        out.loss.backward()
        grads.append([out.loss.detach()] + [p.grad.clone() for p in model.parameters()])
        if handle:
            handle.remove()
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_no_grad_forward_not_recorded_unless_asked_and_accumulates_max():
    model = build_model("llama")
    mods = attention_modules(model)
    ids, pad = make_batch()
    tracker = MaxLogitTracker([4, 4], modules=mods)
    with tracker.install_hf(model):
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        assert torch.isinf(tracker.values()).all()  # no-grad (evaluation) forwards do not count by default
        model(input_ids=ids[:1])  # eval mode but autograd on (e.g. a from_pretrained model): training, counts
        assert torch.isfinite(tracker.values()).all()
        tracker.reset()
        tracker.track_eval = True
        with torch.no_grad():
            model(input_ids=ids[:1])
            first = tracker.values().clone()
            model(input_ids=ids[1:])
        # micro-batches accumulate: running max == max over both
        both = oracle_max_logits(model, ids, torch.ones_like(pad))
        torch.testing.assert_close(tracker.values().double(), both, rtol=1e-5, atol=1e-5)
        assert (tracker.values() >= first).all()


def test_record_api_and_errors():
    lin = torch.nn.Linear(2, 2)
    tracker = MaxLogitTracker([3, 2], modules=[lin, torch.nn.Linear(2, 2)])
    tracker.record(0, torch.tensor([1.0, 5.0, -2.0]))
    tracker.record(lin, [torch.tensor(3.0), 2.0, 0.0])
    tracker.record(1, torch.tensor([7.0, 8.0]))
    expect = torch.tensor([[3.0, 5.0, 0.0], [7.0, 8.0, float("-inf")]])
    assert torch.equal(tracker.values(), expect)
    with pytest.raises(ValueError, match="3 heads"):
        tracker.record(0, torch.ones(4))
    with pytest.raises(ValueError, match="out of range"):
        tracker.record(2, torch.ones(2))
    with pytest.raises(ValueError, match="not a tracked"):
        tracker.record(torch.nn.Linear(1, 1), torch.ones(2))
    with pytest.raises(ValueError, match="no transformers config"):
        install_hf_tracking(torch.nn.Sequential(lin), tracker)


def test_flex_attention_refused_with_message():
    model = build_model("llama")
    model.config._attn_implementation_internal = "flex_attention"
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with pytest.raises(ValueError, match="flex_attention"):
        tracker.install_hf(model)


# ---------------------------------------------------------------------------------------------
# memory: seq 2048 on CPU stays bounded by the chunk
# ---------------------------------------------------------------------------------------------
_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from dist_muonclip.tracker import max_logits_torch

    def peak_kib():  # VmHWM: peak resident set since the last reset
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])

    def reset_peak():  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mode = sys.argv[1]
    b, h, s, d = 1, 8, 2048, 16
    q, k = torch.randn(b, h, s, d), torch.randn(b, 2, s, d)   # GQA 8/2
    max_logits_torch(q[:, :, :64], k[:, :, :64], causal=True, chunk_size=1 << 16)  # warm up allocator/kernels
    reset_peak()
    before = peak_kib()
    if mode == "chunked":
        out = max_logits_torch(q, k, scale=0.25, causal=True, chunk_size=1 << 18)
    else:  # the naive way: materialize [B, H, S, S]
        logits = (q @ k.repeat_interleave(4, 1).transpose(-1, -2)) * 0.25
        logits = logits.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        out = logits.amax(dim=(0, 2, 3))
    after = peak_kib()
    print(json.dumps({"delta_kib": after - before, "out": out.tolist()}))
    """
)


def _peak(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_chunked_peak_memory_bounded_by_chunk_at_seq_2048():
    """Peak RSS growth (VmHWM after a reset, fresh process) of the chunked path stays within a few chunks,
    while materializing the [1, 8, 2048, 2048] logits costs >= 128 MiB (which also shows the
    measurement can see such allocations)."""
    chunk_bytes = (1 << 18) * 4  # fp32 logits per chunk: 1 MiB
    chunked, naive = _peak("chunked"), _peak("naive")
    full_bytes = 8 * 2048 * 2048 * 4
    assert naive["delta_kib"] * 1024 >= full_bytes  # the oracle run really paid for S^2
    # budget: logits chunk + bool mask chunk + fp32 key copy (2048*2*16*4 = 256 KiB) + allocator
    # slack; measured 1.5-1.6 MiB. 8 chunks = 8 MiB is still 16x below the materialized logits.
    # (Regression: fresh per-chunk allocations of growing widths once fragmented the heap to 8-8.7 MiB,
    # measured on a loaded machine; the reused logits buffer fixed it.)
    assert chunked["delta_kib"] * 1024 <= 8 * chunk_bytes, chunked
    # same answer both ways (fp32 both; reduction order differs: ~1e-6 relative)
    torch.testing.assert_close(torch.tensor(chunked["out"]), torch.tensor(naive["out"]), rtol=1e-5, atol=1e-5)


def test_one_tracker_per_module_and_deepcopy_of_tracked_model():
    """Pins: a second optimizer on the same model must not silently steal the records; a deepcopy
    of a tracked model (EMA copy) runs untracked and can get its own tracker."""
    import copy

    model = build_model("llama").train()
    first = MaxLogitTracker([4, 4], modules=attention_modules(model))
    handle = first.install_hf(model)
    with pytest.raises(ValueError, match="already tracked"):
        MaxLogitTracker([4, 4], modules=attention_modules(model)).install_hf(model)
    twin = copy.deepcopy(model)
    ids, pad = make_batch()
    twin(input_ids=ids)  # untracked copy: runs, records nothing anywhere
    assert torch.isinf(first.values()).all()
    second = MaxLogitTracker([4, 4], modules=attention_modules(twin))
    with second.install_hf(twin):
        twin(input_ids=ids, attention_mask=pad)
    torch.testing.assert_close(second.values().double(), oracle_max_logits(twin, ids, pad), rtol=1e-5, atol=1e-5)
    assert torch.isinf(first.values()).all()
    handle.remove()


def test_wrapper_plumbing_for_flash_style_calls():
    """The flash path gives no 4-D mask: causality from module.is_causal, the window from the
    sliding_window kwarg, packed sequences from cu_seq_lens_k, a 2-D padding mask; the scale is
    the ``scaling`` kwarg. Driven through the registered wrapper with a stand-in attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from dist_muonclip.integrations import transformers_attention as tr

    AttentionInterface.register("dmc_test_flashlike", lambda module, q, k, v, mask, **kw: (q, None))
    try:
        module = torch.nn.Module()
        module.is_causal = True
        tracker = MaxLogitTracker([4], modules=[module])
        wrapper = tr._make_wrapper("dmc_test_flashlike")
        tr._REGISTRY[module] = weakref.ref(tracker)
        torch.manual_seed(0)
        q, k = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
        same = ((i >= 5) == (j >= 5))
        keep = (j <= i) & (j > i - 4) & same
        wrapper(module, q, k, k, None, scaling=0.3, sliding_window=4, cu_seq_lens_k=cu, cu_seq_lens_q=cu)
        torch.testing.assert_close(tracker.values()[0].double(), _reference(q, k, 0.3, keep[None, None]),
                                   rtol=1e-5, atol=1e-5)
        tracker.reset()
        pad = torch.ones(1, 12, dtype=torch.long)
        pad[0, :2] = 0
        wrapper(module, q, k, k, pad, scaling=0.3)
        keep = (j <= i) & pad.bool()[0][None, :]
        torch.testing.assert_close(tracker.values()[0].double(), _reference(q, k, 0.3, keep[None, None]),
                                   rtol=1e-5, atol=1e-5)
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop("dmc_test_flashlike", None)
        tr._REGISTRY.pop(module, None)


def test_backend_dispatch_to_kernel_module(monkeypatch):
    """backend="triton" calls dist_muonclip.kernels.max_logit.max_logits_triton (here a stand-in
    that records its arguments and answers with the torch path), float masks go in as bool; a
    sliding window falls back to torch; a missing kernel module is an error for "triton" only."""
    import types

    from dist_muonclip.tracker import max_logits

    calls = []

    def fake(query, key, *, scale, causal, attention_mask=None):
        calls.append((query.shape, key.shape, scale, causal, None if attention_mask is None else attention_mask.dtype))
        return max_logits_torch(query, key, scale=scale, causal=causal, attention_mask=attention_mask)

    fake_mod = types.ModuleType("dist_muonclip.kernels.max_logit")
    fake_mod.max_logits_triton = fake
    monkeypatch.setitem(sys.modules, "dist_muonclip.kernels.max_logit", fake_mod)
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    got = max_logits(q, k, attention_mask=additive, backend="triton")
    assert calls == [((2, 4, 9, 8), (2, 2, 9, 8), 1 / math.sqrt(8), False, torch.bool)]  # GQA key passed as is
    torch.testing.assert_close(got, max_logits_torch(q, k, causal=True), rtol=0, atol=0)
    max_logits(q, k, causal=True, sliding_window=3, backend="triton")
    assert len(calls) == 1  # structural masks: torch path
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    window_mask = ((j <= i) & (j > i - 3))[None, None].expand(2, 1, 9, 9)
    got = max_logits(q, k, causal=True, attention_mask=window_mask, sliding_window=3, backend="triton")
    # a 4-D mask already holds the window (HF's sdpa mask for Mistral): the kernel takes it
    assert len(calls) == 2
    torch.testing.assert_close(got, max_logits_torch(q, k, causal=True, sliding_window=3), rtol=0, atol=0)
    assert max_logits(q, k, backend="auto").shape == (4,) and len(calls) == 2  # auto on CPU: torch
    monkeypatch.setitem(sys.modules, "dist_muonclip.kernels.max_logit", None)  # import fails
    with pytest.raises(RuntimeError, match="not importable"):
        max_logits(q, k, backend="triton")


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_generation_with_kv_cache_unchanged_while_tracked(family):
    """Pins: the registered mask/attention functions must keep cached decoding (q_len=1,
    kv_len > q_len) identical; no_grad decoding is not recorded."""
    model = build_model(family).eval()
    ids, pad = make_batch()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=pad, **kw)
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with tracker.install_hf(model):
        got = model.generate(input_ids=ids, attention_mask=pad, **kw)
    assert torch.equal(ref, got)
    assert torch.isinf(tracker.values()).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tracked_cached_decoding_equals_full_sequence_oracle(attn):
    """With track_eval, prefill + cached decode steps (q_len=1 against a longer key cache) record
    exactly the rows of the full causal logits of the generated sequence."""
    model = build_model("llama", attn).eval()
    ids, _ = make_batch()
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model), track_eval=True)
    with tracker.install_hf(model):
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seen = out[:, :-1]  # the last generated token is never fed back
    ref = oracle_max_logits(model, seen, torch.ones_like(seen))
    torch.testing.assert_close(tracker.values().double(), ref, rtol=1e-5, atol=1e-5)


def test_sdpa_fused_path_replaces_sdpa_and_records_exact_max(monkeypatch):
    """On GPU, causal mask-free sdpa calls go through the fused Triton attention that returns the
    output and the max together. Here a stand-in (SDPA + the chunked torch max) takes the kernel's
    place on CPU: the model's output must not change and the record must equal the float64 oracle;
    a padding mask is fused too (the kernel reads it)."""
    from dist_muonclip.integrations import transformers_attention as tr

    calls = []

    def stand_in(q, k, v, *, scale=None, causal=True, window=None, attention_mask=None):
        calls.append(q.shape)
        if attention_mask is not None:  # within the causal mask: the same SDPA call HF makes
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scale,
                                                                   enable_gqa=True)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                   enable_gqa=True)
        return out, max_logits_torch(q, k, scale=scale, causal=causal, attention_mask=attention_mask)

    model = build_model("llama").train().to(torch.bfloat16)
    ids, pad = make_batch()
    ref = model(input_ids=ids).logits
    ref_pad = model(input_ids=ids, attention_mask=pad).logits
    monkeypatch.setattr(tr, "_FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(tr, "_fused_attention", lambda: stand_in)
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with tracker.install_hf(model):
        got = model(input_ids=ids).logits
        assert len(calls) == 2  # both layers took the fused path
        torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the stand-in is the same SDPA call
        fused_vals = tracker.values().clone()
        tracker.reset()
        got_pad = model(input_ids=ids, attention_mask=pad).logits
        assert len(calls) == 4  # a padding mask (within the causal one): fused too, reading the mask
        torch.testing.assert_close(got_pad, ref_pad, rtol=0, atol=0)
        masked_vals = tracker.values().clone()
        monkeypatch.setattr(tr, "FUSED_ATTENTION", False)  # the public switch: SDPA + separate tracking
        tracker.reset()
        model(input_ids=ids, attention_mask=pad)
        assert len(calls) == 4
        torch.testing.assert_close(tracker.values(), masked_vals, rtol=0, atol=0)  # same q, k; same max
    # oracle in float64 on an fp32 copy: bf16 q/k rounding bounds the difference (~2^-8 relative)
    model32 = model.float()
    torch.testing.assert_close(fused_vals.double(), oracle_max_logits(model32, ids, torch.ones_like(ids)),
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(masked_vals.double(), oracle_max_logits(model32, ids, pad), rtol=2e-2, atol=2e-2)


def test_sliding_window_mask_takes_fused_path_with_its_window(monkeypatch):
    """Pins the Mistral sliding-window slowdown (issue 19: tracking doubled forward+backward at
    S=4096, window 1024, because HF's 4-D window mask sent every layer to SDPA-with-mask plus the
    chunked torch max): a mask that is exactly causal + the module's ``sliding_window`` now takes
    the fused path, with that window; a padded batch takes it with the window and the mask.
    The stand-in (SDPA with the causal-window mask + the chunked torch max) takes the kernel's
    place on CPU, so the outputs must equal the untracked model's bit for bit."""
    from dist_muonclip.integrations import transformers_attention as tr

    calls = []

    def stand_in(q, k, v, *, scale=None, causal=True, window=None, attention_mask=None):
        calls.append(window if attention_mask is None else "mask")
        pos = torch.arange(q.shape[2])
        keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        if attention_mask is not None:
            keep = keep & attention_mask
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)
        return out, max_logits_torch(q, k, scale=scale, attention_mask=keep.expand(q.shape[0], 1, *keep.shape[-2:]))

    model = build_model("mistral").train().to(torch.bfloat16)  # the fused path is bf16/fp16 only
    ids, pad = make_batch()
    assert SEQ > model.config.sliding_window  # the window binds: HF builds a 4-D mask
    ref = model(input_ids=ids).logits
    monkeypatch.setattr(tr, "_FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(tr, "_fused_attention", lambda: stand_in)
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with tracker.install_hf(model):
        got = model(input_ids=ids).logits
        assert calls == [8, 8]  # both layers fused, with the model's window
        # same SDPA call and mask as HF's: identical up to SDPA's CPU kernel choice (bool vs
        # built mask are the same tensor values, so the result is bitwise equal)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        fused_vals = tracker.values().clone()
        tracker.reset()
        model(input_ids=ids, attention_mask=pad)
        assert calls == [8, 8, "mask", "mask"]  # padding: within causal + window, the kernel reads it
        masked_vals = tracker.values().clone()
    # oracle in float64 on an fp32 copy: bf16 q/k rounding bounds the difference (~2^-8 relative)
    model32 = model.float()
    torch.testing.assert_close(fused_vals.double(), oracle_max_logits(model32, ids, torch.ones_like(ids)),
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(masked_vals.double(), oracle_max_logits(model32, ids, pad), rtol=2e-2, atol=2e-2)


def test_mla_heads_take_fused_path(monkeypatch):
    """DeepSeek-V3 MLA (q/k head 48 = 32 nope + 16 rope, v head 32; the real model's 192 = 128 +
    64 / 128 scaled down): sdpa calls with q/k and v head dims that differ take the fused path
    (before: only value.shape == key.shape did). Stand-in as above: SDPA + the chunked torch max,
    so the outputs equal the untracked model's bit for bit and the record the float64 oracle; a
    head dim the kernel cannot split (24 = 16 + 8) falls back."""
    from dist_muonclip.integrations import transformers_attention as tr

    calls = []

    def stand_in(q, k, v, *, scale=None, causal=True, window=None, attention_mask=None):
        calls.append((q.shape[-1], v.shape[-1]))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        return out, max_logits_torch(q, k, scale=scale, causal=causal)

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, attn_implementation="sdpa",
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, q_lora_rank=None, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=2)
    model = transformers.DeepseekV3ForCausalLM(cfg).train().to(torch.bfloat16)
    ids, _ = make_batch()
    ref = model(input_ids=ids).logits
    monkeypatch.setattr(tr, "_FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(tr, "_fused_attention", lambda: stand_in)
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with tracker.install_hf(model):
        got = model(input_ids=ids).logits
        assert calls == [(48, 32), (48, 32)]
        torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the stand-in is the same SDPA call
        vals = tracker.values().clone()
    # bf16 q/k vs the oracle's float64 recomputation on an fp32 copy: ~2^-8 relative
    torch.testing.assert_close(vals.double(), oracle_max_logits(model.float(), ids, torch.ones_like(ids)),
                               rtol=2e-2, atol=2e-2)
    small = build_model("deepseek_v3").train().to(torch.bfloat16)  # q/k head 24 = 16 + 8: not split
    with MaxLogitTracker([4, 4], modules=attention_modules(small)).install_hf(small):
        small(input_ids=ids)
    assert len(calls) == 2
