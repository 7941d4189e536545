"""``MuonClip``: Muon for hidden matrices + AdamW for the rest + per-head QK-Clip, one optimizer.

The math lives in pure functions (``functional``, ``newton_schulz``, ``qk_clip``); this class
collects state and dispatches. ``step()`` reads as its phases (DESIGN.md):

    preflight  -> one host read: non-finite gradient flags and max logits
    Muon       -> per bucket of same-shape matrices: momentum, orthogonalize (batched NS), apply
    AdamW      -> torch's own (foreach/fused) AdamW kernels on the remaining parameters
    QK-Clip    -> rescale W_q / W_k rows of heads whose max logit exceeded tau (Kimi K2)
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

from .functional import ADJUST_LR_FNS, muon_apply_, muon_momentum_, update_scale
from .newton_schulz import orthogonalize, validate_ns_options
from .param_split import ParamInfo, as_matrices, format_split, matrix_shape, split_parameters

__all__ = ["MuonClip"]

_STATE_FORMAT = "dist_muonclip.v1"
_MUON_KEYS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_backend", "ns_dtype", "ns_eps",
              "adjust_lr_fn")
_ADAMW_KEYS = ("betas", "eps")


def _check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return float(value)


def _check_betas(name: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    return (_check_float(f"{name}[0]", betas[0], low=0.0, high=1.0, high_open=True),
            _check_float(f"{name}[1]", betas[1], low=0.0, high=1.0, high_open=True))


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
            tuned for AdamW serves both (Moonlight, arXiv 2502.16982).
        momentum, nesterov: Muon momentum (EMA form of ``torch.optim.Muon``).
        weight_decay: decoupled weight decay of the Muon part (and of AdamW unless
            ``adamw_weight_decay`` is given): ``W <- W - lr * weight_decay * W``.
        ns_steps, ns_coefficients, ns_backend, ns_dtype, ns_eps: Newton-Schulz options, see
            :func:`dist_muonclip.newton_schulz.orthogonalize`. ``ns_dtype`` also takes
            ``"bfloat16"``/``"float32"`` (JSON configs). bf16 is the fast default; float32 makes
            runs reproducible across reduction orders (engine-equivalence tests use it).
        adjust_lr_fn: ``"match_rms_adamw"`` (0.2 sqrt(max(m, n))), ``"original"`` (Keller Jordan's
            sqrt(max(1, m/n))) or ``"none"``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part. ``None`` lr/decay
            mean "same as the Muon part".
        qk_clip: ``None`` = on with defaults when ``model_or_params`` is a model whose attention
            layers are found, else off; ``False`` = off; ``True``, a dict or a
            :class:`~dist_muonclip.qk_clip.QKClipConfig` = on (an error if no layer is found).
        model_config: HF config (or dict with head counts) for QK-Clip layer discovery when the
            model does not carry one.
        muon_patterns, adamw_patterns: name globs overriding the automatic split.
        skip_nonfinite: skip (and warn about) parameters whose gradient has inf/nan this step,
            leaving their state untouched. Costs one device->host read per step.
        adamw_foreach, adamw_fused: passed to torch's AdamW kernels.
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
        verbose: bool = False,
    ) -> None:
        # -- validate everything before any state exists ------------------------------------
        lr = _check_float("lr", lr, low=0.0)
        momentum = _check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        weight_decay = _check_float("weight_decay", weight_decay, low=0.0)
        ns_eps = _check_float("ns_eps", ns_eps, low=0.0, low_open=True)
        ns_coefficients, ns_steps, ns_dtype, ns_backend = validate_ns_options(
            ns_coefficients, ns_steps, ns_dtype, ns_backend)
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is unknown; use one of {ADJUST_LR_FNS}")
        adamw_lr = lr if adamw_lr is None else _check_float("adamw_lr", adamw_lr, low=0.0)
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
            raise TypeError("model_or_params must be an nn.Module or an iterable of parameters/param groups, "
                            "got a single Tensor; wrap it in a list")
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
        for gi, g in enumerate(groups):
            if "params" not in g:
                raise ValueError(f"param group {gi} has no 'params' key")
            params = g["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            plain = []
            for pi, item in enumerate(params):
                if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    name, p = item
                else:
                    name, p = f"group{gi}.param{pi}", item
                if not isinstance(p, Tensor):
                    raise TypeError(f"param group {gi} entry {pi} is a {type(p).__name__}, not a Tensor")
                if p in seen:
                    raise ValueError(f"parameter {name!r} appears twice (first as {seen[p]!r}); "
                                     "each parameter may be in one group only, once")
                seen[p] = name
                self._names[p] = name
                view = "matrix" if p.ndim == 2 else ("flatten" if p.ndim > 2 else "vector")
                self._views[p] = view
                plain.append(p)
            g["params"] = plain
            g.pop("param_names", None)
        return groups, None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its type (``use_muon``) decides which defaults fill missing keys."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        g = dict(param_group)
        params = g["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        g["params"] = params
        use_muon = g.setdefault("use_muon", True)
        if not isinstance(use_muon, bool):
            raise TypeError(f"use_muon must be a bool, got {use_muon!r}")
        defaults = self._muon_defaults if use_muon else self._adamw_defaults
        for k, v in defaults.items():
            g.setdefault(k, v)
        existing = {p for grp in self.param_groups for p in grp["params"]}
        for i, p in enumerate(params):
            name = self._names.setdefault(p, f"group{len(self.param_groups)}.param{i}")
            self._views.setdefault(p, "matrix" if p.ndim == 2 else ("flatten" if p.ndim > 2 else "vector"))
            if not isinstance(p, Tensor):
                raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a Tensor")
            if not (p.is_floating_point()):
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; MuonClip optimizes floating-point "
                                "parameters only (leave integer buffers out of the optimizer)")
            if p in existing:
                raise ValueError(f"parameter {name!r} is already in another param group; each parameter "
                                 "may be in one group only")
            if use_muon and p.ndim < 2:
                raise ValueError(f"parameter {name!r} of shape {tuple(p.shape)} is in a use_muon=True group, "
                                 "but Muon needs a matrix (>= 2 dims); put it in a group with use_muon=False")
        self._validate_group(g)
        super().add_param_group(g)

    def _validate_group(self, g: dict[str, Any]) -> None:
        _check_float("lr", g["lr"], low=0.0)
        _check_float("weight_decay", g["weight_decay"], low=0.0)
        if g["use_muon"]:
            _check_float("momentum", g["momentum"], low=0.0, high=1.0, high_open=True)
            (g["ns_coefficients"], g["ns_steps"], g["ns_dtype"], g["ns_backend"]) = validate_ns_options(
                g["ns_coefficients"], g["ns_steps"], g["ns_dtype"], g["ns_backend"])
            if g["adjust_lr_fn"] not in ADJUST_LR_FNS:
                raise ValueError(f"adjust_lr_fn={g['adjust_lr_fn']!r} is unknown; use one of {ADJUST_LR_FNS}")
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

    def metrics(self) -> dict[str, float]:
        """Scalars of the last step (one device->host read): update RMS, grad norm, QK-Clip stats."""
        out: dict[str, float] = {}
        if self._last_metrics:
            keys = list(self._last_metrics)
            values = torch.stack([self._last_metrics[k].float().reshape(()) for k in keys]).tolist()
            out.update(zip(keys, values))
        if self._clipper is not None and hasattr(self._clipper, "metrics"):
            out.update(self._clipper.metrics())
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, s_max: Any = None) -> Any:
        """One MuonClip step. ``s_max``: optional per-layer, per-head max logits (see class doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = self._collect_gradients()
        max_logits = self._clipper.max_logits(s_max) if self._clipper is not None else None
        skipped = self._preflight(work, max_logits)
        sq_sums: list[Tensor] = []
        for bucket in self._muon_buckets(work, skipped):
            sq_sums.append(self._muon_bucket_step(bucket))
        self._adamw_step(work, skipped)
        if max_logits is not None:
            self._qk_clip_(max_logits)
        self._record_metrics(work, skipped, sq_sums)
        self._step_count_total += 1
        return loss

    def _collect_gradients(self) -> list[tuple[dict, list[Tensor]]]:
        work = []
        for g in self.param_groups:
            params = []
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"parameter {self._names[p]!r} has a sparse gradient; MuonClip needs dense "
                                       "gradients (use nn.Embedding(sparse=False))")
                params.append(p)
            work.append((g, params))
        return work

    def _preflight(self, work, max_logits: Tensor | None) -> set[Tensor]:
        """One host read deciding which parameters to skip; rejects non-finite max logits.

        Raises before any parameter or state changes when the max logits are inf/nan.
        """
        flat = [p for _, params in work for p in params] if self.skip_nonfinite else []
        flags = [p.grad.isfinite().all() for p in flat]
        if max_logits is not None:
            flags.extend((torch.isnan(max_logits) | torch.isposinf(max_logits)).any(dim=-1).unbind())
        if not flags:
            return set()
        host = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        finite, bad_layers = host[: len(flat)], host[len(flat):]
        if any(bad_layers):
            names = self._clipper.layer_names() if hasattr(self._clipper, "layer_names") else None
            layers = [names[i] if names else str(i) for i, b in enumerate(bad_layers) if b]
            raise ValueError(f"non-finite max attention logits in layer(s) {layers}: the forward pass produced "
                             "inf/nan attention scores; no parameter or state was changed by this step")
        skipped = {p for p, ok in zip(flat, finite) if not ok}
        if skipped:
            warnings.warn("MuonClip: non-finite gradient, step skipped (state untouched) for "
                          + ", ".join(sorted(self._names[p] for p in skipped)), RuntimeWarning, stacklevel=3)
        return skipped

    def _muon_buckets(self, work, skipped: set[Tensor]):
        """Same-shape matrices of one group form a bucket, orthogonalized as one batch."""
        for g, params in work:
            if not g["use_muon"]:
                continue
            by_shape: dict[tuple, list[Tensor]] = defaultdict(list)
            for p in params:
                if p in skipped:
                    continue
                _, m, n = matrix_shape(p.shape, self._views[p])
                by_shape[(m, n, p.dtype, p.device)].append(p)
            for key in sorted(by_shape, key=lambda k: (k[0], k[1], str(k[2]), str(k[3]))):
                yield g, by_shape[key]

    def _muon_bucket_step(self, bucket) -> Tensor:
        g, params = bucket
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        updates = muon_momentum_(grads, bufs, momentum=g["momentum"], nesterov=g["nesterov"])
        views = [as_matrices(u, self._views[p]) for u, p in zip(updates, params)]
        ns_kw = dict(coefficients=g["ns_coefficients"], steps=g["ns_steps"], dtype=g["ns_dtype"],
                     eps=g["ns_eps"], backend=g["ns_backend"])
        if len(views) == 1 and views[0].shape[0] == 1:
            # A lone 2-D matrix takes the unbatched path: bit-identical to torch.optim.Muon.
            ortho = [orthogonalize(views[0][0], **ns_kw)]
        else:
            stacked = orthogonalize(torch.cat(views), **ns_kw)
            ortho = list(torch.split(stacked, [v.shape[0] for v in views]))
        _, m, n = matrix_shape(params[0].shape, self._views[params[0]])
        scale = update_scale(m, n, g["adjust_lr_fn"])
        muon_apply_(params, ortho, lr=g["lr"], weight_decay=g["weight_decay"], scale=scale)
        # sum of squares of the applied update (lr-free), for the update-RMS metric
        return sum((o.float().square().sum() for o in ortho), torch.zeros((), device=params[0].device)) * scale**2

    def _adamw_step(self, work, skipped: set[Tensor]) -> None:
        for g, params in work:
            if g["use_muon"]:
                continue
            params = [p for p in params if p not in skipped]
            if not params:
                continue
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    # torch.optim.AdamW's convention: a CPU step counter unless the fused kernel runs
                    state["step"] = torch.zeros((), dtype=torch.float32,
                                                device=p.device if self.adamw_fused else "cpu")
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = g["betas"]
            _torch_adam(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                        foreach=self.adamw_foreach, fused=self.adamw_fused, decoupled_weight_decay=True,
                        amsgrad=False, beta1=beta1, beta2=beta2, lr=g["lr"], weight_decay=g["weight_decay"],
                        eps=g["eps"], maximize=False)

    def _qk_clip_(self, max_logits: Tensor) -> None:
        for p, scale in self._clipper.row_scales(max_logits):
            p.mul_(scale.to(p.dtype).view(-1, *([1] * (p.ndim - 1))))

    def _record_metrics(self, work, skipped: set[Tensor], sq_sums: list[Tensor]) -> None:
        grads = [p.grad for _, params in work for p in params if p not in skipped]
        metrics: dict[str, Tensor] = {}
        if grads:
            metrics["grad_norm"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        n_muon = sum(p.numel() for g, params in work if g["use_muon"] for p in params if p not in skipped)
        if sq_sums and n_muon:
            metrics["muon_update_rms"] = torch.sqrt(torch.stack(sq_sums).sum() / n_muon)
        metrics["num_skipped"] = torch.tensor(float(len(skipped)))
        self._last_metrics = metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """State keyed by parameter name (stable across processes and rebuilt models).

        Layout: ``{"format", "step", "state": {name: {...}}, "param_groups": [{..., "params": [names]}]}``.
        Tensors are references, like ``torch.optim.Optimizer.state_dict``.
        """
        groups = []
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            d["params"] = [self._names[p] for p in g["params"]]
            groups.append(d)
        state = {self._names[p]: dict(s) for p, s in self.state.items() if s}
        return {"format": _STATE_FORMAT, "step": self._step_count_total, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (matched by parameter name; validated before anything changes)."""
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"state_dict has format {state_dict.get('format')!r}, expected {_STATE_FORMAT!r} "
                             "(a dist_muonclip MuonClip.state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        by_name = {self._names[p]: p for g in self.param_groups for p in g["params"]}
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
        new_state: dict[Tensor, dict[str, Any]] = {}
        for name, s in state_dict["state"].items():
            if name not in by_name:
                raise ValueError(f"state_dict has state for unknown parameter {name!r}")
            p = by_name[name]
            entry = {}
            for k, v in s.items():
                if isinstance(v, Tensor):
                    if k == "step":
                        v = v.detach().to(dtype=torch.float32, device="cpu").clone()
                    else:
                        if v.shape != p.shape:
                            raise ValueError(f"state {k!r} of {name!r} has shape {tuple(v.shape)}, parameter has "
                                             f"{tuple(p.shape)}")
                        v = v.detach().to(dtype=p.dtype, device=p.device).clone()
                entry[k] = v
            new_state[p] = entry
        for sg, g in zip(saved_groups, self.param_groups):
            for k, v in sg.items():
                if k != "params":
                    g[k] = v
        self.state.clear()
        self.state.update(new_state)
        self._step_count_total = int(state_dict.get("step", 0))
