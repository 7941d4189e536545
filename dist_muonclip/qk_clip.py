"""QK-Clip (Kimi K2, arXiv 2507.20534, Sec. 2.2 / Algorithm 1): per-head rescaling of the query
and key projections after the optimizer update, so that no attention logit exceeds tau.

For every attention layer and head h, with S_h the max logit of this step's forward (see
:mod:`dist_muonclip.tracker`):

    eta_h = min(1, tau / S_h)

MHA (group size 1): rows of head h in W_q (and its bias) are multiplied by eta_h^alpha, in W_k by
eta_h^(1-alpha); every logit of head h is multiplied by exactly eta_h, so S_h' = min(S_h, tau).

GQA (a key head g serves the query heads of its group G(g)); two policies, both reduce to the MHA
rule for group size 1 and both guarantee S_h' <= tau for every head:

* ``gqa_policy="exact"`` (default): with eta_g = min_{h in G(g)} eta_h,
  k rows of g *= eta_g^(1-alpha) and q rows of h *= eta_h / eta_g^(1-alpha). The product that
  multiplies head h's logits is exactly eta_h, so each head ends exactly where MHA would put it
  (clipped heads at tau, heads under tau with unchanged logits). Price: a head under tau sharing
  its key head with a clipped head has its q rows multiplied by eta_g^-(1-alpha) >= 1 (its
  logits, hence the model function for that head, are unchanged). Groups with no clipped head
  are untouched bit for bit.
* ``gqa_policy="conservative"``: k rows of g *= eta_g^(1-alpha), q rows of h *= eta_h^alpha.
  Head h's logits are multiplied by eta_h^alpha * eta_g^(1-alpha) <= eta_h (eta_g <= eta_h):
  never scales a weight up, but over-clips heads that share a key head with a stronger head.

MLA (DeepSeek-V2/V3): per head, the no-RoPE query part q_C (rows of q_proj / q_b_proj) *=
eta_h^alpha, the no-RoPE key part k_C (the k rows of kv_b_proj) *= eta_h^(1-alpha), the RoPE query
part q_R *= eta_h; the shared RoPE key k_R is never touched. Logit = q_C.k_C + q_R.k_R, so every
logit of head h is multiplied by exactly eta_h.

QK-norm (Qwen3 q_norm/k_norm, an RMSNorm over head_dim applied after W_q/W_k): RMSNorm is
invariant to the scale of its input, so scaling W_q/W_k rows changes nothing; the only lever is the
norm weight, and logits are bilinear in (q_norm.weight, k_norm.weight). When that weight is shared
by all heads (numel == head_dim) a per-head clip is impossible. ``qk_norm_policy="shared"``
(default) multiplies q_norm.weight by eta_min^alpha and k_norm.weight by eta_min^(1-alpha) with
eta_min = min over the layer's heads: every logit of the layer is multiplied by eta_min, which
guarantees S_h' <= tau for all heads (heads under tau are scaled too: unavoidable with a shared
weight). ``qk_norm_policy="error"`` refuses such models at construction. A norm over the whole
projection (numel == heads * head_dim, OLMo2 style) carries per-head rows: the GQA/MHA rule above
is applied to the norm weights instead of W_q/W_k.

Fused QKV projections (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX / Falcon ``query_key_value``,
MPT ``Wqkv``, Baichuan ``W_pack``): the q and k row blocks (GQA-aware, row orders and GPT-2's
transposed ``Conv1D`` in :mod:`dist_muonclip.qk_layers`) get the rules above.

The clipper is layout-agnostic: :meth:`QKClipper.row_scales` returns one per-row scale vector per
parameter (length ``param.shape[0]``; ``[1, param.shape[1]]`` per-column scales for a transposed
``Conv1D`` weight) and whoever owns the parameter's storage (replicated, FSDP row shards,
DeepSpeed flat fragments) multiplies the elements it holds (:func:`~dist_muonclip.layouts.scale_rows_`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from dist_muonclip.layouts import scale_rows_
from dist_muonclip.qk_layers import (FUSED_QKV_LAYOUTS, FUSED_QKV_NAMES, AttentionLayer, ClipTarget, as_config,
                                     fused_blocks, fused_order, head_counts, resolve_attr, weight_and_bias)
from dist_muonclip.tracker import DEFAULT_CHUNK_SIZE, MaxLogitTracker

__all__ = [
    "DEFAULT_MAPPING",
    "FUSED_QKV_NAMES",
    "AttentionLayer",
    "ClipTarget",
    "NoAttentionLayersError",
    "QKClipConfig",
    "QKClipper",
    "discover_attention_layers",
    "pack_s_max",
]


class NoAttentionLayersError(ValueError, LookupError):
    """No attention layer matched (a ValueError for users; a LookupError so that automatic mode
    can treat "nothing to clip" as "QK-Clip off")."""

#: role -> attribute name on an attention module (dotted paths allowed). Override any value with
#: ``QKClipConfig(mapping={...})`` (seed 000's ``clipping_layers_mapping`` format).
DEFAULT_MAPPING: dict[str, str] = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "q_norm": "q_norm",
    "k_norm": "k_norm",
    # MLA (DeepSeek-V2/V3)
    "q_b_proj": "q_b_proj",
    "kv_b_proj": "kv_b_proj",
    "kv_a_proj_with_mqa": "kv_a_proj_with_mqa",
    # fused q/k/v projection (one weight); without an override every name of FUSED_QKV_NAMES is tried
    "qkv_proj": "qkv_proj",
}



@dataclass
class QKClipConfig:
    """QK-Clip options.

    Args:
        enable: False turns QK-Clip off at zero cost (no tracking, no clip).
        tau: max-logit threshold (Kimi K2 used 100).
        alpha: share of the clip put on the query side (0.5 = sqrt(eta) on each side).
        mapping: overrides of :data:`DEFAULT_MAPPING` (role -> attribute name).
        gqa_policy: "exact" | "conservative" (see module docstring).
        qk_norm_policy: "shared" | "error" for models with a head-shared q_norm/k_norm.
        track: "auto" (HF attention hook when the model is a transformers model, else manual),
            "hf" (require the hook), "manual" (only tracker.record / s_max).
        track_eval: also record forwards run without autograd (evaluation under no_grad).
        chunk_size: logits materialized at once by the torch max-logit path (elements).
        backend: max-logit backend: "auto" (Triton on CUDA when importable) | "torch" | "triton".
        check_finite: raise on NaN/+inf max logits (one host sync per clip).
        fused_qkv: row order of fused QKV projections: "auto" (from the model type; see module
            docstring), "concat" ([q; k; v]) or "per_head" ([q_h; k_h; v_h] per head, MHA only).
    """

    enable: bool = True
    tau: float = 100.0
    alpha: float = 0.5
    mapping: dict[str, str] | None = None
    gqa_policy: str = "exact"
    qk_norm_policy: str = "shared"
    track: str = "auto"
    track_eval: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    backend: str = "auto"
    check_finite: bool = True
    fused_qkv: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.enable, bool):
            raise TypeError(f"QKClipConfig.enable must be bool, got {type(self.enable).__name__}")
        if not (isinstance(self.tau, (int, float)) and float(self.tau) > 0 and float(self.tau) < float("inf")):
            raise ValueError(f"QKClipConfig.tau must be a finite positive number, got {self.tau!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"QKClipConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if self.gqa_policy not in ("exact", "conservative"):
            raise ValueError(f"QKClipConfig.gqa_policy must be 'exact' or 'conservative', got {self.gqa_policy!r}")
        if self.qk_norm_policy not in ("shared", "error"):
            raise ValueError(f"QKClipConfig.qk_norm_policy must be 'shared' or 'error', got {self.qk_norm_policy!r}")
        if self.track not in ("auto", "hf", "manual"):
            raise ValueError(f"QKClipConfig.track must be 'auto', 'hf' or 'manual', got {self.track!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"QKClipConfig.backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        if self.fused_qkv not in FUSED_QKV_LAYOUTS:
            raise ValueError(f"QKClipConfig.fused_qkv must be one of {FUSED_QKV_LAYOUTS}, got {self.fused_qkv!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"QKClipConfig.chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.mapping is not None:
            if not isinstance(self.mapping, Mapping):
                raise TypeError(f"QKClipConfig.mapping must be a dict role -> attribute name, got {type(self.mapping).__name__}")
            unknown = sorted(set(self.mapping) - set(DEFAULT_MAPPING))
            if unknown:
                raise ValueError(f"QKClipConfig.mapping: unknown roles {unknown}; known roles: {sorted(DEFAULT_MAPPING)}")
            bad = {k: v for k, v in self.mapping.items() if not isinstance(v, str) or not v}
            if bad:
                raise TypeError(f"QKClipConfig.mapping values must be non-empty attribute names, got {bad}")
        self.tau, self.alpha = float(self.tau), float(self.alpha)

    @classmethod
    def from_any(cls, value: QKClipConfig | Mapping[str, Any] | bool | None) -> QKClipConfig:
        """``None``/``True`` -> defaults, ``False`` -> disabled, dict -> fields, config -> itself."""
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enable=False)
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"qk_clip: unknown options {unknown}; known: {sorted(names)}")
            return cls(**dict(value))
        raise TypeError(f"qk_clip must be a QKClipConfig, a dict, a bool or None; got {type(value).__name__}")

    def role_names(self) -> dict[str, str]:
        names = dict(DEFAULT_MAPPING)
        names.update(self.mapping or {})
        return names


def _mha_targets(name: str, heads: int, kv: int, head_dim: int | None, wq: nn.Parameter, bq, wk: nn.Parameter,
                 bk, *, qname: str, kname: str) -> tuple[list[ClipTarget], int]:
    if head_dim is None:
        if wq.shape[0] % heads:
            raise ValueError(f"{name}: {qname} has {wq.shape[0]} rows, not divisible by num_attention_heads={heads}")
        head_dim = wq.shape[0] // heads
    if wq.shape[0] != heads * head_dim:
        raise ValueError(
            f"{name}: {qname} has {wq.shape[0]} rows but num_attention_heads * head_dim = {heads} * {head_dim}; "
            "fix head_dim / num_attention_heads in model_config (fused QKV projections: map 'qkv_proj' instead)"
        )
    if wk.shape[0] != kv * head_dim:
        raise ValueError(
            f"{name}: {kname} has {wk.shape[0]} rows but num_key_value_heads * head_dim = {kv} * {head_dim}; "
            "fix num_key_value_heads / head_dim in model_config"
        )
    targets = [ClipTarget(wq, f"{name}.{qname}.weight", head_dim, [(0, head_dim, "q")]),
               ClipTarget(wk, f"{name}.{kname}.weight", head_dim, [(0, head_dim, "k")])]
    if bq is not None:
        targets.append(ClipTarget(bq, f"{name}.{qname}.bias", head_dim, [(0, head_dim, "q")]))
    if bk is not None:
        targets.append(ClipTarget(bk, f"{name}.{kname}.bias", head_dim, [(0, head_dim, "k")]))
    return targets, head_dim


def _layer_from_module(name: str, module: nn.Module, cfg: Any, roles: dict[str, str],
                       config: QKClipConfig) -> AttentionLayer | None:
    kv_b = resolve_attr(module, roles["kv_b_proj"])
    kv_a = resolve_attr(module, roles["kv_a_proj_with_mqa"])
    q_full = resolve_attr(module, roles["q_proj"])
    q_b = resolve_attr(module, roles["q_b_proj"])
    if isinstance(kv_b, nn.Module) and isinstance(kv_a, nn.Module) and (q_full is not None or q_b is not None):
        return _mla_layer(name, module, cfg, roles, q_b if q_b is not None else q_full,
                          roles["q_b_proj"] if q_b is not None else roles["q_proj"], kv_b)
    k_obj = resolve_attr(module, roles["k_proj"])
    if q_full is None or k_obj is None:
        fused = _fused_qkv(module, roles)
        return None if fused is None else _fused_layer(name, cfg, module, *fused, config)
    wq, bq = weight_and_bias(q_full)
    wk, bk = weight_and_bias(k_obj)
    if wq is None or wk is None:
        return None
    heads, kv, head_dim = head_counts(cfg, name)
    qn, kn = resolve_attr(module, roles["q_norm"]), resolve_attr(module, roles["k_norm"])
    if (qn is None) != (kn is None):
        raise ValueError(f"{name}: has only one of {roles['q_norm']}/{roles['k_norm']}; QK-Clip needs both or neither")
    if qn is None:
        targets, _ = _mha_targets(name, heads, kv, head_dim, wq, bq, wk, bk,
                                  qname=roles["q_proj"], kname=roles["k_proj"])
        return AttentionLayer(name, module, "mha", heads, kv, targets)
    # QK-norm: W_q/W_k do not change the logits; act on the norm weights (see module docstring).
    _, head_dim = _mha_targets(name, heads, kv, head_dim, wq, bq, wk, bk, qname=roles["q_proj"], kname=roles["k_proj"])
    wqn, _ = weight_and_bias(qn)
    wkn, _ = weight_and_bias(kn)
    if wqn is None or wkn is None:
        raise ValueError(
            f"{name}: {roles['q_norm']}/{roles['k_norm']} have no learnable weight, so QK-Clip has nothing that "
            "changes the logits; disable QK-Clip for this model (qk_clip=False)"
        )
    qnn, knn = wqn.numel(), wkn.numel()
    if qnn == head_dim and knn == head_dim:
        if config.qk_norm_policy == "error":
            raise ValueError(
                f"{name}: QK-norm with a weight shared by all heads ({roles['q_norm']}.weight has {qnn} = head_dim "
                "elements): scaling W_q/W_k does not change the logits and a per-head clip is impossible. Set "
                "qk_norm_policy='shared' (scale the norm weights by the layer's smallest eta) or disable QK-Clip"
            )
        targets = [ClipTarget(wqn, f"{name}.{roles['q_norm']}.weight", qnn, [(0, qnn, "q_shared")]),
                   ClipTarget(wkn, f"{name}.{roles['k_norm']}.weight", knn, [(0, knn, "k_shared")])]
        return AttentionLayer(name, module, "mha", heads, kv, targets, qk_norm="shared")
    if qnn == heads * head_dim and knn == kv * head_dim:
        targets = [ClipTarget(wqn, f"{name}.{roles['q_norm']}.weight", head_dim, [(0, head_dim, "q")]),
                   ClipTarget(wkn, f"{name}.{roles['k_norm']}.weight", head_dim, [(0, head_dim, "k")])]
        return AttentionLayer(name, module, "mha", heads, kv, targets, qk_norm="per_head")
    raise ValueError(
        f"{name}: q/k norm weights have {qnn}/{knn} elements; expected head_dim={head_dim} (shared) or "
        f"heads*head_dim={heads * head_dim}/{kv * head_dim} (per head)"
    )


def _fused_qkv(module: nn.Module, roles: dict[str, str]) -> tuple[str, Any] | None:
    """``(attribute name, module)`` of the fused QKV projection of an attention module, if any."""
    names = (roles["qkv_proj"],) if roles["qkv_proj"] != DEFAULT_MAPPING["qkv_proj"] else FUSED_QKV_NAMES
    for attr in names:
        obj = resolve_attr(module, attr)
        if obj is not None and weight_and_bias(obj)[0] is not None:
            return attr, obj
    return None


def _fused_layer(name: str, cfg: Any, module: nn.Module, attr: str, obj: Any,
                 config: QKClipConfig) -> AttentionLayer:
    """Clip targets on the q and k blocks of a fused QKV projection (see module docstring)."""
    w, b = weight_and_bias(obj)
    order, kv_fixed = fused_order(cfg, attr, name, config.fused_qkv)
    heads, kv, head_dim = head_counts(cfg, name)
    kv = kv_fixed or kv
    dim = 1 if type(obj).__name__ == "Conv1D" else 0     # transformers' Conv1D: weight [in, out]
    _, blocks = fused_blocks(name, attr, w.shape[dim], heads, kv, head_dim, order)
    targets = [ClipTarget(p, f"{name}.{attr}.{kind}", block, segments, offset=offset, count=count, dim=pdim)
               for p, kind, pdim in ((w, "weight", dim), (b, "bias", 0)) if p is not None
               for offset, count, block, segments in blocks]
    return AttentionLayer(name, module, "mha", heads, kv, targets)


def _mla_layer(name: str, module: nn.Module, cfg: Any, roles: dict[str, str], q_obj: Any, qname: str,
               kv_b: nn.Module) -> AttentionLayer:
    heads, _, _ = head_counts(cfg, name)
    dims = {}
    for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        v = getattr(cfg, key, None)
        v = getattr(module, key, None) if v is None else v
        if v is None:
            raise ValueError(f"{name}: MLA layer but the model config has no {key}; add it to model_config")
        dims[key] = int(v)
    nope, rope, vdim = dims["qk_nope_head_dim"], dims["qk_rope_head_dim"], dims["v_head_dim"]
    wq, bq = weight_and_bias(q_obj)
    wkv, bkv = weight_and_bias(kv_b)
    if wq is None or wkv is None:
        raise ValueError(f"{name}: MLA projections {qname}/{roles['kv_b_proj']} have no weight parameter")
    if wq.shape[0] != heads * (nope + rope):
        raise ValueError(f"{name}: {qname} has {wq.shape[0]} rows, expected heads*(qk_nope_head_dim+qk_rope_head_dim)"
                         f" = {heads}*({nope}+{rope})")
    if wkv.shape[0] != heads * (nope + vdim):
        raise ValueError(f"{name}: {roles['kv_b_proj']} has {wkv.shape[0]} rows, expected "
                         f"heads*(qk_nope_head_dim+v_head_dim) = {heads}*({nope}+{vdim})")
    qseg = [(0, nope, "q"), (nope, rope, "qr")]
    targets = [ClipTarget(wq, f"{name}.{qname}.weight", nope + rope, qseg),
               ClipTarget(wkv, f"{name}.{roles['kv_b_proj']}.weight", nope + vdim, [(0, nope, "k")])]
    if bq is not None:
        targets.append(ClipTarget(bq, f"{name}.{qname}.bias", nope + rope, qseg))
    if bkv is not None:
        targets.append(ClipTarget(bkv, f"{name}.{roles['kv_b_proj']}.bias", nope + vdim, [(0, nope, "k")]))
    # k_C is per head: the "key heads" of MLA are the query heads.
    return AttentionLayer(name, module, "mla", heads, heads, targets)


def discover_attention_layers(model: nn.Module, config: QKClipConfig | None = None, *,
                              model_config: Any = None) -> list[AttentionLayer]:
    """Find the attention layers of ``model`` by attribute names (``config.mapping`` over
    :data:`DEFAULT_MAPPING`) in ``named_modules`` order; head counts and MLA dims come from
    ``model_config`` (HF config or dict), else the module's own ``.config``, else ``model.config``."""
    config = config or QKClipConfig()
    roles = config.role_names()
    explicit_cfg = as_config(model_config)
    default_cfg = as_config(getattr(model, "config", None))
    layers: list[AttentionLayer] = []
    for name, module in model.named_modules():
        if any(name.startswith(l.name + ".") for l in layers if l.name):
            continue  # inside an attention layer already found
        cfg = explicit_cfg or getattr(module, "config", None) or default_cfg
        layer = _layer_from_module(name or type(model).__name__, module, cfg, roles, config)
        if layer is not None:
            layers.append(layer)
    if not layers:
        raise NoAttentionLayersError(
            f"QK-Clip found no attention layer in {type(model).__name__}: no module has both "
            f"{roles['q_proj']!r} and {roles['k_proj']!r} (or MLA {roles['kv_b_proj']!r} + {roles['kv_a_proj_with_mqa']!r}). "
            "Set the names with mapping={'q_proj': <your query attr>, 'k_proj': <your key attr>}, pass layers=... "
            "explicitly, or disable QK-Clip (qk_clip=False). Fused QKV projections are found by the names "
            f"{FUSED_QKV_NAMES} (or mapping={{'qkv_proj': <your attr>}})."
        )
    return layers


def _explicit_layer(i: int, spec: Any, config: QKClipConfig) -> AttentionLayer:
    """``layers=[{"module": m, "mode": "mha", "w_q": "q_proj", "w_k": "k_proj", "num_heads": 8,
    "num_kv_heads": 8, "head_dim": None}]``; MLA: ``{"module": m, "mode": "mla", "num_heads": H,
    "w_qc": ..., "w_kc": ..., "w_qr": ...}`` (separate per-head q_C, k_C, q_R projections) or
    ``{"w_q": ..., "w_kv_b": ..., "qk_nope_head_dim":..., "qk_rope_head_dim":..., "v_head_dim":...}``
    (DeepSeek layout). Names may be dotted and point at a module with .weight or a parameter."""
    if isinstance(spec, AttentionLayer):
        return spec
    if not isinstance(spec, Mapping) or not isinstance(spec.get("module"), nn.Module):
        raise TypeError(f"layers[{i}] must be an AttentionLayer or a dict with an nn.Module under 'module'")
    module, mode = spec["module"], spec.get("mode", "mha")
    name = spec.get("name", f"layers[{i}]")
    heads = spec.get("num_heads")
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{name}: num_heads must be a positive int, got {heads!r}")

    def get(key: str) -> tuple[nn.Parameter, nn.Parameter | None]:
        path = spec.get(key)
        if not isinstance(path, str):
            raise ValueError(f"{name}: missing {key!r} (attribute name of the projection)")
        w, b = weight_and_bias(resolve_attr(module, path))
        if w is None:
            raise ValueError(f"{name}: {key}={path!r} matches no nn.Linear/parameter in {type(module).__name__}")
        return w, b

    if mode == "mha":
        kv = spec.get("num_kv_heads") or heads
        if heads % kv:
            raise ValueError(f"{name}: num_heads={heads} must be a multiple of num_kv_heads={kv}")
        (wq, bq), (wk, bk) = get("w_q"), get("w_k")
        targets, _ = _mha_targets(name, heads, kv, spec.get("head_dim"), wq, bq, wk, bk,
                                  qname=spec["w_q"], kname=spec["w_k"])
        return AttentionLayer(name, module, "mha", heads, kv, targets)
    if mode != "mla":
        raise ValueError(f"{name}: mode must be 'mha' or 'mla', got {mode!r}")
    if "w_kv_b" in spec:
        cfg = SimpleNamespace(num_attention_heads=heads, **{k: spec.get(k) for k in
                                                             ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")})
        roles = config.role_names()
        return _mla_layer(name, module, cfg, roles, resolve_attr(module, spec["w_q"]), spec["w_q"],
                          resolve_attr(module, spec["w_kv_b"]))
    targets = []
    for key, kind in (("w_qc", "q"), ("w_kc", "k"), ("w_qr", "qr")):
        w, b = get(key)
        if w.shape[0] % heads:
            raise ValueError(f"{name}: {key}={spec[key]!r} has {w.shape[0]} rows, not divisible by num_heads={heads}")
        blk = w.shape[0] // heads
        targets.append(ClipTarget(w, f"{name}.{spec[key]}.weight", blk, [(0, blk, kind)]))
        if b is not None:
            targets.append(ClipTarget(b, f"{name}.{spec[key]}.bias", blk, [(0, blk, kind)]))
    return AttentionLayer(name, module, "mla", heads, heads, targets)


def pack_s_max(s_max: Any, num_heads: Sequence[int], *, device: torch.device | None = None) -> torch.Tensor:
    """Seed-style ``s_max`` (one list/tensor of per-head max logits per layer) -> ``[L, max_heads]``
    fp32, ``-inf`` padded. A ready ``[L, max_heads]`` tensor passes through (validated)."""
    num_layers, max_heads = len(num_heads), max(num_heads, default=1)
    if isinstance(s_max, torch.Tensor) and s_max.ndim == 2:
        if tuple(s_max.shape) != (num_layers, max_heads):
            raise ValueError(f"s_max has shape {tuple(s_max.shape)}, expected [num_layers, max_heads] = "
                             f"[{num_layers}, {max_heads}]")
        return s_max.detach().to(device=device, dtype=torch.float32)
    if not isinstance(s_max, Sequence) and not isinstance(s_max, torch.Tensor):
        raise TypeError(f"s_max must be a list (one entry per attention layer) or a tensor, got {type(s_max).__name__}")
    if len(s_max) != num_layers:
        raise ValueError(f"s_max has {len(s_max)} layers, QK-Clip tracks {num_layers} attention layers")
    out = torch.full((num_layers, max_heads), float("-inf"), dtype=torch.float32, device=device)
    for i, row in enumerate(s_max):
        if isinstance(row, torch.Tensor):
            vals = row.detach().reshape(-1)
        else:
            vals = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in row])
        if vals.numel() != num_heads[i]:
            raise ValueError(f"s_max[{i}] has {vals.numel()} values, layer {i} has {num_heads[i]} heads")
        out[i, : vals.numel()] = vals.to(device=out.device, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# the clipper
# --------------------------------------------------------------------------------------------
class QKClipper:
    """Finds attention layers, tracks their max logits and turns them into per-row scales.

    Args:
        model: the model (HF transformers or any nn.Module); may be None with explicit ``layers``.
        config: :class:`QKClipConfig`, dict, bool or None.
        model_config: HF config or dict with num_attention_heads, num_key_value_heads, head_dim
            (and MLA dims) overriding ``model.config``.
        layers: explicit layer specs (see :func:`_explicit_layer`) instead of discovery.

    Typical optimizer use (see BRIEF): ``S = clipper.max_logits(s_max)``; all-reduce(S, MAX);
    ``for p, scale in clipper.row_scales(S): scale_rows_(p.detach().view(-1), scale, [(0, p.numel())], p.shape)``.
    """

    def __init__(self, model: nn.Module | None = None, config: Any = None, *, model_config: Any = None,
                 layers: Sequence[Any] | None = None) -> None:
        self.config = QKClipConfig.from_any(config)
        self.layers: list[AttentionLayer] = []
        self.tracker: MaxLogitTracker | None = None
        self._last_s: torch.Tensor | None = None
        self._last_eta: torch.Tensor | None = None
        if not self.config.enable:
            return
        if layers is not None:
            self.layers = [_explicit_layer(i, s, self.config) for i, s in enumerate(layers)]
            if not self.layers:
                raise ValueError("layers=[] given: pass at least one attention layer or disable QK-Clip")
        elif model is not None:
            self.layers = discover_attention_layers(model, self.config, model_config=model_config)
        else:
            raise ValueError("QKClipper needs a model or explicit layers")
        device = self.layers[0].targets[0].param.device
        self.tracker = MaxLogitTracker([l.num_heads for l in self.layers], modules=[l.module for l in self.layers],
                                       chunk_size=self.config.chunk_size, backend=self.config.backend,
                                       track_eval=self.config.track_eval, device=device)
        # a transformers model, possibly wrapped (DDP's .module, DeepSpeed engines): look at every module
        is_hf = model is not None and any(
            hasattr(getattr(m, "config", None), "_attn_implementation_internal") for m in model.modules())
        if self.config.track == "hf" and not is_hf:
            raise ValueError("QKClipConfig.track='hf' but the model is not a transformers model; use track='auto'/'manual'")
        if is_hf and self.config.track != "manual":
            self.tracker.install_hf(model)

    # -- properties -----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.config.enable and bool(self.layers)

    @property
    def num_heads(self) -> list[int]:
        return [l.num_heads for l in self.layers]

    def describe(self) -> str:
        """One line per clipped layer: name, mode, heads, what is scaled."""
        lines = [f"QK-Clip tau={self.config.tau:g} alpha={self.config.alpha:g} gqa_policy={self.config.gqa_policy}"]
        for l in self.layers:
            kind = l.mode + (f"+qk_norm({l.qk_norm})" if l.qk_norm != "none" else "")
            heads = f"{l.num_heads}/{l.num_kv_heads}" if l.mode == "mha" else str(l.num_heads)
            scaled = ", ".join(".".join(t.name.rsplit(".", 2)[-2:]) for t in l.targets)
            lines.append(f"  {l.name}: {kind}, heads {heads}, scales {scaled}")
        return "\n".join(lines)

    def layer_names(self) -> list[str]:
        """Module names of the clipped attention layers, in row order of :meth:`max_logits`."""
        return [l.name for l in self.layers]

    def close(self) -> None:
        """Stop tracking (restores HF attention implementations)."""
        if self.tracker is not None:
            self.tracker.remove()

    # -- S ------------------------------------------------------------------------------------
    def max_logits(self, s_max: Any = None) -> torch.Tensor:
        """This step's ``[num_layers, max_heads]`` fp32 max logits (``-inf`` = nothing recorded).

        With ``s_max`` (seed API: per layer, per head values) those are used; otherwise the
        tracker's record is returned and the tracker is reset for the next step.
        """
        if not self.enabled:
            return torch.empty(0, 0)
        assert self.tracker is not None
        if s_max is not None:
            out = pack_s_max(s_max, self.num_heads, device=self.tracker.values().device)
            self.tracker.reset()
            return out
        out = self.tracker.values().clone()
        self.tracker.reset()
        return out

    def _check(self, max_logits: torch.Tensor, check_finite: bool) -> None:
        shape = (len(self.layers), max(self.num_heads))
        if not isinstance(max_logits, torch.Tensor) or tuple(max_logits.shape) != shape:
            got = tuple(max_logits.shape) if isinstance(max_logits, torch.Tensor) else type(max_logits).__name__
            raise ValueError(f"max_logits must be a [num_layers, max_heads] = {list(shape)} tensor, got {got}")
        if check_finite:
            bad = torch.isnan(max_logits) | (max_logits == float("inf"))
            if bool(bad.any()):  # the one host sync of a clip
                rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
                desc = ", ".join(f"{self.layers[i].name} heads {bad[i].nonzero().flatten().tolist()}" for i in rows)
                raise ValueError(
                    f"QK-Clip: non-finite max logits in {desc} (training diverged or inputs contain NaN/inf); "
                    "no parameter was changed"
                )

    def etas(self, max_logits: torch.Tensor) -> torch.Tensor:
        """eta = min(1, tau / S) per layer and head; 1 where S <= tau or nothing was recorded."""
        s = max_logits.to(torch.float32)
        tau = self.config.tau
        return torch.where(s > tau, tau / s.clamp_min(tau), torch.ones_like(s))

    def _head_factors(self, layer: AttentionLayer, eta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-kind factors: "q"/"qr" over query heads, "k" over key heads, *_shared scalars."""
        alpha = self.config.alpha
        if layer.mode == "mla":
            return {"q": eta.pow(alpha), "k": eta.pow(1.0 - alpha), "qr": eta}
        if layer.qk_norm == "shared":
            emin = eta.amin().reshape(1)
            return {"q_shared": emin.pow(alpha), "k_shared": emin.pow(1.0 - alpha)}
        g = layer.group_size
        eta_g = eta.view(layer.num_kv_heads, g).amin(dim=1)
        k = eta_g.pow(1.0 - alpha)
        if self.config.gqa_policy == "exact":
            q = eta / k.repeat_interleave(g)
        else:
            q = eta.pow(alpha)
        return {"q": q, "k": k}

    def row_scales(self, max_logits: torch.Tensor, *, check_finite: bool | None = None
                   ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Per-row multiplicative scales ``[(param, scale[param.shape[0]])]`` (fp32, on the param's
        device) for every tensor to clip. Rows of heads under tau get exactly 1.0. Raises (before
        anything changes) on a wrong shape or non-finite values. No host sync besides the finite
        check (``check_finite=False`` skips it: for callers that already checked, e.g. the
        optimizer's preflight; default: ``config.check_finite``).
        """
        if not self.enabled:
            return []
        self._check(max_logits, self.config.check_finite if check_finite is None else check_finite)
        eta_all = self.etas(max_logits)
        self._last_s, self._last_eta = max_logits.detach(), eta_all
        scales: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for li, layer in enumerate(self.layers):
            factors = self._head_factors(layer, eta_all[li, : layer.num_heads])
            for t in layer.targets:
                rows = torch.ones(t.num_blocks, t.block, dtype=torch.float32, device=eta_all.device)
                for start, length, kind in t.segments:
                    f = factors[kind]
                    assert f.numel() in (1, t.num_blocks), (t.name, f.numel(), t.num_blocks)
                    rows[:, start:start + length] = f.view(-1, 1)  # broadcast over the segment's rows
                scale = rows.reshape(-1)
                n = t.param.shape[t.dim]
                if t.offset or scale.numel() != n:      # blocks of a fused projection: the rest keeps 1
                    scale = torch.ones(n, dtype=torch.float32, device=eta_all.device).index_copy_(
                        0, torch.arange(t.offset, t.offset + scale.numel(), device=eta_all.device), scale)
                scale = (scale.view(1, -1) if t.dim == 1 else scale).to(t.param.device)
                key = id(t.param)
                if key in scales:  # a parameter shared by several layers: compose the clips
                    scale = scales[key][1] * scale
                scales[key] = (t.param, scale)
        return list(scales.values())

    @torch.no_grad()
    def apply_(self, max_logits: torch.Tensor | None = None) -> torch.Tensor | None:
        """Clip full (non-sharded) parameters in place; ``max_logits`` defaults to
        :meth:`max_logits`. Returns the S used (None when disabled)."""
        if not self.enabled:
            return None
        s = self.max_logits() if max_logits is None else max_logits
        for p, scale in self.row_scales(s):
            scale_rows_(p.detach().view(-1), scale, [(0, p.numel())], p.shape)
        return s

    def step(self, s_max: Any = None) -> torch.Tensor | None:
        """Seed-style: ``apply_(max_logits(s_max))``."""
        if not self.enabled:
            return None
        return self.apply_(self.max_logits(s_max))

    # -- metrics ------------------------------------------------------------------------------
    def metrics(self) -> dict[str, torch.Tensor]:
        """Device tensors (no sync) from the last :meth:`row_scales`: per layer max logit before
        the clip, number / fraction of clipped heads, min eta. Empty before the first clip."""
        if self._last_s is None or self._last_eta is None:
            return {}
        s, eta = self._last_s, self._last_eta
        valid = torch.zeros_like(s, dtype=torch.bool)
        for i, l in enumerate(self.layers):
            valid[i, : l.num_heads] = True
        clipped = (s > self.config.tau) & valid
        out: dict[str, torch.Tensor] = {
            "qk_clip/max_logit": s.amax(),
            "qk_clip/num_heads_clipped": clipped.sum().to(torch.float32),
            "qk_clip/frac_heads_clipped": clipped.sum().to(torch.float32) / valid.sum(),
            "qk_clip/min_eta": eta.amin(),
        }
        per_layer = s.amax(dim=1)
        for i in range(len(self.layers)):
            out[f"qk_clip/max_logit/layer_{i:02d}"] = per_layer[i]
        return out
