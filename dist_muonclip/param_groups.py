"""MuonClip's param groups: built from a model or from torch.optim-style inputs, validated."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

from torch import Tensor, nn

from .newton_schulz import dtype_name, validate_ns_options
from .param_split import ParamInfo, split_parameters
from .validation import check_adjust_lr_fn, check_betas, check_float, group_param_list, names_given

__all__ = ["build_param_groups", "validate_group"]


def build_param_groups(registry: Any, model_or_params: Any, muon_patterns: Sequence[str],
                       adamw_patterns: Sequence[str]) -> tuple[list[dict], list[ParamInfo] | None, bool | None]:
    """MuonClip's first param groups from a model (automatic split) or from parameters / param
    groups as torch.optim takes them, registering names in ``registry``. Returns ``(groups,
    split, names_given)``: ``names_given`` is whether groups came as ``(name, param)`` pairs
    (``None``: names came from the model, later groups may be either kind)."""
    if isinstance(model_or_params, nn.Module):
        infos = split_parameters(model_or_params, muon_patterns=muon_patterns, adamw_patterns=adamw_patterns)
        if not infos:
            raise ValueError("model_or_params: the model has no trainable parameters")
        for info in infos:
            registry.names[info.param] = info.name
            registry.views[info.param] = info.view
            registry.order.setdefault(info.param, len(registry.order))
        groups = []
        muon = [i.param for i in infos if i.use_muon]
        adamw = [i.param for i in infos if not i.use_muon]
        if muon:
            groups.append({"params": muon, "use_muon": True})
        if adamw:
            groups.append({"params": adamw, "use_muon": False})
        return groups, infos, None
    if muon_patterns or adamw_patterns:
        raise ValueError("muon_patterns/adamw_patterns need an nn.Module as model_or_params; with param "
                         "groups, put parameters in groups with use_muon=True/False instead")
    if isinstance(model_or_params, Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        "but got a single Tensor: wrap it in a list (model_or_params may also be an nn.Module)")
    if isinstance(model_or_params, (set, frozenset)):
        raise TypeError("model_or_params is a set, whose order changes between runs; pass a list (as torch.optim)")
    raw = list(model_or_params)
    if not raw:
        raise ValueError("model_or_params is empty: the optimizer got no parameters")
    if all(isinstance(g, dict) for g in raw):
        groups = [dict(g) for g in raw]
    elif any(isinstance(g, dict) for g in raw):
        raise TypeError("model_or_params mixes param groups (dicts) with bare parameters; use one kind")
    else:
        groups = [{"params": raw}]
    seen: dict[Tensor, str] = {}
    groups_named = False
    for gi, g in enumerate(groups):
        if "params" not in g:
            raise ValueError(f"param group {gi} has no 'params' key")
        params = group_param_list(g["params"], gi)
        named = names_given(params, gi)
        if gi > 0 and named != groups_named:       # torch.optim's rule and message
            raise ValueError("all optimizer param groups should be with/without names. cannot add param group "
                             f"{'with' if named else 'without'} names to the optimizer (group {gi}; group 0 "
                             f"is {'with' if groups_named else 'without'}): name all parameters or none")
        groups_named = named
        plain = []
        in_group: set[Tensor] = set()
        for pi, item in enumerate(params):
            if isinstance(item, tuple):
                name, p = item
            else:
                name, p = f"group{gi}.param{pi}", item
            if not isinstance(p, Tensor):
                raise TypeError(f"param group {gi} entry {pi} is a {type(p).__name__}, not a Tensor")
            if p in in_group:     # torch.optim warns (and would step it twice); we keep it once
                warnings.warn(f"optimizer contains a parameter group with duplicate parameters (group {gi}, "
                              f"{name!r}); it is optimized once", UserWarning, stacklevel=4)
                continue
            in_group.add(p)
            if p in seen:
                raise ValueError(f"parameter {name!r} appears twice (first as {seen[p]!r}); "
                                 "some parameters appear in more than one parameter group: "
                                 "each parameter may be in one group only")
            seen[p] = name
            registry.names[p] = name
            registry.order.setdefault(p, len(registry.order))
            view = "matrix" if p.ndim == 2 else ("flatten" if p.ndim > 2 else "vector")
            registry.views[p] = view
            plain.append(p)
        g["params"] = plain
        g.pop("param_names", None)
    return groups, None, groups_named


def validate_group(g: dict[str, Any]) -> None:
    """Check (and normalize in place) one param group's hyperparameters."""
    check_float("lr", g["lr"], low=0.0)
    check_float("weight_decay", g["weight_decay"], low=0.0)
    if g["use_muon"]:
        check_float("momentum", g["momentum"], low=0.0, high=1.0, high_open=True)
        (g["ns_coefficients"], g["ns_steps"], g["ns_dtype"], g["ns_backend"]) = validate_ns_options(
            g["ns_coefficients"], g["ns_steps"], g["ns_dtype"], g["ns_backend"])
        g["ns_dtype"] = dtype_name(g["ns_dtype"])
        g["adjust_lr_fn"] = check_adjust_lr_fn(g["adjust_lr_fn"])
    else:
        g["betas"] = check_betas("betas", g["betas"])
        check_float("eps", g["eps"], low=0.0, low_open=True)
