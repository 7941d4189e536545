"""dist_muonclip.options: the JSON schema generated from MuonClip.__init__ and QKClipConfig, the
reference generated from it, DeepSpeed Muon's keys and "auto" values. No processes."""
from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

from dist_muonclip import MuonClip
from dist_muonclip import options as O
from tests._tiny_hf import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(**params):
    return {"type": "MuonClip", "params": params}


# ------------------------------------------------------------------ one source of truth

def test_reference_md_is_generated_from_the_code():
    """configs/REFERENCE.md is exactly what the code generates: a changed signature, docstring or
    QKClipConfig field makes this fail until `python -m dist_muonclip.options --write
    configs/REFERENCE.md` is run."""
    with open(os.path.join(ROOT, "configs", "REFERENCE.md")) as f:
        assert f.read() == O.render_reference(), "stale: python -m dist_muonclip.options --write configs/REFERENCE.md"
    assert O.main(["--check", os.path.join(ROOT, "configs", "REFERENCE.md")]) == 0


def test_check_flag_reports_a_stale_reference(tmp_path):
    stale = tmp_path / "REFERENCE.md"
    stale.write_text(O.render_reference().replace("`0.95`", "`0.9`"))
    assert O.main(["--check", str(stale)]) == 1
    assert O.main(["--write", str(stale)]) == 0 and O.main(["--check", str(stale)]) == 0


def test_schema_is_the_signature_minus_one_explicit_list():
    sig = inspect.signature(MuonClip.__init__).parameters
    json_keys = set(O.muonclip_options())
    assert json_keys | set(O.NOT_JSON) == set(sig) - {"self"}
    assert not json_keys & set(O.NOT_JSON)
    for name, opt in O.muonclip_options().items():
        default = sig[name].default
        if default is inspect.Parameter.empty:
            assert opt.default == O.REQUIRED
        elif isinstance(default, torch.dtype):
            assert getattr(torch, opt.default) == default
        else:
            assert json.loads(json.dumps(opt.default)) == (list(default) if isinstance(default, tuple) else default)
        assert opt.doc, f"{name} has no meaning: document it in MuonClip's Args"
    import dataclasses

    from dist_muonclip.qk_clip import QKClipConfig
    assert [f.name for f in dataclasses.fields(QKClipConfig)] == list(O.qk_clip_options())
    assert O.qk_clip_options()["chunk_size"].default == QKClipConfig().chunk_size


def test_an_annotation_without_json_kind_stops_generation():
    with pytest.raises(TypeError, match="KIND_OF_ANY or NOT_JSON"):
        O._kind("MuonClip", "new_option", "Callable[[int], int]")


def test_every_documented_default_is_accepted_when_written_back():
    """Regression (issue 13): `qk_clip.chunk_size: null` was documented and rejected. Now every
    default of the reference, written into a config, parses and builds a MuonClip."""
    params = {k: (0.01 if o.default == O.REQUIRED else o.default) for k, o in O.deepspeed_options().items()}
    for qk in (None, {k: o.default for k, o in O.qk_clip_options().items()}):
        kw = O.parse_muonclip_section(_section(**{**params, "qk_clip": qk}))
        opt = MuonClip(tiny_model("llama", seed=0), **kw)
        assert opt.param_groups[0]["lr"] == 0.01
        assert (opt.qk_clipper is not None) and opt.qk_clipper.config.chunk_size == O.qk_clip_options()[
            "chunk_size"].default
        opt.close()


# ------------------------------------------------------------------ "auto"

def test_auto_values_are_filled_by_the_caller():
    sec = _section(lr="auto", adamw_betas="auto", adamw_eps="auto", weight_decay="auto", qk_clip={"tau": "auto"})
    kw = O.parse_muonclip_section(sec, auto_values={"lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-6,
                                                    "weight_decay": 0.0, "qk_clip.tau": 30.0})
    assert kw["lr"] == 3e-4 and kw["adamw_betas"] == (0.9, 0.99) and kw["adamw_eps"] == 1e-6
    assert kw["weight_decay"] == 0.0 and kw["qk_clip"] == {"tau": 30.0}
    # DeepSpeed-Muon spelling, as HF Trainer fills it
    kw = O.parse_muonclip_section(_section(lr="auto", betas="auto", eps="auto"),
                                  auto_values={"lr": 1e-3, "betas": (0.8, 0.9), "eps": 1e-7})
    assert kw["adamw_betas"] == (0.8, 0.9) and kw["adamw_eps"] == 1e-7


@pytest.mark.parametrize("sec, words", [
    (_section(lr="auto"), ["optimizer.params.lr", "\"auto\"", "auto_values"]),
    (_section(lr=0.01, qk_clip={"tau": "auto"}), ["optimizer.params.qk_clip.tau", "\"auto\""]),
])
def test_unfilled_auto_is_an_error_naming_the_key(sec, words):
    with pytest.raises(ValueError) as err:
        O.parse_muonclip_section(sec, auto_values={"weight_decay": 0.1})
    for w in words:
        assert w in str(err.value), str(err.value)


def test_auto_value_of_the_wrong_kind_is_rejected():
    with pytest.raises(TypeError, match="optimizer.params.lr must be a number"):
        O.parse_muonclip_section(_section(lr="auto"), auto_values={"lr": "fast"})


# ------------------------------------------------------------------ DeepSpeed Muon's keys

def test_deepspeed_muon_keys_translate():
    kw = O.parse_muonclip_section(_section(lr=0.001, muon_lr=0.02, momentum=0.9, weight_decay=0.0, betas=[0.9, 0.99],
                                           eps=1e-10, ns_method="standard", adam_w_mode=True, torch_adam=True,
                                           foreach=False, fp32_optimizer_states=True, per_head_muon=False))
    assert kw == {"lr": 0.02, "adamw_lr": 0.001, "momentum": 0.9, "weight_decay": 0.0, "adamw_betas": (0.9, 0.99),
                  "adamw_eps": 1e-10, "ns_coefficients": "jordan", "adamw_foreach": False,
                  "adjust_lr_fn": "original"}
    # adam_lr wins over the shared lr for the AdamW part; an explicit adjust_lr_fn wins over the dialect
    kw = O.parse_muonclip_section(_section(lr=0.5, muon_lr=0.02, adam_lr=0.003, ns_method="gram",
                                           adjust_lr_fn="match_rms_adamw"))
    assert kw == {"lr": 0.02, "adamw_lr": 0.003, "ns_coefficients": "jordan", "adjust_lr_fn": "match_rms_adamw"}
    # MuonClip's own names alone: MuonClip's defaults, no dialect
    assert O.parse_muonclip_section(_section(lr=0.02)) == {"lr": 0.02}


@pytest.mark.parametrize("params, words", [
    ({"lr": 0.1, "adam_lr": 0.1, "adamw_lr": 0.2}, ["'adam_lr'", "'adamw_lr'", "keep one"]),
    ({"lr": 0.1, "eps": 1e-8, "adamw_eps": 1e-8}, ["'eps'", "'adamw_eps'"]),
    ({"lr": 0.1, "ns_method": "gram", "ns_coefficients": "cans"}, ["'ns_method'", "'ns_coefficients'"]),
    ({"muon_lr": 0.02}, ["muon_lr", "adam_lr"]),
    ({"lr": 0.1, "ns_method": "quintic"}, ["optimizer.params.ns_method", "ns_coefficients"]),
    ({"lr": 0.1, "adam_w_mode": False}, ["adam_w_mode", "decoupled"]),
    ({"lr": 0.1, "per_head_muon": True}, ["per_head_muon", "not implemented"]),
    ({"lr": 0.1, "fp32_optimizer_states": False}, ["fp32_optimizer_states"]),
    ({"lr": 0.1, "grad_reduction": "optimizer"}, ["grad_reduction", "DeepSpeed reduces"]),
    ({"lr": 0.1, "bucket_cap_mb": 25}, ["bucket_cap_mb", "reduce_bucket_size"]),
])
def test_deepspeed_keys_without_equivalent_are_refused_naming_the_fix(params, words):
    with pytest.raises(ValueError) as err:
        O.parse_muonclip_section(_section(**params))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_gram_newton_schulz_is_the_jordan_polynomial():
    """ns_method "gram" maps to ns_coefficients "jordan": DeepSpeed's Gram Newton-Schulz is the
    same polynomial iteration re-associated on X X^T. Oracle: DeepSpeed's own two functions in
    float64 agree to rounding (measured 2.6e-15), and ours in fp32 matches them to fp32 rounding
    (measured 9.0e-7 over these shapes; bound 1e-5 = ~10x, far below a wrong coefficient or step
    count, which moves singular values by > 1e-2)."""
    om = pytest.importorskip("deepspeed.runtime.zero.muon.original_muon")
    from dist_muonclip.newton_schulz import orthogonalize

    def eager(fn):   # DeepSpeed wraps both in torch.compile; the eager function is the same math
        return getattr(fn, "_torchdynamo_orig_callable", fn)

    gram, standard = eager(om.zeropower_via_gram_newtonschulz), eager(om.zeropower_via_newtonschulz5)
    real = om.ns_compute_dtype
    om.ns_compute_dtype = lambda method="gram": torch.float64
    try:
        torch.manual_seed(0)
        for shape in [(64, 64), (64, 256), (256, 64), (96, 480), (32, 200)]:
            g = torch.randn(shape, dtype=torch.float64)
            ref_gram, ref_std = gram(g, 5).double(), standard(g, 5).double()
            assert (ref_gram - ref_std).abs().max() < 1e-12, shape
            ours = orthogonalize(g.float(), coefficients="jordan", steps=5, dtype=torch.float32, backend="torch")
            assert (ours.double() - ref_gram).abs().max() < 1e-5, shape
    finally:
        om.ns_compute_dtype = real
