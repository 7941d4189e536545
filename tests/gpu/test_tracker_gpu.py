"""QK-Clip tracking through the HF hook on a CUDA GPU: the fused attention+max path and the
standalone max-logit kernel path, against a float64 recomputation (skipped without CUDA + Triton).

CPU tests cover the same wiring with a stand-in for the kernel (tests/test_tracker.py); these run
the real kernels on HF's [B, S, H, D]-transposed views, forward and backward.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                       reason="needs CUDA and triton"),
]
transformers = pytest.importorskip("transformers")

from dist_muonclip.integrations import transformers_attention as tr  # noqa: E402
from dist_muonclip.tracker import MaxLogitTracker  # noqa: E402
from tests.test_tracker import VOCAB, attention_modules, build_model, oracle_max_logits  # noqa: E402


@pytest.mark.parametrize("seq", [16, 301])
def test_hf_llama_bf16_fused_and_masked_paths_exact_with_unchanged_training(seq, monkeypatch):
    """Causal, mask-free calls take the fused Triton attention (counted), padded calls too (the
    kernel reads the mask); both records equal the float64 oracle; the loss and the gradients equal the
    untracked SDPA model's up to bf16 rounding (the fused forward is a different attention kernel)."""
    fused_calls = []
    real = tr._fused_attention()
    assert real is not None, "the fused attention kernel must be available on a CUDA machine with triton"

    def counting(*args, **kwargs):
        fused_calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "_fused_attention", lambda: counting)
    model = build_model("llama").train().to("cuda", torch.bfloat16)
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g).cuda()
    pad = torch.ones_like(ids)
    pad[1, : seq // 4] = 0

    ref_loss = ref_model(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with tracker.install_hf(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert len(fused_calls) == 2  # both layers: fused path
        fused_vals = tracker.values().clone()
        tracker.reset()
        model(input_ids=ids, attention_mask=pad)
        masked_vals = tracker.values().clone()
        assert len(fused_calls) == 4  # a padding mask within the causal one: fused, reading the mask
    # bf16 attention (different kernels, fp32 accumulation): the loss agrees to bf16 rounding of
    # the logits (~2^-8 relative); gradients to a few bf16 ulps of each tensor's scale
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=1e-2, atol=1e-2)
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        scale = p_ref.grad.float().abs().max().item() + 1e-12
        err = (p.grad.float() - p_ref.grad.float()).abs().max().item()
        assert err <= 3e-2 * scale, (name, err, scale)
    model32 = copy.deepcopy(model).float().cpu()
    # the oracle recomputes q, k in float64 from bf16 weights and fp32 hidden states: the tracked
    # values come from bf16 q, k (rounded to 2^-8 relative), so 2e-2 relative covers the rounding
    want = oracle_max_logits(model32, ids.cpu(), torch.ones_like(ids).cpu())
    torch.testing.assert_close(fused_vals.double().cpu(), want, rtol=2e-2, atol=2e-2)
    want_pad = oracle_max_logits(model32, ids.cpu(), pad.cpu())
    torch.testing.assert_close(masked_vals.double().cpu(), want_pad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window", [1, 100, 256, 1000])
@pytest.mark.parametrize("B,H,Hkv,S", [(2, 8, 2, 777), (1, 4, 4, 1024)])
def test_fused_sliding_window_forward_backward_exact(B, H, Hkv, S, window):
    """The windowed fused attention (forward: Triton; backward: aten's flash with
    window_size_left = window - 1) against float64 attention with the causal-window mask:
    output, the three gradients and the per-head max. HF's [B, S, H, D] views as inputs."""
    from dist_muonclip.kernels.attention_max import attention_with_max_logits

    g = torch.Generator("cuda").manual_seed(window + S)
    mk = lambda h: torch.randn(B, S, h, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)  # noqa: E731
    q, k, v = mk(H).requires_grad_(), mk(Hkv).requires_grad_(), mk(Hkv).requires_grad_()
    do = torch.randn(B, H, S, 128, device="cuda", generator=g).bfloat16()
    scale = 128 ** -0.5
    out, mx = attention_with_max_logits(q, k, v, scale=scale, causal=True, window=window)
    grads = torch.autograd.grad(out, (q, k, v), do)
    pos = torch.arange(S, device="cuda")
    keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grp = H // Hkv
    s = scale * q64 @ k64.repeat_interleave(grp, 1).mT
    ref_mx = s.detach().masked_fill(~keep, float("-inf")).amax(dim=(0, 2, 3))
    ref = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v64.repeat_interleave(grp, 1)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    # bf16 output and bf16 P before P V (flash attention's rounding): ~2^-8 relative
    assert rel(out, ref) < 1e-2
    for gr, rg in zip(grads, ref_grads):  # flash backward, bf16 dS / dP: a few 2^-8
        # window 1: a row sees only itself, softmax is constant and dq is exactly 0; the fused
        # one is 0 up to the rounding of dP - rowsum(dO * O): bound it by dO's scale instead
        ref_norm = max(rg.norm().item(), 1e-3 * do.double().norm().item())
        assert (gr.double() - rg).norm().item() < 2e-2 * ref_norm
    # exact fp32 products of bf16 inputs, fp32 sums of 128 terms: ~128 * 2^-24 relative
    torch.testing.assert_close(mx.double(), ref_mx, rtol=1e-5, atol=0)


def test_hf_mistral_sliding_window_takes_fused_path_exactly(monkeypatch):
    """Mistral (window 8 < sequence 301): every layer's call takes the fused kernel with the
    model's window; the record equals the float64 oracle and the loss / gradients the untracked
    SDPA-with-mask model's up to bf16 rounding; a padded batch is fused too."""
    windows = []
    real = tr._fused_attention()
    assert real is not None

    def counting(*args, **kwargs):
        windows.append(kwargs.get("window"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "_fused_attention", lambda: counting)
    model = build_model("mistral").train().to("cuda", torch.bfloat16)
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 301), generator=g).cuda()
    pad = torch.ones_like(ids)
    pad[1, :40] = 0
    ref_loss = ref_model(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with tracker.install_hf(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert windows == [8, 8]
        vals = tracker.values().clone()
        tracker.reset()
        model(input_ids=ids, attention_mask=pad)
        assert windows == [8, 8, 8, 8]  # padded: fused with the window and the mask
        pad_vals = tracker.values().clone()
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=1e-2, atol=1e-2)  # bf16 logits
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        scale = p_ref.grad.float().abs().max().item() + 1e-12
        assert (p.grad.float() - p_ref.grad.float()).abs().max().item() <= 3e-2 * scale, name
    model32 = copy.deepcopy(model).float().cpu()
    # bf16 q, k vs the oracle's float64 recomputation: 2e-2 relative covers the rounding
    torch.testing.assert_close(vals.double().cpu(), oracle_max_logits(model32, ids.cpu(), torch.ones_like(ids).cpu()),
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(pad_vals.double().cpu(), oracle_max_logits(model32, ids.cpu(), pad.cpu()),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backward", ["auto", "flash"])
@pytest.mark.parametrize("window", [None, 300])
def test_fused_mla_head_dims_forward_backward_exact(backward, window):
    """MLA heads (q/k 192 = 128 + 64, v 128, DeepSeek-V3), HF's [B, S, H, D] views, against
    float64: output, gradients, max. backward "auto" is cuDNN's (it takes Dv != D); "flash" and
    windows pad v / out / dO with zero columns to 192 for aten's flash backward."""
    from dist_muonclip.kernels.attention_max import attention_with_max_logits

    B, H, S = 2, 8, 777
    g = torch.Generator("cuda").manual_seed(5)
    mk = lambda d: torch.randn(B, S, H, d, device="cuda", generator=g).bfloat16().transpose(1, 2)  # noqa: E731
    q, k, v = mk(192).requires_grad_(), mk(192).requires_grad_(), mk(128).requires_grad_()
    do = torch.randn(B, H, S, 128, device="cuda", generator=g).bfloat16()
    scale = 0.8 * 192 ** -0.5  # an mscale-like factor
    out, mx = attention_with_max_logits(q, k, v, scale=scale, causal=True, window=window, backward=backward)
    assert out.shape == (B, H, S, 128)
    grads = torch.autograd.grad(out, (q, k, v), do)
    pos = torch.arange(S, device="cuda")
    keep = pos[None, :] <= pos[:, None]
    if window is not None:
        keep &= pos[None, :] > pos[:, None] - window
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (scale * q64 @ k64.mT).masked_fill(~keep, float("-inf"))
    ref = torch.softmax(s, -1) @ v64
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref) < 1e-2  # bf16 output, bf16 P before P V: ~2^-8
    for gr, rg in zip(grads, ref_grads):
        assert rel(gr, rg) < 2e-2  # bf16 dS / dP in the backward: a few 2^-8
    torch.testing.assert_close(mx.double(), s.detach().amax(dim=(0, 2, 3)), rtol=1e-5, atol=0)  # fp32 sums of 192


def test_hf_deepseek_mla_takes_fused_path_exactly(monkeypatch):
    """DeepSeek-V3 MLA through the HF glue (q/k 48 = 32 + 16, v 32): every layer fused, record
    equal to the float64 oracle, loss and gradients equal to the untracked SDPA model's up to
    bf16 rounding."""
    dims = []
    real = tr._fused_attention()
    assert real is not None

    def counting(q, k, v, **kwargs):
        dims.append((q.shape[-1], v.shape[-1]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(tr, "_fused_attention", lambda: counting)
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, attn_implementation="sdpa",
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, q_lora_rank=None, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=2)
    model = transformers.DeepseekV3ForCausalLM(cfg).train().to("cuda", torch.bfloat16)
    ref_model = copy.deepcopy(model).float()  # fp32 SDPA: the gradient oracle
    bf16_model = copy.deepcopy(model)  # untracked bf16 SDPA: the error bf16 itself makes
    ids = torch.randint(0, VOCAB, (2, 301), generator=torch.Generator().manual_seed(4)).cuda()
    ref_loss = ref_model(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    bf16_model(input_ids=ids, labels=ids).loss.backward()
    tracker = MaxLogitTracker([4, 4], modules=attention_modules(model))
    with tracker.install_hf(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert dims == [(48, 32), (48, 32)]
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=1e-2, atol=1e-2)  # bf16 logits
    worst = {}
    for (name, p), p_bf, p_ref in zip(model.named_parameters(), bf16_model.parameters(), ref_model.parameters()):
        if p_ref.grad is None:
            continue
        scale = p_ref.grad.abs().max().item() + 1e-12
        err = (p.grad.float() - p_ref.grad).abs().max().item() / scale
        err_bf16 = (p_bf.grad.float() - p_ref.grad).abs().max().item() / scale
        worst[name] = (err, err_bf16)
        # a bf16 model's gradients vs fp32 weights: a few 2^-8 of each tensor's scale, or no
        # worse than untracked bf16 SDPA's own (bf16 accumulation of the embedding gradient)
        assert err <= max(3e-2, 1.5 * err_bf16), (name, err, err_bf16)
    print("\nMLA grad errors (tracked, untracked bf16) vs fp32:", {k: tuple(round(x, 4) for x in v)
                                                              for k, v in worst.items()})
    model32 = copy.deepcopy(model).float().cpu()
    # bf16 q, k vs the oracle's float64 recomputation: 2e-2 relative covers the rounding
    torch.testing.assert_close(tracker.values().double().cpu(),
                               oracle_max_logits(model32, ids.cpu(), torch.ones_like(ids).cpu()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backward", ["auto", "flash"])
def test_fused_mla_hf_layouts_backward_exact(backward):
    """HF's DeepSeek-V3 layouts: q, k [B, H, S, 192]-contiguous (concatenated nope + rope parts),
    v a [B, S, H, 128 + 128] slice ([B, S, H, D] with a padded row), dO [B, S, H, 128]-laid-out.
    Pins the mixed-layout backward (the backward now copies the odd ones into q's layout)."""
    from dist_muonclip.kernels.attention_max import attention_with_max_logits

    B, H, S = 2, 8, 500
    g = torch.Generator("cuda").manual_seed(6)
    q = torch.randn(B, H, S, 192, device="cuda", generator=g).bfloat16().requires_grad_()
    k = torch.randn(B, H, S, 192, device="cuda", generator=g).bfloat16().requires_grad_()
    kv = torch.randn(B, S, H, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    v = kv.transpose(1, 2)[..., 128:]
    do = torch.randn(B, S, H, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
    out, _ = attention_with_max_logits(q, k, v, scale=192 ** -0.5, causal=True, backward=backward)
    grads = torch.autograd.grad(out, (q, k, kv), do)
    q64, k64, kv64 = (t.detach().double().requires_grad_() for t in (q, k, kv))
    pos = torch.arange(S, device="cuda")
    s = (192 ** -0.5 * q64 @ k64.mT).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    ref = torch.softmax(s, -1) @ kv64.transpose(1, 2)[..., 128:]
    ref_grads = torch.autograd.grad(ref, (q64, k64, kv64), do.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref) < 1e-2  # bf16 output: ~2^-8
    for gr, rg in zip(grads, ref_grads):
        assert rel(gr, rg) < 2e-2  # bf16 dS / dP: a few 2^-8


@pytest.mark.parametrize("form", ["left_padding", "packed", "packed_window"])
@pytest.mark.parametrize("H,Hkv,D,DV", [(8, 2, 128, 128), (4, 4, 192, 128)])
def test_fused_masked_forward_backward_exact(form, H, Hkv, D, DV):
    """Masks on top of the causal structure (HF's padding / packed-sequence sdpa masks), GQA and
    MLA head dims: output, gradients (cuDNN backward with the mask as a bias; padded query rows
    see nothing: output 0, LSE +inf, no gradient) and the max vs float64, over the rows that
    see something."""
    from dist_muonclip.kernels.attention_max import attention_with_max_logits

    B, S = 2, 640
    g = torch.Generator("cuda").manual_seed(7)
    mk = lambda h, d: torch.randn(B, S, h, d, device="cuda", generator=g).bfloat16().transpose(1, 2)  # noqa: E731
    q, k, v = mk(H, D).requires_grad_(), mk(Hkv, D).requires_grad_(), mk(Hkv, DV).requires_grad_()
    do = torch.randn(B, H, S, DV, device="cuda", generator=g).bfloat16()
    pos = torch.arange(S, device="cuda")
    window = 100 if form == "packed_window" else None
    if form == "left_padding":
        pad = torch.tensor([0, 137], device="cuda")
        mask = (pos[None, None, :] >= pad[:, None, None])[:, None].expand(B, 1, S, S)
        mask = mask & (pos[None, :] <= pos[:, None])  # HF's mask: causal and padding
    else:
        seg = torch.stack([torch.bucketize(pos, torch.tensor([200, 333], device="cuda"), right=True),
                           torch.bucketize(pos, torch.tensor([500], device="cuda"), right=True)])
        mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (pos[None, :] <= pos[:, None])
    scale = D ** -0.5
    out, mx = attention_with_max_logits(q, k, v, scale=scale, causal=True, window=window, attention_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), do)
    keep = mask & (pos[None, :] <= pos[:, None])
    if window is not None:
        keep = keep & (pos[None, :] > pos[:, None] - window)
    keep = keep.expand(B, H, S, S)
    seen = keep.any(-1)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grp = H // Hkv
    s = (scale * q64 @ k64.repeat_interleave(grp, 1).mT).masked_fill(~keep, float("-inf"))
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v64.repeat_interleave(grp, 1)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double() * seen[..., None])
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out[seen], ref[seen]) < 1e-2  # bf16 output, bf16 P: ~2^-8
    assert (out[~seen] == 0).all()
    # padded rows' dO enters nowhere: the reference zeroes it, the kernel's LSE +inf does
    for gr, rg in zip(grads, ref_grads):
        assert torch.isfinite(gr).all() and rel(gr, rg) < 2e-2  # bf16 dS / dP: a few 2^-8
    torch.testing.assert_close(mx.double(), s.detach().amax(dim=(0, 2, 3)), rtol=1e-5, atol=0)  # fp32 sums
