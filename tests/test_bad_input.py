"""Bad input gets a clear error naming the parameter and the fix, before any state changes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_muonclip import MuonClip


def _w(shape=(8, 8)):
    return nn.Parameter(torch.randn(shape))


W = _w()
B = nn.Parameter(torch.randn(8))

BAD = [
    (dict(lr=-1.0), ValueError, "lr must be >= 0"),
    (dict(lr=float("nan")), TypeError, "lr must be a finite number"),
    (dict(lr="0.1"), TypeError, "lr must be a finite number"),
    (dict(lr=0.1, momentum=1.0), ValueError, "momentum must be < 1"),
    (dict(lr=0.1, momentum=-0.1), ValueError, "momentum must be >= 0"),
    (dict(lr=0.1, weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
    (dict(lr=0.1, ns_coefficients="newton"), ValueError, "ns_coefficients"),
    (dict(lr=0.1, ns_steps=0), ValueError, "ns_steps"),
    (dict(lr=0.1, ns_steps=2.5), (ValueError, TypeError), "ns_steps"),
    (dict(lr=0.1, ns_backend="cuda"), ValueError, "ns_backend"),
    (dict(lr=0.1, ns_dtype="int8"), (ValueError, TypeError), "ns_dtype"),
    (dict(lr=0.1, ns_dtype=torch.int32), (ValueError, TypeError), "ns_dtype"),
    (dict(lr=0.1, adjust_lr_fn="sqrt"), ValueError, "adjust_lr_fn"),
    (dict(lr=0.1, adamw_betas=(0.9, 1.0)), ValueError, r"adamw_betas\[1\]"),
    (dict(lr=0.1, adamw_betas=0.9), TypeError, "adamw_betas must be a pair"),
    (dict(lr=0.1, adamw_eps=0.0), ValueError, "adamw_eps must be > 0"),
    (dict(lr=0.1, adamw_lr=-1e-3), ValueError, "adamw_lr must be >= 0"),
    (dict(lr=0.1, nesterov="yes"), TypeError, "nesterov must be a bool"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MuonClip([W], **kwargs)


def test_bad_params():
    with pytest.raises(ValueError, match="empty"):
        MuonClip([], lr=0.1)
    with pytest.warns(UserWarning, match=r"duplicate parameters \(group 0, 'w2'\)"):   # as torch.optim: warn
        MuonClip([("w", W), ("w2", W)], lr=0.1)
    with pytest.raises(ValueError, match=r"'group1.param0' appears twice \(first as 'group0.param0'\)"):
        MuonClip([{"params": [W]}, {"params": [W], "use_muon": False}], lr=0.1)
    with pytest.raises(ValueError, match=r"'bias' of shape \(8,\) is in a use_muon=True group"):
        MuonClip([("bias", B)], lr=0.1)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        MuonClip([{"params": [torch.zeros(4, 4, dtype=torch.long)], "use_muon": False}], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        MuonClip(W, lr=0.1)
    with pytest.raises(TypeError, match="mixes param groups"):
        MuonClip([{"params": [W]}, B], lr=0.1)
    with pytest.raises(ValueError, match="need an nn.Module"):
        MuonClip([W], lr=0.1, muon_patterns=["*"])
    with pytest.raises(TypeError, match="use_muon must be a bool"):
        MuonClip([{"params": [W], "use_muon": "yes"}], lr=0.1)


def test_add_param_group_error_leaves_optimizer_unchanged():
    opt = MuonClip([W], lr=0.1)
    before = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match="ns_steps"):
        opt.add_param_group({"params": [_w()], "ns_steps": -3})
    with pytest.raises(ValueError, match="use_muon=False"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))]})
    assert [list(g["params"]) for g in opt.param_groups] == before
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "use_muon": False, "lr": 0.01})
    assert opt.param_groups[-1]["betas"] == (0.9, 0.95) and opt.param_groups[-1]["lr"] == 0.01


def test_sparse_gradient_is_refused_with_its_name():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = MuonClip([{"params": [("emb.weight", emb.weight)], "use_muon": False}], lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="'emb.weight' has a sparse gradient"):
        opt.step()


def test_load_state_dict_mismatch_is_refused_before_changes():
    a = MuonClip([("a", _w())], lr=0.1)
    b = MuonClip([("b", _w())], lr=0.1)
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="format"):
        b.load_state_dict({"state": {}, "param_groups": []})


def test_set_layout_refuses_a_non_layout_before_changes():
    opt = MuonClip([_w()], lr=0.02)
    engine = opt.engine
    with pytest.raises(TypeError, match="layout must be a dist_muonclip.layouts.Layout"):
        opt.set_layout("shard0")
    assert opt.engine is engine        # nothing rebuilt
