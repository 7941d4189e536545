"""Hugging Face Trainer, accelerate and DeepSpeed's own ``deepspeed.initialize`` with MuonClip.

One line switches an existing Trainer + DeepSpeed script to MuonClip, with the optimizer named in
its DeepSpeed JSON::

    import dist_muonclip.hf  # noqa: F401  (installs the hooks below; idempotent)

    "optimizer": {"type": "MuonClip", "params": {"lr": "auto", "weight_decay": "auto",
                                                 "betas": "auto", "eps": "auto"}}

What the import does (:func:`install`), and why each hook sits where it does:

* **DeepSpeed builds the optimizer from the config** in ``DeepSpeedEngine._configure_basic_optimizer``
  after ``_do_sanity_check`` asserted the type is one it knows (``_is_supported_optimizer``). Both
  are extended for the type ``MuonClip`` (case-insensitive): the engine builds
  ``MuonClip(engine.module, grad_reduction="external", **params)`` inside the same
  :class:`~dist_muonclip.integrations.deepspeed.DeepSpeedMuonClip` adapter that
  :func:`dist_muonclip.deepspeed.initialize` uses, and binds it to DeepSpeed's partitions when the
  engine is complete (ZeRO-0/1/2, fp32 or bf16: same layouts, same numerics). This is the one
  place every caller goes through: HF Trainer (``TrainingArguments(deepspeed=...)``), accelerate's
  DeepSpeed plugin (``DummyOptim``) and ``deepspeed.initialize`` itself.
* **A plain MuonClip handed to DeepSpeed as the client optimizer** (``deepspeed.initialize(optimizer=
  MuonClip(model))``, ``accelerator.prepare(model, MuonClip(model))``, Trainer's
  ``optimizers=(MuonClip(model), None)`` or ``optimizer_cls_and_kwargs``) is wrapped into the same
  adapter in ``DeepSpeedEngine.__init__``, so ZeRO-1/2's per-group stepping works.
* **Trainer + DeepSpeed drops ``optimizers=(opt, ...)``** (``deepspeed_init`` sets
  ``trainer.optimizer = None`` and builds AdamW). When ``opt`` is a MuonClip it is routed to
  DeepSpeed instead; an ``"optimizer"`` section in the JSON as well, or a scheduler built on the
  instance, raise ``ValueError`` naming the fix.
* **HF's ``"auto"`` values**: Trainer fills ``optimizer.params.{lr, betas, eps, weight_decay}``
  from ``TrainingArguments``; ``betas`` and ``eps`` are accepted as the HF spellings of
  ``adamw_betas`` / ``adamw_eps`` (:data:`HF_PARAM_ALIASES`), and ``adamw_lr``,
  ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay`` set to ``"auto"`` are filled too
  (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``). An ``"auto"`` left
  when nobody filled it raises ``ValueError`` naming the key.
* **Trainer without DeepSpeed** (DDP under torchrun): Trainer writes ``optimizer.pt`` by calling
  ``optimizer.state_dict()`` on rank 0 only; MuonClip's full state is a collective (every rank
  holds a part), so that call would hang. ``Trainer._save_optimizer_and_scheduler`` gathers the
  full state on every rank first, then rank 0 writes it (same file, same format: resume works at
  any world size). A MuonClip built before the process group existed (e.g. before
  ``TrainingArguments``) is moved onto the data-parallel group when Trainer builds its optimizer.
  :class:`MuonClipTrainer` builds MuonClip itself from ``TrainingArguments`` at the right time.

**When the hooks go in.** DeepSpeed is patched by the import. transformers and accelerate are
never imported by it: each of their modules is patched right after the script (or a framework)
imports it, or at once if it already is (:mod:`dist_muonclip.integrations.hf_imports`). An
accelerate-only script (no transformers) gets accelerate's hooks from ``import accelerate``:
DeepSpeed offload keeps a MuonClip instance, FSDP2's parameter swap is followed.

The scheduler can come from either side: a ``"scheduler"`` section (DeepSpeed's) or, without
one, Trainer's ``lr_scheduler_type``; both write the adapter's param groups, whose first lr scales
every MuonClip group (``lr`` and ``adamw_lr`` keep their ratio).

ZeRO-3 (models built under ``deepspeed.zero.Init`` included) and ``offload_optimizer: {"device":
"cpu"}`` at stages 1-3 work on this route too (:mod:`dist_muonclip.integrations.hf_deepspeed`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..dist_check import DistributedNotReadyWarning, check_process_group
from ..optimizer import MuonClip
from . import deepspeed as ds_adapter   # our DeepSpeed adapter (public names only)
from . import hf_deepspeed              # ZeRO-3 / offload on DeepSpeed's own initialize
from . import hf_imports                # patch transformers / accelerate when they are imported
from .hf_deepspeed import full_shapes   # noqa: F401  (build a MuonClip instance on a zero.Init model)

__all__ = [
    "full_shapes",
    "HF_PARAM_ALIASES",
    "AUTO_FILLS",
    "install",
    "is_installed",
    "patched",
    "muonclip_kwargs",
    "check_process_group",
    "DistributedNotReadyWarning",
    "muonclip_optimizer",
    "unwrap_optimizer",
    "save_trainer_optimizer",
    "MuonClipTrainerMixin",
    "MuonClipTrainer",
    "MuonClipFactory",
]

# HF / DeepSpeed AdamW spelling -> MuonClip option (Trainer fills these four names from TrainingArguments)
HF_PARAM_ALIASES: dict[str, str] = {"betas": "adamw_betas", "eps": "adamw_eps"}

# MuonClip option -> (TrainingArguments attribute(s), how to read them, must a number match it).
# Filled when "auto". adamw_lr / adamw_weight_decay exist to differ from lr / weight_decay (which
# Trainer already matches against learning_rate / weight_decay): a number there is never a mismatch.
AUTO_FILLS: dict[str, tuple[str, Any, bool]] = {
    "adamw_lr": ("learning_rate", lambda a: a.learning_rate, False),
    "adamw_betas": ("adam_beta1+adam_beta2", lambda a: [a.adam_beta1, a.adam_beta2], True),
    "adamw_eps": ("adam_epsilon", lambda a: a.adam_epsilon, True),
    "adamw_weight_decay": ("weight_decay", lambda a: a.weight_decay, False),
}

_STATE: dict[str, Any] = {"installed": False}
# adapters this module created or adopted: bound to DeepSpeed's partitions when their engine is built
_PENDING_BIND: "weakref.WeakSet[Any]" = weakref.WeakSet()


# --------------------------------------------------------------------------------------------
# The config section
# --------------------------------------------------------------------------------------------

def _is_muonclip_type(name: Any) -> bool:
    return isinstance(name, str) and name.lower() == "muonclip"


def muonclip_kwargs(params: dict[str, Any] | None) -> dict[str, Any]:
    """MuonClip keyword arguments from a config's ``optimizer.params`` (after HF filled ``"auto"``).

    Maps the HF/DeepSpeed spellings ``betas``/``eps`` to ``adamw_betas``/``adamw_eps`` (both
    spellings at once: ``ValueError``), refuses a remaining ``"auto"`` (nobody filled it), then
    validates with :func:`dist_muonclip.deepspeed.parse_muonclip_section` (unknown keys, JSON
    types). Never changes ``params``.
    """
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise TypeError(f"DeepSpeed config optimizer.params must be an object, got {type(params).__name__}")
    out = dict(params)
    for hf_key, ours in HF_PARAM_ALIASES.items():
        if hf_key in out:
            if ours in out:
                raise ValueError(f"DeepSpeed config optimizer.params has both {hf_key!r} and {ours!r} (the same "
                                 f"MuonClip option, {hf_key!r} is its HF/AdamW spelling); keep one")
            out[ours] = out.pop(hf_key)
    autos = sorted(k for k, v in out.items() if isinstance(v, str) and v == "auto")
    if autos:
        raise ValueError(f"DeepSpeed config optimizer.params {autos} are \"auto\" but nothing filled them: \"auto\" "
                         "is filled by HF Trainer (from TrainingArguments) and accelerate (lr, weight_decay from "
                         "DummyOptim); with deepspeed.initialize or dist_muonclip.deepspeed.initialize write numbers")
    return ds_adapter.parse_muonclip_section({"type": "MuonClip", "params": out})


# --------------------------------------------------------------------------------------------
# Misuse: MuonClip built in a multi-process job before the process group exists
# --------------------------------------------------------------------------------------------

def _adopt_process_group(opt: MuonClip) -> None:
    """Move a not-yet-stepped MuonClip built before the process group onto the world group."""
    if dist.is_available() and dist.is_initialized() and opt.world_size != dist.get_world_size():
        opt.set_layout(None)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def unwrap_optimizer(opt: Any) -> Any:
    """The innermost optimizer behind accelerate's / DeepSpeed's wrappers (``.optimizer`` chain)
    and our DeepSpeed adapter (``.inner``)."""
    seen = set()
    while id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, MuonClip):
            return opt
        if isinstance(opt, ds_adapter.DeepSpeedMuonClip):
            return opt.inner
        nxt = getattr(opt, "optimizer", None)
        if nxt is None:
            return opt
        opt = nxt
    return opt


def muonclip_optimizer(obj: Any) -> MuonClip:
    """The :class:`MuonClip` behind a DeepSpeed engine (``engine.basic_optimizer``), a Trainer
    (``trainer.optimizer``), accelerate's wrapped optimizer or the adapter."""
    for cand in (getattr(obj, "basic_optimizer", None), getattr(obj, "optimizer", None), obj):
        if cand is None:
            continue
        inner = unwrap_optimizer(cand)
        if isinstance(inner, MuonClip):
            return inner
    raise ValueError(f"no MuonClip found behind {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# DeepSpeed hooks
# --------------------------------------------------------------------------------------------

def _check_engine_modes(engine: Any) -> None:
    """The modes MuonClip refuses (same rules and messages as dist_muonclip.deepspeed.prepare_config);
    ZeRO-3 and offload_optimizer cpu are supported (see dist_muonclip.integrations.hf_deepspeed)."""
    hf_deepspeed.check_engine_modes(engine)


def _wrap_client(model: nn.Module, opt: MuonClip, lr_scheduler: Any) -> Any:
    if lr_scheduler is not None and getattr(lr_scheduler, "optimizer", None) is opt:
        raise ValueError("the lr scheduler was built on the MuonClip instance, but DeepSpeed steps MuonClip through "
                         "an adapter whose param groups carry the lr: pass no scheduler and use a DeepSpeed "
                         "\"scheduler\" section, or build the scheduler on the optimizer deepspeed.initialize "
                         "returns (Trainer: set lr_scheduler_type)")
    client = ds_adapter.DeepSpeedMuonClip(model, opt)
    _PENDING_BIND.add(client)
    return client


def _patch_deepspeed() -> None:
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import utils as zero_utils

    Engine = ds_engine.DeepSpeedEngine
    orig_init = Engine.__init__
    orig_supported = Engine._is_supported_optimizer
    orig_basic = Engine._configure_basic_optimizer
    sig = inspect.signature(orig_init)

    @functools.wraps(orig_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        a = bound.arguments
        instance = isinstance(a.get("optimizer"), MuonClip)
        if instance:
            _check_mode_of_plain_instance(a.get("config"), a.get("config_class"))
            hf_deepspeed.check_instance_shapes(a["model"], a["optimizer"])
            a["optimizer"] = _wrap_client(a["model"], a["optimizer"], a.get("lr_scheduler"))
        with hf_deepspeed.instance_engine(self) if instance else contextlib.nullcontext():
            orig_init(*bound.args, **bound.kwargs)
        client = getattr(self, "basic_optimizer", None)
        if client is not None and client in _PENDING_BIND:
            _PENDING_BIND.discard(client)
            client.bind(self)

    def _is_supported_optimizer(self, optimizer_name):
        return _is_muonclip_type(optimizer_name) or orig_supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):
        if not _is_muonclip_type(self.optimizer_name()):
            return orig_basic(self, model_parameters)
        kwargs = muonclip_kwargs(self.optimizer_params())
        _check_engine_modes(self)
        try:   # every value validated here, before DeepSpeed partitions anything
            inner = hf_deepspeed.build_muonclip(self.module, **kwargs)   # full shapes under zero.Init
        except (ValueError, TypeError) as e:
            raise type(e)(f"DeepSpeed config optimizer.params: {e}") from e
        _check_trainable(self.module, inner, model_parameters)
        client = ds_adapter.DeepSpeedMuonClip(self.module, inner)
        _PENDING_BIND.add(client)
        return client

    orig_force = Engine.zero_force_ds_cpu_optimizer

    def zero_force_ds_cpu_optimizer(self):   # offload with a MuonClip instance (see hf_deepspeed)
        return False if hf_deepspeed.is_instance_engine(self) else orig_force(self)

    Engine.__init__ = __init__
    Engine.zero_force_ds_cpu_optimizer = zero_force_ds_cpu_optimizer
    Engine._is_supported_optimizer = _is_supported_optimizer
    Engine._configure_basic_optimizer = _configure_basic_optimizer
    if ds_adapter.DeepSpeedMuonClip not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        # ZeRO-1/2 partition it like torch's Adam (it was written for their per-group stepping)
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(ds_adapter.DeepSpeedMuonClip)
    _STATE["deepspeed"] = (Engine, orig_init, orig_supported, orig_basic)


def _check_mode_of_plain_instance(config: Any, config_class: Any) -> None:
    """A MuonClip instance next to a config naming another optimizer: refuse before DeepSpeed starts."""
    name = getattr(config_class, "optimizer_name", None)
    if name is not None and not _is_muonclip_type(name):
        raise ValueError(f"a MuonClip instance was passed as the optimizer but the DeepSpeed config's optimizer "
                         f"section has type {name!r}; remove that section (or set its type to MuonClip and pass "
                         "no instance)")
    if _is_muonclip_type(name):
        raise ValueError("both a MuonClip instance and an 'optimizer' section of type MuonClip were given; "
                         "remove one of them")


def _check_trainable(model: nn.Module, inner: MuonClip, model_parameters: Any) -> None:
    """DeepSpeed was given ``model_parameters``; MuonClip optimizes the model's trainable ones.
    They must be the same set, or some parameter would silently not train (or train twice)."""
    if model_parameters is None:
        return
    given = set()
    for item in model_parameters:
        if isinstance(item, dict):
            given.update(item["params"])
        else:
            given.add(item)
    ours = {p for g in inner.param_groups for p in g["params"]}
    if given and given != ours:
        raise ValueError(f"DeepSpeed got {len(given)} parameters (model_parameters) but MuonClip optimizes the "
                         f"model's {len(ours)} trainable ones; freeze parameters with requires_grad=False instead "
                         "of leaving them out of model_parameters")


# --------------------------------------------------------------------------------------------
# transformers hooks
# --------------------------------------------------------------------------------------------

def _patch_hf_deepspeed(hf_ds: Any) -> None:
    """``transformers.integrations.deepspeed``: fill MuonClip's "auto" values from TrainingArguments
    and route ``optimizers=(MuonClip, None)`` to DeepSpeed (see the module doc)."""
    if _STATE.get("hf_deepspeed"):
        return
    orig_process = hf_ds.HfTrainerDeepSpeedConfig.trainer_config_process
    orig_init = hf_ds.deepspeed_init

    @functools.wraps(orig_process)
    def trainer_config_process(self, args, auto_find_batch_size=False):
        orig_process(self, args, auto_find_batch_size)
        if _is_muonclip_type((self.config.get("optimizer") or {}).get("type")):
            for key, (hf_key, read, must_match) in AUTO_FILLS.items():
                self.fill_match(f"optimizer.params.{key}", read(args), hf_key, must_match)

    @functools.wraps(orig_init)
    def deepspeed_init(trainer, num_training_steps, inference=False):
        opt = trainer.optimizer
        if inference or not isinstance(opt, MuonClip):
            return orig_init(trainer, num_training_steps, inference=inference)
        config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
        if "optimizer" in config:
            raise ValueError("Trainer got optimizers=(MuonClip, ...) and the DeepSpeed config has an 'optimizer' "
                             "section: remove the section, or drop the instance and set the section's type to "
                             "MuonClip")
        if trainer.lr_scheduler is not None:
            raise ValueError("Trainer + DeepSpeed with optimizers=(MuonClip, scheduler): the scheduler would drive "
                             "the instance, not the DeepSpeed optimizer; pass optimizers=(muonclip, None) and choose "
                             "the schedule with TrainingArguments(lr_scheduler_type=...) or a DeepSpeed "
                             "\"scheduler\" section")
        # deepspeed_init sets trainer.optimizer = None and calls trainer.create_optimizer() (AdamW):
        # route our instance through that call instead; DeepSpeedEngine.__init__ wraps it.
        trainer.create_optimizer = lambda *a, **k: opt
        try:
            return orig_init(trainer, num_training_steps, inference=inference)
        finally:
            del trainer.create_optimizer

    hf_ds.HfTrainerDeepSpeedConfig.trainer_config_process = trainer_config_process
    hf_ds.deepspeed_init = deepspeed_init
    _STATE["hf_deepspeed"] = True


def _patch_trainer(hf_trainer: Any) -> None:
    """``transformers.trainer``: its imported ``deepspeed_init`` name, the rank-0-only optimizer
    save, and a MuonClip built before the process group (see the module doc)."""
    if _STATE.get("trainer"):
        return
    # transformers.trainer imported this module at its top, so it is complete here
    hf_ds = sys.modules["transformers.integrations.deepspeed"]
    _patch_hf_deepspeed(hf_ds)
    Trainer = hf_trainer.Trainer
    orig_save = Trainer._save_optimizer_and_scheduler
    orig_create = Trainer.create_optimizer

    @functools.wraps(orig_save)
    def _save_optimizer_and_scheduler(self, output_dir):
        # DeepSpeed saves through engine.save_checkpoint (every rank) and FSDP through torch's
        # state-dict helpers; only the plain path calls state_dict() on rank 0 alone
        if (getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False)
                or not isinstance(unwrap_optimizer(self.optimizer), MuonClip)):
            return orig_save(self, output_dir)
        save_trainer_optimizer(self, output_dir)

    @functools.wraps(orig_create)
    def create_optimizer(self, model=None):
        opt = orig_create(self, model)
        inner = unwrap_optimizer(opt)
        if isinstance(inner, MuonClip) and not getattr(self, "is_deepspeed_enabled", False):
            _adopt_process_group(inner)
        return opt

    hf_trainer.deepspeed_init = hf_ds.deepspeed_init          # Trainer imported the name
    Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler
    Trainer.create_optimizer = create_optimizer
    _STATE["trainer"] = True


def _patch_accelerate(acc_mod: Any) -> None:
    """``accelerate.accelerator`` (and the ``accelerate.utils`` it imported): keep a MuonClip under
    DeepSpeed offload, follow FSDP2's parameter swap."""
    if _STATE.get("accelerate"):
        return
    from . import hf_fsdp     # accelerate / Trainer FSDP2: MuonClip follows the DTensor swap

    hf_deepspeed.patch_accelerate()     # offload: keep a MuonClip instead of DeepSpeedCPUAdam
    hf_fsdp.patch_accelerate()
    _STATE["accelerate"] = True


def save_trainer_optimizer(trainer: Any, output_dir: str) -> None:
    """Trainer's ``optimizer.pt`` / ``scheduler.pt`` for MuonClip, called on every rank.

    MuonClip's full ``state_dict()`` is a collective (each rank holds the state of what it owns):
    every rank gathers it, rank 0 (``args.should_save``) writes it. The file is the full,
    layout-independent state, so Trainer's own ``_load_optimizer_and_scheduler`` resumes from it at
    any world size.
    """
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    state = unwrap_optimizer(trainer.optimizer).state_dict()    # collective: all ranks, same order
    if trainer.args.should_save:
        torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
        if trainer.lr_scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # torch's "save the optimizer too" reminder
                torch.save(trainer.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))


# --------------------------------------------------------------------------------------------
# Trainer without DeepSpeed: building MuonClip at the right time
# --------------------------------------------------------------------------------------------

class MuonClipFactory:
    """For ``Trainer(optimizer_cls_and_kwargs=(MuonClipFactory, {"lr": ...}))``.

    Trainer calls ``MuonClipFactory()(model, **kwargs)`` inside ``create_optimizer``, after
    accelerate has created the process group and before DDP wraps the model, so MuonClip sees the
    model's names and the data-parallel group.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> MuonClip:
        return MuonClip(model, **kwargs)


class MuonClipTrainerMixin:
    """Trainer mixin: ``optimizer`` built as MuonClip from ``TrainingArguments``.

    ``muonclip_kwargs`` (constructor keyword) adds or overrides MuonClip options; ``lr``,
    ``weight_decay``, ``adamw_betas`` and ``adamw_eps`` default to ``learning_rate``,
    ``weight_decay``, ``(adam_beta1, adam_beta2)`` and ``adam_epsilon``. With DeepSpeed enabled the
    same instance is routed to DeepSpeed (see the module doc).
    """

    def __init__(self, *args: Any, muonclip_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if muonclip_kwargs is not None and not isinstance(muonclip_kwargs, dict):
            raise TypeError(f"muonclip_kwargs must be a dict of MuonClip options, got {type(muonclip_kwargs).__name__}")
        self.muonclip_kwargs = dict(muonclip_kwargs or {})
        super().__init__(*args, **kwargs)

    def muonclip_options(self) -> dict[str, Any]:
        a = self.args
        return {"lr": a.learning_rate, "weight_decay": a.weight_decay, "adamw_betas": (a.adam_beta1, a.adam_beta2),
                "adamw_eps": a.adam_epsilon, **self.muonclip_kwargs}

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            with hf_deepspeed.full_shapes(opt_model):    # a model built under zero.Init (ZeRO-3)
                self.optimizer = MuonClip(opt_model, **self.muonclip_options())
        return super().create_optimizer(model)


def _make_trainer_class() -> Any:
    from transformers import Trainer

    class MuonClipTrainer(MuonClipTrainerMixin, Trainer):
        """``transformers.Trainer`` that trains with MuonClip (see :class:`MuonClipTrainerMixin`)."""

    return MuonClipTrainer


def __getattr__(name: str) -> Any:
    if name == "MuonClipTrainer":      # transformers imported on first use only
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------

def is_installed() -> bool:
    return bool(_STATE["installed"])


def install() -> None:
    """Install the DeepSpeed, transformers and accelerate hooks (see the module doc). Idempotent; a
    framework that is not installed is skipped.

    DeepSpeed is patched now. transformers and accelerate are never imported here: each module is
    patched when it is imported (now, if it already is), through
    :func:`~dist_muonclip.integrations.hf_imports.when_imported`, so an accelerate-only script
    never loads transformers, and a transformers import never starts another one half-way.
    """
    if _STATE["installed"]:
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    else:
        _patch_deepspeed()
    if hf_imports.is_importable("transformers"):
        hf_imports.when_imported("transformers.integrations.deepspeed", _patch_hf_deepspeed)
        hf_imports.when_imported("transformers.trainer", _patch_trainer)
    if hf_imports.is_importable("accelerate"):
        # accelerate/__init__ imports .accelerator, which imports the utils patched here
        hf_imports.when_imported("accelerate.accelerator", _patch_accelerate)
    _STATE["installed"] = True


def patched() -> dict[str, bool]:
    """Which framework modules carry the hooks now (a module not imported yet is patched on import)."""
    return {name: bool(_STATE.get(name)) for name in ("deepspeed", "hf_deepspeed", "trainer", "accelerate")}


install()
