"""Which parameters Muon optimizes and which AdamW does.

Muon is an optimizer for the *hidden* weight matrices of a network (Jordan et al. 2024; Moonlight,
arXiv 2502.16982). Embeddings, the output head (tied or not), norms, biases and other 1-D
parameters are left to AdamW. This module makes that decision from an ``nn.Module`` so users do
not have to, prints it on request, and lets name patterns override it.

Matrix views. Muon orthogonalizes 2-D matrices. Parameters with more dims are handled two ways:

* ``"flatten"``: convolution kernels ``[out, in, *k]`` are one matrix ``[out, in * prod(k)]``
  (Keller Jordan's recipe for conv nets).
* ``"batch"``: any other >2-D parameter is a stack of independent matrices over its leading
  dims, e.g. fused MoE experts ``[num_experts, out, in]`` (transformers' DeepSeek-V3 / Qwen-MoE
  experts): each expert is orthogonalized on its own, never flattened into one matrix.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["ParamInfo", "split_parameters", "format_split", "matrix_shape", "as_matrices"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score", "embed_out")
# Attribute names under which frameworks hold the model they wrap; a module path is read without
# them (DDP / DeepSpeed ``module``, Lightning ``_forward_module``, torch.compile ``_orig_mod``, FSDP1
# ``_fsdp_wrapped_module``, activation checkpointing ``_checkpoint_wrapped_module``)
_WRAPPER_NAMES = frozenset({"module", "_forward_module", "_orig_mod", "_fsdp_wrapped_module",
                            "_checkpoint_wrapped_module"})


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter and the optimizer part it goes to.

    ``view`` is ``"matrix"`` (2-D), ``"flatten"``, ``"batch"`` (see module doc) or ``"vector"``
    (AdamW parameters).
    """

    name: str
    param: nn.Parameter
    use_muon: bool
    reason: str
    view: str


def matrix_shape(shape: Sequence[int], view: str) -> tuple[int, int, int]:
    """``(num_matrices, m, n)`` of a Muon parameter of ``shape`` under ``view``."""
    shape = tuple(shape)
    if view == "matrix":
        return 1, shape[0], shape[1]
    if view == "flatten":
        n = 1
        for d in shape[1:]:
            n *= d
        return 1, shape[0], n
    if view == "batch":
        b = 1
        for d in shape[:-2]:
            b *= d
        return b, shape[-2], shape[-1]
    raise ValueError(f"unknown matrix view {view!r}")


def as_matrices(t: torch.Tensor, view: str) -> torch.Tensor:
    """A ``[num_matrices, m, n]`` view of ``t`` (no copy for contiguous tensors)."""
    return t.reshape(matrix_shape(t.shape, view))


def _default_view(param: nn.Parameter, module: nn.Module | None) -> str:
    if param.ndim == 2:
        return "matrix"
    if module is not None and isinstance(module, _CONV_TYPES):
        return "flatten"
    return "batch"


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, f"*{pat}*") and "*" not in pat:
            return pat
    return None


def _output_head_params(model: nn.Module) -> set[int]:
    """Parameters of the output heads that ``model`` or any module inside it reports through
    ``get_output_embeddings()`` (HF models). The HF model is often not the module MuonClip is built
    on: Lightning's ``self.model``, DeepSpeed's engine module, a ``torch.compile`` or DDP wrapper."""
    ids: set[int] = set()
    for _, mod in model.named_modules():
        get_out = getattr(mod, "get_output_embeddings", None)
        if not callable(get_out):
            continue
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            ids.update(id(p) for p in head.parameters(recurse=False))
    return ids


def _named_like_head(mod_name: str) -> bool:
    """A module named like an output head (``lm_head``, ``output``, ...) outside any repeated block:
    wrapper attributes (:data:`_WRAPPER_NAMES`) are skipped, any other prefix is allowed
    (``model.lm_head`` in a LightningModule), a numeric component (``layers.3.output``) rules it out."""
    parts = [p for p in mod_name.split(".") if p and p not in _WRAPPER_NAMES]
    return bool(parts) and parts[-1] in _HEAD_NAMES and not any(p.isdigit() for p in parts)


def split_parameters(
    model: nn.Module,
    *,
    muon_patterns: Sequence[str] = (),
    adamw_patterns: Sequence[str] = (),
) -> list[ParamInfo]:
    """Classify every trainable parameter of ``model`` (frozen ones are left out).

    Rules, first match wins:

    0. A ``use_muon`` attribute on the parameter (DeepSpeed Muon's tag: ``param.use_muon = True``
       or ``False``) decides, reason ``"tag"``. A tag that a pattern contradicts is an error; a
       ``True`` tag on a parameter with fewer than 2 dims is an error (Muon needs matrices).
    1. ``adamw_patterns`` / ``muon_patterns`` (fnmatch globs on the full parameter name; a pattern
       without ``*`` matches as a substring). A name matching both is an error.
    2. Weights of ``nn.Embedding`` modules -> AdamW (also when tied to the head: tied weights
       appear once, under the embedding's name).
    3. The output head -> AdamW: the ``get_output_embeddings()`` of ``model`` or of any module in
       it (an HF model wrapped by Lightning, DeepSpeed, DDP, ``torch.compile``, FSDP); when none
       reports one, a module named like ``lm_head``/``output``/``head``/``classifier``/``score``
       outside repeated blocks, whatever prefix it has (``model.lm_head``, ``module.lm_head``).
    4. Parameters with fewer than 2 dims (norm gains, biases, scalars) -> AdamW.
    5. Everything else -> Muon.

    Returns the parameters in ``model.named_parameters()`` order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"split_parameters expects an nn.Module, got {type(model).__name__}")
    owner: dict[int, tuple[str, nn.Module]] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mod_name, mod))
    head_ids = _output_head_params(model)
    infos: list[ParamInfo] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mod_name, mod = owner.get(id(p), ("", None))
        a_pat = _matches(name, adamw_patterns)
        m_pat = _matches(name, muon_patterns)
        if a_pat and m_pat:
            raise ValueError(
                f"parameter {name!r} matches adamw_patterns entry {a_pat!r} and muon_patterns entry "
                f"{m_pat!r}; make the patterns disjoint"
            )
        view = _default_view(p, mod)
        tag = getattr(p, "use_muon", None)
        if tag is not None:
            if not isinstance(tag, bool):
                raise TypeError(f"parameter {name!r} has use_muon={tag!r}; the tag must be True or False")
            pat = m_pat if not tag else a_pat
            if pat:
                label = "muon_patterns" if not tag else "adamw_patterns"
                raise ValueError(f"parameter {name!r} is tagged use_muon={tag} but matches {label} entry {pat!r}; "
                                 "remove the pattern or the tag")
            if tag and p.ndim < 2:
                raise ValueError(f"parameter {name!r} of shape {tuple(p.shape)} is tagged use_muon=True, but Muon "
                                 "needs a parameter with at least 2 dims; tag it use_muon=False")
            infos.append(ParamInfo(name, p, tag, "tag", view if tag else "vector"))
        elif m_pat:
            if p.ndim < 2:
                raise ValueError(
                    f"muon_patterns entry {m_pat!r} selects {name!r} of shape {tuple(p.shape)}, but Muon "
                    "needs a parameter with at least 2 dims; remove it from muon_patterns"
                )
            infos.append(ParamInfo(name, p, True, f"muon_patterns {m_pat!r}", view))
        elif a_pat:
            infos.append(ParamInfo(name, p, False, f"adamw_patterns {a_pat!r}", "vector"))
        elif isinstance(mod, nn.Embedding):
            infos.append(ParamInfo(name, p, False, "embedding", "vector"))
        elif id(p) in head_ids or (not head_ids and _named_like_head(mod_name)):
            infos.append(ParamInfo(name, p, False, "output head", "vector"))
        elif p.ndim < 2:
            infos.append(ParamInfo(name, p, False, "bias" if name.endswith("bias") else f"{p.ndim}-D", "vector"))
        else:
            reason = {"matrix": "hidden matrix", "flatten": "conv kernel (flattened)",
                      "batch": "stacked matrices"}[view]
            infos.append(ParamInfo(name, p, True, reason, view))
    for pats, label in ((adamw_patterns, "adamw_patterns"), (muon_patterns, "muon_patterns")):
        for pat in pats:
            if not any(_matches(i.name, [pat]) for i in infos):
                raise ValueError(f"{label} entry {pat!r} matches no trainable parameter; check the name")
    return infos


def format_split(infos: Sequence[ParamInfo]) -> str:
    """A table of the split: name, shape, optimizer, reason, plus totals."""
    rows = [("parameter", "shape", "optimizer", "why")]
    for i in infos:
        rows.append((i.name, "x".join(map(str, i.param.shape)), "Muon" if i.use_muon else "AdamW", i.reason))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(4)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_muon = sum(i.param.numel() for i in infos if i.use_muon)
    n_adam = sum(i.param.numel() for i in infos if not i.use_muon)
    lines.append(f"Muon: {sum(i.use_muon for i in infos)} tensors, {n_muon:,} elements; "
                 f"AdamW: {sum(not i.use_muon for i in infos)} tensors, {n_adam:,} elements")
    return "\n".join(lines)
