"""QK-Clip on fused QKV projections (issue 17): the q and k blocks of Phi-3 ``qkv_proj``, GPT-2
``c_attn`` (a transposed Conv1D), GPT-NeoX ``query_key_value`` (interleaved per head) and Falcon
multi-query ``query_key_value``, found and split from the config (MHA and GQA, with and without
bias).

Oracle: the model's own attention computes q and k from the fused weight; the tracker records the
post-RoPE logits softmax sees (tests/test_tracker.py checks it against float64). After a MuonClip
step with lr 0 (only the clip changes weights) the same forward must give max logit <= tau per
head, clipped heads exactly on tau, other heads unchanged, and the v block untouched. One-layer
models, so the re-forward sees exactly the inputs the clip was computed from.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

# fp32 model; the clip multiplies each logit of head h by eta_h up to a few roundings (~1e-7
# relative); 1e-5 leaves margin, as in tests/test_qk_clip.py
RTOL = 1e-5
VOCAB = 96


def _config(kind: str, bias: bool):
    tf = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=1, attn_implementation="eager")
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **common)
    if kind == "phi3":
        return tf.Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, rotary_pct=0.5,
                                max_position_embeddings=64, attention_bias=bias, **common)
    if kind == "falcon_mq":
        return tf.FalconConfig(hidden_size=64, num_attention_heads=4, multi_query=True, new_decoder_architecture=False,
                               alibi=False, bias=bias, **common)
    raise ValueError(kind)


CASES = [("gpt2", True), ("phi3", False), ("gpt_neox", True), ("gpt_neox", False), ("falcon_mq", True),
         ("falcon_mq", False)]


def _fused(model):
    for m in model.modules():
        for attr in ("c_attn", "qkv_proj", "query_key_value"):
            if hasattr(m, attr):
                return attr, getattr(m, attr)
    raise AssertionError("no fused projection")


def _v_block(kind, attr, w, heads, kv, d):
    """The value part of the fused weight, found independently of the library."""
    if kind == "gpt2":                                    # Conv1D [in, 3 * hidden]: columns
        return w[:, (heads + kv) * d:]
    if kind == "gpt_neox":                                # per head [q_h; k_h; v_h]
        return w.view(heads, 3 * d, -1)[:, 2 * d:]
    return w[(heads + kv) * d:]                           # concat [q; k; v]


def _max_logits(model, ids):
    """Per-head max logits of one forward (grad enabled: the tracker records training forwards)."""
    from dist_muonclip.qk_clip import QKClipper

    clipper = QKClipper(model, {"tau": 1e9})
    try:
        model(input_ids=ids)
        return clipper.max_logits().clone()
    finally:
        clipper.close()


@pytest.mark.parametrize("kind, bias", CASES)
def test_clip_with_lr0_puts_every_head_at_most_tau(kind, bias):
    from dist_muonclip import MuonClip

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, bias)).eval()   # no dropout
    attr, proj = _fused(model)
    with torch.no_grad():
        proj.weight.mul_(6.0)                             # logits of O(1) so heads differ clearly
        if proj.bias is not None:                         # biases start at zero: an unscaled row would show
            proj.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    s0 = _max_logits(model, ids)
    tau = float(s0.median())                              # about half of the heads clip
    clipped = s0 > tau
    assert 0 < int(clipped.sum()) < s0.numel()
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = 1 if kind == "falcon_mq" else getattr(cfg, "num_key_value_heads", heads) or heads
    d = cfg.hidden_size // heads
    v_before = _v_block(kind, attr, proj.weight.detach(), heads, kv, d).clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt = MuonClip(model, lr=0.0, adamw_lr=0.0, weight_decay=0.0, qk_clip={"tau": tau})
    assert opt.metrics() is not None
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.metrics()["qk_clip/num_heads_clipped"] == int(clipped.sum())
    opt.close()

    s1 = _max_logits(model, ids)
    assert (s1 <= tau * (1 + RTOL)).all(), (s1, tau)
    torch.testing.assert_close(s1[clipped], torch.full_like(s1[clipped], tau), rtol=RTOL, atol=0)
    torch.testing.assert_close(s1[~clipped], s0[~clipped], rtol=RTOL, atol=0)
    assert torch.equal(_v_block(kind, attr, proj.weight.detach(), heads, kv, d), v_before)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n in before if f".{attr}." in n and (n.endswith("weight") or bias)}, changed


def test_column_scale_on_row_shards_and_fragments_equals_full():
    """A transposed (Conv1D) weight's per-column clip on FSDP row shards and on DeepSpeed flat
    fragments cut mid-row equals scaling the full tensor."""
    from dist_muonclip.layouts import scale_rows_

    full = torch.randn(7, 12)
    scale = torch.rand(1, 12) + 0.5
    want = full * scale
    for ranges in ([(0, 84)], [(24, 60)], [(5, 31)], [(0, 0)]):
        local = full.reshape(-1)[ranges[0][0]:ranges[0][1]].clone()
        scale_rows_(local, scale, ranges, full.shape)
        assert torch.equal(local, want.reshape(-1)[ranges[0][0]:ranges[0][1]]), ranges


def test_unknown_fused_layouts_are_refused_naming_the_fix():
    from dist_muonclip.qk_clip import QKClipConfig, QKClipper

    cfg = transformers.FalconConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=2, vocab_size=VOCAB,
                                    num_hidden_layers=1, new_decoder_architecture=True, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="new_decoder_architecture"):
        QKClipper(model, {"tau": 1.0})
    with pytest.raises(ValueError, match="fused_qkv must be one of"):
        QKClipConfig(fused_qkv="interleaved")
    model = transformers.AutoModelForCausalLM.from_config(_config("phi3", False))
    with pytest.raises(ValueError, match=r"qkv_proj has 128 outputs, not divisible by heads \+ 2 \* kv_heads = 4 \+ 2 \* 4"):
        QKClipper(model, {"tau": 1.0}, model_config={"num_attention_heads": 4, "num_key_value_heads": 4})
