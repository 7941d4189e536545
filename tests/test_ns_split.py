"""``ns_split`` (issue 17): per-block Newton-Schulz of attention projections, against a float64
reference that slices each block by hand and orthogonalizes it as its own matrix."""
from __future__ import annotations

import pytest
import torch

from dist_muonclip.functional import update_scale
from dist_muonclip.newton_schulz import orthogonalize
from dist_muonclip.ns_split import BlockSplit, find_block_splits, orthogonalize_blocks

transformers = pytest.importorskip("transformers")

NS64 = dict(coefficients="jordan", steps=5, dtype=torch.float64, eps=1e-7, backend="torch")


def _scale(m, n):
    return update_scale(m, n, "match_rms_adamw")


def _reference(v: torch.Tensor, blocks: list[tuple[int, list[int]]]) -> torch.Tensor:
    """float64: each block (dim, indices) orthogonalized alone, times its own RMS scale over the
    whole matrix's (the engine multiplies by the whole matrix's scale afterwards)."""
    v = v.double()
    out = torch.full_like(v, float("nan"))
    m, n = v.shape
    for dim, idx in blocks:
        x = v[idx] if dim == 0 else v[:, idx]
        o = orthogonalize(x, **NS64) * (_scale(*x.shape) / _scale(m, n))
        if dim == 0:
            out[idx] = o
        else:
            out[:, idx] = o
    assert not out.isnan().any()
    return out


def test_blocks_equal_float64_reference_rows_columns_and_interleaved():
    """Row blocks (q/k/v heads), column blocks (o_proj heads), interleaved blocks (GPT-NeoX 'qkv':
    q of every head together) and an unsplit matrix in the same batch. float64 NS: same math, only
    the batching differs (1e-12); fp32 NS of well-conditioned blocks: ~1e-6 relative (5e-5 margin)."""
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(1, 24, 16, generator=g) for _ in range(4)]
    d = 4
    splits = [BlockSplit(0, tuple(((h * d, (h + 1) * d),) for h in range(6))),               # 6 row heads
              BlockSplit(1, tuple(((h * d, (h + 1) * d),) for h in range(4))),               # 4 column heads
              BlockSplit(0, tuple(tuple((12 * h + j * d, 12 * h + (j + 1) * d) for h in range(2))
                                  for j in range(3))),                                       # interleaved qkv
              None]
    refs = [_reference(mats[0][0], [(0, list(range(h * d, (h + 1) * d))) for h in range(6)]),
            _reference(mats[1][0], [(1, list(range(h * d, (h + 1) * d))) for h in range(4)]),
            _reference(mats[2][0], [(0, [12 * h + j * d + i for h in range(2) for i in range(d)]) for j in range(3)]),
            orthogonalize(mats[3][0].double(), **NS64)]
    out64 = orthogonalize_blocks(mats, splits, _scale, **NS64)
    out32 = orthogonalize_blocks(mats, splits, _scale, **{**NS64, "dtype": torch.float32})
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out64[i], ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out32[i].double(), ref, atol=5e-5, rtol=5e-5)


def test_without_splits_is_the_whole_matrix_call():
    mats = [torch.randn(2, 8, 12), torch.randn(1, 8, 12)]
    want = orthogonalize(torch.cat(mats), **NS64)
    assert torch.equal(orthogonalize_blocks(mats, [None, None], _scale, **NS64), want)


def _tiny(kind):
    from tests._tiny_hf import tiny_model

    if kind == "phi3":
        cfg = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=96, num_hidden_layers=1, vocab_size=96, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, max_position_embeddings=64,
                                      attn_implementation="eager")
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg)
    return tiny_model(kind, seed=0, num_hidden_layers=1)


@pytest.mark.parametrize("kind, mode", [("llama", "heads"), ("phi3", "qkv"), ("phi3", "heads")])
def test_muonclip_step_equals_float64_reference(kind, mode):
    """One MuonClip step (fp64 NS, no weight decay, nesterov) equals the reference update per block
    for every split projection (GQA llama: 4 q heads, 2 k/v heads, o_proj columns; Phi-3 fused
    [q; k; v]); unsplit matrices equal the whole-matrix update; ns_split changes the result."""
    from dist_muonclip import MuonClip

    model = _tiny(kind).double()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    lr, mu = 0.02, 0.95
    opt = MuonClip(model, lr=lr, momentum=mu, weight_decay=0.0, ns_dtype="float64", ns_backend="torch",
                   qk_clip=False, ns_split=mode)
    opt.step()
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    rows = lambda count, off=0: [(0, list(range(off + h * d, off + (h + 1) * d))) for h in range(count)]
    expected = {}
    if kind == "llama":
        expected = {"q_proj": rows(heads), "k_proj": rows(kv), "v_proj": rows(kv),
                    "o_proj": [(1, list(range(h * d, (h + 1) * d))) for h in range(heads)]}
    elif mode == "qkv":
        expected = {"qkv_proj": [(0, list(range(0, heads * d))), (0, list(range(heads * d, (heads + kv) * d))),
                                 (0, list(range((heads + kv) * d, (heads + 2 * kv) * d)))]}
    else:
        expected = {"qkv_proj": rows(heads + 2 * kv)}
    muon = {opt.param_name(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    for n, p in model.named_parameters():
        if n not in muon:
            continue
        v = grads[n] * (1 + mu)                      # nesterov from zero momentum: G + mu * (mu * 0 + G)
        key = n.split(".")[-2]
        ref = _reference(v, expected[key]) if key in expected else orthogonalize(v, **NS64)
        want = before[n] - lr * _scale(*v.shape) * ref
        # fp64 throughout; only batching differs (1e-12)
        torch.testing.assert_close(p.detach(), want, atol=1e-12, rtol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    split_names = [n for n in muon if n.split(".")[-2] in expected]
    assert split_names
    whole = _reference(grads[split_names[0]] * (1 + mu), [(0, list(range(grads[split_names[0]].shape[0])))])
    assert not torch.allclose(before[split_names[0]] - lr * _scale(*whole.shape) * whole,
                              dict(model.named_parameters())[split_names[0]].detach())


def test_bad_ns_split_raises_before_state():
    from dist_muonclip import MuonClip

    model = _tiny("llama")
    with pytest.raises(ValueError, match=r"ns_split='rows' is unknown"):
        MuonClip(model, lr=0.01, ns_split="rows")
    with pytest.raises(ValueError, match=r"ns_split='qkv': no attention projection found"):
        MuonClip(model, lr=0.01, ns_split="qkv")          # llama has no fused projection
    with pytest.raises(ValueError, match="needs the model"):
        MuonClip([p for p in model.parameters() if p.ndim == 2], lr=0.01, ns_split="heads")
    assert model.config._attn_implementation == "eager"   # failed constructions installed no tracker
    splits = find_block_splits(model, "heads")
    assert sorted(tuple(len(s.blocks) for s in splits.values())) == [2, 2, 4, 4]
