"""``MuonClip``: Muon for hidden matrices + AdamW for the rest + per-head QK-Clip, one optimizer.

The math lives in pure functions (``functional``, ``newton_schulz``, ``qk_clip``); this class
collects state and dispatches. ``step()`` reads as its phases (DESIGN.md):

    preflight  -> one host read: non-finite gradient flags and max logits
    Muon       -> per bucket of same-shape matrices: momentum, orthogonalize (batched NS), apply
    AdamW      -> torch's own (foreach/fused) AdamW kernels on the remaining parameters
    QK-Clip    -> rescale W_q / W_k rows of heads whose max logit exceeded tau (Kimi K2)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

from .comm import Comm, CommAccountant
from .functional import ADJUST_LR_FNS, muon_apply_, muon_momentum_, update_scale
from .newton_schulz import orthogonalize, validate_ns_options
from .param_split import ParamInfo, as_matrices, format_split, matrix_shape, split_parameters
from .layouts import Layout, Replicated, piece_row_scale
from .plan import (Bucket, MatrixItem, Segment, bucket_by_size, build_plan, chunk_ranges, flat_partition,
                   split_on_ranges, split_stacked)

__all__ = ["MuonClip"]

_STATE_FORMAT = "dist_muonclip.v1"
_MUON_KEYS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_backend", "ns_dtype", "ns_eps",
              "adjust_lr_fn")
_ADAMW_KEYS = ("betas", "eps")
# DDP's default bucket caps (torch.nn.parallel.DistributedDataParallel: bucket_cap_mb=25, and
# dist._DEFAULT_FIRST_BUCKET_BYTES for the first bucket, so the first reduction starts early)
_DEFAULT_BUCKET_CAP_MB = 25.0
_FIRST_BUCKET_BYTES = 1024 * 1024


class UnsupportedParameterError(TypeError, RuntimeError):
    """A parameter MuonClip cannot optimize (complex, integer). A TypeError (our rule for bad
    input) that is also the RuntimeError torch.optim.Muon raises for complex parameters, so code
    catching torch's error class keeps working; raised at construction, before any state."""


def _check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
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


def _check_lr(name: str, value: Any) -> float | Tensor:
    """Validate a learning rate; a 1-element tensor stays that tensor (torch.optim's tensor-lr
    semantics: the step computes with it, and LR schedulers ``fill_`` it in place)."""
    _check_float(name, value, low=0.0)
    return value if isinstance(value, Tensor) else float(value)


def _check_betas(name: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    return (_check_float(f"{name}[0]", betas[0], low=0.0, high=1.0, high_open=True),
            _check_float(f"{name}[1]", betas[1], low=0.0, high=1.0, high_open=True))


def _group_param_list(params: Any, gi: int) -> list[Any]:
    """A group's ``params`` as a list, as torch.optim reads it (a Tensor alone is one parameter)."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"param group {gi}: 'params' is a set, whose order changes between runs; use a list "
                        "(optimizer parameters need to be organized in ordered collections, as in torch.optim)")
    return list(params)


def _names_given(params: Sequence[Any], gi: int) -> bool:
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


def _check_adjust_lr_fn(adjust_lr_fn: Any) -> str:
    """``None`` is torch.optim.Muon's default and means its "original" scale (not our default)."""
    if adjust_lr_fn is None:
        return "original"
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported: adjust_lr_fn must be one "
                         f"of {ADJUST_LR_FNS} or None (torch.optim.Muon's default, meaning 'original')")
    return adjust_lr_fn


class MuonClip(Optimizer):
    r"""Muon + AdamW + QK-Clip in one ``torch.optim.Optimizer``.

    Args:
        model_or_params: an ``nn.Module`` (parameters are split automatically, see
            :func:`dist_muonclip.param_split.split_parameters`; QK-Clip finds its attention
            layers), or an iterable of parameters / ``(name, parameter)`` pairs / param groups.
            Groups carry ``use_muon`` (default ``True``, like ``torch.optim.Muon``; 1-D parameters
            must go in a ``use_muon=False`` group).
        lr: learning rate of the Muon part, and of the AdamW part unless ``adamw_lr`` is given.
            With ``adjust_lr_fn="match_rms_adamw"`` Muon's update has AdamW's RMS, so one lr
            tuned for AdamW serves both (Moonlight, arXiv 2502.16982). A 1-element tensor keeps
            torch.optim's tensor-lr semantics (the step computes with the tensor).
        momentum, nesterov: Muon momentum (EMA form of ``torch.optim.Muon``).
        weight_decay: decoupled weight decay of the Muon part (and of AdamW unless
            ``adamw_weight_decay`` is given): ``W <- W - lr * weight_decay * W``.
        ns_steps, ns_coefficients, ns_backend, ns_dtype, ns_eps: Newton-Schulz options, see
            :func:`dist_muonclip.newton_schulz.orthogonalize`. ``ns_dtype`` also takes
            ``"bfloat16"``/``"float32"`` (JSON configs). bf16 is the fast default; float32 makes
            runs reproducible across reduction orders (engine-equivalence tests use it).
        adjust_lr_fn: ``"match_rms_adamw"`` (0.2 sqrt(max(m, n))), ``"original"`` (Keller Jordan's
            sqrt(max(1, m/n))), ``"none"`` or ``"rms_0.4"`` (0.4 sqrt(max(m, n)), GAD-cell/muon-clip's
            scale); ``None`` means ``"original"``, as in torch.optim.Muon.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part. ``None`` lr/decay
            mean "same as the Muon part".
        qk_clip: ``None`` = on with defaults when ``model_or_params`` is a model whose attention
            layers are found, else off; ``False`` = off; ``True``, a dict or a
            :class:`~dist_muonclip.qk_clip.QKClipConfig` = on (an error if no layer is found).
        model_config: HF config (or dict with head counts) for QK-Clip layer discovery when the
            model does not carry one.
        muon_patterns, adamw_patterns: name globs overriding the automatic split.
        skip_nonfinite: skip (and warn about) parameters whose gradient has inf/nan this step,
            leaving their state untouched. The test is on the *reduced* gradient in every mode
            (DDP, optimizer-owned reduction, sharded layouts), so all ranks skip the same
            parameters, and a gradient that is non-finite on any one rank skips that parameter
            everywhere; the others step normally, and ``max_grad_norm`` measures them alone.
            Costs one device->host read per step.
        adamw_foreach, adamw_fused: passed to torch's AdamW kernels.
        process_group: the data-parallel group. Default: the world group when
            ``torch.distributed`` is initialized (ZeRO-1 mode), else single process.
        grad_reduction: ``"external"`` (DDP, DeepSpeed ZeRO-0 or anything else all-reduces the
            gradients; owners orthogonalize and the updates are all-gathered) or ``"optimizer"``
            (no DDP: the optimizer reduces gradients straight to their owners from
            post-accumulate-grad hooks, overlapping backward; use :meth:`no_sync` to accumulate).
            As with DDP, the reduction reads ``p.grad`` when backward produces it: changes made to
            ``p.grad`` after backward are not seen.
        bucket_cap_mb: ``grad_reduction="optimizer"``: size cap (MiB) of the communication
            buckets, DDP's ``bucket_cap_mb``. Like DDP, gradients are bucketed in reverse
            registration order for the first step, then in the order the first backward really
            produced them (rank 0's order, one small broadcast after the first step); a bucket's
            reductions start as soon as all its gradients exist; the first bucket is capped at
            1 MiB, like DDP's. Independent of the same-shape Newton-Schulz buckets.
        shard_adamw: keep AdamW state sharded (each rank updates an equal flat slice and the
            slices are all-gathered). ``False`` updates AdamW parameters redundantly everywhere.
        accountant: a :class:`~dist_muonclip.comm.CommAccountant` counting this optimizer's
            collectives (calls, bytes) per step.
        layout: where parameter elements live (:mod:`dist_muonclip.layouts`). Default
            :class:`~dist_muonclip.layouts.Replicated`; FSDP2 and DeepSpeed ZeRO-1/2 integrations
            pass their sharded layouts.
        log_dir, wandb_run, log_every: write :meth:`metrics` every ``log_every`` steps to
            TensorBoard (``log_dir``) and/or W&B (``wandb_run="auto"``: the active run), on rank 0;
            one device->host read per logged step (:class:`dist_muonclip.metrics.MetricsLogger`).
        max_grad_norm: clip the global norm of the (reduced) gradient to this value before
            momentum and Newton-Schulz, in every mode (DDP, optimizer-owned reduction, sharded
            layouts). Clipping the orthogonalized update instead would be a no-op on its norm.
        profiler: an object whose ``phase(name)`` returns a context manager timing that phase of
            ``step()`` (preflight, reduce, ns, gather, scatter, apply, adamw, qk_clip); see
            :mod:`dist_muonclip.profiler`.
        verbose: print the parameter split at construction.

    ``step(closure=None, s_max=None)``: ``s_max`` optionally gives per-layer, per-head max
    logits (list of per-layer sequences/tensors, or a ``[num_layers, num_heads]`` tensor) for
    models that track them themselves (seed API of efficient-muonclip).
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Any],
        *,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_coefficients: Any = "jordan",
        ns_backend: str = "auto",
        ns_dtype: torch.dtype | str = torch.bfloat16,
        ns_eps: float = 1e-7,
        adjust_lr_fn: str = "match_rms_adamw",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        qk_clip: Any = None,
        model_config: Any = None,
        muon_patterns: Sequence[str] = (),
        adamw_patterns: Sequence[str] = (),
        skip_nonfinite: bool = True,
        adamw_foreach: bool | None = None,
        adamw_fused: bool | None = None,
        process_group: Any = None,
        grad_reduction: str = "external",
        shard_adamw: bool = True,
        accountant: CommAccountant | None = None,
        layout: Layout | None = None,
        log_dir: str | None = None,
        wandb_run: Any = None,
        log_every: int = 1,
        profiler: Any = None,
        max_grad_norm: float | None = None,
        bucket_cap_mb: float = _DEFAULT_BUCKET_CAP_MB,
        verbose: bool = False,
    ) -> None:
        # -- validate everything before any state exists ------------------------------------
        lr = _check_lr("lr", lr)
        momentum = _check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        weight_decay = _check_float("weight_decay", weight_decay, low=0.0)
        ns_eps = _check_float("ns_eps", ns_eps, low=0.0, low_open=True)
        ns_coefficients, ns_steps, ns_dtype, ns_backend = validate_ns_options(
            ns_coefficients, ns_steps, ns_dtype, ns_backend)
        adjust_lr_fn = _check_adjust_lr_fn(adjust_lr_fn)
        adamw_lr = lr if adamw_lr is None else _check_lr("adamw_lr", adamw_lr)
        adamw_betas = _check_betas("adamw_betas", adamw_betas)
        adamw_eps = _check_float("adamw_eps", adamw_eps, low=0.0, low_open=True)
        adamw_weight_decay = (weight_decay if adamw_weight_decay is None
                              else _check_float("adamw_weight_decay", adamw_weight_decay, low=0.0))
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")

        self._muon_defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                   ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_backend=ns_backend,
                                   ns_dtype=ns_dtype, ns_eps=ns_eps, adjust_lr_fn=adjust_lr_fn)
        self._adamw_defaults = dict(lr=adamw_lr, weight_decay=adamw_weight_decay, betas=adamw_betas,
                                    eps=adamw_eps)
        self._names: dict[Tensor, str] = {}
        self._views: dict[Tensor, str] = {}
        self._param_order: dict[Tensor, int] = {}   # registration order (model order when given a model)
        model = model_or_params if isinstance(model_or_params, nn.Module) else None
        groups, split = self._build_groups(model_or_params, muon_patterns, adamw_patterns)
        self._split = split
        self.skip_nonfinite = bool(skip_nonfinite)
        self.adamw_foreach = adamw_foreach
        self.adamw_fused = adamw_fused

        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self._step_count_total = 0
        self._last_metrics: dict[str, Tensor] = {}
        self._clipper = self._build_clipper(model, qk_clip, model_config)
        self._ml_shape = tuple(self._clipper.max_logits(None).shape) if self._clipper is not None else None
        self._plan = None
        self.profiler = profiler
        self.max_grad_norm = None if max_grad_norm is None else _check_float("max_grad_norm", max_grad_norm, low=0.0,
                                                                             low_open=True)
        self._clip_coef: Tensor | None = None
        self._grad_norm: Tensor | None = None
        self.bucket_cap_mb = _check_float("bucket_cap_mb", bucket_cap_mb, low=0.0, low_open=True)
        self._setup_distribution(process_group, grad_reduction, shard_adamw, accountant, layout)
        init_state = getattr(self._layout, "init_optimizer_state", None)
        if init_state is not None:     # e.g. FSDP2: all state exists eagerly, so DCP sees the same keys everywhere
            init_state(self)
        self._logger = None
        if (log_dir is not None or wandb_run is not None) and self.rank == 0:
            from .tools.metrics import MetricsLogger

            self._logger = MetricsLogger(log_dir, wandb_run=wandb_run, every=log_every)
        if profiler is not None and hasattr(profiler, "attach"):
            profiler.attach(self)          # idempotent; needs the accountant and comm set up above
        if verbose:
            print(self.describe_split())

    # ------------------------------------------------------------------ construction
    def _build_groups(self, model_or_params: Any, muon_patterns: Sequence[str],
                      adamw_patterns: Sequence[str]) -> tuple[list[dict], list[ParamInfo] | None]:
        if isinstance(model_or_params, nn.Module):
            infos = split_parameters(model_or_params, muon_patterns=muon_patterns, adamw_patterns=adamw_patterns)
            if not infos:
                raise ValueError("model_or_params: the model has no trainable parameters")
            for info in infos:
                self._names[info.param] = info.name
                self._views[info.param] = info.view
                self._param_order.setdefault(info.param, len(self._param_order))
            self._names_given = None    # names come from the model: added groups may be either kind
            groups = []
            muon = [i.param for i in infos if i.use_muon]
            adamw = [i.param for i in infos if not i.use_muon]
            if muon:
                groups.append({"params": muon, "use_muon": True})
            if adamw:
                groups.append({"params": adamw, "use_muon": False})
            return groups, infos
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
        names_given = False
        for gi, g in enumerate(groups):
            if "params" not in g:
                raise ValueError(f"param group {gi} has no 'params' key")
            params = _group_param_list(g["params"], gi)
            named = _names_given(params, gi)
            if gi > 0 and named != names_given:       # torch.optim's rule and message
                raise ValueError("all optimizer param groups should be with/without names. cannot add param group "
                                 f"{'with' if named else 'without'} names to the optimizer (group {gi}; group 0 "
                                 f"is {'with' if names_given else 'without'}): name all parameters or none")
            names_given = named
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
                self._names[p] = name
                self._param_order.setdefault(p, len(self._param_order))
                view = "matrix" if p.ndim == 2 else ("flatten" if p.ndim > 2 else "vector")
                self._views[p] = view
                plain.append(p)
            g["params"] = plain
            g.pop("param_names", None)
        self._names_given = names_given
        return groups, None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its type (``use_muon``) decides which defaults fill missing keys.

        After construction (a collective when distributed: every rank adds the same group): the
        new parameters are checked against the layout (FSDP2: ``(Shard(0),)`` DTensors on the
        mesh) before anything changes, every rank re-plans, the state of matrices whose owner
        moved travels to the new owner (one object all-gather, only then), and layouts that
        create state eagerly (FSDP2, for DCP) create the new parameters' state.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        g = dict(param_group)
        if "params" not in g:
            raise ValueError("param_group has no 'params' key")
        params = _group_param_list(g["params"], len(self.param_groups))
        if getattr(self, "_plan", None) is not None and self._names_given is not None:   # after construction
            named = _names_given(params, len(self.param_groups))
            if named != self._names_given:      # torch.optim's rule and message
                raise ValueError("all optimizer param groups should be with/without names. cannot add param group "
                                 f"{'with' if named else 'without'} names to the optimizer (its groups are "
                                 f"{'with' if self._names_given else 'without'})")
        g["params"] = params
        use_muon = g.setdefault("use_muon", True)
        if not isinstance(use_muon, bool):
            raise TypeError(f"use_muon must be a bool, got {use_muon!r}")
        defaults = self._muon_defaults if use_muon else self._adamw_defaults
        for k, v in defaults.items():
            g.setdefault(k, v)
        existing = {p for grp in self.param_groups for p in grp["params"]}
        taken = {self._names[p] for p in existing if p in self._names}
        plain, names = [], []
        for i, item in enumerate(params):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
            else:
                p = item
                name = self._names.get(p, f"group{len(self.param_groups)}.param{i}") if isinstance(p, Tensor) \
                    else f"group{len(self.param_groups)}.param{i}"
            if not isinstance(p, Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a Tensor")
            if not p.is_floating_point():
                raise UnsupportedParameterError(
                    f"parameter {name!r} has dtype {p.dtype}; MuonClip optimizes real floating-point parameters "
                    "only (Muon does not support complex parameters; leave integer buffers out of the optimizer)")
            if p in existing:
                raise ValueError(f"parameter {name!r} is already in another param group; each parameter "
                                 "may be in one group only")
            if name in taken and self._names.get(p) != name:
                raise ValueError(f"parameter name {name!r} is already used by another parameter; names key the "
                                 "optimizer state and must be unique")
            if use_muon and p.ndim < 2:
                raise ValueError(f"parameter {name!r} of shape {tuple(p.shape)} is in a use_muon=True group, "
                                 "but Muon needs a matrix (>= 2 dims); put it in a group with use_muon=False")
            plain.append(p)
            names.append(name)
        g["params"] = plain
        self._validate_group(g)
        after_init = getattr(self, "_plan", None) is not None   # torch's __init__ adds the first groups
        if after_init:     # construction checks the first groups in _setup_distribution
            self._check_layout(plain, dict(zip(plain, names)))
        for p, name in zip(plain, names):      # register only once the group is known to be valid
            self._names.setdefault(p, name)
            self._views.setdefault(p, "matrix" if p.ndim == 2 else ("flatten" if p.ndim > 2 else "vector"))
            self._param_order.setdefault(p, len(self._param_order))
        old_owners = self._unit_owners() if after_init else None
        super().add_param_group(g)
        if after_init:   # re-plan on every rank
            self._replan()
            self._migrate_moved_state(old_owners)
            if self._owns_reduction:
                for p in plain:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
            init_state = getattr(self._layout, "init_optimizer_state", None)
            if init_state is not None:    # e.g. FSDP2: state exists eagerly so DCP sees the same keys everywhere
                init_state(self)

    def _check_layout(self, params: Sequence[Tensor], names: dict[Tensor, str]) -> None:
        """Refuse parameters the layout cannot hold, naming them (before any state exists)."""
        if self._layout.sharded:
            for p in params:
                try:
                    self._layout.validate([p], names, self.world_size, self.rank)
                except KeyError as e:     # a layout given explicit per-name ranges (FlatRangesLayout)
                    raise ValueError(f"parameter {names.get(p, '<unnamed>')!r} is not known to the layout "
                                     f"{type(self._layout).__name__} ({e}); give the layout its ranges") from None
            return
        for p in params:
            if hasattr(p, "placements") and hasattr(p, "device_mesh"):   # a DTensor (FSDP2, tensor parallel)
                raise ValueError(
                    f"parameter {names.get(p, '<unnamed>')!r} is a DTensor with placements {tuple(p.placements)} "
                    "(FSDP2 / tensor parallel) but the layout is Replicated; for fully_shard models use "
                    "dist_muonclip.fsdp.make_muonclip(model, ...) or pass layout=dist_muonclip.fsdp."
                    "Shard0Layout(mesh), process_group=mesh.get_group()")

    def _unit_owners(self) -> dict[str, tuple[int, str]] | None:
        """Replicated layout, distributed: Muon unit name -> (owner, its parameter's name)."""
        if self._comm is None or self._layout.sharded:
            return None      # sharded layouts keep state on the local pieces, whoever owns the matrix
        return {n: (o, self._names[self._unit_param(self._by_name[n])]) for n, o in self._plan.owners.items()}

    def _migrate_moved_state(self, old: dict[str, tuple[int, str]] | None) -> None:
        """After a re-plan, move the momentum of matrices whose owner changed to the new owner.

        The decision depends on the plans only (identical everywhere), so every rank takes part
        in the one ``all_gather_object`` of the moved parameters' state, or none does.
        """
        if old is None:
            return
        moved = {pname for n, (o, pname) in old.items() if self._plan.owners.get(n) != o}
        if not moved:
            return
        local = {n: s for n, s in self._local_state().items() if n in moved}
        full = self._merge_states(self._comm.all_gather_object(local))
        params = {self._by_name[n] for n in moved}
        for p in params:
            for t in (p, *self._slabs_of.get(p, ())):
                self.state.pop(t, None)
        self.state.update(self._states_from_full(full, params))

    def _validate_group(self, g: dict[str, Any]) -> None:
        _check_float("lr", g["lr"], low=0.0)
        _check_float("weight_decay", g["weight_decay"], low=0.0)
        if g["use_muon"]:
            _check_float("momentum", g["momentum"], low=0.0, high=1.0, high_open=True)
            (g["ns_coefficients"], g["ns_steps"], g["ns_dtype"], g["ns_backend"]) = validate_ns_options(
                g["ns_coefficients"], g["ns_steps"], g["ns_dtype"], g["ns_backend"])
            g["adjust_lr_fn"] = _check_adjust_lr_fn(g["adjust_lr_fn"])
        else:
            g["betas"] = _check_betas("betas", g["betas"])
            _check_float("eps", g["eps"], low=0.0, low_open=True)

    def _build_clipper(self, model: nn.Module | None, qk_clip: Any, model_config: Any):
        if qk_clip is False or (qk_clip is None and model is None):
            return None
        try:
            from .qk_clip import QKClipper, QKClipConfig
        except ImportError:
            if qk_clip is None:
                return None
            raise
        if model is None:
            raise ValueError("qk_clip needs the model (pass the nn.Module as model_or_params) to find its "
                             "attention layers")
        config = QKClipConfig.from_any(qk_clip)
        if not config.enable:
            return None
        if qk_clip is None:
            try:
                return QKClipper(model, config, model_config=model_config)
            except LookupError:  # auto mode: a model without attention layers has nothing to clip
                return None
        return QKClipper(model, config, model_config=model_config)

    # ------------------------------------------------------------------ introspection
    def describe_split(self) -> str:
        """The Muon/AdamW split as a printable table."""
        if self._split is not None:
            return format_split(self._split)
        infos = [ParamInfo(self._names[p], p, g["use_muon"], "param group", self._views[p])
                 for g in self.param_groups for p in g["params"]]
        return format_split(infos)

    @property
    def qk_clipper(self):
        """The :class:`~dist_muonclip.qk_clip.QKClipper` in use, or ``None``."""
        return self._clipper

    def param_name(self, p: Tensor) -> str:
        return self._names[p]

    @property
    def layout(self) -> Layout:
        """Where parameter elements live on this rank (:mod:`dist_muonclip.layouts`)."""
        return self._layout

    @property
    def plan(self):
        """The :class:`~dist_muonclip.plan.Plan`: owners and same-shape buckets of the Muon matrices."""
        return self._plan

    @property
    def comm(self) -> Comm | None:
        """The :class:`~dist_muonclip.comm.Comm` of the data-parallel group (``None``: single process)."""
        return self._comm

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken (restored by ``load_state_dict``)."""
        return self._step_count_total

    def device_metrics(self) -> dict[str, Tensor]:
        """The last step's metrics as device scalars (no sync): ``muon_update_rms``, ``grad_norm``,
        ``num_skipped`` and, with QK-Clip, ``qk_clip/*`` (max logit per layer before the clip,
        heads clipped, min eta)."""
        out = dict(self._last_metrics)
        if self._clipper is not None:
            out.update(self._clipper.metrics())
        return out

    def close(self) -> None:
        """Flush and close the metric sinks and stop max-logit tracking (restores the model's
        attention implementation)."""
        if self._logger is not None:
            self._logger.close()
        if self._clipper is not None:
            self._clipper.close()

    def metrics(self) -> dict[str, float]:
        """:meth:`device_metrics` as plain floats, with exactly one device->host read."""
        from .tools.metrics import to_host

        return to_host(self.device_metrics())

    # ------------------------------------------------------------------ distribution
    def _setup_distribution(self, process_group: Any, grad_reduction: str, shard_adamw: bool,
                            accountant: CommAccountant | None, layout: Layout | None) -> None:
        if grad_reduction not in ("external", "optimizer"):
            raise ValueError(f"grad_reduction={grad_reduction!r} is unknown; use 'external' (DDP/DeepSpeed reduce "
                             "gradients) or 'optimizer' (the optimizer reduce-scatters them to owners)")
        self._comm: Comm | None = None
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            comm = Comm(process_group, accountant)
            # a sharded layout needs the all-to-alls even on one rank (FSDP2 at W=1: e.g. DCP resume at W=1)
            if comm.world_size > 1 or grad_reduction == "optimizer" or (layout is not None and layout.sharded):
                self._comm = comm
        self.accountant = accountant
        self.grad_reduction = grad_reduction
        self.shard_adamw = bool(shard_adamw)
        self.rank = self._comm.rank if self._comm else 0
        self.world_size = self._comm.world_size if self._comm else 1
        self._reduced: dict[Tensor, Tensor] = {}
        self._adamw_slices: dict[tuple, Tensor] = {}
        self._launched: list[Any] = []
        self._ready: set[Tensor] = set()
        self._sync_enabled = True
        self._hooks: list[Any] = []
        self._layout = layout if layout is not None else Replicated(self.world_size)
        if not isinstance(self._layout, Layout):
            raise TypeError(f"layout must be a dist_muonclip.layouts.Layout, got {type(layout).__name__}")
        if not self._layout.sharded:
            self._check_layout([p for g in self.param_groups for p in g["params"]], self._names)
        if self._layout.sharded and grad_reduction == "optimizer":
            raise ValueError("grad_reduction='optimizer' needs the Replicated layout; with a sharded layout the "
                             "sharding engine (FSDP2, DeepSpeed) already reduces gradients: use 'external'")
        if self._layout.sharded:
            self._layout.validate([p for g in self.param_groups for p in g["params"]], self._names,
                                  self.world_size, self.rank)
        self._replan()
        if self._owns_reduction:
            for g in self.param_groups:
                for p in g["params"]:
                    if p.requires_grad:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def _replan(self) -> None:
        """Deterministic plan of owners, buckets and AdamW slices; validated across ranks."""
        self._by_name = {self._names[p]: p for g in self.param_groups for p in g["params"]}
        self._group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        items = []
        for gi, g in enumerate(self.param_groups):
            if not g["use_muon"]:
                continue
            for p in g["params"]:
                b, m, n = matrix_shape(p.shape, self._views[p])
                items.append(MatrixItem(self._names[p], gi, b, m, n, str(p.dtype), g["ns_steps"]))
        layout = getattr(self, "_layout", None)
        sharded = layout is not None and layout.sharded
        # fused MoE experts [E, m, n]: chunks of experts get owners of their own. Replicated: min(E, W)
        # equal chunks placed by LPT; sharded: the chunks each rank holds (no expert travels)
        if sharded:
            items = self._split_on_layout(items)
        elif self.world_size > 1:
            # a slab must be a view of its parameter (updates land in place): non-contiguous stacks stay whole
            whole = [i for i in items if not self._by_name[i.name].is_contiguous()]
            items = whole + split_stacked([i for i in items if self._by_name[i.name].is_contiguous()],
                                          self.world_size)
        self._build_slabs(items, meta=sharded)
        hint = getattr(layout, "owner_hint", None) if sharded else None
        preferred = {}
        if sharded:   # sharded layouts: orthogonalize a matrix where (most of) it lives
            for g in self.param_groups:
                if g["use_muon"]:
                    for p in g["params"]:
                        r = hint(p) if hint is not None else None
                        if r is not None:
                            preferred[self._names[p]] = r
            for slab in self._slab_parent:
                sizes = [sum(b - a for a, b in rs) for rs in self._lay_ranges(slab)]
                preferred[self._names[slab]] = max(range(len(sizes)), key=lambda r: (sizes[r], -r))
        self._plan = build_plan(items, self.world_size, preferred)
        # AdamW: per (group, dtype, device) one flat partition in parameter order
        self._partitions = []
        for gi, g in enumerate(self.param_groups):
            if g["use_muon"] or getattr(self, "_layout", None) is not None and self._layout.sharded:
                continue   # sharded layouts: AdamW runs on the local pieces, no partition needed
            by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in g["params"]:
                by_kind[(str(p.dtype), str(p.device))].append(p)
            for kind, params in by_kind.items():
                shard = self.shard_adamw and self.world_size > 1
                chunk, segs = flat_partition([(self._names[p], p.numel()) for p in params],
                                             self.world_size if shard else 1)
                mine = segs[self.rank] if shard else segs[0]
                self._partitions.append(_Partition(gi, kind, params, chunk, segs, mine, shard))
        self._grad_order: list[Tensor] = []        # hook order seen in backward, until buckets are rebuilt
        self._bucket_order: list[Tensor] | None = None
        self._comm_buckets = self._build_comm_buckets() if self._owns_reduction else []
        if self._comm is not None:
            self._check_plan_across_ranks()

    def _build_comm_buckets(self) -> list["_CommBucket"]:
        """Buckets of the optimizer-owned gradient reduction (see ``bucket_cap_mb``).

        Every gradient element goes to the rank that needs it reduced: a Muon matrix (or chunk of
        experts) to its owner, an AdamW element to the rank holding it in its flat slice, or, for
        unsharded AdamW, to every rank (all-reduce). Parameters are bucketed in backward order
        (:func:`~dist_muonclip.plan.bucket_by_size`): reverse registration order at first, the
        order the first backward really produced afterwards (:meth:`_rebuild_buckets`, as DDP
        rebuilds its buckets after the first iteration); inside a bucket the flat buffer is sorted by
        destination, so each destination's elements are one contiguous region: one reduce per
        destination (what DeepSpeed ZeRO-1/2 issues per partition), in place, so no rank ever
        holds more than the bucket itself (an all-to-all to owners would receive W copies).
        """
        routes: dict[Tensor, list[tuple[int, int, int | None, tuple]]] = defaultdict(list)
        for g in self.param_groups:
            if not g["use_muon"]:
                continue
            for p in g["params"]:
                slabs = self._slabs_of.get(p)
                if not slabs:
                    routes[p].append((0, p.numel(), self._owner(p), ("muon", p)))
                    continue
                for slab in slabs:      # chunks of stacked experts: contiguous flat ranges of p
                    _, a, b = self._slab_parent[slab]
                    per = slab[0].numel()
                    routes[p].append((a * per, b * per, self._owner(slab), ("muon", slab)))
        for part in self._partitions:
            for r, segs in enumerate(part.segments):
                off = 0
                for seg in segs:
                    if seg.stop > seg.start:
                        routes[self._by_name[seg.name]].append(
                            (seg.start, seg.stop, r if part.sharded else None, ("adamw", part.key, off)))
                    off += seg.stop - seg.start
        order = sorted(routes, key=lambda p: -self._param_order[p])     # backward: reverse registration
        if self._bucket_order is not None:                               # ... or as observed
            seen = [p for p in self._bucket_order if p in routes]
            known = set(seen)
            order = seen + [p for p in order if p not in known]
        sizes = [((p.dtype, p.device), p.numel() * p.element_size()) for p in order]
        cap = int(self.bucket_cap_mb * 1024 * 1024)
        out = []
        for members in bucket_by_size(sizes, cap, _FIRST_BUCKET_BYTES):
            params = [order[i] for i in members]
            flat = [(dest, p, a, b, sink) for p in params for a, b, dest, sink in routes[p]]
            flat.sort(key=lambda t: self.world_size if t[0] is None else t[0])   # stable: param order kept
            pieces, regions, mine, off = [], [], [], 0
            for dest, p, a, b, sink in flat:
                if regions and regions[-1][0] == dest:
                    regions[-1][2] += b - a
                else:
                    regions.append([dest, off, b - a])
                if dest is None or dest == self.rank:
                    mine.append((sink, off, b - a))
                pieces.append((p, a, b))
                off += b - a
            out.append(_CommBucket(tuple(params), tuple(pieces), tuple(tuple(r) for r in regions), tuple(mine), off))
        return out

    def _split_on_layout(self, items: list[MatrixItem]) -> list[MatrixItem]:
        """Chunks of stacked parameters along the sharded layout's cuts (:func:`split_on_ranges`)."""
        out: list[MatrixItem] = []
        for item in items:
            if item.num_matrices < 2:
                out.append(item)
            else:
                out.extend(split_on_ranges(item, self._layout.ranges(self._by_name[item.name])))
        return out

    def _build_slabs(self, items: Sequence[MatrixItem], *, meta: bool = False) -> None:
        """Register the chunks of stacked parameters as units of the Muon engine.

        Replicated layout: a slab is a ``[k, m, n]`` view of its parameter's matrices
        (``as_matrices``) with a name, an owner and a momentum buffer of its own; gradient,
        activity and storage come from the parameter. Sharded layouts (``meta``): a slab is a
        ``[k, m, n]`` meta tensor naming the chunk; its local pieces are slices of the
        parameter's local pieces and its momentum a slice of the parameter's (so checkpoints see
        per-parameter state). Slab objects are cached by (parameter, start, stop), so a re-plan
        that keeps a chunk keeps its state.
        """
        cache = getattr(self, "_slab_cache", {})
        for slab in getattr(self, "_slab_parent", {}):
            self._names.pop(slab, None)
            self._views.pop(slab, None)
        self._slab_parent: dict[Tensor, tuple[Tensor, int, int]] = {}
        self._slabs_of: dict[Tensor, list[Tensor]] = {}
        keep = {}
        for item in items:
            if item.parent is None:
                continue
            p = self._by_name[item.parent]
            key = (id(p), item.start, item.start + item.num_matrices)
            slab = cache.get(key)
            if slab is not None and (slab.device.type == "meta") != meta:
                slab = None
            if slab is None and meta:
                slab = torch.empty((item.num_matrices, item.m, item.n), device="meta")
            elif slab is None:
                with torch.no_grad():
                    slab = as_matrices(p.detach(), self._views[p])[item.start:item.start + item.num_matrices]
            keep[key] = slab
            self._slab_parent[slab] = (p, item.start, item.start + item.num_matrices)
            self._slabs_of.setdefault(p, []).append(slab)
            self._names[slab] = item.name
            self._views[slab] = "batch"
            self._by_name[item.name] = slab
            self._group_of[slab] = self._group_of[p]
        self._slab_cache = keep

    def _refresh_slabs(self) -> None:
        """Re-point slabs whose parameter got new storage (``p.data = ...``, ``model.to(...)``)."""
        for slab, (p, a, b) in self._slab_parent.items():
            if slab.device.type == "meta":
                continue
            full = as_matrices(p.detach(), self._views[p])
            if slab.data_ptr() != full[a:b].data_ptr() or slab.dtype != p.dtype or slab.device != p.device:
                with torch.no_grad():
                    view = full[a:b]
                    slab.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())

    # -- the sharded layout as seen by Muon units (parameters and slabs of stacked parameters) -
    def _lay_ranges(self, t: Tensor) -> list[list[tuple[int, int]]]:
        info = self._slab_parent.get(t)
        if info is None:
            return self._layout.ranges(t)
        p, a, b = info
        return chunk_ranges(a, b, math.prod(t.shape[1:]), self._layout.ranges(p))

    def _lay_slice(self, t: Tensor, flat: Tensor) -> Tensor:
        """The slab's elements within its parameter's local 1-D ``flat`` (one local range)."""
        p, a, b = self._slab_parent[t]
        per = math.prod(t.shape[1:])
        lo, hi = a * per, b * per
        for x, y in self._layout.ranges(p)[self.rank]:
            if y > x:
                s, e = max(x, lo), min(y, hi)
                return flat[s - x:e - x] if e > s else flat[:0]
        return flat[:0]

    def _lay_local_param(self, t: Tensor) -> Tensor:
        if t not in self._slab_parent:
            return self._layout.local_param(t)
        return self._lay_slice(t, self._layout.local_param(self._slab_parent[t][0]))

    def _lay_local_grad(self, t: Tensor) -> Tensor | None:
        if t not in self._slab_parent:
            return self._layout.local_grad(t)
        g = self._layout.local_grad(self._slab_parent[t][0])
        return None if g is None else self._lay_slice(t, g)

    def _lay_full_shape(self, t: Tensor) -> torch.Size:
        return t.shape if t in self._slab_parent else self._layout.full_shape(t)

    def _local_momentum(self, t: Tensor, local: Tensor) -> Tensor:
        """Momentum of this rank's pieces of ``t``: a slab's is a slice of its parameter's."""
        p = self._unit_param(t)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(self._layout.local_param(p) if p is not t else local,
                                                        memory_format=torch.contiguous_format)
        return state["momentum_buffer"] if p is t else self._lay_slice(t, state["momentum_buffer"])

    def _unit_param(self, t: Tensor) -> Tensor:
        """The parameter a Muon unit belongs to (itself unless it is a slab)."""
        info = self._slab_parent.get(t)
        return t if info is None else info[0]

    def _check_plan_across_ranks(self) -> None:
        descr = [(self._names[p], tuple(p.shape), str(p.dtype), bool(g["use_muon"]))
                 for g in self.param_groups for p in g["params"]]
        comm = [([self._names[p] for p in b.params], [r[0] for r in b.regions]) for b in self._comm_buckets]
        digests = self._comm.all_gather_object(((self._plan.digest(), repr(comm)), descr))
        if len({d for d, _ in digests}) == 1:
            return
        base = digests[0][1]
        for r, (_, other) in enumerate(digests):
            if other == base:
                continue
            for i in range(max(len(base), len(other))):
                a = base[i] if i < len(base) else None
                b = other[i] if i < len(other) else None
                if a != b:
                    raise ValueError(f"MuonClip plans differ across ranks: parameter #{i} is {a} on rank 0 but {b} on "
                                     f"rank {r}; every rank must build the optimizer from the same model and groups")
        raise ValueError("MuonClip plans differ across ranks (same parameters, different plan); this is a bug")

    def _owner(self, p: Tensor) -> int:
        return self._plan.owners[self._names[p]]

    def set_layout(self, layout: Layout | None, *, process_group: Any = None) -> None:
        """Move a not-yet-stepped optimizer onto another layout (``None``: Replicated) over
        ``process_group`` (default: the world group when initialized), re-planning on every rank.

        For integrations that partition the model after the optimizer was built (DeepSpeed's
        ZeRO-1/2 flat partitions). Raises if the optimizer already holds state.
        """
        if any(self.state.values()):
            raise ValueError("set_layout: this MuonClip has already stepped (it holds state); move a fresh "
                             "optimizer, or load the state after changing the layout")
        for h in self._hooks:
            h.remove()
        reduction = "external" if layout is not None and layout.sharded else self.grad_reduction
        self._setup_distribution(process_group, reduction, self.shard_adamw, self.accountant, layout)

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation with ``grad_reduction="optimizer"``: backward passes inside this
        context do not launch the reduction (like ``DistributedDataParallel.no_sync``)."""
        old, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = old

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, s_max: Any = None) -> Any:
        """One MuonClip step. ``s_max``: optional per-layer, per-head max logits (see class doc).

        Collective when distributed: every rank of the group must call it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._slab_parent:
            self._refresh_slabs()
        self._launch_reductions()                          # optimizer-owned reduction: buckets not yet launched
        with self._phase("reduce"):
            self._finish_reductions()                      # ... and their results (reduced gradients)
        with self._phase("preflight"):
            pre = self._preflight(s_max)                   # one all-reduce(MAX): flags + max logits
        self._clip_coef = self._grad_clip_coef(pre)        # max_grad_norm on the reduced gradient
        if self._layout.sharded:
            sq_sums = self._sharded_muon(pre)              # momentum, gather, NS, scatter, apply on pieces
            with self._phase("adamw"):
                self._sharded_adamw(pre)
        else:
            pending = [self._muon_bucket(b, pre) for b in self._plan.buckets]   # momentum, NS, launch gather
            sq_sums = [self._finish_bucket(job) for job in pending if job is not None]  # apply as they arrive
            with self._phase("adamw"):
                self._adamw_step(pre)
        if pre.max_logits is not None:
            with self._phase("qk_clip"):
                self._qk_clip_(pre.max_logits)
        self._record_metrics(pre, sq_sums)
        self._end_step()
        if self._logger is not None:     # logged as step N = the N-th completed step
            self._logger.log(self._step_count_total, self.device_metrics())
        return loss

    def _phase(self, name: str):
        """Time a phase of ``step()`` when a profiler is attached (``profiler.phase(name)``)."""
        return self.profiler.phase(name) if self.profiler is not None else contextlib.nullcontext()

    def _grad_clip_coef(self, pre: "_Preflight") -> Tensor | None:
        """``min(1, max_grad_norm / ||g||)`` of the reduced global gradient, applied to the raw
        gradient before momentum and Newton-Schulz (never to the orthogonalized update).

        Each element is counted on exactly one rank (owners' reduced matrices, AdamW slices, local
        pieces of sharded layouts); one scalar all-reduce sums the squares when that differs from
        what every rank already holds.
        """
        self._grad_norm = None
        if self.max_grad_norm is None:
            return None
        with self._phase("clip_grad"):
            return self._global_clip_coef(pre)

    def _global_clip_coef(self, pre: "_Preflight") -> Tensor:
        """Skipped (non-finite) parameters are left out in every mode, so one inf gradient does
        not zero every other parameter's step."""
        sq: list[Tensor] = []
        needs_sum = self._comm is not None
        if self._layout.sharded:
            sq = [g.float().square().sum() for p in pre.active if (g := self._layout.local_grad(p)) is not None]
        elif self._owns_reduction:
            sq = [g.float().square().sum() for p, g in self._held_reduced(once=True) if p in pre.active]
        else:   # replicated gradients: every rank holds the same full gradient
            needs_sum = False
            sq = [p.grad.float().square().sum() for p in pre.active if p.grad is not None]
        device = self._layout.local_param(next(iter(self._by_name.values()))).device
        total = torch.stack([s.to(device) for s in sq]).sum() if sq else torch.zeros((), device=device)
        if needs_sum:
            self._comm.all_reduce(total, tag="grad_norm")
        self._grad_norm = total.sqrt()
        return (self.max_grad_norm / (self._grad_norm + 1e-6)).clamp(max=1.0)

    @property
    def _owns_reduction(self) -> bool:
        """Optimizer-owned reduction is running: reduced gradients live in ``_reduced`` and
        ``_adamw_slices``, ``p.grad`` is this rank's unreduced gradient."""
        return self.grad_reduction == "optimizer" and self._comm is not None

    def _clipped(self, g: Tensor) -> Tensor:
        return g if self._clip_coef is None else g * self._clip_coef.to(g.dtype)

    def _local_max_logits(self, s_max: Any) -> Tensor | None:
        return self._clipper.max_logits(s_max) if self._clipper is not None else None

    def _preflight(self, s_max: Any) -> "_Preflight":
        """Decide, identically on every rank, what this step does; refuse bad max logits early.

        One packed all-reduce(MAX) carries: an error flag, per-parameter has-gradient and
        non-finite-gradient flags, and every layer's per-head max logits (DESIGN.md step 1).
        Non-finite flags come from the reduced gradient pieces each rank holds, so every mode
        skips exactly the parameters whose reduced gradient is non-finite. Only errors raised
        here, before the all-reduce, reach the other ranks through the error flag.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        n, shape = len(params), self._ml_shape
        size = 1 + n * (2 if self.skip_nonfinite else 1) + (math.prod(shape) if shape is not None else 0)
        device = self._layout.local_param(params[0]).device if self._layout.sharded else next(
            (p.grad.device for p in params if p.grad is not None), params[0].device)
        error = None
        try:
            packed = self._local_flags(params, s_max, device)
        except Exception as e:
            if self._comm is None:
                raise
            error = e                  # tell the other ranks instead of leaving them waiting
            packed = torch.zeros(size, device=device)
            packed[0] = 1.0
        assert packed.numel() == size
        if self._comm is not None:
            self._comm.all_reduce(packed, op=dist.ReduceOp.MAX, tag="preflight")
        host = packed.tolist()                             # the one device->host read of the step
        head = host[: 1 + n * (2 if self.skip_nonfinite else 1)]
        if head[0]:
            if error is not None:
                raise error
            raise RuntimeError("MuonClip.step(): another rank failed in step() (see its error); this rank stops "
                               "too instead of waiting for it")
        has_grad = {p for p, h in zip(params, head[1:1 + n]) if h}
        nonfinite = {p for p, f in zip(params, head[1 + n:]) if f} if self.skip_nonfinite else set()
        reduced = None
        if shape is not None:
            k = math.prod(shape)
            reduced = packed[len(packed) - k:].reshape(shape)
            vals = host[len(host) - k:]
            bad = [any(v != v or v == math.inf for v in vals[i * shape[1]:(i + 1) * shape[1]])
                   for i in range(shape[0])]
            if any(bad):
                names = self._clipper.layer_names() if hasattr(self._clipper, "layer_names") else None
                layers = [names[i] if names else str(i) for i, b in enumerate(bad) if b]
                raise ValueError(f"non-finite max attention logits in layer(s) {layers}: the forward pass produced "
                                 "inf/nan attention scores; no parameter or state was changed by this step")
        if nonfinite:
            warnings.warn("MuonClip: non-finite gradient, step skipped (state untouched) for "
                          + ", ".join(sorted(self._names[p] for p in nonfinite)), RuntimeWarning, stacklevel=4)
        return _Preflight(has_grad - nonfinite, nonfinite, reduced)

    def _local_flags(self, params: list[Tensor], s_max: Any, device: torch.device) -> Tensor:
        """``[error=0, has_grad..., non_finite..., max_logits...]`` of this rank, fp32."""
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"parameter {self._names[p]!r} has a sparse gradient; MuonClip needs dense "
                                   "gradients (use nn.Embedding(sparse=False))")
        grads = [self._layout.local_grad(p) if self._layout.sharded else p.grad for p in params]
        parts = [torch.zeros(1, device=device),
                 torch.tensor([g is not None for g in grads], dtype=torch.float32, device=device)]
        if self.skip_nonfinite:
            # the reduced gradient this rank holds: all of it (DDP mode), its pieces (sharded
            # layouts, optimizer-owned reduction); the MAX over ranks then covers every element
            if self._owns_reduction:
                index = {p: i for i, p in enumerate(params)}
                held = [(index[p], g) for p, g in self._held_reduced(once=False)]
            else:
                held = [(i, g) for i, g in enumerate(grads) if g is not None]
            # One multi-tensor L1-norm pass, a launch per dtype and device (isfinite + all per
            # parameter took the preflight to 17.8 ms on an H100 for a 1.2B model, this 3.9 ms:
            # benchmarks/results/multi_gpu_h100x1.json). An inf or nan element makes the sum
            # non-finite, and so does an L1 norm beyond fp32 range: equally a step not to take.
            flags = torch.zeros(len(params), device=device)
            if held:
                norms = torch._foreach_norm([g for _, g in held], 1)
                bad = (~torch.stack([n.float().to(device) for n in norms]).isfinite()).float()
                flags.index_add_(0, torch.tensor([i for i, _ in held], device=device), bad)
            parts.append(flags.clamp_(max=1.0))
        shape = self._ml_shape
        if shape is not None:
            max_logits = self._local_max_logits(s_max)
            if max_logits is None:
                max_logits = torch.full(shape, float("-inf"))
            if tuple(max_logits.shape) != shape:
                raise ValueError(f"max logits have shape {tuple(max_logits.shape)}, expected {shape} (layers x heads)")
            parts.append(max_logits.float().reshape(-1).to(device))
        return torch.cat(parts)

    def _grad(self, p: Tensor) -> Tensor:
        """The reduced gradient of ``p`` as this rank sees it (zeros where the graph gave none)."""
        if p in self._reduced:
            return self._reduced[p]
        info = self._slab_parent.get(p)
        if info is not None:
            q, a, b = info
            return as_matrices(q.grad, self._views[q])[a:b] if q.grad is not None else torch.zeros_like(p)
        return p.grad if p.grad is not None else torch.zeros_like(p)

    # -- optimizer-owned gradient reduction ------------------------------------------------
    def _on_grad_ready(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: launch, in bucket order, every bucket whose gradients all
        exist. Buckets launch in the same order on every rank whatever order hooks fire in."""
        if self._bucket_order is None and p not in self._ready:
            self._grad_order.append(p)
        if not self._sync_enabled:
            return
        self._ready.add(p)
        buckets = self._comm_buckets
        while len(self._launched) < len(buckets):
            bucket = buckets[len(self._launched)]
            # a parameter frozen now has no gradient coming (one unfrozen later has no hook: it
            # keeps its bucket waiting until step(), which launches whatever is left)
            if not all(q in self._ready or not q.requires_grad for q in bucket.params):
                break
            self._launched.append(self._launch_bucket(bucket))

    def _launch_bucket(self, bucket: "_CommBucket") -> tuple:
        """Pack the bucket's gradients (sorted by destination) and start one reduce per
        destination region (all-reduce for unsharded AdamW), in place in the flat buffer."""
        dtype, device = bucket.params[0].dtype, bucket.params[0].device
        parts = []
        for p, a, b in bucket.pieces:
            g = p.grad
            # no gradient on this rank (or a sparse one, which the preflight refuses on every rank): zeros
            parts.append(g.reshape(-1)[a:b] if g is not None and not g.is_sparse
                         else torch.zeros(b - a, dtype=dtype, device=device))
        flat = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype, device=device)
        works = []
        for dest, off, n in bucket.regions:
            view = flat[off:off + n]
            if dest is None:
                works.append(self._comm.all_reduce(view, async_op=True, tag="grad_reduce"))
            else:
                works.append(self._comm.reduce(view, dest, async_op=True, tag="grad_reduce"))
        return bucket, flat, works

    def _launch_reductions(self) -> None:
        """Launch the buckets whose hooks did not all fire (no gradient on this rank, no hooks).

        Runs at the start of ``step()``, so every rank issues the same collectives in the same
        order, whichever gradients it happened to have.
        """
        if not self._owns_reduction:
            return
        while len(self._launched) < len(self._comm_buckets):
            self._launched.append(self._launch_bucket(self._comm_buckets[len(self._launched)]))

    def _finish_reductions(self) -> None:
        """Wait for the reductions; keep (averaged) what this rank needs: its owned matrices in
        ``_reduced`` and its AdamW slice per partition in ``_adamw_slices``."""
        if not self._owns_reduction:
            return
        w = self.world_size
        for part in self._partitions:
            p0 = part.params[0]
            size = part.chunk if part.sharded else sum(q.numel() for q in part.params)
            self._adamw_slices[part.key] = torch.zeros(size, dtype=p0.dtype, device=p0.device)
        for bucket, flat, works in self._launched:
            for work in works:
                work.wait()
            for sink, off, n in bucket.mine:
                if sink[0] == "muon":
                    unit = sink[1]
                    self._reduced[unit] = flat[off:off + n].div(w).view(unit.shape)
                else:
                    _, key, at = sink
                    self._adamw_slices[key][at:at + n] = flat[off:off + n]
        for buf in self._adamw_slices.values():
            buf.div_(w)
        self._launched = []
        self._ready.clear()

    def _rebuild_buckets(self) -> None:
        """After the first step, bucket in the order the first backward produced gradients (DDP's
        ``_rebuild_buckets``): rank 0's observed order, broadcast once as an index tensor (the only
        extra collective, counted), so every rank builds the same buckets. Parameters rank 0 saw
        no gradient for keep their reverse-registration place after the observed ones."""
        params = list(self._param_order)
        index = {p: i for i, p in enumerate(params)}
        order = torch.full((len(params),), -1, dtype=torch.int64, device=self._comm.device)
        seen = list(dict.fromkeys(index[p] for p in self._grad_order if p in index))   # first sighting
        if seen:
            order[:len(seen)] = torch.tensor(seen, dtype=torch.int64)
        self._comm.broadcast(order, 0, tag="bucket_order")
        self._bucket_order = [params[i] for i in order.tolist() if i >= 0]
        self._grad_order = []
        self._comm_buckets = self._build_comm_buckets()

    def _held_reduced(self, *, once: bool) -> list[tuple[Tensor, Tensor]]:
        """Optimizer-owned reduction: ``(parameter, reduced gradient piece)`` for every piece this
        rank holds (owned matrices, its AdamW slices). ``once``: unsharded AdamW (every rank holds
        it) only on rank 0, so summing over ranks counts each element once."""
        out = [(self._unit_param(u), g) for u, g in self._reduced.items()]
        for part in self._partitions:
            buf = self._adamw_slices.get(part.key)
            if buf is None or (once and not part.sharded and self.rank != 0):
                continue
            off = 0
            for seg in part.mine:
                n = seg.stop - seg.start
                if n:
                    out.append((self._by_name[seg.name], buf[off:off + n]))
                off += n
        return out

    # -- Muon ------------------------------------------------------------------------------
    def _muon_bucket(self, bucket: Bucket, pre: "_Preflight"):
        """Momentum + NS on the matrices this rank owns, then launch the exchange of updates."""
        g = self.param_groups[bucket.group]
        active = [self._by_name[n] for n in bucket.names if self._unit_param(self._by_name[n]) in pre.active]
        if not active:
            return None
        mine = [p for p in active if self._owner(p) == self.rank]
        ns_kw = dict(coefficients=g["ns_coefficients"], steps=g["ns_steps"], dtype=g["ns_dtype"],
                     eps=g["ns_eps"], backend=g["ns_backend"])
        ortho = None
        if mine:
            bufs = []
            for p in mine:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            updates = muon_momentum_([self._clipped(self._grad(p)) for p in mine], bufs, momentum=g["momentum"],
                                     nesterov=g["nesterov"])
            views = [as_matrices(u, self._views[p]) for u, p in zip(updates, mine)]
            if len(views) == 1 and views[0].shape[0] == 1:
                with self._phase("ns"):   # unbatched: bit-identical to torch.optim.Muon
                    ortho = orthogonalize(views[0][0], **ns_kw).unsqueeze(0)
            else:
                with self._phase("ns"):
                    ortho = orthogonalize(torch.cat(views), **ns_kw)
        if self._comm is None:
            return (bucket, active, ortho, None)
        counts = [0] * self.world_size
        for p in active:
            counts[self._owner(p)] += matrix_shape(p.shape, self._views[p])[0]
        if ortho is None:
            ortho = torch.empty((0, bucket.m, bucket.n), dtype=g["ns_dtype"], device=active[0].device)
        gathered, work = self._comm.all_gather_uneven(ortho.contiguous(), counts, async_op=True, tag="muon_gather")
        return (bucket, active, gathered, work)

    def _finish_bucket(self, job) -> Tensor:
        bucket, active, ortho, work = job
        if work is not None:
            with self._phase("gather"):
                work.wait()
        g = self.param_groups[bucket.group]
        pieces = ortho.split([matrix_shape(p.shape, self._views[p])[0] for p in active])
        scale = update_scale(bucket.m, bucket.n, g["adjust_lr_fn"])
        with self._phase("apply"):
            muon_apply_(active, pieces, lr=g["lr"], weight_decay=g["weight_decay"], scale=scale)
        return ortho.float().square().sum() * scale**2

    # -- sharded layouts (FSDP2 row shards, DeepSpeed flat fragments) ----------------------
    def _local_size(self, p: Tensor, rank: int) -> int:
        return sum(b - a for a, b in self._lay_ranges(p)[rank])

    def _sharded_muon(self, pre: "_Preflight") -> list[Tensor]:
        """Per bucket: momentum on local pieces -> all-to-all of pieces to owners -> NS on the
        assembled matrices -> all-to-all of update pieces back -> apply on local pieces.

        All gathers are launched first, then each bucket is orthogonalized as its pieces arrive
        and its scatter launched, so communication of one bucket overlaps NS of the next.
        """
        jobs = [job for b in self._plan.buckets if (job := self._sharded_gather(b, pre)) is not None]
        for job in jobs:
            self._sharded_orthogonalize(job)
        return [self._sharded_apply(job) for job in jobs]

    def _sharded_gather(self, bucket: Bucket, pre: "_Preflight") -> dict | None:
        g = self.param_groups[bucket.group]
        active = [self._by_name[n] for n in bucket.names if self._unit_param(self._by_name[n]) in pre.active]
        if not active:
            return None
        me, w = self.rank, self.world_size
        grads, bufs = [], []
        for p in active:
            local = self._lay_local_param(p)
            lg = self._lay_local_grad(p)
            grads.append(self._clipped(lg) if lg is not None else torch.zeros_like(local))
            bufs.append(self._local_momentum(p, local))
        pieces = muon_momentum_(grads, bufs, momentum=g["momentum"], nesterov=g["nesterov"])
        mine = [p for p in active if self._owner(p) == me]
        in_splits = [0] * w
        for p, v in zip(active, pieces):
            in_splits[self._owner(p)] += v.numel()
        out_splits = [sum(self._local_size(p, s) for p in mine) for s in range(w)]
        send = torch.cat(pieces) if pieces else grads[0].new_empty(0)
        recv = send.new_empty(sum(out_splits))
        work = self._comm.all_to_all_single(recv, send, out_splits, in_splits, async_op=True, tag="muon_gather")
        return {"bucket": bucket, "group": g, "active": active, "mine": mine, "recv": recv, "work": work}

    def _sharded_orthogonalize(self, job: dict) -> None:
        with self._phase("gather"):
            job["work"].wait()
        w, g = self.world_size, job["group"]
        mine, recv = job["mine"], job["recv"]
        fulls = [recv.new_empty(math.prod(self._lay_full_shape(p))) for p in mine]
        off = 0
        for s in range(w):
            for p, full in zip(mine, fulls):
                for a, b in self._lay_ranges(p)[s]:
                    full[a:b] = recv[off:off + b - a]
                    off += b - a
        sends: list[Tensor] = []
        in_splits = [0] * w
        if mine:
            views = [as_matrices(f.view(self._lay_full_shape(p)), self._views[p]) for f, p in zip(fulls, mine)]
            ns_kw = dict(coefficients=g["ns_coefficients"], steps=g["ns_steps"], dtype=g["ns_dtype"],
                         eps=g["ns_eps"], backend=g["ns_backend"])
            with self._phase("ns"):
                ortho = orthogonalize(torch.cat(views), **ns_kw)
            flats = [o.reshape(-1) for o in ortho.split([v.shape[0] for v in views])]
            for r in range(w):
                for p, flat in zip(mine, flats):
                    for a, b in self._lay_ranges(p)[r]:
                        sends.append(flat[a:b])
                        in_splits[r] += b - a
        dtype = g["ns_dtype"]
        send = torch.cat(sends) if sends else recv.new_empty(0, dtype=dtype)
        out_splits = [sum(self._local_size(p, self.rank) for p in job["active"] if self._owner(p) == s)
                      for s in range(w)]
        job["update"] = send.new_empty(sum(out_splits))
        job["work"] = self._comm.all_to_all_single(job["update"], send, out_splits, in_splits, async_op=True,
                                                   tag="muon_scatter")

    def _sharded_apply(self, job: dict) -> Tensor:
        with self._phase("scatter"):
            job["work"].wait()
        bucket, g, update = job["bucket"], job["group"], job["update"]
        sizes = [self._local_size(p, self.rank) for p in job["active"]]
        scale = update_scale(bucket.m, bucket.n, g["adjust_lr_fn"])
        with self._phase("apply"):
            muon_apply_([self._lay_local_param(p) for p in job["active"]], list(update.split(sizes)),
                        lr=g["lr"], weight_decay=g["weight_decay"], scale=scale)
        return update.float().square().sum() * scale**2   # this rank's pieces only

    def _adamw_apply(self, g: dict, items: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """torch's AdamW kernel on ``(param, view, grad)`` triples; state is created lazily shaped
        like ``view`` (the whole parameter or this rank's piece of it)."""
        if not items:
            return
        views, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p, view, grad in items:
            state = self.state[p]
            if "step" not in state:
                # torch.optim.AdamW's convention: a CPU step counter unless the fused kernel runs
                state["step"] = torch.zeros((), dtype=torch.float32, device=view.device if self.adamw_fused else "cpu")
                state["exp_avg"] = torch.zeros_like(view, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(view, memory_format=torch.contiguous_format)
            views.append(view)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = g["betas"]
        _torch_adam(views, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=self.adamw_foreach, fused=self.adamw_fused,
                    decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=g["lr"],
                    weight_decay=g["weight_decay"], eps=g["eps"], maximize=False)

    def _sharded_adamw(self, pre: "_Preflight") -> None:
        """AdamW is elementwise: it runs on the local pieces with no communication."""
        for g in self.param_groups:
            if g["use_muon"]:
                continue
            items = []
            for p in g["params"]:
                local = self._layout.local_param(p)
                if p in pre.active and local.numel():
                    lg = self._layout.local_grad(p)
                    items.append((p, local, self._clipped(lg) if lg is not None else torch.zeros_like(local)))
            self._adamw_apply(g, items)

    # -- AdamW -----------------------------------------------------------------------------
    def _adamw_step(self, pre: "_Preflight") -> None:
        """Replicated layout: each rank updates its equal flat slice (or everything when AdamW is
        not sharded), then the slices are all-gathered."""
        for part in self._partitions:
            g = self.param_groups[part.group]
            reduced = self._adamw_slices.pop(part.key, None)
            offset_of = self._slice_offsets(part)
            items = []
            for seg in part.mine:
                p = self._by_name[seg.name]
                if p not in pre.active or seg.stop == seg.start:
                    continue
                view = self._segment_view(p, seg)
                if reduced is not None:
                    off = offset_of[seg.name]
                    grad = self._clipped(reduced[off:off + seg.stop - seg.start].view_as(view))
                else:
                    gr = self._grad(p)
                    grad = self._clipped(gr if view.shape == p.shape else gr.reshape(-1)[seg.start:seg.stop])
                items.append((p, view, grad))
            self._adamw_apply(g, items)
            if part.sharded:
                self._gather_adamw(part)

    @staticmethod
    def _segment_view(p: Tensor, seg: Segment) -> Tensor:
        if seg.start == 0 and seg.stop == p.numel():
            return p.detach()
        return p.detach().view(-1)[seg.start:seg.stop]

    def _slice_offsets(self, part: "_Partition") -> dict[str, int]:
        out, off = {}, 0
        for seg in part.mine:
            out[seg.name] = off
            off += seg.stop - seg.start
        return out

    def _gather_adamw(self, part: "_Partition") -> None:
        """All-gather the updated AdamW slices so every replica holds the full parameters."""
        self._comm.all_gather_segments_(
            part.segments, lambda seg: self._segment_view(self._by_name[seg.name], seg).reshape(-1), part.chunk,
            dtype=part.params[0].dtype, device=part.params[0].device, tag="adamw_gather")

    # -- QK-Clip, metrics ------------------------------------------------------------------
    def _qk_clip_(self, max_logits: Tensor) -> None:
        """Scale the rows of W_q / W_k (and biases, MLA parts) of heads over tau, on held elements."""
        # the preflight already refused non-finite logits (after the all-reduce): no second sync
        for p, scale in self._clipper.row_scales(max_logits, check_finite=False):
            if not self._layout.sharded:
                view = scale.to(p.device).view(-1, *([1] * (p.ndim - 1)))
                if p.dtype in (torch.float32, torch.float64):
                    p.data.mul_(view.to(p.dtype))
                else:   # low precision: multiply in fp32 and round once, so S lands on tau, not a hair above
                    p.data.copy_(p.data.float() * view)
                continue
            local = self._layout.local_param(p)
            if local.numel():
                shape = self._layout.full_shape(p)
                row = math.prod(shape[1:])
                local.mul_(piece_row_scale(scale.to(local.device), self._layout.ranges(p)[self.rank], row)
                           .to(local.dtype))

    def _record_metrics(self, pre: "_Preflight", sq_sums: list[Tensor]) -> None:
        metrics: dict[str, Tensor] = {}
        if self._grad_norm is not None:
            metrics["grad_norm"] = self._grad_norm   # the global norm, computed for max_grad_norm
        # sharded layouts, optimizer-owned reduction: norms of the reduced pieces this rank holds
        # (no extra collective for a metric)
        if self._owns_reduction:
            grads = [g for p, g in self._held_reduced(once=True) if p in pre.active]
        else:
            grads = [self._layout.local_grad(p) if self._layout.sharded else self._grad(p) for p in pre.active]
            grads = [g for g in grads if g is not None]
        if grads and "grad_norm" not in metrics:
            metrics["grad_norm"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        n_muon = sum((self._local_size(p, self.rank) if self._layout.sharded else p.numel())
                     for p in pre.active if self.param_groups[self._group_of[p]]["use_muon"])
        if sq_sums and n_muon:
            metrics["muon_update_rms"] = torch.sqrt(torch.stack([s.to(sq_sums[0].device) for s in sq_sums]).sum()
                                                    / n_muon)
        metrics["num_skipped"] = torch.tensor(float(len(pre.skipped)))
        self._last_metrics = metrics

    def _end_step(self) -> None:
        self._reduced.clear()
        self._adamw_slices.clear()
        if self._owns_reduction and self._bucket_order is None:
            self._rebuild_buckets()
        self._step_count_total += 1
        if self.accountant is not None:
            self.accountant.end_step()

    # ------------------------------------------------------------------ checkpoints
    def _local_state(self) -> dict[str, dict[str, Any]]:
        """This rank's state keyed by name: ``{"step"?: t, "pieces": [(start, stop, {key: 1-D})]}``.

        Pieces are flat element ranges of the full parameter, so shards from any layout and world
        size merge into the full state (:meth:`_merge_states`).
        """
        out: dict[str, dict[str, Any]] = {}

        def add(name: str, start: int, stop: int, s: dict[str, Any]) -> None:
            entry = out.setdefault(name, {"pieces": []})
            if "step" in s:
                entry["step"] = s["step"]
            entry["pieces"].append((start, stop, {k: v.reshape(-1) for k, v in s.items()
                                                  if isinstance(v, Tensor) and k != "step"}))

        for g in self.param_groups:
            for p in g["params"]:
                for slab in self._slabs_of.get(p, ()):   # chunks of a stacked parameter: their owners
                    s = self.state.get(slab)
                    if s:
                        _, a, b = self._slab_parent[slab]
                        per = slab[0].numel()
                        add(self._names[p], a * per, b * per, s)
                s = self.state.get(p)
                if not s:
                    continue
                name = self._names[p]
                if self._layout.sharded:
                    off = 0
                    for a, b in self._layout.ranges(p)[self.rank]:
                        add(name, a, b, {k: (v.reshape(-1)[off:off + b - a] if k != "step" else v)
                                         for k, v in s.items()})
                        off += b - a
                elif g["use_muon"]:
                    add(name, 0, p.numel(), s)     # the owner holds the whole momentum buffer
        if not self._layout.sharded:
            for part in self._partitions:
                for seg in part.mine:
                    s = self.state.get(self._by_name[seg.name])
                    if s:
                        add(seg.name, seg.start, seg.stop, s)
        return out

    def state_dict(self, *, sharded: bool = False) -> dict[str, Any]:
        """State keyed by parameter name (stable across processes, rebuilt models and world sizes).

        Default: the full state, identical to a single-process run's (a collective when
        distributed: every rank must call it; each gets the full state). ``sharded=True``: only
        this rank's part (no communication); combine shards with :meth:`merge_sharded`.

        Layout: ``{"format", "step", "state": {name: {...}}, "param_groups": [{..., "params": [names]}]}``.
        """
        hook = getattr(self._layout, "optimizer_state_dict", None)
        if hook is not None and not sharded:   # e.g. FSDP2: torch's format with DTensor state (DCP, get_state_dict)
            return hook(self)
        groups = []
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            d["params"] = [self._names[p] for p in g["params"]]
            groups.append(d)
        base = {"format": _STATE_FORMAT, "step": self._step_count_total, "param_groups": groups}
        local = self._local_state()
        if sharded:
            return {**base, "sharded": {"rank": self.rank, "world_size": self.world_size, "state": local}}
        shards = self._comm.all_gather_object(local) if self._comm is not None else [local]
        return {**base, "state": self._merge_states(shards)}

    def _merge_states(self, shards: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Assemble full per-parameter state from every rank's pieces."""
        pieces: dict[str, list] = defaultdict(list)
        steps: dict[str, Tensor] = {}
        for shard in shards:
            for name, s in shard.items():
                pieces[name].extend(s["pieces"])
                if "step" in s:
                    steps[name] = s["step"]
        state: dict[str, dict[str, Any]] = {}
        for name, plist in pieces.items():
            plist = sorted(plist, key=lambda t: t[0])
            shape = self._layout.full_shape(self._by_name[name])
            entry: dict[str, Any] = {}
            if name in steps:
                entry["step"] = steps[name].detach().cpu().clone()
            for key in plist[0][2]:
                entry[key] = torch.cat([t[2][key].detach().cpu() for t in plist]).view(shape)
            state[name] = entry
        return state

    def merge_sharded(self, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Combine ``state_dict(sharded=True)`` of every rank into one full state dict."""
        ws = {s["sharded"]["world_size"] for s in shards}
        if len(ws) != 1 or len(shards) != ws.pop():
            raise ValueError("merge_sharded needs exactly one shard from every rank of one run")
        full = {k: v for k, v in shards[0].items() if k != "sharded"}
        full["state"] = self._merge_states([s["sharded"]["state"] for s in shards])
        return full

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full :meth:`state_dict` (from any world size; matched by parameter name).

        Each rank keeps what it owns under the current plan. Validated before anything changes.
        """
        hook = getattr(self._layout, "load_optimizer_state_dict", None)
        if hook is not None and state_dict.get("format") != _STATE_FORMAT:
            hook(self, state_dict)       # e.g. FSDP2: torch's format (from get_state_dict / dcp.load)
            return
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"state_dict has format {state_dict.get('format')!r}, expected {_STATE_FORMAT!r} "
                             "(a dist_muonclip MuonClip.state_dict())")
        if "sharded" in state_dict:
            raise ValueError("this is one rank's shard (state_dict(sharded=True)); combine all ranks' shards with "
                             "optimizer.merge_sharded(shards) and load the result")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            mine = [self._names[p] for p in g["params"]]
            if list(sg["params"]) != mine:
                missing = sorted(set(mine) - set(sg["params"]))
                extra = sorted(set(sg["params"]) - set(mine))
                raise ValueError(f"param group {gi} does not match the checkpoint: missing in checkpoint "
                                 f"{missing[:5]}, unexpected {extra[:5]} (rebuild the model with the same "
                                 "parameter names and split)")
            if sg.get("use_muon", g["use_muon"]) != g["use_muon"]:
                raise ValueError(f"param group {gi}: use_muon differs between checkpoint and optimizer")
        for name, s in state_dict["state"].items():
            if name not in self._by_name:
                raise ValueError(f"state_dict has state for unknown parameter {name!r}")
            p = self._by_name[name]
            for k, v in s.items():
                if isinstance(v, Tensor) and k != "step" and v.shape != p.shape:
                    raise ValueError(f"state {k!r} of {name!r} has shape {tuple(v.shape)}, parameter has "
                                     f"{tuple(p.shape)}")
        new_state = self._states_from_full(state_dict["state"])
        for sg, g in zip(saved_groups, self.param_groups):
            for k, v in sg.items():
                if k != "params":
                    g[k] = v
        self.state.clear()
        self.state.update(new_state)
        self._step_count_total = int(state_dict.get("step", 0))

    def _states_from_full(self, full: dict[str, dict[str, Any]], only: set | None = None
                          ) -> dict[Tensor, dict[str, Any]]:
        """Of full per-parameter state (name -> {key: full tensor}), what this rank keeps under the
        current plan and layout: owners' momentum (whole, or per chunk of experts), AdamW slices,
        sharded pieces. ``only``: just these parameters."""
        new_state: dict[Tensor, dict[str, Any]] = {}

        def take(p: Tensor, s: dict[str, Any], ranges: list[tuple[int, int]], whole: bool) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in s.items():
                if not isinstance(v, Tensor):
                    out[k] = v
                elif k == "step":
                    out[k] = v.detach().to(torch.float32).clone().to(p.device if self.adamw_fused else "cpu")
                else:
                    local = self._layout.local_param(p)   # sharded: fp32 master pieces of a bf16 param
                    v = v.detach().to(dtype=local.dtype if self._layout.sharded else p.dtype, device=local.device)
                    pieces = [v.reshape(-1)[a:b] for a, b in ranges if b > a]
                    out[k] = v.clone() if whole else (torch.cat(pieces) if pieces else v.reshape(-1)[:0]).clone()
            return out

        for g in self.param_groups:
            for p in g["params"]:
                name = self._names[p]
                if name not in full or (only is not None and p not in only):
                    continue
                if self._layout.sharded:
                    new_state[p] = take(p, full[name], self._layout.ranges(p)[self.rank], whole=False)
                elif p in self._slabs_of:
                    for slab in self._slabs_of[p]:
                        if self._owner(slab) == self.rank:
                            _, a, b = self._slab_parent[slab]
                            per = slab[0].numel()
                            st = take(p, full[name], [(a * per, b * per)], whole=False)
                            new_state[slab] = {k: (v.view(slab.shape) if isinstance(v, Tensor) and k != "step" else v)
                                               for k, v in st.items()}
                elif g["use_muon"] and self._owner(p) == self.rank:
                    new_state[p] = take(p, full[name], [(0, p.numel())], whole=True)
        if not self._layout.sharded:
            for part in self._partitions:
                for seg in part.mine:
                    p = self._by_name[seg.name]
                    if seg.name in full and (only is None or p in only):
                        whole = seg.start == 0 and seg.stop == p.numel()
                        new_state[p] = take(p, full[seg.name], [(seg.start, seg.stop)], whole)
        return new_state


@dataclasses.dataclass(frozen=True)
class _Partition:
    """AdamW parameters of one (group, dtype, device), flattened and split into equal slices."""

    group: int
    kind: tuple
    params: list
    chunk: int
    segments: list
    mine: list
    sharded: bool

    @property
    def key(self) -> tuple:
        return (self.group, self.kind)


@dataclasses.dataclass(frozen=True)
class _CommBucket:
    """One communication bucket of the optimizer-owned reduction (see ``_build_comm_buckets``)."""

    params: tuple        # parameters whose gradients it carries, backward order (readiness)
    pieces: tuple        # (param, start, stop): flat element ranges, in buffer order
    regions: tuple       # (dest rank, or None = every rank, offset, numel): one collective each
    mine: tuple          # (sink, offset, numel): reduced elements this rank keeps
    numel: int


@dataclasses.dataclass(frozen=True)
class _Preflight:
    active: set          # parameters that step (have a gradient somewhere, all finite)
    skipped: set         # parameters skipped for non-finite gradients
    max_logits: Tensor | None
