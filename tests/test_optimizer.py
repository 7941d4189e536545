"""Single-process MuonClip numerics against oracles: torch.optim.Muon, torch.optim.AdamW, float64."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_muonclip import MuonClip
from dist_muonclip.newton_schulz import orthogonalize

SHAPES = [(64, 64), (96, 32), (32, 96), (37, 53), (53, 37), (17, 128)]


def _params(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.1) for s in shapes]


def _clone(ps):
    return [nn.Parameter(p.detach().clone()) for p in ps]


def _set_grads(step, *param_lists, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in param_lists[0]]
    for ps in param_lists:
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()


def test_matches_torch_muon_bit_for_bit_on_distinct_shapes():
    """Each shape alone in its bucket takes the unbatched NS path: identical to torch.optim.Muon."""
    ours, ref = _params(SHAPES), None
    ref = _clone(ours)
    a = MuonClip(ours, lr=0.02, weight_decay=0.1, ns_backend="torch", qk_clip=False)
    b = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for t in range(30):
        _set_grads(t, ours, ref)
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    for p, q in zip(ours, ref):
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_with_batched_buckets(adjust, nesterov):
    """Repeated shapes are orthogonalized as one [B, m, n] batch (baddbmm instead of addmm).

    Tolerance: batched and unbatched bf16 matmuls may round differently; one bf16 ulp of the
    NS output (2^-8 relative) times lr*scale per step bounds the drift, ~1e-3 absolute after 20
    steps for these magnitudes. In practice the difference is far smaller.
    """
    shapes = SHAPES + SHAPES + [(64, 64)]
    ours = _params(shapes, seed=3)
    ref = _clone(ours)
    a = MuonClip(ours, lr=0.02, weight_decay=0.05, nesterov=nesterov, adjust_lr_fn=adjust,
                 ns_backend="torch", qk_clip=False)
    b = torch.optim.Muon(ref, lr=0.02, weight_decay=0.05, nesterov=nesterov, adjust_lr_fn=adjust)
    for t in range(20):
        _set_grads(t, ours, ref, seed=4)
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)


def _float64_reference(p0, grads, *, lr, momentum, nesterov, wd, scale_fn):
    """DESIGN.md's formula literally, in float64: M = mu M + G; V = G + mu M; NS; decay; update."""
    W = p0.detach().double().clone()
    M = torch.zeros_like(W)
    for G in grads:
        G = G.double()
        M = momentum * M + G
        V = G + momentum * M if nesterov else M
        O = orthogonalize(V, steps=5, dtype=torch.float64, backend="torch")
        m, n = W.shape
        W = W - lr * (O * scale_fn(m, n) + wd * W)
    return W


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_float64_design_formula(nesterov):
    """Our EMA-form momentum equals DESIGN.md's sum form up to a factor NS normalization removes.

    Tolerance: both sides run NS in float64; the only differences are the eps clamp position and
    float64 rounding, so 1e-10 absolute is ample.
    """
    shapes = [(48, 48), (80, 24), (24, 80)]
    ours = _params(shapes, seed=5, dtype=torch.float64)
    init = [p.detach().clone() for p in ours]
    opt = MuonClip(ours, lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=0.1, ns_dtype="float64",
                   ns_backend="torch", qk_clip=False)
    all_grads = []
    for t in range(8):
        _set_grads(t, ours, seed=6)
        all_grads.append([p.grad.clone() for p in ours])
        opt.step()
    for i, p in enumerate(ours):
        ref = _float64_reference(init[i], [g[i] for g in all_grads], lr=0.03, momentum=0.9, nesterov=nesterov,
                                 wd=0.1, scale_fn=lambda m, n: 0.2 * math.sqrt(max(m, n)))
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-10)


def test_adamw_part_matches_torch_adamw_exactly():
    """use_muon=False groups run torch's own AdamW kernel: identical to torch.optim.AdamW."""
    shapes = [(10,), (7, 5), (3,)]
    ours = _params(shapes, seed=7)
    ref = _clone(ours)
    a = MuonClip([{"params": ours, "use_muon": False}], lr=1e-2, adamw_betas=(0.9, 0.99), adamw_eps=1e-7,
                 weight_decay=0.05)
    b = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05)
    for t in range(15):
        _set_grads(t, ours, ref, seed=8)
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


def test_unified_and_separate_lr_follow_schedulers():
    """adamw_lr=None: one lr for both parts; a LambdaLR scales every group from its own base lr."""
    w, bias = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    opt = MuonClip([{"params": [w]}, {"params": [bias], "use_muon": False}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    opt2 = MuonClip([{"params": [w]}, {"params": [bias], "use_muon": False}], lr=0.1, adamw_lr=0.003)
    sched = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([0.05, 0.0015])
    del sched


def test_stacked_and_conv_views_orthogonalize_per_matrix():
    """3-D non-conv params (fused MoE experts) are orthogonalized per expert; conv kernels flattened.

    Oracle: torch.optim.Muon on the individual expert matrices / on the flattened conv kernel.
    Tolerance: batched vs unbatched bf16 NS rounding (see test_matches_torch_muon_with_batched_buckets).
    """

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.Parameter(torch.randn(3, 16, 24) * 0.1)
            self.conv = nn.Conv2d(4, 8, 3, bias=False)

    torch.manual_seed(0)
    net = Net()
    experts_ref = [nn.Parameter(net.experts[i].detach().clone()) for i in range(3)]
    conv_ref = nn.Parameter(net.conv.weight.detach().reshape(8, -1).clone())
    opt = MuonClip(net, lr=0.02, ns_backend="torch", qk_clip=False)
    ref = torch.optim.Muon(experts_ref + [conv_ref], lr=0.02, adjust_lr_fn="match_rms_adamw")
    for t in range(5):
        g = torch.Generator().manual_seed(t)
        ge, gc = torch.randn(3, 16, 24, generator=g), torch.randn(8, 4, 3, 3, generator=g)
        net.experts.grad, net.conv.weight.grad = ge.clone(), gc.clone()
        for i in range(3):
            experts_ref[i].grad = ge[i].clone()
        conv_ref.grad = gc.reshape(8, -1).clone()
        opt.step()
        ref.step()
    for i in range(3):
        torch.testing.assert_close(net.experts[i].detach(), experts_ref[i].detach(), rtol=0, atol=1e-3)
    torch.testing.assert_close(net.conv.weight.detach().reshape(8, -1), conv_ref.detach(), rtol=0, atol=1e-3)


def test_nonfinite_gradient_skips_only_that_parameter():
    """Regression: an inf/nan gradient must not poison momentum; other params step as the oracle."""
    ours = _params([(16, 16), (16, 8)], seed=9)
    ref = _clone(ours)
    opt = MuonClip(ours, lr=0.02, ns_backend="torch", qk_clip=False)
    oracle = torch.optim.Muon([ref[1]], lr=0.02, adjust_lr_fn="match_rms_adamw")
    _set_grads(0, ours, ref)
    opt.step()
    oracle.step()
    before_p = ours[0].detach().clone()
    before_m = opt.state[ours[0]]["momentum_buffer"].clone()
    _set_grads(1, ours, ref)
    ours[0].grad[3, 4] = float("nan")
    ours[0].grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="group0.param0"):
        opt.step()
    oracle.step()
    assert torch.equal(ours[0].detach(), before_p)
    assert torch.equal(opt.state[ours[0]]["momentum_buffer"], before_m)
    assert torch.isfinite(opt.state[ours[0]]["momentum_buffer"]).all()
    assert torch.equal(ours[1], ref[1])
    assert opt.metrics()["num_skipped"] == 1.0


def test_nonfinite_gradient_in_adamw_group_skips_only_that_parameter():
    """Regression twin for the AdamW part: a non-finite bias gradient leaves that bias and its
    exp_avg / exp_avg_sq / step untouched (warning names it); the other AdamW parameter steps
    exactly as torch.optim.AdamW with the bad one left out."""
    ours = _params([(10,), (6,)], seed=12)
    ref = _clone(ours)
    opt = MuonClip([{"params": ours, "use_muon": False}], lr=1e-2, weight_decay=0.05)
    oracle = torch.optim.AdamW([ref[1]], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    _set_grads(0, ours, ref)
    opt.step()
    oracle.step()
    before_p = ours[0].detach().clone()
    before_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[ours[0]].items()}
    _set_grads(1, ours, ref)
    ours[0].grad[2] = float("nan")
    with pytest.warns(RuntimeWarning, match="group0.param0"):
        opt.step()
    oracle.step()
    assert torch.equal(ours[0].detach(), before_p)
    for k, v in opt.state[ours[0]].items():
        assert torch.equal(v, before_state[k]) if torch.is_tensor(v) else v == before_state[k], k
    assert torch.equal(ours[1], ref[1])  # bit for bit: the same fused AdamW kernel on the same values


def test_metrics_report_update_rms_and_grad_norm():
    """match_rms_adamw makes the update RMS 0.2 * sqrt(max(m,n)) * RMS(NS(V)) ~ 0.2 (Moonlight)."""
    ps = _params([(64, 64), (64, 256)], seed=10)
    opt = MuonClip(ps, lr=0.0, weight_decay=0.0, ns_dtype="float32", ns_backend="torch", qk_clip=False)
    _set_grads(0, ps, seed=11)
    grads = [p.grad.clone() for p in ps]
    opt.step()
    m = opt.metrics()
    expected_norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])).item()
    assert m["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)  # fp32 summation order
    # Jordan's quintic leaves singular values in ~[0.7, 1.2], so the RMS is 0.2 within ~20%.
    assert 0.15 < m["muon_update_rms"] < 0.25


def test_max_grad_norm_clips_raw_gradient_like_clip_grad_norm_():
    """Oracle: torch.nn.utils.clip_grad_norm_ on the gradients, then the unclipped optimizer.
    Regression (the DeepSpeed trap): clipping must act on the raw gradient, not on the update.

    Tolerance: the oracle scales gradients in place, we scale inside the step; the products round
    the same way in fp32 but the norm is summed in a different order (~1e-7 relative)."""
    ours = _params([(32, 32), (24, 40)], seed=12) + [nn.Parameter(torch.randn(7))]
    ref = _clone(ours)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "use_muon": False}]  # noqa: E731
    a = MuonClip(groups(ours), lr=0.02, ns_dtype="float32", ns_backend="torch", max_grad_norm=0.5)
    b = MuonClip(groups(ref), lr=0.02, ns_dtype="float32", ns_backend="torch")
    norms = []
    for t in range(6):
        _set_grads(t, ours, ref, seed=13)
        norms.append(torch.nn.utils.clip_grad_norm_(ref, 0.5).item())
        a.step()
        b.step()
        assert a.metrics()["grad_norm"] == pytest.approx(norms[-1], rel=1e-5)
    assert min(norms) > 0.5   # the clip acted in every step
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
