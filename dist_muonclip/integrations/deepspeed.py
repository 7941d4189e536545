"""DeepSpeed integration: MuonClip from a DeepSpeed JSON config, at ZeRO stages 0, 1 and 2.

Switch an existing DeepSpeed job to MuonClip by editing its config::

    "optimizer": {"type": "MuonClip", "params": {"lr": 0.01, "adamw_lr": 0.003, "qk_clip": {"tau": 100}}}

and replacing ``deepspeed.initialize`` by :func:`initialize` (same arguments, same return value)::

    engine, optimizer, loader, scheduler = dist_muonclip.deepspeed.initialize(model=model, config="ds.json")

What DeepSpeed hands the optimizer depends on the stage and precision; each case maps to a
layout of :mod:`dist_muonclip.layouts` (DESIGN.md, "Layouts"):

=====================  ===============================  =========================================
config                 DeepSpeed wrapper                layout used by MuonClip
=====================  ===============================  =========================================
stage 0, fp32          none (client optimizer as is)    Replicated: DeepSpeed all-reduces
                                                        gradients, owners orthogonalize, updates
                                                        are all-gathered (ZeRO-1 state sharding)
stage 0, bf16          FP16_UnfusedOptimizer (full      fp32 masters split into equal flat slices
                       fp32 master per parameter)       (:class:`MasterSliceLayout`); the updated
                                                        slices are all-gathered after the step
stage 1, bf16          BF16_Optimizer (flat fp32        :class:`FlatFragmentsLayout`
                       partitions)
stage 1 fp32, stage 2  DeepSpeedZeroOptimizer (flat     :class:`FlatFragmentsLayout`
                       fp32 partitions)
=====================  ===============================  =========================================

With flat partitions a matrix may be cut across ranks. :class:`FlatFragmentsLayout` reads
DeepSpeed's partition bookkeeping (parameter offsets in the flat buffer, partition size) and
tells the engine which ``(rank, offset, length)`` fragments make up every matrix; the engine keeps
momentum on the fragments, all-to-alls them to the matrix's owner, orthogonalizes each matrix
exactly once, sends update fragments back and applies them on the fp32 partition. DeepSpeed then
all-gathers the parameters as usual. Gradient clipping (``gradient_clipping``) is applied to the
raw reduced gradient before :meth:`MuonClip.step` runs, never to the orthogonalized update.

A non-finite gradient anywhere skips the whole step at every stage, as DeepSpeed skips an
overflow step: MuonClip is not called (momentum, AdamW moments and fp32 masters stay
bit-identical), the engine counts it in ``skipped_steps``, ``was_step_applied()`` is false, the
scheduler does not advance and ``get_global_grad_norm()`` is inf. DeepSpeed's wrappers (ZeRO-1/2,
BF16_Optimizer, FP16_UnfusedOptimizer) clip inside their ``step`` and detect the invalid norm
themselves. At stage 0 fp32 DeepSpeed has no wrapper: the engine would clip with
``clip_grad_norm_``, which on an infinite norm multiplies every gradient by 0 and reports no
overflow (every other parameter would then take a zero-gradient step: momentum decayed, weight
decay applied). There :class:`DeepSpeedMuonClip` does the wrapper's job (see
:meth:`DeepSpeedMuonClip.bind`): it takes over the engine's fp32 clip, computes the global norm
itself, skips on an invalid norm (``overflow``) and otherwise clips exactly as DeepSpeed would. The
max logits recorded by a skipped step's forward carry into the next step's QK-Clip (same weights:
a max over two batches, never a missed clip).

The optimizer DeepSpeed sees is a thin :class:`DeepSpeedMuonClip` with two param groups, the Muon
matrices and the AdamW parameters. DeepSpeed flattens and partitions every group on its own, so
each rank holds ~1/W of the Muon elements (one momentum word each) and ~1/W of the AdamW elements
(two moment words each): optimizer state is balanced across ranks, instead of the ranks whose
partition holds the embedding and the output head carrying twice the state of the others. A
DeepSpeed ``scheduler`` writes the groups' ``lr``; the adapter reads the first group's and scales
every MuonClip group by ``lr / initial lr`` (so ``lr`` and ``adamw_lr`` keep their ratio).

ZeRO-3 is not supported (MuonClip needs whole matrices once per step; use FSDP2 for parameter
sharding). fp16 (loss scaling) is not supported: use bf16.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ..comm import Comm, CommAccountant
from ..optimizer import MuonClip
from ..plan import flat_partition

try:  # the layout contract (dist_muonclip.layouts); sharded layouts need it
    from ..layouts import Layout as _LayoutBase
except ImportError:  # pragma: no cover - engine without layouts: only ZeRO-0 fp32 works
    _LayoutBase = object

__all__ = [
    "MUONCLIP_OPTIONS",
    "QK_CLIP_OPTIONS",
    "parse_muonclip_section",
    "prepare_config",
    "DeepSpeedMuonClip",
    "FlatFragmentsLayout",
    "MasterSliceLayout",
    "initialize",
    "muonclip_optimizer",
    "full_state_dict",
    "load_full_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "disable_shm_comm",
]

FULL_STATE_FILE = "muonclip_full_state.pt"

# --------------------------------------------------------------------------------------------
# The "optimizer" section of a DeepSpeed config
# --------------------------------------------------------------------------------------------

# key -> (JSON kind, default, meaning). Kinds: number, int, bool, str, number_or_null, pair,
# str_list, coefficients, qk_clip. configs/REFERENCE.md documents the same table.
MUONCLIP_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "lr": ("number", None, "Muon lr (required); also the AdamW part's lr unless adamw_lr is set"),
    "momentum": ("number", 0.95, "Muon momentum mu in [0, 1)"),
    "nesterov": ("bool", True, "Nesterov momentum (torch.optim.Muon form)"),
    "weight_decay": ("number", 0.1, "decoupled weight decay of the Muon part (and AdamW unless adamw_weight_decay)"),
    "ns_steps": ("int", 5, "Newton-Schulz iterations"),
    "ns_coefficients": ("coefficients", "jordan",
                        "\"jordan\" | \"polar_express\" | \"cans\" | [a, b, c] | [[a, b, c], ...]"),
    "ns_backend": ("str", "auto", "\"auto\" | \"torch\" | \"triton\""),
    "ns_dtype": ("str", "bfloat16", "\"bfloat16\" | \"float32\" (NS operand dtype)"),
    "ns_eps": ("number", 1e-7, "Frobenius-norm clamp of the NS input"),
    "adjust_lr_fn": ("str", "match_rms_adamw", "\"match_rms_adamw\" | \"original\" | \"none\""),
    "adamw_lr": ("number_or_null", None, "lr of the AdamW part (null: same as lr)"),
    "adamw_betas": ("pair", [0.9, 0.95], "AdamW (beta1, beta2)"),
    "adamw_eps": ("number", 1e-8, "AdamW epsilon"),
    "adamw_weight_decay": ("number_or_null", None, "AdamW weight decay (null: same as weight_decay)"),
    "qk_clip": ("qk_clip", None, "null (auto) | true | false | {QK-Clip options, see QK_CLIP_OPTIONS}"),
    "muon_patterns": ("str_list", [], "name globs forced to Muon"),
    "adamw_patterns": ("str_list", [], "name globs forced to AdamW"),
    "skip_nonfinite": ("bool", True, "skip parameters whose gradient is non-finite (state untouched)"),
    "shard_adamw": ("bool", True, "ZeRO-0: shard AdamW state over ranks (stages 1/2 always shard)"),
    "verbose": ("bool", False, "print the Muon/AdamW split at construction"),
    "ns_split": ("str_or_null", None, "null (whole matrices) | \"qkv\" | \"heads\" (per-block Newton-Schulz)"),
}

QK_CLIP_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "enable": ("bool", True, "false turns QK-Clip off"),
    "tau": ("number", 100.0, "max-logit threshold"),
    "alpha": ("number", 0.5, "share of the clip put on the query side"),
    "mapping": ("dict_or_null", None, "role -> attribute-name overrides for attention modules"),
    "gqa_policy": ("str", "exact", "\"exact\" | \"conservative\""),
    "qk_norm_policy": ("str", "shared", "\"shared\" | \"error\" (models with q_norm/k_norm)"),
    "track": ("str", "auto", "\"auto\" | \"hf\" | \"manual\""),
    "track_eval": ("bool", False, "also record forwards without autograd"),
    "chunk_size": ("int", None, "logits materialized at once by the torch max-logit path"),
    "backend": ("str", "auto", "max-logit backend: \"auto\" | \"torch\" | \"triton\""),
    "check_finite": ("bool", True, "raise on NaN/+inf max logits"),
    "fused_qkv": ("str", "auto", "row order of fused QKV projections: \"auto\" | \"concat\" | \"per_head\""),
}

_KIND_TEXT = {"number": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
              "number_or_null": "a number or null", "str_or_null": "a string or null",
              "pair": "a list of two numbers",
              "str_list": "a list of strings", "dict_or_null": "an object or null",
              "coefficients": "a string, [a, b, c] or a list of [a, b, c]",
              "qk_clip": "null, true, false or an object"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_kind(path: str, kind: str, value: Any) -> None:
    ok = {
        "number": _is_number(value),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "number_or_null": value is None or _is_number(value),
        "str_or_null": value is None or isinstance(value, str),
        "pair": isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value),
        "str_list": isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
        "dict_or_null": value is None or isinstance(value, dict),
        "coefficients": isinstance(value, str)
        or (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value))
        or (isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(r, (list, tuple)) and len(r) == 3 and all(_is_number(v) for v in r) for r in value)),
        "qk_clip": value is None or isinstance(value, (bool, dict)),
    }[kind]
    if not ok:
        raise TypeError(f"DeepSpeed config {path} must be {_KIND_TEXT[kind]}, got {value!r} "
                        f"({type(value).__name__})")


def _unknown_key(path: str, key: str, allowed: Sequence[str]) -> ValueError:
    import difflib

    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"DeepSpeed config {path}: unknown key {key!r}{hint}; MuonClip accepts "
                      f"{', '.join(sorted(allowed))} (see configs/REFERENCE.md)")


def parse_muonclip_section(section: dict[str, Any]) -> dict[str, Any]:
    """Validate a config's ``"optimizer"`` section of type MuonClip; return MuonClip kwargs.

    Unknown keys and wrong JSON types raise ``ValueError``/``TypeError`` naming the key path
    (e.g. ``optimizer.params.qk_clip.tau``). Values are checked again, in full, when the optimizer
    is built (ranges, coefficient names), still before any state exists.
    """
    if not isinstance(section, dict):
        raise TypeError(f"DeepSpeed config 'optimizer' must be an object, got {type(section).__name__}")
    for key in section:
        if key not in ("type", "params"):
            raise _unknown_key("optimizer", key, ("type", "params"))
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise TypeError(f"DeepSpeed config optimizer.params must be an object, got {type(params).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key not in MUONCLIP_OPTIONS:
            raise _unknown_key("optimizer.params", key, list(MUONCLIP_OPTIONS))
        kind = MUONCLIP_OPTIONS[key][0]
        _check_kind(f"optimizer.params.{key}", kind, value)
        if kind == "qk_clip" and isinstance(value, dict):
            for qk, qv in value.items():
                if qk not in QK_CLIP_OPTIONS:
                    raise _unknown_key("optimizer.params.qk_clip", qk, list(QK_CLIP_OPTIONS))
                _check_kind(f"optimizer.params.qk_clip.{qk}", QK_CLIP_OPTIONS[qk][0], qv)
        if kind == "pair":
            value = tuple(value)
        if kind == "coefficients" and not isinstance(value, str):
            value = tuple(value) if _is_number(value[0]) else [tuple(r) for r in value]
        kwargs[key] = value
    if "lr" not in kwargs:
        raise ValueError("DeepSpeed config optimizer.params.lr is required for MuonClip (e.g. \"lr\": 0.01 with the "
                         "default adjust_lr_fn=\"match_rms_adamw\", which lets an AdamW-tuned lr serve both parts)")
    return kwargs


def _load_json(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _zero_stage(config: dict[str, Any]) -> int:
    zero = config.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise TypeError("DeepSpeed config zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise TypeError(f"DeepSpeed config zero_optimization.stage must be an integer, got {stage!r}")
    return stage


def prepare_config(config: Any, *, has_optimizer: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a DeepSpeed config (dict or JSON path) into (config for DeepSpeed, MuonClip kwargs).

    The returned config is a copy without the MuonClip ``"optimizer"`` section and with
    ``zero_allow_untested_optimizer`` set (DeepSpeed's whitelist does not know MuonClip). The
    kwargs are ``None`` when the config has no MuonClip section (then ``has_optimizer`` must be
    true: a MuonClip instance was passed). Raises for combinations MuonClip does not support.
    """
    cfg = _load_json(config)
    section = cfg.get("optimizer")
    kwargs = None
    if section is not None:
        if not isinstance(section, dict):
            raise TypeError(f"DeepSpeed config 'optimizer' must be an object, got {type(section).__name__}")
        if str(section.get("type", "")).lower() == "muonclip":
            if has_optimizer:
                raise ValueError("both an optimizer instance and an 'optimizer' section of type MuonClip were given; "
                                 "remove one of them")
            kwargs = parse_muonclip_section(section)
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
    stage = _zero_stage(cfg)
    if stage == 3:
        raise ValueError("MuonClip does not support ZeRO stage 3: Newton-Schulz needs each whole matrix once per step, "
                         "and stage 3 never materializes parameters outside forward/backward. Use ZeRO stage 1 or 2 "
                         "(optimizer state and gradients sharded, configs/zero2*.json), or FSDP2 with "
                         "dist_muonclip's Shard(0) layout for parameter sharding")
    if stage not in (0, 1, 2):
        raise ValueError(f"DeepSpeed config zero_optimization.stage={stage} is not a ZeRO stage; use 0, 1 or 2")
    zero = cfg.get("zero_optimization", {}) or {}
    for key in ("offload_optimizer", "offload_param"):
        off = zero.get(key)
        if off and (not isinstance(off, dict) or off.get("device", "none") not in ("none", None)):
            raise ValueError(f"DeepSpeed config zero_optimization.{key} is not supported with MuonClip (offloaded "
                             "optimizer steps run DeepSpeed's CPU kernels); remove it")
    if (cfg.get("fp16") or {}).get("enabled", False):
        raise ValueError("DeepSpeed config fp16.enabled: MuonClip supports fp32 and bf16 (fp32 master weights); "
                         "fp16 loss scaling is not supported, use \"bf16\": {\"enabled\": true}")
    if stage in (1, 2):
        cfg["zero_allow_untested_optimizer"] = True
    return cfg, kwargs


# --------------------------------------------------------------------------------------------
# Layouts over DeepSpeed's storage
# --------------------------------------------------------------------------------------------

_GROUP_KEY = "dist_muonclip_group"   # index of a DeepSpeedMuonClip param group (0: Muon, 1: AdamW)


class FlatFragmentsLayout(_LayoutBase):
    """Matrices cut into fragments by DeepSpeed's flat fp32 partitions (ZeRO-1/2, BF16_Optimizer).

    DeepSpeed flattens each param group into one buffer (parameter ``i`` at ``offsets[i]``, with
    optional alignment padding between parameters) and gives rank ``r`` the elements
    ``[r * partition_size, (r + 1) * partition_size)`` of it. A parameter therefore lies on one or
    more consecutive ranks, as one contiguous fragment per rank. ``flat`` is this rank's fp32
    partition of the group (DeepSpeed sets its ``.grad`` to the reduced, clipped gradient before
    the step). One group: the constructor; several: :meth:`from_groups`.
    """

    sharded = True

    def __init__(self, params: Sequence[Tensor], offsets: Sequence[int], partition_size: int, rank: int,
                 world_size: int, flat: Tensor) -> None:
        self.rank, self.world_size = rank, world_size
        self._where: dict[Tensor, tuple[int, int, int]] = {}     # p -> (group, offset, numel)
        self._shape: dict[Tensor, torch.Size] = {}
        self._partition_size: list[int] = []
        self._flat: list[Tensor] = []
        self._stashed: dict[int, Tensor] = {}
        self._add_group(params, offsets, partition_size, flat)

    @classmethod
    def from_groups(cls, groups: Sequence[tuple[Sequence[Tensor], Sequence[int], int, Tensor]], rank: int,
                    world_size: int) -> "FlatFragmentsLayout":
        """One layout over several flat groups: ``(params, offsets, partition_size, flat)`` each."""
        if not groups:
            raise ValueError("FlatFragmentsLayout.from_groups: no groups")
        params, offsets, partition_size, flat = groups[0]
        layout = cls(params, offsets, partition_size, rank, world_size, flat)
        for g in groups[1:]:
            layout._add_group(*g)
        return layout

    def _add_group(self, params: Sequence[Tensor], offsets: Sequence[int], partition_size: int,
                   flat: Tensor) -> None:
        if len(params) != len(offsets):
            raise ValueError("FlatFragmentsLayout: one offset per parameter")
        if flat.numel() != int(partition_size):
            raise ValueError(f"FlatFragmentsLayout: partition has {flat.numel()} elements, expected "
                             f"{int(partition_size)}")
        gi = len(self._flat)
        self._partition_size.append(int(partition_size))
        self._flat.append(flat)
        for p, o in zip(params, offsets):
            if p in self._where:
                raise ValueError("FlatFragmentsLayout: a parameter appears in two groups")
            self._where[p] = (gi, int(o), p.numel())
            self._shape[p] = p.shape

    def stash_grad(self, group: int) -> None:
        """Keep group ``group``'s gradient partition for a step that runs after DeepSpeed has
        dropped it (ZeRO-1/2 step the client one group at a time, see DeepSpeedMuonClip.step)."""
        g = self._flat[group].grad
        if g is None:
            self._stashed.pop(group, None)
        else:
            self._stashed[group] = g

    def clear_stash(self) -> None:
        self._stashed.clear()

    def _grad_of(self, group: int) -> Tensor | None:
        g = self._flat[group].grad
        return self._stashed.get(group) if g is None else g

    def _span(self, p: Tensor, r: int) -> tuple[int, int]:
        gi, off, n = self._where[p]
        ps = self._partition_size[gi]
        a, b = max(off, r * ps), min(off + n, (r + 1) * ps)
        return (a - off, b - off) if b > a else (0, 0)

    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        out = []
        for r in range(self.world_size):
            a, b = self._span(p, r)
            out.append([(a, b)] if b > a else [])
        return out

    def fragments(self, p: Tensor) -> list[tuple[int, int, int]]:
        """``(rank, offset in rank's partition of p's group, length)`` of every fragment of ``p``."""
        gi, off, _ = self._where[p]
        ps = self._partition_size[gi]
        out = []
        for r in range(self.world_size):
            a, b = self._span(p, r)
            if b > a:
                out.append((r, off + a - r * ps, b - a))
        return out

    def owner_hint(self, p: Tensor) -> int:
        """The rank holding the largest fragment of ``p`` (lowest rank on ties): orthogonalizing
        there moves only the other fragments (none for a matrix inside one partition)."""
        sizes = [b - a for a, b in (self._span(p, r) for r in range(self.world_size))]
        return max(range(self.world_size), key=lambda r: (sizes[r], -r))

    def _local(self, p: Tensor, flat: Tensor) -> Tensor:
        a, b = self._span(p, self.rank)
        if b <= a:
            return flat[:0]
        gi, off, _ = self._where[p]
        base = off - self.rank * self._partition_size[gi]
        return flat[base + a:base + b]

    def local_param(self, p: Tensor) -> Tensor:
        return self._local(p, self._flat[self._where[p][0]].detach())

    def local_grad(self, p: Tensor) -> Tensor | None:
        g = self._grad_of(self._where[p][0])
        return None if g is None else self._local(p, g)

    def full_shape(self, p: Tensor) -> torch.Size:
        return self._shape[p]


class MasterSliceLayout(_LayoutBase):
    """Full fp32 master copies on every rank (DeepSpeed stage 0 + bf16), split into equal slices.

    Each rank updates only its slice of the concatenated masters of each group (ZeRO-1 state
    sharding; with DeepSpeedMuonClip's two groups every rank holds 1/W of the Muon and 1/W of the
    AdamW elements: balanced state); :meth:`all_gather_` then refreshes the other slices (one
    all-gather) so every replica's master is complete again before DeepSpeed copies masters into
    the bf16 parameters. ``groups``: more lists of ``(params, masters, names)`` after the first.
    """

    sharded = True

    def __init__(self, params: Sequence[Tensor], masters: Sequence[Tensor], names: Sequence[str], comm: Comm,
                 groups: Sequence[tuple[Sequence[Tensor], Sequence[Tensor], Sequence[str]]] = ()) -> None:
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size
        all_groups = [(params, masters, names), *groups]
        self._master = {p: m for ps, ms, _ in all_groups for p, m in zip(ps, ms)}
        self._shape = {p: p.shape for p in self._master}
        self._by_name = {n: p for ps, _, ns in all_groups for n, p in zip(ns, ps)}
        self._ranges = {p: [[] for _ in range(self.world_size)] for p in self._master}
        # per rank: its slice of every group, packed back to back into one chunk for the all-gather
        self.chunk = 0
        self._segments: list[list[Any]] = [[] for _ in range(self.world_size)]
        for ps, _, ns in all_groups:
            chunk, segments = flat_partition([(n, p.numel()) for n, p in zip(ns, ps)], self.world_size)
            self.chunk += chunk
            for r, segs in enumerate(segments):
                self._segments[r].extend(segs)
                for seg in segs:
                    self._ranges[self._by_name[seg.name]][r].append((seg.start, seg.stop))

    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        return self._ranges[p]

    def owner_hint(self, p: Tensor) -> int:
        sizes = [sum(b - a for a, b in rs) for rs in self._ranges[p]]
        return max(range(self.world_size), key=lambda r: (sizes[r], -r))

    def _local(self, p: Tensor, t: Tensor) -> Tensor:
        rs = self._ranges[p][self.rank]
        return t.view(-1)[rs[0][0]:rs[0][1]] if rs else t.view(-1)[:0]

    def local_param(self, p: Tensor) -> Tensor:
        return self._local(p, self._master[p].detach())

    def local_grad(self, p: Tensor) -> Tensor | None:
        g = self._master[p].grad
        return None if g is None else self._local(p, g)

    def full_shape(self, p: Tensor) -> torch.Size:
        return self._shape[p]

    @torch.no_grad()
    def all_gather_(self) -> None:
        """Every rank's updated slices into every rank's masters (one all-gather, fp32)."""
        if self.world_size == 1:
            return
        self.comm.all_gather_segments_(
            self._segments, lambda s: self._master[self._by_name[s.name]].detach().view(-1)[s.start:s.stop],
            self.chunk, dtype=torch.float32, device=next(iter(self._master.values())).device,
            tag="master_gather")


def _set_layout(opt: MuonClip, layout: Any) -> None:
    """Give an already built MuonClip a layout (``None``: Replicated) over the default process
    group, before its first step (a MuonClip built before ``init_distributed`` is single-process)."""
    if any(opt.state.values()):
        raise ValueError("a MuonClip instance that has already stepped cannot be moved onto DeepSpeed's partitions; "
                         "pass a fresh instance (or the config section) to initialize()")
    opt.set_layout(layout)


# --------------------------------------------------------------------------------------------
# The optimizer DeepSpeed sees
# --------------------------------------------------------------------------------------------

class DeepSpeedMuonClip(Optimizer):
    """The client optimizer handed to DeepSpeed: two param groups (Muon matrices, AdamW
    parameters; an empty one is left out), MuonClip inside.

    DeepSpeed replaces each group's ``params`` by its fp32 partition (ZeRO-1/2, bf16) and calls
    :meth:`step` after it has reduced, unscaled and clipped the gradients; :meth:`bind` (called
    by :func:`initialize` once DeepSpeed is set up) moves the inner :class:`MuonClip` onto the
    layout matching what DeepSpeed did. Separate groups make DeepSpeed partition the Muon and the
    AdamW elements evenly on their own, which balances optimizer state across ranks. A scheduler
    writes the groups' ``lr``; every MuonClip group's lr is scaled by ``first group's lr /
    initial lr``.

    Args:
        model: the model given to DeepSpeed (its parameter names drive the Muon/AdamW split and
            QK-Clip).
        muonclip: the MuonClip instance on ``model`` (built by :func:`initialize` from the config
            section, or passed by the user), still replicated; :meth:`bind` gives it its layout.
    """

    def __init__(self, model: nn.Module, muonclip: MuonClip) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(muonclip, MuonClip):
            raise TypeError(f"optimizer must be a dist_muonclip.MuonClip, got {type(muonclip).__name__}")
        owned = {p for g in muonclip.param_groups for p in g["params"]}
        params = [p for p in model.parameters() if p in owned]
        if len(params) != len(owned):
            raise ValueError("the MuonClip instance optimizes parameters that are not the model's; build it on the "
                             "same model passed to initialize()")
        self._model = model
        self.inner = muonclip
        lr = float(muonclip.param_groups[0]["lr"])
        self._lr0 = lr
        self._base_lrs = [g["lr"] for g in muonclip.param_groups]
        self._after_step: Callable[[], None] | None = None
        self._fragments: FlatFragmentsLayout | None = None
        # ZeRO-0 fp32 only (no DeepSpeed wrapper): this client plays the wrapper's part in the
        # engine's contract, which reads ``overflow`` and ``_global_grad_norm`` after step()
        self._clips_fp32 = False
        self._gradient_clipping = 0.0
        self.overflow = False
        self._global_grad_norm: float | None = None
        self.layout_name = "unbound"
        self._bound = False
        muon = {p for g in muonclip.param_groups if g.get("use_muon", True) for p in g["params"]}
        split = [[p for p in params if p in muon], [p for p in params if p not in muon]]
        groups = [{"params": ps, "lr": lr, _GROUP_KEY: k} for k, ps in enumerate(g for g in split if g)]
        super().__init__(groups, {"lr": lr})
        self._groups = list(self.param_groups)   # DeepSpeed narrows param_groups while it steps

    # -- binding to DeepSpeed's storage -----------------------------------------------------
    def bind(self, engine: Any) -> None:
        """Build the inner MuonClip over what DeepSpeed made of the parameters (see module doc)."""
        wrapper = engine.optimizer
        layout: Any = None
        if wrapper is self:
            self.layout_name = "replicated"
            self._take_over_fp32_clip(engine)
        elif hasattr(wrapper, "single_partition_of_fp32_groups"):       # ZeRO-1/2 (DeepSpeedZeroOptimizer)
            self._check_groups(wrapper.bit16_groups)
            n = len(self._groups)
            layout = FlatFragmentsLayout.from_groups(
                [(wrapper.round_robin_bit16_groups[i], wrapper.round_robin_bit16_offsets[i], wrapper.partition_size[i],
                  wrapper.single_partition_of_fp32_groups[i]) for i in range(n)],
                dist.get_rank(wrapper.dp_process_group), dist.get_world_size(wrapper.dp_process_group))
            self._fragments = layout
            if n > 1:
                self._after_step = lambda: self._refresh_bit16(wrapper, range(n - 1))
            self.layout_name = "flat_fragments(zero)"
        elif hasattr(wrapper, "fp32_groups_flat_partition"):            # BF16_Optimizer (stage 1 + bf16)
            self._check_groups(wrapper.bf16_groups)
            parts = []
            for i, params in enumerate(wrapper.bf16_groups):
                offsets, off = [], 0
                for p in params:
                    offsets.append(off)
                    off += p.numel()
                w = dist.get_world_size(wrapper.real_dp_process_group[i])
                parts.append((params, offsets, wrapper.bf16_groups_flat[i].numel() // w,
                              wrapper.fp32_groups_flat_partition[i]))
            group = wrapper.real_dp_process_group[0]
            layout = FlatFragmentsLayout.from_groups(parts, dist.get_rank(group), dist.get_world_size(group))
            self.layout_name = "flat_fragments(bf16)"
        elif hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):  # stage 0 + bf16
            self._check_groups(wrapper.fp16_groups)
            comm = Comm(None, self.inner.accountant)
            names = {p: n for n, p in self._model.named_parameters()}
            groups = [(list(ps), list(ms), [names[p] for p in ps]) for ps, ms in zip(wrapper.fp16_groups,
                                                                                   wrapper.fp32_groups)]
            layout = MasterSliceLayout(*groups[0], comm, groups=groups[1:])
            self._after_step = layout.all_gather_
            self.layout_name = "master_slices"
        else:
            raise TypeError(f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__}, which dist_muonclip does "
                            "not support (supported: ZeRO stage 0/1/2 with fp32 or bf16)")
        if layout is not None and _LayoutBase is object:
            raise RuntimeError("this dist_muonclip has no sharded-layout engine (dist_muonclip.layouts); only ZeRO "
                               "stage 0 with fp32 is available")
        world = dist.get_world_size()
        if layout is not None:
            if layout.world_size != world:
                raise ValueError(f"DeepSpeed's data-parallel group has {layout.world_size} of {world} ranks; "
                                 "model/pipeline/sequence parallelism is not supported with MuonClip")
            _set_layout(self.inner, layout)
        elif self.inner.world_size != world:     # instance built before init_distributed
            _set_layout(self.inner, None)
        self._bound = True

    def _take_over_fp32_clip(self, engine: Any) -> None:
        """ZeRO-0 fp32: clip and check the gradients in :meth:`step`, as DeepSpeed's wrappers do.

        The engine calls ``clip_fp32_gradients()`` (``deepspeed.runtime.utils.clip_grad_norm_``)
        right before ``optimizer.step()`` only in this configuration; on an infinite norm that
        multiplies every gradient by 0 (inf * 0 = nan for the poisoned ones) and tells nobody.
        The engine's clip becomes a no-op for this engine and :meth:`_fp32_preflight` does the
        same clip (same coefficient ``min(1, clip / (norm + 1e-6))``, in place on the reduced
        gradients, as DeepSpeed does) after checking the norm.
        """
        self._clips_fp32 = True
        self._gradient_clipping = float(engine.gradient_clipping() or 0.0)
        engine.clip_fp32_gradients = self._engine_clip_is_done_in_step

    @staticmethod
    def _engine_clip_is_done_in_step() -> None:
        """Stands in for ``engine.clip_fp32_gradients`` at ZeRO-0 fp32 (see _take_over_fp32_clip)."""

    @torch.no_grad()
    def _fp32_preflight(self) -> bool:
        """ZeRO-0 fp32, before MuonClip's step: global gradient norm (``_global_grad_norm`` for
        ``engine.get_global_grad_norm()``), skip on inf/nan (``overflow``), else clip. True: step.

        The gradients are DeepSpeed's all-reduced ones, identical on every rank; one 1-float
        all-reduce(MAX) of the norm still makes the skip decision collective by construction (it
        replaces the all-reduce DeepSpeed's clip_grad_norm_ does, and like DeepSpeed's own
        collectives it is not counted by MuonClip's accountant).
        """
        grads = [p.grad for p in self._model.parameters() if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, 2)
            norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
        else:
            norm = torch.zeros((), device=next(self._model.parameters()).device)
        norm = torch.nan_to_num(norm, nan=math.inf, posinf=math.inf).reshape(1)   # nan -> inf: MAX keeps it
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(norm, op=dist.ReduceOp.MAX)
        value = float(norm)                     # the host read the skip decision needs
        self.overflow = not math.isfinite(value)
        self._global_grad_norm = math.inf if self.overflow else value
        if self.overflow:
            return False
        if self._gradient_clipping > 0 and grads:
            coef = (self._gradient_clipping / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef.reshape(()).to(grads[0].device))
        return True

    def _check_groups(self, groups: Sequence[Any]) -> None:
        if len(groups) != len(self._groups):
            raise RuntimeError(f"DeepSpeed made {len(groups)} param groups out of DeepSpeedMuonClip's "
                               f"{len(self._groups)}; MoE expert groups are not supported")

    @staticmethod
    @torch.no_grad()
    def _refresh_bit16(wrapper: Any, groups: Sequence[int]) -> None:
        """Copy the fp32 partitions of ``groups`` into their bit16 partitions, as DeepSpeed does
        right after stepping each group (ours were updated after DeepSpeed's copy, see step)."""
        for i in groups:
            pid = dist.get_rank(group=wrapper.real_dp_process_group[i])
            wrapper.parallel_partitioned_bit16_groups[i][pid].data.copy_(wrapper.single_partition_of_fp32_groups[i].data)

    # -- optimizer API ----------------------------------------------------------------------
    def _sync_lr(self) -> None:
        lr = float(self._groups[0]["lr"])
        factor = lr / self._lr0 if self._lr0 > 0 else 1.0
        for g, base in zip(self.inner.param_groups, self._base_lrs):
            g["lr"] = base * factor

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, s_max: Any = None) -> Any:
        """One MuonClip step over all groups.

        DeepSpeed's ZeRO-1/2 optimizer steps its client once per param group, with
        ``param_groups`` narrowed to that group, and drops each group's gradient partition right
        after; MuonClip needs every gradient at once (one preflight, QK-Clip after all updates).
        So the calls for the first groups only keep their gradient partitions, the call for the
        last group runs the whole step, and the earlier groups' bit16 partitions are refreshed
        from the updated fp32 partitions before DeepSpeed all-gathers the parameters.
        """
        if not self._bound:
            # DeepSpeed's fp16/bf16 wrappers call step() once with zero gradients while they are
            # built, to create Adam's state eagerly; MuonClip creates state lazily: nothing to do.
            return None
        if len(self.param_groups) == 1 and len(self._groups) > 1:
            k = self.param_groups[0][_GROUP_KEY]
            if self._fragments is None:
                raise RuntimeError("DeepSpeed stepped one param group of several on a layout that is not ZeRO-1/2's")
            if k != len(self._groups) - 1:
                self._fragments.stash_grad(k)
                return None
        if self._clips_fp32 and not self._fp32_preflight():
            return None       # invalid gradient norm: the engine books a skipped step (overflow)
        self._sync_lr()
        try:
            loss = self.inner.step(closure, s_max=s_max)
        finally:
            if self._fragments is not None:
                self._fragments.clear_stash()
        if self._after_step is not None:
            self._after_step()
        return loss

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()

    def state_dict(self) -> dict[str, Any]:
        """MuonClip's state: this rank's shard when DeepSpeed saves one file per rank (ZeRO-1/2,
        bf16 master slices), else the full state. A collective for the full state."""
        sharded = self.layout_name != "replicated"
        return {"format": "dist_muonclip.deepspeed.v1", "lr0": self._lr0, "base_lrs": self._base_lrs,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self._groups],
                "muonclip": self.inner.state_dict(sharded=sharded)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output; shards are merged over all ranks (a collective)."""
        if state_dict.get("format") != "dist_muonclip.deepspeed.v1":
            raise ValueError("not a DeepSpeedMuonClip state dict (expected format 'dist_muonclip.deepspeed.v1')")
        inner_sd = state_dict["muonclip"]
        if "sharded" in inner_sd:
            if inner_sd["sharded"]["world_size"] != self.inner.world_size:
                raise ValueError(f"this checkpoint's optimizer state was saved by {inner_sd['sharded']['world_size']} "
                                 f"ranks, this run has {self.inner.world_size}: resume through "
                                 "dist_muonclip.deepspeed.load_checkpoint (full-state export)")
            shards = [None] * self.inner.world_size
            dist.all_gather_object(shards, inner_sd)
            inner_sd = self.inner.merge_sharded(shards)
        self.inner.load_state_dict(inner_sd)
        if len(state_dict["param_groups"]) != len(self._groups):
            raise ValueError(f"this checkpoint has {len(state_dict['param_groups'])} DeepSpeedMuonClip param groups, "
                             f"this run has {len(self._groups)}: resume through dist_muonclip.deepspeed.load_checkpoint "
                             "(full-state export)")
        for g, saved in zip(self._groups, state_dict["param_groups"]):
            g.update(saved)

    def full_state_dict(self) -> dict[str, Any]:
        """Everything needed to resume at any world size: MuonClip's full state, the fp32 master
        weights by parameter name, and the lr bookkeeping. A collective; every rank gets it."""
        inner = self.inner
        names = {p: n for n, p in self._model.named_parameters()}
        layout = getattr(inner, "_layout", None)
        masters: dict[str, Tensor] = {}
        if layout is not None and getattr(layout, "sharded", False):
            local = {names[p]: [(a, b, layout.local_param(p).detach().float().cpu().clone())
                                for a, b in layout.ranges(p)[inner.rank] if b > a]
                     for g in inner.param_groups for p in g["params"]}
            shards = [None] * inner.world_size
            dist.all_gather_object(shards, local)
            for g in inner.param_groups:
                for p in g["params"]:
                    full = torch.empty(p.numel(), dtype=torch.float32)
                    for shard in shards:
                        for a, b, t in shard[names[p]]:
                            full[a:b] = t
                    masters[names[p]] = full.view(layout.full_shape(p))
        else:
            for g in inner.param_groups:
                for p in g["params"]:
                    masters[names[p]] = p.detach().float().cpu().clone()
        return {"format": "dist_muonclip.deepspeed.full.v1", "optimizer": inner.state_dict(), "masters": masters,
                "lr": self._groups[0]["lr"], "lr0": self._lr0}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Any], engine: Any) -> None:
        """Load :meth:`full_state_dict` output saved at any world size (masters, then state)."""
        if state.get("format") != "dist_muonclip.deepspeed.full.v1":
            raise ValueError("not a dist_muonclip DeepSpeed full state (expected format "
                             "'dist_muonclip.deepspeed.full.v1')")
        inner = self.inner
        names = {p: n for n, p in self._model.named_parameters()}
        masters = state["masters"]
        missing = [names[p] for g in inner.param_groups for p in g["params"] if names[p] not in masters]
        if missing:
            raise ValueError(f"full state has no weights for {missing[:5]}")
        layout = getattr(inner, "_layout", None)
        for g in inner.param_groups:
            for p in g["params"]:
                full = masters[names[p]].reshape(-1)
                if layout is not None and getattr(layout, "sharded", False):
                    for (a, b) in layout.ranges(p)[inner.rank]:
                        if b > a:
                            layout.local_param(p).copy_(full[a:b].to(layout.local_param(p)))
                    if isinstance(layout, MasterSliceLayout):   # full masters everywhere
                        layout._master[p].detach().view(-1).copy_(full.to(layout._master[p]))
                p.detach().view(-1).copy_(full.to(device=p.device, dtype=p.dtype))
        wrapper = engine.optimizer
        if hasattr(wrapper, "update_lp_params") and hasattr(wrapper, "single_partition_of_fp32_groups"):
            wrapper.update_lp_params()       # bit16 params <- fp32 partitions, all-gathered
        inner.load_state_dict(state["optimizer"])
        for g in self._groups:
            g["lr"] = state["lr"]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def disable_shm_comm() -> None:
    """Skip DeepSpeed's shared-memory CPU collective op (a ~30 s compile on first use); plain gloo
    runs instead. Call before :func:`initialize`. Also set by ``DIST_MUONCLIP_DS_SHM=0``."""
    import importlib

    # not `import deepspeed.comm.torch as m`: deepspeed.comm's attribute `torch` is the torch package
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None, *,
               config: Any = None, config_params: Any = None, accountant: CommAccountant | None = None,
               **kwargs: Any):
    """``deepspeed.initialize`` with MuonClip: same arguments, returns exactly what it returns.

    The config (``config=`` dict or JSON path, or ``args.deepspeed_config`` from
    ``deepspeed.add_config_arguments``) carries ``"optimizer": {"type": "MuonClip", "params":
    {...}}``; or ``optimizer=MuonClip(model, ...)`` is passed and the config has no optimizer
    section. Any ``scheduler`` section drives the lr of both the Muon and the AdamW part.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)``; the MuonClip instance
    is :func:`muonclip_optimizer` ``(engine)``.
    """
    import deepspeed

    if model is None:
        raise ValueError("initialize() needs model=")
    if config is None and config_params is not None:
        config = config_params
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("both args.deepspeed_config and config= were given; pass one")
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None      # deepspeed.initialize refuses both; we pass the edited dict
    if config is None:
        raise ValueError("initialize() needs a DeepSpeed config: config= (dict or JSON path) or --deepspeed_config")
    if optimizer is not None and not isinstance(optimizer, MuonClip):
        raise TypeError(f"optimizer must be a dist_muonclip.MuonClip instance (or None with a MuonClip config "
                        f"section), got {type(optimizer).__name__}; use deepspeed.initialize for other optimizers")
    cfg, mc_kwargs = prepare_config(config, has_optimizer=optimizer is not None)
    client = None
    if optimizer is not None:   # an instance: checked before any process group is created
        if accountant is not None:
            raise ValueError("accountant= applies to the optimizer built from the config section; with an "
                             "optimizer instance pass it there: MuonClip(model, ..., accountant=acc)")
        client = DeepSpeedMuonClip(model, optimizer)
    if os.environ.get("DIST_MUONCLIP_DS_SHM", "1") == "0":
        disable_shm_comm()
    if not (dist.is_available() and dist.is_initialized()):
        deepspeed.init_distributed(dist_backend=kwargs.pop("dist_backend", None))
    if mc_kwargs is not None:
        try:   # every value is validated here, before DeepSpeed touches the model
            optimizer = MuonClip(model, accountant=accountant, grad_reduction="external", **mc_kwargs)
        except (ValueError, TypeError) as e:
            raise type(e)(f"DeepSpeed config optimizer.params: {e}") from e
        client = DeepSpeedMuonClip(model, optimizer)
    out = deepspeed.initialize(args=args, model=model, optimizer=client, config=cfg, **kwargs)
    client.bind(out[0])
    out[0]._dist_muonclip = client
    return out


def _client(engine: Any) -> DeepSpeedMuonClip:
    client = getattr(engine, "_dist_muonclip", None)
    if client is None:
        raise ValueError("this DeepSpeed engine was not built by dist_muonclip.deepspeed.initialize")
    return client


def muonclip_optimizer(engine: Any) -> MuonClip:
    """The :class:`MuonClip` inside an engine built by :func:`initialize`."""
    return _client(engine).inner


def full_state_dict(engine: Any) -> dict[str, Any]:
    """Full-state export (any world size can load it): see :meth:`DeepSpeedMuonClip.full_state_dict`."""
    return _client(engine).full_state_dict()


def load_full_state_dict(engine: Any, state: dict[str, Any]) -> None:
    _client(engine).load_full_state_dict(state, engine)


def save_checkpoint(engine: Any, save_dir: str, tag: str | None = None, **kwargs: Any) -> str:
    """``engine.save_checkpoint`` plus the full-state export in ``<save_dir>/<tag>/muonclip_full_state.pt``.

    A collective. Resume at the same world size with ``engine.load_checkpoint`` or
    :func:`load_checkpoint`; at a different one with :func:`load_checkpoint`.
    """
    if tag is None:
        tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(save_dir, tag=tag, **kwargs)
    state = full_state_dict(engine)
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(save_dir, str(tag), FULL_STATE_FILE))
    dist.barrier()
    return str(tag)


def load_checkpoint(engine: Any, load_dir: str, tag: str | None = None) -> str:
    """Resume from :func:`save_checkpoint` at any world size: model weights, fp32 masters,
    MuonClip state, lr scheduler and step counters. Returns the tag."""
    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag), FULL_STATE_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: the checkpoint was not written by "
                         "dist_muonclip.deepspeed.save_checkpoint (engine.save_checkpoint resumes only at the same "
                         "world size, through engine.load_checkpoint)")
    engine.load_checkpoint(load_dir, tag=tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    state = torch.load(path, map_location="cpu", weights_only=False)
    load_full_state_dict(engine, state)
    model_sd = torch.load(os.path.join(load_dir, str(tag), "mp_rank_00_model_states.pt"), map_location="cpu",
                          weights_only=False)
    if engine.lr_scheduler is not None and model_sd.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model_sd["lr_scheduler"])
    engine.global_steps = model_sd.get("global_steps", engine.global_steps)
    engine.global_samples = model_sd.get("global_samples", engine.global_samples)
    engine.skipped_steps = model_sd.get("skipped_steps", engine.skipped_steps)
    return str(tag)


# --------------------------------------------------------------------------------------------
# A small DeepSpeed training entry point (launchers and tests run it)
# --------------------------------------------------------------------------------------------

def _tiny_llama(args: Any) -> nn.Module:
    import transformers as tf

    torch.manual_seed(args.seed)
    cfg = tf.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.hidden_size * 3 // 2,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(128, args.seq_len), attn_implementation="eager")
    return tf.AutoModelForCausalLM.from_config(cfg)


def _global_batch(step: int, args: Any) -> Tensor:
    """The global batch of ``step``: identical for every world size (rank r takes its rows)."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step)
    # learnable sequences: each row is an arithmetic progression mod vocab (random start, stride 1..4)
    start = torch.randint(0, args.vocab_size, (args.global_batch, 1), generator=g)
    stride = torch.randint(1, 5, (args.global_batch, 1), generator=g)
    return (start + stride * torch.arange(args.seq_len)) % args.vocab_size


def train_engine(engine: Any, batch_for_step: Callable[[int], Tensor], *, steps: int, start: int = 0,
                 log: Callable[[str], None] | None = None) -> list[float]:
    """Train a causal LM DeepSpeed engine for ``steps`` steps; ``batch_for_step(t)`` gives this
    rank's token ids ``[micro_batch * grad_accum, seq]``. Returns the global mean loss per step.

    The loop is DeepSpeed's: ``engine(...)``, ``engine.backward(loss)``, ``engine.step()`` per
    micro batch (DeepSpeed steps the optimizer at the accumulation boundary).
    """
    gas = engine.gradient_accumulation_steps()
    losses = []
    for t in range(start, start + steps):
        ids = batch_for_step(t)
        total = torch.zeros(())
        for micro in ids.chunk(gas):
            loss = engine(input_ids=micro, labels=micro).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float() / gas
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(float(total))
        if log is not None:
            log(f"step {t + 1}/{start + steps} loss {losses[-1]:.4f} lr {engine.get_lr()[0]:.3g}")
    return losses


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m dist_muonclip.deepspeed --deepspeed_config configs/zero1.json --steps 10``.

    Trains a tiny Llama (built from a config, no download) on deterministic random tokens with
    MuonClip from the config's optimizer section. Works under the ``deepspeed`` launcher,
    ``torchrun``, ``mpirun`` (via ``python -m dist_muonclip.launch_env``) or alone. Rank 0 writes
    ``--out`` (losses, world size, a parameter checksum).
    """
    import argparse

    import deepspeed

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all ranks")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON log written by rank 0")
    p.add_argument("--save-dir", default=None, help="save a checkpoint at the end (save_checkpoint)")
    p.add_argument("--resume-dir", default=None, help="resume from save_checkpoint output (any world size)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")))
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if args.deepspeed_config is None:
        p.error("--deepspeed_config is required (e.g. configs/zero1.json)")
    if os.environ.get("DIST_MUONCLIP_DS_SHM", "1") == "0":
        disable_shm_comm()
    owns_group = not dist.is_initialized()
    if owns_group:
        deepspeed.init_distributed()
    result = _main_run(p, args)
    if owns_group:
        # A process group still alive at interpreter exit can abort in gloo's thread teardown
        # ("terminate called without an active exception"): leave together, then destroy.
        # (Not on an exception: the other ranks may never reach the barrier.)
        dist.barrier()
        dist.destroy_process_group()
    return result


def _main_run(p: Any, args: Any) -> dict[str, Any]:
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = _load_json(args.deepspeed_config)
    gas = int(cfg.get("gradient_accumulation_steps", 1))
    if args.global_batch % (world * gas):
        p.error(f"--global-batch {args.global_batch} must be divisible by world size x accumulation = {world * gas}")
    cfg["train_batch_size"] = args.global_batch
    cfg["train_micro_batch_size_per_gpu"] = args.global_batch // (world * gas)
    args.deepspeed_config = None
    model = _tiny_llama(args)
    engine, *_ = initialize(args=args, model=model, config=cfg)
    start = 0
    if args.resume_dir:
        load_checkpoint(engine, args.resume_dir)
        start = int(engine.global_steps)
    per = args.global_batch // world

    def batch(t: int) -> Tensor:
        return _global_batch(t, args)[rank * per:(rank + 1) * per]

    say = print if rank == 0 else None
    losses = train_engine(engine, batch, steps=args.steps - start, start=start, log=say)
    if args.save_dir:
        save_checkpoint(engine, args.save_dir, tag=f"step{args.steps}")
    masters = full_state_dict(engine)["masters"]
    result = {"world_size": world, "layout": engine._dist_muonclip.layout_name, "start": start, "losses": losses,
              "checksum": {k: float(v.double().sum()) for k, v in masters.items()},
              "zero_stage": engine.zero_optimization_stage(), "bf16": bool(engine.bfloat16_enabled())}
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
