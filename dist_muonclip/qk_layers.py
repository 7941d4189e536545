"""What QK-Clip acts on: attention layers, their clip targets (row blocks per head), head counts
from model configs, and fused QKV projections (where their q, k and v rows are).

A fused projection computes q, k and v of every head with one weight. Its output rows come in
one of two orders (``H`` query heads, ``KV`` key/value heads, head size ``d``):

* ``"concat"``: ``[q (H*d); k (KV*d); v (KV*d)]``: Phi-3 ``qkv_proj``, GPT-2 ``c_attn`` (a
  ``Conv1D``: the weight is stored ``[in, out]``, so these are its *columns*), MPT ``Wqkv``,
  Baichuan ``W_pack``, Falcon ``query_key_value`` with ``multi_query`` (``KV = 1``);
* ``"per_head"``: per head ``[q_h; k_h; v_h]`` (``3d`` rows each, MHA only): GPT-NeoX
  ``query_key_value`` (``view(..., heads, 3d)`` then ``chunk(3)``), Falcon's original MHA.

Falcon's ``new_decoder_architecture`` (q heads grouped with their key head) is refused by name.
:func:`fused_blocks` is pure; :mod:`dist_muonclip.qk_clip` turns its blocks into clip targets.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from torch import nn

__all__ = ["FUSED_QKV_LAYOUTS", "FUSED_QKV_NAMES", "AttentionLayer", "ClipTarget", "as_config", "first_attr",
           "fused_blocks", "fused_order", "head_counts", "resolve_attr", "weight_and_bias"]

@dataclass
class ClipTarget:
    """One parameter QK-Clip rescales: its dim-0 rows are ``num_blocks`` blocks of ``block`` rows
    (one block per head, or per key head for kind "k" under GQA); within a block the rows
    ``[start, start + length)`` of each segment get that segment's per-head factor.

    Segment kinds: "q" (query side), "k" (key side), "qr" (MLA RoPE query: eta_h),
    "q_shared" / "k_shared" (one factor for the whole tensor: head-shared QK-norm weights).

    Fused QKV projections: the blocks start at row ``offset`` and there are ``count`` of them
    (rows outside keep scale 1); ``dim=1`` puts the rows on dim 1 (transposed ``Conv1D`` weights).
    """

    param: nn.Parameter
    name: str
    block: int
    segments: list[tuple[int, int, str]]
    offset: int = 0
    count: int | None = None
    dim: int = 0

    @property
    def num_blocks(self) -> int:
        return self.count if self.count is not None else self.param.shape[self.dim] // self.block


@dataclass
class AttentionLayer:
    """An attention layer QK-Clip acts on (found by :func:`discover_attention_layers` or given)."""

    name: str
    module: nn.Module
    mode: str  # "mha" (includes GQA) | "mla"
    num_heads: int
    num_kv_heads: int
    targets: list[ClipTarget] = field(default_factory=list)
    qk_norm: str = "none"  # "none" | "shared" | "per_head"

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def resolve_attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def weight_and_bias(obj: Any) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """A name may point at a module with .weight (and .bias) or straight at a parameter."""
    if isinstance(obj, nn.Parameter):
        return obj, None
    if isinstance(obj, nn.Module):
        w = getattr(obj, "weight", None)
        b = getattr(obj, "bias", None)
        return (w if isinstance(w, nn.Parameter) else None), (b if isinstance(b, nn.Parameter) else None)
    return None, None


def as_config(cfg: Any) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping):
        return SimpleNamespace(**cfg)
    return cfg


def first_attr(cfg: Any, *names: str) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def head_counts(cfg: Any, where: str) -> tuple[int, int, int | None]:
    if cfg is None:
        raise ValueError(
            f"{where}: no model config to read head counts from; pass model_config (an HF config or a dict "
            "with num_attention_heads, num_key_value_heads, head_dim) or explicit layers"
        )
    heads = first_attr(cfg, "num_attention_heads", "n_head", "num_heads")
    if heads is None:
        raise ValueError(
            f"{where}: model config has no num_attention_heads; add it (and num_key_value_heads, head_dim) "
            "to model_config"
        )
    kv = first_attr(cfg, "num_key_value_heads", "num_kv_heads", "n_kv_head")
    kv = heads if kv is None else kv
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and getattr(cfg, "hidden_size", None) is not None:
        if cfg.hidden_size % heads:
            raise ValueError(f"{where}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {heads}")
        head_dim = cfg.hidden_size // heads
    heads, kv = int(heads), int(kv)
    if heads < 1 or kv < 1 or heads % kv:
        raise ValueError(
            f"{where}: num_attention_heads={heads} must be a positive multiple of num_key_value_heads={kv}"
        )
    return heads, kv, (int(head_dim) if head_dim is not None else None)


#: attribute names of fused QKV projections in transformers models, tried in order
FUSED_QKV_NAMES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
#: accepted values of ``QKClipConfig.fused_qkv``
FUSED_QKV_LAYOUTS = ("auto", "concat", "per_head")


def fused_order(cfg: Any, attr: str, where: str, fused_qkv: str = "auto") -> tuple[str, int | None]:
    """``(row order, number of key heads when the model fixes it)`` of the fused projection
    ``attr`` of a model with config ``cfg`` (``fused_qkv`` other than "auto" decides)."""
    if fused_qkv != "auto":
        return fused_qkv, None
    model_type = getattr(cfg, "model_type", None)
    if model_type == "gpt_neox":
        return "per_head", None
    if model_type == "falcon":
        if getattr(cfg, "new_decoder_architecture", False):
            raise ValueError(f"{where}: Falcon's new_decoder_architecture groups q heads with their key head inside "
                             "query_key_value; QK-Clip does not split that layout: disable QK-Clip (qk_clip=False) "
                             "or pass explicit layers")
        return ("concat", 1) if getattr(cfg, "multi_query", False) else ("per_head", None)
    if attr == "query_key_value":
        raise ValueError(f"{where}: fused projection {attr!r} of model type {model_type!r} has no known row order; "
                         "set QKClipConfig(fused_qkv='concat' or 'per_head')")
    return "concat", None


def fused_blocks(where: str, attr: str, rows: int, heads: int, kv: int, head_dim: int | None,
                 order: str) -> tuple[int, list[tuple[int, int, int, list[tuple[int, int, str]]]]]:
    """``(head_dim, [(offset, count, block, segments)])``: the q and k row blocks of a fused
    projection with ``rows`` outputs; ``segments`` as in ``ClipTarget`` ("q" / "k" per head)."""
    if head_dim is None:
        if rows % (heads + 2 * kv):
            raise ValueError(f"{where}: {attr} has {rows} outputs, not divisible by heads + 2 * kv_heads = "
                             f"{heads} + 2 * {kv}; give head_dim in model_config")
        head_dim = rows // (heads + 2 * kv)
    d = head_dim
    if rows != (heads + 2 * kv) * d:
        raise ValueError(f"{where}: fused {attr} has {rows} outputs but (num_attention_heads + 2 * "
                         f"num_key_value_heads) * head_dim = ({heads} + 2 * {kv}) * {d}; fix the head counts in "
                         "model_config")
    if order == "per_head":
        if kv != heads:
            raise ValueError(f"{where}: fused_qkv='per_head' needs as many key heads as query heads (MHA), got "
                             f"{heads}/{kv}")
        return d, [(0, heads, 3 * d, [(0, d, "q"), (d, d, "k")])]
    return d, [(0, heads, d, [(0, d, "q")]), (heads * d, kv, d, [(0, d, "k")])]
