"""The automatic Muon/AdamW split on HF models built from configs, and its overrides."""
from __future__ import annotations

import pytest
from torch import nn

from dist_muonclip import MuonClip, split_parameters
from tests._tiny_hf import tiny_model


def _split(model, **kw):
    return {i.name: (i.use_muon, i.view) for i in split_parameters(model, **kw)}


def _expected_muon(model) -> set[str]:
    """Independent oracle: >=2-D params that are neither an Embedding's weight nor the output head."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(model.get_output_embeddings().weight)}
    return {n for n, p in model.named_parameters() if p.ndim >= 2 and id(p) not in emb | head}


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False), ("deepseek_v3", False)])
def test_split_on_hf_models(kind, tied):
    model = tiny_model(kind, tie_word_embeddings=tied)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    split = _split(model)
    assert {n for n, (m, _) in split.items() if m} == _expected_muon(model)
    assert split["model.embed_tokens.weight"][0] is False
    if not tied:
        assert split["lm_head.weight"][0] is False
    else:
        assert "lm_head.weight" not in split  # tied weight appears once, as the embedding
    for n, (use_muon, _) in split.items():
        if "norm" in n or n.endswith("bias"):
            assert not use_muon, n
    if kind == "qwen2":
        assert split["model.layers.0.self_attn.q_proj.bias"] == (False, "vector")
    if kind == "deepseek_v3":
        # fused experts [E, out, in]: a stack of matrices, never one flattened matrix
        assert split["model.layers.1.mlp.experts.gate_up_proj"] == (True, "batch")
        assert split["model.layers.0.self_attn.kv_b_proj.weight"] == (True, "matrix")


def test_optimizer_from_model_covers_every_trainable_param_once():
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    opt = MuonClip(model, lr=1e-3, qk_clip=False)
    seen = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(seen) == len(set(seen)) == len(trainable)
    table = opt.describe_split()
    assert "model.embed_tokens.weight" in table and "AdamW" in table and "Muon" in table
    assert "model.layers.0.mlp.up_proj.weight" not in table  # frozen: left out
    assert "model.layers.1.mlp.up_proj.weight" in table


def test_patterns_override_the_split():
    model = tiny_model("llama")
    split = _split(model, adamw_patterns=["*.o_proj.weight"], muon_patterns=["lm_head.weight"])
    assert split["model.layers.0.self_attn.o_proj.weight"][0] is False
    assert split["lm_head.weight"][0] is True
    with pytest.raises(ValueError, match="adamw_patterns entry 'nothing_matches'"):
        split_parameters(model, adamw_patterns=["nothing_matches"])
    with pytest.raises(ValueError, match="needs a parameter with at least 2 dims"):
        split_parameters(model, muon_patterns=["*norm.weight"])
    with pytest.raises(ValueError, match="make the patterns disjoint"):
        split_parameters(model, muon_patterns=["*q_proj*"], adamw_patterns=["*layers.0.self_attn.q_proj*"])


def test_verbose_prints_split(capsys):
    MuonClip(tiny_model("qwen2"), lr=1e-3, verbose=True, qk_clip=False)
    out = capsys.readouterr().out
    assert "q_proj.bias" in out and "Muon:" in out
