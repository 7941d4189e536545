"""The fused Muon elementwise passes on CUDA (dist_muonclip/kernels/elementwise.py) against
torch's own kernels, bit for bit, and MuonClip on CUDA against torch.optim.Muon (the oracle of
tests/test_torch_parity.py on the CPU) bit for bit. Skipped without CUDA + Triton."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                       reason="needs CUDA and triton"),
]

from dist_muonclip import MuonClip  # noqa: E402
from dist_muonclip.kernels import apply_update_triton, momentum_nesterov_triton  # noqa: E402

SHAPES = [(1024, 4096), (333, 77), (1, 1), (4096,)]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("momentum", [0.95, 0.3])
def test_momentum_pass_bit_identical_to_torch_lerp(nesterov, momentum):
    torch.manual_seed(0)
    g = [torch.randn(s, device="cuda") for s in SHAPES]
    b = [torch.randn(s, device="cuda") for s in SHAPES]
    b_ref = [x.clone() for x in b]
    v = momentum_nesterov_triton(g, b, momentum=momentum, nesterov=nesterov)
    for gg, bb, vv, br in zip(g, b, v, b_ref):
        br.lerp_(gg, 1 - momentum)
        ref = gg.lerp(br, momentum) if nesterov else br
        assert torch.equal(bb, br)
        assert torch.equal(vv, ref)


@pytest.mark.parametrize("udtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wd", [0.1, 0.0])
def test_apply_pass_bit_identical_to_torch_mul_add(udtype, pdtype, wd):
    torch.manual_seed(1)
    lr, scale = 0.02, 3.7
    p = [torch.randn(s, device="cuda", dtype=pdtype) for s in SHAPES]
    u = [torch.randn(s, device="cuda", dtype=udtype) for s in SHAPES]
    ref = [x.clone() for x in p]
    apply_update_triton(p, u, decay=1 - lr * wd, alpha=-lr * scale)
    for pp, uu, rr in zip(p, u, ref):
        if wd:
            rr.mul_(1 - lr * wd)
        rr.add_(uu, alpha=-lr * scale)
        assert torch.equal(pp, rr)


def test_muonclip_cuda_bit_identical_to_torch_muon():
    torch.manual_seed(0)
    shapes = [(256, 512), (512, 256), (128, 128)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    pa = [nn.Parameter(t.clone()) for t in init]
    pb = [nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=(3.4445, -4.7750, 2.0315),
              ns_steps=5, adjust_lr_fn=None)
    ref = torch.optim.Muon(pa, eps=1e-7, **kw)
    ours = MuonClip(pb, ns_eps=1e-7, qk_clip=False, ns_backend="torch", **kw)
    for _ in range(3):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for params, opt in ((pa, ref), (pb, ours)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(pa, pb):
        assert torch.equal(ref.state[a]["momentum_buffer"], ours.state[b]["momentum_buffer"])
        assert torch.equal(a, b)


def test_cuda_preflight_l2_norms_skip_nonfinite_and_give_the_grad_norm_metric():
    """On CUDA the preflight's one pass (fp32 L2 norms) flags the inf gradient's parameter and
    its norms are the grad-norm metric: equal to float64's norm of the active gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=True), nn.Linear(128, 32, bias=False)).cuda()
    opt = MuonClip(model, lr=1e-2, qk_clip=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    bad = model[1].weight
    bad.grad[3, 5] = float("inf")
    before = bad.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(bad, before)
    want = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad.double()) for p in model.parameters() if p is not bad]))
    got = opt.metrics()["grad_norm"]
    assert float(got) == pytest.approx(float(want), rel=1e-6)
