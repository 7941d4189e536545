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
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from .comm import Comm, CommAccountant
from .dist_check import check_process_group
from .validation import (UnsupportedParameterError, check_adjust_lr_fn, check_betas, check_float, check_lr,
                         check_runtime_options, group_param_list, names_given, validate_layout)
from .dtensor_layout import layout_from_params
from .tp_layout import check_tensor_parallel_options, tensor_parallel_layout
from .engine import Engine, EngineOptions, ParamRegistry, STATE_FORMAT
from .layouts import Layout, Replicated
from .newton_schulz import dtype_name, validate_ns_options
from .ns_split import NS_SPLITS, find_block_splits
from .param_groups import build_param_groups, validate_group
from .param_split import ParamInfo, format_split

__all__ = ["MuonClip"]

_MUON_KEYS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_backend", "ns_dtype", "ns_eps",
              "adjust_lr_fn")
_ADAMW_KEYS = ("betas", "eps")
# DDP's default bucket cap (torch.nn.parallel.DistributedDataParallel: bucket_cap_mb=25)
_DEFAULT_BUCKET_CAP_MB = 25.0


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
            :class:`~dist_muonclip.qk_clip.QKClipConfig` = on (an error if no layer is found); a
            :class:`~dist_muonclip.qk_clip.QKClipper` = that clipper (e.g. built from explicit layers).
        model_config: HF config (or dict with head counts) for QK-Clip layer discovery when the
            model does not carry one.
        muon_patterns, adamw_patterns: name globs overriding the automatic split.
        skip_nonfinite: skip (and warn about) parameters whose gradient has inf/nan this step,
            leaving their state untouched. The test is on the *reduced* gradient in every mode
            (DDP, optimizer-owned reduction, sharded layouts), so all ranks skip the same
            parameters, and a gradient that is non-finite on any one rank skips that parameter
            everywhere; the others step normally, and ``max_grad_norm`` measures them alone.
            A layer whose tracked max logits are inf/nan is not clipped that step (warning;
            ``False``: ValueError). Costs one device->host read per step.
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
        layout: where parameter elements live (:mod:`dist_muonclip.layouts`). Default: read from
            the parameters: plain tensors -> :class:`~dist_muonclip.layouts.Replicated`; DTensors
            (``fully_shard`` on a 1-D mesh or HSDP's 2-D mesh) -> their mesh and placements
            (:class:`~dist_muonclip.dtensor_layout.Shard0Layout`, on the shard axis's process group
            unless ``process_group`` is given). An explicit layout overrides (DeepSpeed ZeRO-1/2).
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
        ns_split: per-block Newton-Schulz of attention projections (:mod:`dist_muonclip.ns_split`):
            ``None`` (whole matrices), ``"qkv"`` (q, k, v blocks of fused projections) or
            ``"heads"`` (each head's rows of W_q/W_k/W_v, columns of W_o); needs the model.

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
        ns_split: str | None = None,
    ) -> None:
        # -- validate everything before any state exists ------------------------------------
        if process_group is None:
            check_process_group()   # WORLD_SIZE > 1 but no process group yet: it would run single-process
        lr = check_lr("lr", lr)
        momentum = check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        weight_decay = check_float("weight_decay", weight_decay, low=0.0)
        ns_eps = check_float("ns_eps", ns_eps, low=0.0, low_open=True)
        ns_coefficients, ns_steps, ns_dtype, ns_backend = validate_ns_options(
            ns_coefficients, ns_steps, ns_dtype, ns_backend)
        ns_dtype = dtype_name(ns_dtype)   # param_groups hold plain values (torch's state-dict helpers, JSON)
        adjust_lr_fn = check_adjust_lr_fn(adjust_lr_fn)
        adamw_lr = lr if adamw_lr is None else check_lr("adamw_lr", adamw_lr)
        adamw_betas = check_betas("adamw_betas", adamw_betas)
        adamw_eps = check_float("adamw_eps", adamw_eps, low=0.0, low_open=True)
        adamw_weight_decay = (weight_decay if adamw_weight_decay is None
                              else check_float("adamw_weight_decay", adamw_weight_decay, low=0.0))
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        max_grad_norm, bucket_cap_mb = check_runtime_options(
            skip_nonfinite=skip_nonfinite, shard_adamw=shard_adamw, verbose=verbose, adamw_foreach=adamw_foreach,
            adamw_fused=adamw_fused, muon_patterns=muon_patterns, adamw_patterns=adamw_patterns,
            max_grad_norm=max_grad_norm, bucket_cap_mb=bucket_cap_mb, grad_reduction=grad_reduction, layout=layout,
            accountant=accountant, process_group=process_group, profiler=profiler, log_every=log_every)
        if ns_split not in NS_SPLITS:
            raise ValueError(f"ns_split={ns_split!r} is unknown; use one of {NS_SPLITS} (per-block Newton-Schulz of "
                             "attention projections, dist_muonclip.ns_split)")

        self._muon_defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                   ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_backend=ns_backend,
                                   ns_dtype=ns_dtype, ns_eps=ns_eps, adjust_lr_fn=adjust_lr_fn)
        self._adamw_defaults = dict(lr=adamw_lr, weight_decay=adamw_weight_decay, betas=adamw_betas,
                                    eps=adamw_eps)
        self._registry = ParamRegistry()
        self._names = self._registry.names        # parameter -> name (keys the state in checkpoints)
        self._views = self._registry.views        # parameter -> matrix view
        self._param_order = self._registry.order  # registration order (model order when given a model)
        self._engine: Engine | None = None
        model = model_or_params if isinstance(model_or_params, nn.Module) else None
        groups, split, self._names_given = build_param_groups(self._registry, model_or_params, muon_patterns,
                                                              adamw_patterns)
        muon = {p for g in groups if g.get("use_muon", True) for p in g["params"]}
        self._ns_splits = {p: s for p, s in find_block_splits(model, ns_split, model_config=model_config).items()
                           if p in muon}
        self.ns_split = ns_split
        self._split = split
        self._options = EngineOptions(skip_nonfinite=skip_nonfinite, adamw_foreach=adamw_foreach,
                                      adamw_fused=adamw_fused, max_grad_norm=max_grad_norm,
                                      bucket_cap_mb=bucket_cap_mb, shard_adamw=shard_adamw)
        self._accountant = accountant
        self._profiler = profiler

        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self._num_steps = 0
        self._last_metrics: dict[str, Tensor] = {}
        self._clipper = self._build_clipper(model, qk_clip, model_config)
        self._logger = None
        try:     # a failure from here on must not leave the model's attention patched by the clipper
            if layout is None and model is not None:   # TP DTensors are not FSDP2 rows (issue 17)
                layout = tensor_parallel_layout(model)
                process_group = layout.process_group if layout is not None and process_group is None else process_group
            if layout is not None and layout.head_shard is not None:
                check_tensor_parallel_options(max_grad_norm=max_grad_norm, layout=layout,
                                              clip_layers=self._clipper.layers if self._clipper is not None else ())
                if self._clipper is not None and self._clipper.tracker is not None:
                    self._clipper.tracker.set_head_shard(*layout.head_shard)
            self._build_engine(process_group, grad_reduction, layout)
            if (log_dir is not None or wandb_run is not None) and self.rank == 0:
                from .tools.metrics import MetricsLogger

                self._logger = MetricsLogger(log_dir, wandb_run=wandb_run, every=log_every)
            if profiler is not None and hasattr(profiler, "attach"):
                profiler.attach(self)          # idempotent; needs the accountant and comm set up above
        except Exception:
            if self._clipper is not None:
                self._clipper.close()
            raise
        if verbose:
            print(self.describe_split())

    # ------------------------------------------------------------------ construction
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
        params = group_param_list(g["params"], len(self.param_groups))
        if self._engine is not None and self._names_given is not None:   # after construction
            named = names_given(params, len(self.param_groups))
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
        validate_group(g)
        engine = self._engine      # None while torch's __init__ adds the first groups
        if engine is not None:     # construction checks the first groups when it builds the engine
            validate_layout(engine.layout, plain, dict(zip(plain, names)), engine.world_size, engine.rank)
        for p, name in zip(plain, names):      # register only once the group is known to be valid
            self._registry.register(p, name)
        super().add_param_group(g)
        if engine is not None:   # re-plan on every rank; momentum of units whose owner moved follows them
            self._bound.append(list(plain))
            old_owners = engine.owners_by_name()
            engine.replan()
            engine.migrate_moved_state(old_owners)
            engine.layout.init_optimizer_state(self)

    def _build_clipper(self, model: nn.Module | None, qk_clip: Any, model_config: Any):
        if qk_clip is False or (qk_clip is None and model is None):
            return None
        try:
            from .qk_clip import QKClipper, QKClipConfig
        except ImportError:
            if qk_clip is None:
                return None
            raise
        if isinstance(qk_clip, QKClipper):      # already built (e.g. from explicit layers: compat)
            return qk_clip
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
        return self._engine.layout

    @property
    def plan(self):
        """The :class:`~dist_muonclip.plan.Plan`: owners and same-shape buckets of the Muon matrices."""
        return self._engine.plan

    @property
    def comm(self) -> Comm | None:
        """The :class:`~dist_muonclip.comm.Comm` of the data-parallel group (``None``: single process)."""
        return self._engine.comm

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken (restored by ``load_state_dict``; layouts with their own
        checkpoint format restore it through the setter)."""
        return self._num_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self._num_steps = int(value)

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
    def _build_engine(self, process_group: Any, grad_reduction: str, layout: Layout | None) -> None:
        """Decide the distribution once (process group, layout, who reduces gradients) and build
        the engine that runs every step (:mod:`dist_muonclip.engine`). The option types were
        checked by ``validation.check_runtime_options`` (construction) or :meth:`set_layout`."""
        if layout is None:     # read it from the parameters: DTensors carry their mesh and placements
            layout = layout_from_params([p for g in self.param_groups for p in g["params"]])
            if layout is not None and process_group is None:
                process_group = layout.process_group
        if layout is not None and layout.sharded and grad_reduction == "optimizer":
            raise ValueError("grad_reduction='optimizer' needs the Replicated layout; with a sharded layout the "
                             "sharding engine (FSDP2, DeepSpeed) already reduces gradients: use 'external'")
        comm = None
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            candidate = Comm(process_group, self.accountant)
            # a sharded layout needs the all-to-alls even on one rank (FSDP2 at W=1: e.g. DCP resume at W=1)
            if candidate.world_size > 1 or grad_reduction == "optimizer" or (layout is not None and layout.sharded):
                comm = candidate
        world_size = comm.world_size if comm is not None else 1
        layout = layout if layout is not None else Replicated(world_size)
        params = [p for g in self.param_groups for p in g["params"]]
        validate_layout(layout, params, self._registry.names, world_size, comm.rank if comm is not None else 0)
        if getattr(self, "_engine", None) is not None:
            self._engine.grads.remove_hooks()
        self.grad_reduction = grad_reduction
        self._engine = Engine(param_groups=self.param_groups, state=self.state, registry=self._registry,
                              layout=layout, comm=comm, owns_reduction=grad_reduction == "optimizer" and comm is not None,
                              options=self._options, clipper=self._clipper, profiler=self.profiler,
                              ns_splits=self._ns_splits)
        self._bound = [list(g["params"]) for g in self.param_groups]   # what the engine was built on
        layout.init_optimizer_state(self)     # e.g. FSDP2: all state exists eagerly, so DCP sees the same keys

    @property
    def rank(self) -> int:
        """This rank in the optimizer's process group (0 when single-process)."""
        return self._engine.rank

    @property
    def world_size(self) -> int:
        """Ranks in the optimizer's process group (1 when single-process)."""
        return self._engine.world_size

    @property
    def engine(self) -> Engine:
        """The :class:`~dist_muonclip.engine.Engine` running the steps (units, plan, exchange,
        gradient source, AdamW part, state format), for tools and diagnostics; read-only."""
        return self._engine

    @property
    def accountant(self) -> CommAccountant | None:
        """The :class:`~dist_muonclip.comm.CommAccountant` counting this optimizer's collectives."""
        return self._accountant

    @accountant.setter
    def accountant(self, value: CommAccountant | None) -> None:
        self._accountant = value
        if self._engine is not None and self._engine.comm is not None:
            self._engine.comm.accountant = value

    @property
    def profiler(self) -> Any:
        """The object timing the phases of ``step()`` (``profiler.phase(name)``), or ``None``."""
        return self._profiler

    @profiler.setter
    def profiler(self, value: Any) -> None:
        self._profiler = value
        if self._engine is not None:
            self._engine.profiler = value

    @property
    def shard_adamw(self) -> bool:
        return self._options.shard_adamw

    @property
    def max_grad_norm(self) -> float | None:
        return self._options.max_grad_norm

    @property
    def skip_nonfinite(self) -> bool:
        return self._options.skip_nonfinite

    @property
    def adamw_fused(self) -> bool | None:
        return self._options.adamw_fused

    @property
    def adamw_foreach(self) -> bool | None:
        return self._options.adamw_foreach

    @property
    def bucket_cap_mb(self) -> float:
        return self._options.bucket_cap_mb

    def set_layout(self, layout: Layout | None, *, process_group: Any = None) -> None:
        """Move a not-yet-stepped optimizer onto another layout (``None``: Replicated) over
        ``process_group`` (default: the world group when initialized), re-planning on every rank.

        For integrations that partition the model after the optimizer was built (DeepSpeed's
        ZeRO-1/2 flat partitions). Raises if the optimizer already holds state.
        """
        if layout is not None and not isinstance(layout, Layout):
            raise TypeError(f"layout must be a dist_muonclip.layouts.Layout or None, got {type(layout).__name__}")
        if any(self.state.values()):
            raise ValueError("set_layout: this MuonClip has already stepped (it holds state); move a fresh "
                             "optimizer, or load the state after changing the layout")
        reduction = "external" if layout is not None and layout.sharded else self.grad_reduction
        self._build_engine(process_group, reduction, layout)

    def rebind_params(self) -> bool:
        """Follow a framework that swapped this optimizer's parameters after construction, e.g.
        accelerate's FSDP2 prepare (``fully_shard``, then each group's ``params`` replaced by the
        DTensor parameters in the same order). Names, QK-Clip targets and Newton-Schulz splits move
        to the new tensors (same group and position) and the layout is read again from them on
        every rank (a collective when distributed, like :meth:`set_layout`). Returns ``False`` when
        nothing changed. Raises ``ValueError`` before anything changes if the optimizer holds state
        or a group's length or a parameter's full shape differs.
        """
        new = [list(g["params"]) for g in self.param_groups]
        if len(new) == len(self._bound) and all(len(a) == len(b) and all(x is y for x, y in zip(a, b))
                                                for a, b in zip(self._bound, new)):
            return False
        if len(new) != len(self._bound) or any(len(a) != len(b) for a, b in zip(self._bound, new)):
            raise ValueError("rebind_params: the param groups changed length; only a one-to-one swap of each "
                             "parameter (same group, same position) can be followed; build a new MuonClip")
        mapping = {}
        for a, b in zip(self._bound, new):
            for x, y in zip(a, b):
                if tuple(x.shape) != tuple(y.shape):
                    raise ValueError(f"rebind_params: parameter {self._names[x]!r} changed shape {tuple(x.shape)} -> "
                                     f"{tuple(y.shape)}; only the storage may change (e.g. DTensor shards)")
                mapping[x] = y
        if any(self.state.values()):
            raise ValueError("rebind_params: this MuonClip has already stepped (it holds state for the old "
                             "tensors); shard the model before the first step, or save the state, build a new "
                             "MuonClip on the sharded model and load it")
        for table in (self._registry.names, self._registry.views, self._registry.order):
            items = list(table.items())
            table.clear()
            table.update((mapping.get(p, p), v) for p, v in items)
        self._ns_splits = {mapping.get(p, p): s for p, s in self._ns_splits.items()}
        for layer in (self._clipper.layers if self._clipper is not None else ()):
            for t in layer.targets:
                t.param = mapping.get(t.param, t.param)
        layout = layout_from_params([p for g in new for p in g])
        reduction = "external" if layout is not None and layout.sharded else self.grad_reduction
        self._build_engine(layout.process_group if layout is not None else None, reduction, layout)
        return True

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation with ``grad_reduction="optimizer"``: backward passes inside this
        context do not launch the reduction (like ``DistributedDataParallel.no_sync``)."""
        grads = self._engine.grads
        old = getattr(grads, "sync_enabled", True)
        grads.sync_enabled = False
        try:
            yield
        finally:
            grads.sync_enabled = old

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, s_max: Any = None) -> Any:
        """One MuonClip step. ``s_max``: optional per-layer, per-head max logits (see class doc).

        Collective when distributed: every rank of the group must call it.
        """
        loss = self._run_closure(closure)
        engine = self._engine
        engine.reduce()                                     # optimizer-owned reduction: wait for the buckets
        plan, clip, grad_norm = engine.preflight(s_max)     # one all-reduce(MAX): flags, max logits; clip coef
        update_sq = engine.muon(plan, clip)                 # per bucket: momentum, to owner, NS, from owner, apply
        engine.step_adamw(plan, clip)                       # elementwise, on the elements this rank updates
        engine.qk_clip(plan)                                # rows of W_q / W_k of heads over tau
        self._end_step(engine.metrics(plan, update_sq, grad_norm))
        return loss

    @staticmethod
    def _run_closure(closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _end_step(self, metrics: dict[str, Tensor]) -> None:
        self._last_metrics = metrics
        self._engine.end_step()
        self._num_steps += 1
        if self.accountant is not None:
            self.accountant.end_step()
        if self._logger is not None:     # logged as step N = the N-th completed step
            self._logger.log(self._num_steps, self.device_metrics())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, sharded: bool = False) -> dict[str, Any]:
        """State keyed by parameter name (stable across processes, rebuilt models and world sizes).

        Default: the full state, identical to a single-process run's (a collective when
        distributed: every rank must call it; each gets the full state). ``sharded=True``: only
        this rank's part (no communication); combine shards with :meth:`merge_sharded`.

        Layout: ``{"format", "step", "param_groups": [{..., "params": [names]}], "state": {name: {...}}}``.
        Layouts with a format of their own (FSDP2: torch's, with DTensor state for DCP) return it.
        """
        engine = self._engine
        if not sharded and (own := engine.layout.optimizer_state_dict(self)) is not None:
            return own
        groups = []
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            d["params"] = [self._names[p] for p in g["params"]]
            groups.append(d)
        base = {"format": STATE_FORMAT, "step": self._num_steps, "param_groups": groups}
        local = engine.format.local()
        if sharded:
            return {**base, "sharded": {"rank": self.rank, "world_size": self.world_size, "state": local}}
        shards = engine.comm.all_gather_object(local) if engine.comm is not None else [local]
        return {**base, "state": engine.format.merge(shards)}

    def merge_sharded(self, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Combine ``state_dict(sharded=True)`` of every rank into one full state dict."""
        ws = {s["sharded"]["world_size"] for s in shards}
        if len(ws) != 1 or len(shards) != ws.pop():
            raise ValueError("merge_sharded needs exactly one shard from every rank of one run")
        full = {k: v for k, v in shards[0].items() if k != "sharded"}
        full["state"] = self._engine.format.merge([s["sharded"]["state"] for s in shards])
        return full

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full :meth:`state_dict` (from any world size; matched by parameter name).

        Each rank keeps what it owns under the current plan. Validated before anything changes.
        """
        engine = self._engine
        if state_dict.get("format") != STATE_FORMAT and engine.layout.load_optimizer_state_dict(self, state_dict):
            return       # e.g. FSDP2: torch's format (from get_state_dict / dcp.load)
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"state_dict has format {state_dict.get('format')!r}, expected {STATE_FORMAT!r} "
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
        by_name = engine.units.by_name
        for name, s in state_dict["state"].items():
            if name not in by_name:
                raise ValueError(f"state_dict has state for unknown parameter {name!r}")
            p = by_name[name]
            for k, v in s.items():
                if isinstance(v, Tensor) and k != "step" and v.shape != p.shape:
                    raise ValueError(f"state {k!r} of {name!r} has shape {tuple(v.shape)}, parameter has "
                                     f"{tuple(p.shape)}")
        new_state = engine.format.from_full(state_dict["state"])
        for sg, g in zip(saved_groups, self.param_groups):
            for k, v in sg.items():
                if k != "params":
                    g[k] = v
        self.state.clear()
        self.state.update(new_state)
        self._num_steps = int(state_dict.get("step", 0))

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the engine (process groups, hooks, views), with this rank's state in
        the name-keyed format: ``copy.deepcopy`` and ``pickle`` give an optimizer that steps like
        this one (its engine is rebuilt over the default process group)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("_engine", "state", "_logger")}
        out["_engine_setup"] = (self.grad_reduction, self._engine.layout, self._engine.comm is not None)
        out["_local_state"] = self._engine.format.local()
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        grad_reduction, layout, distributed = state.pop("_engine_setup")
        local = state.pop("_local_state")
        self.__dict__.update(state)
        self.state = defaultdict(dict)
        self._logger = None
        self._engine = None
        self._build_engine(None, grad_reduction, layout if layout.sharded else None)
        self.state.update(self._engine.format.from_local(local))
