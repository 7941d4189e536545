"""The DeepSpeed JSON config as MuonClip reads it: the ``"optimizer"`` section (its schema generated
from ``MuonClip.__init__`` and ``QKClipConfig`` by :mod:`dist_muonclip.options`), the ZeRO stage,
and what offload configurations are supported."""
from __future__ import annotations

import copy
import json
import os
from typing import Any

from .. import options as _options

__all__ = ["MUONCLIP_OPTIONS", "QK_CLIP_OPTIONS", "parse_muonclip_section", "load_config", "prepare_config",
           "zero_stage", "check_offload"]

# --------------------------------------------------------------------------------------------
# The "optimizer" section of a DeepSpeed config
# --------------------------------------------------------------------------------------------

# The schema of the section is generated from MuonClip.__init__ and QKClipConfig
# (dist_muonclip.options, which also renders configs/REFERENCE.md); these views keep the
# documented names: key -> (JSON kind, default, meaning).
MUONCLIP_OPTIONS: dict[str, tuple[str, Any, str]] = {
    k: (o.kind, o.default, o.doc) for k, o in _options.deepspeed_options().items()}
QK_CLIP_OPTIONS: dict[str, tuple[str, Any, str]] = {
    k: (o.kind, o.default, o.doc) for k, o in _options.qk_clip_options().items()}
parse_muonclip_section = _options.parse_muonclip_section


def load_config(config: Any) -> dict[str, Any]:
    """A DeepSpeed config as a dict (a deep copy of a dict, or a JSON file read)."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def zero_stage(config: dict[str, Any]) -> int:
    zero = config.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise TypeError("DeepSpeed config zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise TypeError(f"DeepSpeed config zero_optimization.stage must be an integer, got {stage!r}")
    return stage


def prepare_config(config: Any, *, has_optimizer: bool = False, auto_values: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a DeepSpeed config (dict or JSON path) into (config for DeepSpeed, MuonClip kwargs).

    The returned config is a copy without the MuonClip ``"optimizer"`` section and with
    ``zero_allow_untested_optimizer`` set (DeepSpeed's whitelist does not know MuonClip). The
    kwargs are ``None`` when the config has no MuonClip section (then ``has_optimizer`` must be
    true: a MuonClip instance was passed). ``auto_values`` fills the section's ``"auto"`` values
    (see :func:`dist_muonclip.options.parse_muonclip_section`). Raises for combinations MuonClip
    does not support.
    """
    cfg = load_config(config)
    section = cfg.get("optimizer")
    kwargs = None
    if section is not None:
        if not isinstance(section, dict):
            raise TypeError(f"DeepSpeed config 'optimizer' must be an object, got {type(section).__name__}")
        if str(section.get("type", "")).lower() == "muonclip":
            if has_optimizer:
                raise ValueError("both an optimizer instance and an 'optimizer' section of type MuonClip were given; "
                                 "remove one of them")
            kwargs = parse_muonclip_section(section, auto_values=auto_values)
            del cfg["optimizer"]
        elif has_optimizer:
            raise ValueError(f"the config's optimizer section has type {section.get('type')!r} but a MuonClip instance "
                             "was passed; remove the section (or set its type to MuonClip and pass no instance)")
        else:
            raise ValueError(f"dist_muonclip.deepspeed.initialize: the config's optimizer type is "
                             f"{section.get('type')!r}, not 'MuonClip'; use deepspeed.initialize for other optimizers")
    elif not has_optimizer:
        raise ValueError("the DeepSpeed config has no 'optimizer' section; add {\"type\": \"MuonClip\", \"params\": "
                         "{\"lr\": ...}} (see configs/REFERENCE.md) or pass optimizer=MuonClip(model, ...)")
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config zero_optimization.stage={stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    zero = cfg.get("zero_optimization", {}) or {}
    check_offload(zero, stage, cfg)
    if (cfg.get("fp16") or {}).get("enabled", False):
        raise ValueError("DeepSpeed config fp16.enabled: MuonClip supports fp32 and bf16 (fp32 master weights); "
                         "fp16 loss scaling is not supported, use \"bf16\": {\"enabled\": true}")
    if stage in (1, 2, 3):
        cfg["zero_allow_untested_optimizer"] = True
    return cfg, kwargs


def check_offload(zero: dict[str, Any], stage: int, cfg: dict[str, Any]) -> None:
    """``offload_optimizer: {"device": "cpu"}`` at stages 1-3 keeps MuonClip's state with
    DeepSpeed's fp32 partitions in CPU memory (the client steps there); anything else is refused
    with the fix. Sets ``zero_force_ds_cpu_optimizer: false`` (DeepSpeed otherwise demands its
    own CPU Adam for offload)."""
    off = zero.get("offload_param")
    if off and (not isinstance(off, dict) or off.get("device", "none") not in ("none", None)):
        raise ValueError("DeepSpeed config zero_optimization.offload_param is not supported with MuonClip (parameters "
                         "offloaded between forward passes are not mapped to its layout); remove it (ZeRO-3 without "
                         "parameter offload, optionally with offload_optimizer: {\"device\": \"cpu\"})")
    off = zero.get("offload_optimizer")
    if not off:
        return
    if not isinstance(off, dict):
        raise TypeError("DeepSpeed config zero_optimization.offload_optimizer must be an object like "
                        "{\"device\": \"cpu\"}")
    device = off.get("device", "none")
    if device in ("none", None):
        return
    if device != "cpu":
        raise ValueError(f"DeepSpeed config zero_optimization.offload_optimizer.device={device!r} is not supported with "
                         "MuonClip (its state is not in the format of DeepSpeed's NVMe swapper); use "
                         "\"device\": \"cpu\" or remove offload_optimizer")
    if stage == 0:
        raise ValueError("DeepSpeed config zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3; set "
                         "zero_optimization.stage or remove offload_optimizer")
    if float(off.get("ratio", 1.0)) != 1.0:
        raise ValueError(f"DeepSpeed config zero_optimization.offload_optimizer.ratio={off['ratio']!r}: partial "
                         "offload steps the sub-groups left on the accelerator with DeepSpeed's own Adam, not "
                         "MuonClip; remove ratio (offload everything)")
    cfg["zero_force_ds_cpu_optimizer"] = False
