"""Validation of MuonClip's inputs: every check raises ``ValueError`` / ``TypeError`` naming the
option and the fix, before any state exists (torch.optim's messages and classes where torch.optim
checks the same thing)."""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor

from .functional import ADJUST_LR_FNS
from .layouts import Layout

__all__ = ["UnsupportedParameterError", "check_float", "check_lr", "check_betas", "validate_layout",
           "group_param_list", "names_given", "check_adjust_lr_fn", "check_runtime_options"]


class UnsupportedParameterError(TypeError, RuntimeError):
    """A parameter MuonClip cannot optimize (complex, integer). A TypeError (our rule for bad
    input) that is also the RuntimeError torch.optim.Muon raises for complex parameters, so code
    catching torch's error class keeps working; raised at construction, before any state."""


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:     # torch.optim's own message and class
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return float(value)


def check_lr(name: str, value: Any) -> float | Tensor:
    """Validate a learning rate; a 1-element tensor stays that tensor (torch.optim's tensor-lr
    semantics: the step computes with it, and LR schedulers ``fill_`` it in place)."""
    check_float(name, value, low=0.0)
    return value if isinstance(value, Tensor) else float(value)


def check_betas(name: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    return (check_float(f"{name}[0]", betas[0], low=0.0, high=1.0, high_open=True),
            check_float(f"{name}[1]", betas[1], low=0.0, high=1.0, high_open=True))


def validate_layout(layout: Layout, params: Sequence[Tensor], names: dict, world_size: int, rank: int) -> None:
    """Refuse parameters the layout cannot hold, naming them (before any state exists)."""
    try:
        layout.validate(params, names, world_size, rank)
    except KeyError as e:     # a layout given explicit per-name ranges (FlatRangesLayout)
        raise ValueError(f"a parameter is not known to the layout {type(layout).__name__} ({e}); give the layout "
                         "its ranges") from None


def group_param_list(params: Any, gi: int) -> list[Any]:
    """A group's ``params`` as a list, as torch.optim reads it (a Tensor alone is one parameter)."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"param group {gi}: 'params' is a set, whose order changes between runs; use a list "
                        "(optimizer parameters need to be organized in ordered collections, as in torch.optim)")
    return list(params)


def names_given(params: Sequence[Any], gi: int) -> bool:
    """Whether a group's entries are ``(name, parameter)`` pairs; all or none must be (torch.optim)."""
    named = [isinstance(item, tuple) for item in params]
    if any(named) and not all(named):
        raise ValueError(f"all optimizer params should be with/without names. Some param names are missing "
                         f"(param group {gi}: {named.count(False)} of {len(named)} entries are bare tensors); "
                         "pass (name, parameter) pairs for all of them or for none")
    for item in params:
        if isinstance(item, tuple) and (len(item) != 2 or not isinstance(item[0], str)):
            raise TypeError(f"param group {gi}: a named parameter must be a (str, Tensor) pair, got {item!r:.80}")
    return bool(named) and all(named)


def check_adjust_lr_fn(adjust_lr_fn: Any) -> str:
    """``None`` is torch.optim.Muon's default and means its "original" scale (not our default)."""
    if adjust_lr_fn is None:
        return "original"
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported: adjust_lr_fn must be one "
                         f"of {ADJUST_LR_FNS} or None (torch.optim.Muon's default, meaning 'original')")
    return adjust_lr_fn


def check_runtime_options(*, skip_nonfinite: Any, shard_adamw: Any, verbose: Any, adamw_foreach: Any,
                          adamw_fused: Any, muon_patterns: Any, adamw_patterns: Any, max_grad_norm: Any,
                          bucket_cap_mb: Any, grad_reduction: Any, layout: Any, accountant: Any,
                          process_group: Any, profiler: Any, log_every: Any) -> tuple[float | None, float]:
    """The options that are not hyperparameters, checked before anything changes (QK-Clip patches
    the model's attention, so this runs first). Returns ``(max_grad_norm, bucket_cap_mb)`` as floats."""
    import torch.distributed as dist

    from .comm import CommAccountant

    for flag, value in (("skip_nonfinite", skip_nonfinite), ("shard_adamw", shard_adamw), ("verbose", verbose)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool (True/False), got {value!r}")
    for flag, value in (("adamw_foreach", adamw_foreach), ("adamw_fused", adamw_fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{flag} must be None (torch chooses) or a bool, got {value!r}")
    for flag, value in (("muon_patterns", muon_patterns), ("adamw_patterns", adamw_patterns)):
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{flag} must be a list of name patterns (strings), got {value!r}; a single pattern "
                            f"goes in a list: {flag}=[{value!r}]")
    max_grad_norm = None if max_grad_norm is None else check_float("max_grad_norm", max_grad_norm, low=0.0,
                                                                    low_open=True)
    bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, low=0.0, low_open=True)
    if grad_reduction not in ("external", "optimizer"):
        raise ValueError(f"grad_reduction={grad_reduction!r} is unknown; use 'external' (DDP/DeepSpeed reduce "
                         "gradients) or 'optimizer' (the optimizer reduces them to owners)")
    if layout is not None and not isinstance(layout, Layout):
        raise TypeError(f"layout must be a dist_muonclip.layouts.Layout, got {type(layout).__name__}")
    if accountant is not None and not isinstance(accountant, CommAccountant):
        raise TypeError(f"accountant must be a dist_muonclip.comm.CommAccountant or None, got "
                        f"{type(accountant).__name__}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    if profiler is not None and not callable(getattr(profiler, "phase", None)):
        raise TypeError(f"profiler must have a phase(name) context manager (a dist_muonclip.profiler.StepProfiler) "
                        f"or be None, got {type(profiler).__name__}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    return max_grad_norm, bucket_cap_mb

