"""Drop-in entry points for users of the two public MuonClip repositories.

* GAD-cell/muon-clip ("seed 000")::

      from dist_muonclip.compat import MuonClip, MuonConfig      # was: from muon import MuonClip, MuonConfig
      optimizer = MuonClip(model, model_config, MuonConfig(...))

* axion66/efficient-muonclip ("seed 001")::

      from dist_muonclip.compat import MuonClip, Muon, QKClip    # was: from muonclip import MuonClip ...
      muonclip = MuonClip(muon_params, [model.layer1.attn], "mha", {"w_q": "weight_q", "w_k": "weight_k"}, 8)
      muonclip.step(s_max)

Both map onto :class:`dist_muonclip.MuonClip` and :class:`dist_muonclip.qk_clip.QKClipper`.
Where the algorithm is the same the numbers are the same (tests/test_compat.py runs the seeds'
examples from examples/seeds/ against float64 reimplementations of the seeds); every intended
difference (which logits, the alpha split, GQA, the parameter split, ...) is one row of the table
in docs/compat.md.
"""
from __future__ import annotations

import math
import os
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_muonclip.optimizer import MuonClip as _MuonClip
from dist_muonclip.qk_clip import QKClipConfig, QKClipper

__all__ = ["Muon", "MuonClip", "MuonConfig", "QKClip", "muon_config_kwargs"]


@dataclass
class MuonConfig:
    """Seed 000's configuration, field for field (defaults from its README example).

    ``unified_lr``: one ``lr`` for Muon and AdamW (Muon's update RMS is matched to AdamW's,
    Moonlight arXiv 2502.16982, so one lr serves both); else ``lr_muon`` / ``lr_adam``.
    ``muon_decay`` / ``adam_decay``: decoupled weight decay. ``enable_clipping``,
    ``clipping_layers_mapping`` (role -> attribute name), ``clipping_threshold`` (tau),
    ``clipping_alpha``: QK-Clip. ``log_max_logits`` / ``log_dir``: metrics to TensorBoard under
    ``log_dir`` (when tensorboard is installed) and to the active W&B run. ``cans_ortho``: CANS
    Newton-Schulz coefficients (arXiv 2506.10935). ``estimate_lower_bound``: accepted for
    compatibility; our CANS schedule always uses its own interval estimate (see
    ``dist_muonclip.newton_schulz``), so it changes nothing (a warning says so).
    """

    unified_lr: bool = True
    lr: float = 1e-4
    lr_muon: float = 1e-4
    lr_adam: float = 1e-4
    muon_beta: float = 0.95
    muon_decay: float = 0.0
    ns_steps: int = 5
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_decay: float = 0.0
    adam_eps: float = 1e-10
    enable_clipping: bool = True
    clipping_layers_mapping: dict[str, str] = field(default_factory=lambda: {"q_proj": "q_proj", "k_proj": "k_proj"})
    clipping_threshold: float = 50.0
    clipping_alpha: float = 0.5
    log_max_logits: bool = True
    log_dir: str | None = "./logs"
    cans_ortho: bool = False
    estimate_lower_bound: bool = False


def muon_config_kwargs(cfg: MuonConfig) -> dict[str, Any]:
    """``MuonConfig`` -> keyword arguments of :class:`dist_muonclip.MuonClip` (validated there)."""
    if not isinstance(cfg, MuonConfig):
        raise TypeError(f"muon_config must be a dist_muonclip.compat.MuonConfig, got {type(cfg).__name__}")
    for name in ("unified_lr", "enable_clipping", "log_max_logits", "cans_ortho", "estimate_lower_bound"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"MuonConfig.{name} must be a bool, got {getattr(cfg, name)!r}")
    mapping = cfg.clipping_layers_mapping
    if mapping is not None and not isinstance(mapping, Mapping):
        raise TypeError(f"MuonConfig.clipping_layers_mapping must be a dict, got {type(mapping).__name__}")
    if cfg.estimate_lower_bound:
        warnings.warn("MuonConfig.estimate_lower_bound has no effect: dist_muonclip's CANS schedule estimates "
                      "its spectral interval itself", UserWarning, stacklevel=3)
    lr_muon, lr_adam = (cfg.lr, cfg.lr) if cfg.unified_lr else (cfg.lr_muon, cfg.lr_adam)
    # the optimizer's preflight checks the reduced max logits for NaN/inf (naming the layer) in its
    # one host read, so the clipper need not sync again
    qk = (QKClipConfig(tau=cfg.clipping_threshold, alpha=cfg.clipping_alpha, check_finite=False,
                       mapping=dict(mapping) if mapping else None) if cfg.enable_clipping else False)
    return dict(
        lr=lr_muon, adamw_lr=lr_adam, momentum=cfg.muon_beta, weight_decay=cfg.muon_decay, ns_steps=cfg.ns_steps,
        ns_coefficients="cans" if cfg.cans_ortho else "jordan", adjust_lr_fn="rms_0.4",
        adamw_betas=tuple(cfg.adam_betas), adamw_eps=cfg.adam_eps, adamw_weight_decay=cfg.adam_decay, qk_clip=qk,
    )


def _check_rank(rank: int | None, world_size: int | None) -> None:
    """The seeds take rank/world_size by hand; torch.distributed is the truth here."""
    if world_size is None or world_size == 1:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and world_size == 1:
            raise ValueError(f"world_size=1 given but torch.distributed runs {dist.get_world_size()} ranks; "
                             "pass world_size=dist.get_world_size() (or omit it)")
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} but torch.distributed is not initialized; launch with torchrun "
                         "(or call torch.distributed.init_process_group) before building the optimizer")
    if world_size != dist.get_world_size() or (rank is not None and rank != dist.get_rank()):
        raise ValueError(f"rank={rank}, world_size={world_size} do not match torch.distributed "
                         f"(rank {dist.get_rank()} of {dist.get_world_size()})")


def _seed_layers(attention_params: Sequence[nn.Module], mode: str, metadata: Mapping[str, Any],
                 n_head: int) -> list[dict[str, Any]]:
    if isinstance(attention_params, nn.Module):
        attention_params = [attention_params]
    if not attention_params or not all(isinstance(m, nn.Module) for m in attention_params):
        raise TypeError("attention_params must be a non-empty list of attention nn.Modules")
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    mode = str(mode).lower()
    need = {"mha": ("w_q", "w_k"), "mla": ("w_qc", "w_kc", "w_qr")}.get(mode)
    if need is None:
        raise ValueError(f"mode must be 'mha' or 'mla', got {mode!r}")
    missing = [k for k in need if k not in metadata]
    if missing:
        raise ValueError(f"metadata for mode={mode!r} needs keys {list(need)}; missing {missing}")
    extra = {k: metadata[k] for k in ("num_kv_heads", "n_kv_head", "head_dim") if k in metadata}
    spec = {k: metadata[k] for k in need}
    if mode == "mha":
        spec["num_kv_heads"] = extra.get("num_kv_heads", extra.get("n_kv_head"))
        spec["head_dim"] = extra.get("head_dim")
    return [dict(module=m, mode=mode, num_heads=n_head, name=f"attention_params[{i}]", **spec)
            for i, m in enumerate(attention_params)]


class MuonClip(_MuonClip):
    """Both seeds' ``MuonClip`` constructors on top of :class:`dist_muonclip.MuonClip`.

    Which seed is meant is read from the first argument: an ``nn.Module`` (or ``model=``) is
    seed 000's call, anything else seed 001's. Every intended difference from the seeds is one
    row of the table in ``docs/compat.md``.

    Seed 000 (GAD-cell/muon-clip): ``MuonClip(model, model_config, muon_config)``;
    ``model_config`` is an HF config or a dict with ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim`` (it overrides ``model.config`` for QK-Clip discovery).
    The Muon update is scaled by 0.4 sqrt(max(m, n)) as there (``adjust_lr_fn="rms_0.4"``), so the
    same :class:`MuonConfig` takes the same step. The parameter split is the library's (hidden
    matrices to Muon; embeddings, LM head, norms and biases to AdamW; seed 000 sent every 2-D
    tensor to Muon).

    Seed 001 (axion66/efficient-muonclip), its signature, order and defaults::

        MuonClip(params, attention_params, mode, metadata, n_head, lr=0.02, weight_decay=0.01,
                 momentum=0.95, nesterov=True, ns_steps=5, tau=100.0, alpha=0.5, rank=None,
                 world_size=None)

    ``params`` are the Muon matrices (anything 1-D goes to an AdamW group with the same lr
    instead of failing); the update scale is Keller Jordan's sqrt(max(1, m/n)) as there;
    ``tau=float("inf")`` turns clipping off; ``attention_params=None`` means no QK-Clip;
    ``metadata`` may also carry ``num_kv_heads`` (GQA) and ``head_dim``. ``rank`` /
    ``world_size`` may be omitted (read from ``torch.distributed``). ``step(s_max)`` takes the
    per-layer per-head max logits positionally as there (a callable is still treated as a
    closure); without ``s_max`` the tracker's values are used (``tracker.record``).

    Extra keyword arguments go to :class:`dist_muonclip.MuonClip` (e.g. ``ns_dtype``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        seed000 = isinstance(args[0], nn.Module) if args else ("model" in kwargs or "muon_config" in kwargs)
        if seed000:
            self._init_seed000(*args, **kwargs)
        else:
            self._init_seed001(*args, **kwargs)

    def _init_seed000(self, model: nn.Module, model_config: Any = None, muon_config: MuonConfig | None = None,
                      **kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError("MuonClip(model, model_config, muon_config): model must be an nn.Module")
        cfg = muon_config if muon_config is not None else MuonConfig()
        opts = muon_config_kwargs(cfg)
        opts.update(kwargs)
        log_dir = None
        if cfg.log_max_logits and cfg.log_dir is not None and "log_dir" not in kwargs:
            try:
                import torch.utils.tensorboard  # noqa: F401
                log_dir = os.path.abspath(cfg.log_dir)    # relative to where the optimizer was built
            except ImportError:
                warnings.warn("tensorboard is not installed: MuonConfig.log_dir ignored "
                              "(pip install tensorboard)", UserWarning, stacklevel=3)
        if cfg.log_max_logits:
            opts.setdefault("log_dir", log_dir)
            opts.setdefault("wandb_run", "auto")
        super().__init__(model, model_config=model_config, **opts)

    def _init_seed001(self, params: Any, attention_params: Sequence[nn.Module] | None = None, mode: str = "mha",
                      metadata: Mapping[str, Any] | None = None, n_head: int | None = None, lr: float = 0.02,
                      weight_decay: float = 0.01, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                      tau: float = 100.0, alpha: float = 0.5, rank: int | None = None,
                      world_size: int | None = None, **kwargs: Any) -> None:
        if params is None:
            raise TypeError("MuonClip needs params (seed efficient-muonclip: MuonClip(params, attention_params, "
                            "mode, metadata, n_head, ...)) or a model (seed muon-clip: MuonClip(model, "
                            "model_config, muon_config))")
        clip_off = _tau_off(tau)
        _check_rank(rank, world_size)
        groups = _muon_groups(list(params))
        opts: dict[str, Any] = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                    ns_steps=ns_steps, adjust_lr_fn="original")
        opts.update(kwargs)
        # unknown keywords raise TypeError first, as the seed's own call does
        inspect.signature(_MuonClip.__init__).bind(self, groups, qk_clip=False, **opts)
        clipper: Any = False
        if attention_params is not None and not clip_off:
            if metadata is None or n_head is None:
                raise ValueError("attention_params given: metadata and n_head are required too")
            # the core optimizer builds its clipper from a model; here it comes from explicit layers
            clipper = QKClipper(config=QKClipConfig(tau=tau, alpha=alpha, track="manual", check_finite=False),
                                layers=_seed_layers(attention_params, mode, metadata, n_head))
        super().__init__(groups, qk_clip=clipper, **opts)

    def step(self, s_max: Any = None, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """``step(s_max)`` (seeds) or ``step(closure)`` (torch); ``s_max`` per layer, per head.
        With clipping off (``tau=inf`` or no ``attention_params``) ``s_max`` is not needed and
        is ignored, as the seed's clip was a no-op then."""
        if callable(s_max) and closure is None:
            s_max, closure = None, s_max
        if self.qk_clipper is None:
            s_max = None
        return super().step(closure=closure, s_max=s_max)   # the core logs


def _tau_off(tau: Any) -> bool:
    """``tau=float("inf")`` is the seeds' way of turning the clip off (eta = min(1, inf) = 1)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau) or tau <= 0:
        raise ValueError(f"tau must be a positive number (float('inf') turns clipping off), got {tau!r}")
    return math.isinf(tau)


def _muon_groups(plist: list[Any]) -> list[dict[str, Any]]:
    if not plist:
        raise ValueError("params is empty")
    if isinstance(plist[0], Mapping):
        return plist  # param groups: the caller decides use_muon
    muon = [p for p in plist if p.ndim >= 2]
    other = [p for p in plist if p.ndim < 2]
    groups: list[dict[str, Any]] = [{"params": muon, "use_muon": True}] if muon else []
    if other:
        groups.append({"params": other, "use_muon": False})
    return groups


class Muon(MuonClip):
    """Seed 001's ``Muon(params, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True,
    ns_steps=5, rank=None, world_size=None)``: the Muon part alone (Keller Jordan's update
    scale, no QK-Clip); ``rank`` / ``world_size`` may be omitted here."""

    def __init__(self, params: Iterable[Any], lr: float = 0.02, weight_decay: float = 0.01, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, rank: int | None = None, world_size: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(list(params), lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_steps=ns_steps, rank=rank, world_size=world_size, **kwargs)


class QKClip:
    """Seed 001's ``QKClip(attention_params, mode, metadata, n_head, rank, world_size)``.

    ``step(s_max)`` all-reduces ``s_max`` (MAX) across ranks when distributed, then clips the
    full parameters in place (``QKClipper.apply_``). ``tau`` (default 100) and ``alpha`` (0.5)
    as in the paper. ``s_max=None`` uses the tracker (``qkclip.tracker.record(layer, values)``).
    """

    def __init__(self, attention_params: Sequence[nn.Module], mode: str, metadata: Mapping[str, Any], n_head: int,
                 tau: float = 100.0, alpha: float = 0.5, rank: int | None = None,
                 world_size: int | None = None) -> None:
        _check_rank(rank, world_size)
        # tau=inf: no clip ever (eta = 1), but the layers are still checked and s_max still reduced
        config = QKClipConfig(tau=1.0 if _tau_off(tau) else tau, alpha=alpha, track="manual")
        self.clip_off = math.isinf(tau)
        self.clipper = QKClipper(config=config, layers=_seed_layers(attention_params, mode, metadata, n_head))
        self.distributed = world_size is not None and world_size > 1

    @property
    def tracker(self):
        return self.clipper.tracker

    @torch.no_grad()
    def step(self, s_max: Any = None) -> torch.Tensor:
        s = self.clipper.max_logits(s_max)
        if self.distributed:
            dist.all_reduce(s, op=dist.ReduceOp.MAX)
        if not self.clip_off:
            self.clipper.apply_(s)
        return s

    def metrics(self) -> dict[str, torch.Tensor]:
        return self.clipper.metrics()
