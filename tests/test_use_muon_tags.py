"""DeepSpeed Muon's ``param.use_muon`` tags in MuonClip's split: they override the automatic
rules, show as "tag" in the split table, and contradictions are refused before any state exists.
No processes (the DeepSpeed runs of tagged models: tests/test_deepspeed_muon_keys.py)."""
from __future__ import annotations

import pytest

from dist_muonclip import MuonClip
from dist_muonclip.param_split import split_parameters
from tests._tiny_hf import tiny_model


def test_use_muon_tags_override_the_automatic_split():
    model = tiny_model("llama", seed=0)
    model.model.layers[0].mlp.down_proj.weight.use_muon = False     # a hidden matrix -> AdamW
    model.lm_head.weight.use_muon = True                             # the head -> Muon
    infos = {i.name: i for i in split_parameters(model)}
    assert not infos["model.layers.0.mlp.down_proj.weight"].use_muon
    assert infos["model.layers.0.mlp.down_proj.weight"].reason == "tag"
    assert infos["lm_head.weight"].use_muon and infos["lm_head.weight"].reason == "tag"
    assert infos["model.layers.1.mlp.down_proj.weight"].reason == "hidden matrix"   # untagged: the rules
    opt = MuonClip(model, lr=0.02, qk_clip=False)
    muon = {opt.param_name(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert "lm_head.weight" in muon and "model.layers.0.mlp.down_proj.weight" not in muon
    row = next(r for r in opt.describe_split().splitlines() if r.startswith("model.layers.0.mlp.down_proj.weight"))
    assert "AdamW" in row and row.endswith("tag")


@pytest.mark.parametrize("tag_on, value, kwargs, exc, words", [
    ("model.norm.weight", True, {}, ValueError, ["model.norm.weight", "at least 2 dims", "use_muon=False"]),
    ("model.layers.0.mlp.up_proj.weight", True, {"adamw_patterns": ["layers.0.mlp.up_proj"]}, ValueError,
     ["tagged use_muon=True", "adamw_patterns", "remove the pattern or the tag"]),
    ("model.layers.0.mlp.up_proj.weight", 1, {}, TypeError, ["use_muon=1", "True or False"]),
])
def test_bad_tags_are_refused_before_any_state(tag_on, value, kwargs, exc, words):
    model = tiny_model("llama", seed=0)
    dict(model.named_parameters())[tag_on].use_muon = value
    with pytest.raises(exc) as err:
        MuonClip(model, lr=0.02, qk_clip=False, **kwargs)
    for w in words:
        assert w in str(err.value), str(err.value)
