"""The automatic Muon/AdamW split on HF models built from configs, and its overrides."""
from __future__ import annotations

import pytest
from torch import nn

from dist_muonclip import MuonClip, split_parameters
from tests._tiny_hf import tiny_model


def _split(model, **kw):
    return {i.name: (i.use_muon, i.view) for i in split_parameters(model, **kw)}


def _expected_muon(model, outer: nn.Module | None = None) -> set[str]:
    """Independent oracle: >=2-D params that are neither an Embedding's weight nor the output head,
    named as ``outer`` (a module holding ``model``; default ``model`` itself) names them."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(model.get_output_embeddings().weight)}
    return {n for n, p in (outer or model).named_parameters() if p.ndim >= 2 and id(p) not in emb | head}


def _wrap(model: nn.Module, path: str) -> nn.Module:
    """``model`` held at ``path`` (dotted attribute names) inside fresh container modules."""
    for attr in reversed(path.split(".")):
        outer = nn.Module()
        setattr(outer, attr, model)
        model = outer
    return model


# where frameworks put the model they wrap: Lightning's attribute (a user's name), DDP / DeepSpeed,
# Lightning's strategy wrapper, torch.compile, FSDP1, activation checkpointing, and a stack of them
WRAPPER_PATHS = ["model", "module", "_forward_module", "_orig_mod", "_fsdp_wrapped_module",
                 "_checkpoint_wrapped_module", "module._forward_module.model._orig_mod"]


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


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("path", WRAPPER_PATHS)
def test_output_head_is_adamw_whatever_wraps_the_hf_model(path, tied):
    """Pins the Lightning config route training ``model.lm_head`` with Muon: the head was only found
    through ``get_output_embeddings()`` of the module MuonClip was built on, or by a *top-level*
    name, so an HF model held under any prefix had its head put on Muon."""
    model = tiny_model("llama", tie_word_embeddings=tied)
    if tied:
        model.tie_weights()
    outer = _wrap(model, path)
    split = _split(outer)
    assert {n for n, (m, _) in split.items() if m} == _expected_muon(model, outer)
    assert split[f"{path}.model.embed_tokens.weight"][0] is False
    assert (f"{path}.lm_head.weight" in split) is not tied     # tied: listed once, as the embedding
    if not tied:
        assert split[f"{path}.lm_head.weight"][0] is False
    # the same split as on the bare model, name for name
    assert split == {f"{path}.{n}": v for n, v in _split(model).items()}


class _PlainLM(nn.Module):
    """No ``get_output_embeddings``: the head is found by its name. ``layers.N.output`` is a hidden
    matrix named like a head inside a repeated block."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 16), "output": nn.Linear(16, 8)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(8, 32, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("path", ["", *WRAPPER_PATHS])
def test_output_head_found_by_name_whatever_the_prefix(path, tied):
    model = _PlainLM(tied)
    outer = _wrap(model, path) if path else model
    pre = f"{path}." if path else ""
    split = _split(outer)
    want_muon = {f"{pre}layers.{i}.{m}.weight" for i in range(2) for m in ("up", "output")}
    assert {n for n, (m, _) in split.items() if m} == want_muon
    assert split[f"{pre}embed.weight"] == (False, "vector")
    assert (f"{pre}lm_head.weight" in split) is not tied
    if not tied:
        assert split[f"{pre}lm_head.weight"] == (False, "vector")
    reasons = {i.name: i.reason for i in split_parameters(outer)}
    assert reasons[f"{pre}embed.weight"] == "embedding"
    if not tied:
        assert reasons[f"{pre}lm_head.weight"] == "output head"


def test_output_head_under_real_wrappers():
    """The framework wrappers themselves: torch.compile's ``OptimizedModule`` (``_orig_mod.``),
    activation checkpointing (``_checkpoint_wrapped_module.`` on its modules) and a LightningModule holding the HF
    model as ``self.model`` (the module DeepSpeed builds MuonClip on in Lightning's config route)."""
    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_model("llama")
    want = {n for n, (m, _) in _split(model).items() if m}
    compiled = torch.compile(model)
    # an OptimizedModule (``_orig_mod.``), or the model itself where dynamo is disabled (TORCHDYNAMO_DISABLE,
    # which benchmarks the suite imports set for DeepSpeed's compiled Muon)
    pre = "_orig_mod." if hasattr(compiled, "_orig_mod") else ""
    assert {n for n, (m, _) in _split(compiled).items() if m} == {f"{pre}{n}" for n in want}
    ckpt = checkpoint_wrapper(model)       # its named_parameters() drops the prefix, its modules keep it
    assert {n for n, (m, _) in _split(ckpt).items() if m} == want
    L = pytest.importorskip("lightning")

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

    split = _split(Lit())
    assert split["model.lm_head.weight"] == (False, "vector")
    assert {n for n, (m, _) in split.items() if m} == {f"model.{n}" for n in want}


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
