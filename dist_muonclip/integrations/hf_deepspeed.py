"""ZeRO-3 and optimizer offload on DeepSpeed's own ``deepspeed.initialize`` (HF Trainer, accelerate)
after ``import dist_muonclip.hf``: the pieces :mod:`dist_muonclip.integrations.hf`'s engine hooks
call.

What differs from ZeRO-1/2 on that route, and what is done about it:

* **Models built under ``deepspeed.zero.Init``** (Trainer does this for ``from_pretrained`` /
  ``from_config`` when the JSON says ``"stage": 3``): every parameter's ``.data`` is an empty
  tensor, so a MuonClip built on the model would see only 1-D parameters and put every matrix
  on AdamW. The config route builds MuonClip inside
  :func:`~dist_muonclip.integrations.deepspeed_zero3.full_shapes` (full ``ds_shape`` stand-ins),
  as :func:`dist_muonclip.deepspeed.initialize` does; :class:`MuonClipTrainer` does the same. A
  user's instance built on such a model without it is refused (:func:`check_instance_shapes`).
* **Binding**: unchanged: after ``DeepSpeedEngine.__init__`` the adapter's ``bind`` finds
  ``DeepSpeedZeroOptimizer_Stage3`` and maps its fp32 sub-group partitions with
  :class:`~dist_muonclip.integrations.deepspeed_zero3.Zero3PartitionsLayout`, exactly as on our
  own entry point (so both routes run the same numerics).
* **Offload** (``offload_optimizer: {"device": "cpu"}`` at stage 1/2/3): DeepSpeed refuses a
  *client* optimizer (an instance) that is not its CPU Adam unless the config says
  ``"zero_force_ds_cpu_optimizer": false``; :func:`dist_muonclip.deepspeed.prepare_config` sets that
  on our entry point. Here the config is already parsed, so the engine's
  ``zero_force_ds_cpu_optimizer()`` answers ``False`` while an engine wrapping a MuonClip is
  being built (:func:`instance_engine`). The config route (``"type": "MuonClip"``) never reaches
  that check (DeepSpeed builds it as its own optimizer). Unsupported offload settings
  (``offload_param``, ``ratio``, a device other than cpu) are refused by the same
  :func:`~dist_muonclip.integrations.deepspeed_config.check_offload` rules and messages.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from ..optimizer import MuonClip
from .deepspeed_config import prepare_config
from .deepspeed_zero3 import full_shapes, is_zero3_param

__all__ = ["engine_config", "check_engine_modes", "build_muonclip", "check_instance_shapes", "instance_engine",
           "is_instance_engine", "full_shapes"]

_INSTANCE_ENGINES: set[int] = set()


def engine_config(engine: Any) -> dict[str, Any]:
    """The ZeRO / precision / offload part of an engine's parsed config, as a config dict."""
    stage = engine.zero_optimization_stage()
    cfg: dict[str, Any] = {"zero_optimization": {"stage": stage}}
    if engine.fp16_enabled():
        cfg["fp16"] = {"enabled": True}
    if engine.zero_offload_optimizer():
        off = engine.zero_offload_optimizer()
        section: dict[str, Any] = {"device": str(getattr(off.device, "value", off.device))}
        ratio = getattr(off, "ratio", 1.0)
        if ratio is not None and float(ratio) != 1.0:
            section["ratio"] = ratio
        cfg["zero_optimization"]["offload_optimizer"] = section
    if engine.zero_offload_param():
        off = engine.zero_offload_param()
        cfg["zero_optimization"]["offload_param"] = {"device": str(getattr(off.device, "value", off.device))}
    return cfg


def check_engine_modes(engine: Any) -> None:
    """The modes MuonClip refuses (same rules and messages as dist_muonclip.deepspeed.prepare_config):
    ZeRO stages 0-3, ``offload_optimizer`` cpu at 1-3; not fp16, ``offload_param``, partial offload."""
    prepare_config(engine_config(engine), has_optimizer=True)


def build_muonclip(module: nn.Module, **kwargs: Any) -> MuonClip:
    """``MuonClip(module, grad_reduction="external", **kwargs)`` seeing full parameter shapes when
    ``module`` was built under ``deepspeed.zero.Init``."""
    with full_shapes(module):
        return MuonClip(module, grad_reduction="external", **kwargs)


def check_instance_shapes(model: nn.Module, opt: MuonClip) -> None:
    """A MuonClip built on a ``zero.Init`` model outside ``full_shapes`` saw empty 1-D parameters
    and put no matrix on Muon: refuse it before DeepSpeed starts."""
    partitioned = [p for p in model.parameters() if is_zero3_param(p) and len(p.ds_shape) >= 2]
    if not partitioned:
        return
    muon = sum(len(g["params"]) for g in opt.param_groups if g.get("use_muon", True))
    if muon == 0:
        raise ValueError("the MuonClip instance was built on a model partitioned by deepspeed.zero.Init (its "
                         "parameters were empty, so no matrix went to Muon): build it inside "
                         "`with dist_muonclip.hf.full_shapes(model): opt = MuonClip(model, ...)`, or name it in "
                         "the DeepSpeed config (\"optimizer\": {\"type\": \"MuonClip\", ...}) and pass no instance")


@contextlib.contextmanager
def instance_engine(engine: Any) -> Iterator[None]:
    """While ``engine`` (wrapping a MuonClip instance) is built, its
    ``zero_force_ds_cpu_optimizer()`` answers False (see module doc)."""
    _INSTANCE_ENGINES.add(id(engine))
    try:
        yield
    finally:
        _INSTANCE_ENGINES.discard(id(engine))


def is_instance_engine(engine: Any) -> bool:
    return id(engine) in _INSTANCE_ENGINES


def patch_accelerate() -> None:
    """accelerate's ``prepare`` swaps a client optimizer for ``DeepSpeedCPUAdam`` when
    ``offload_optimizer`` is on (``map_pytorch_optim_to_deepspeed``, unless the config says
    ``"zero_force_ds_cpu_optimizer": false``): a MuonClip is kept (Trainer's
    ``optimizers=(MuonClip, None)``, :class:`MuonClipTrainer`, ``accelerator.prepare``)."""
    try:
        import accelerate.accelerator as acc_mod
    except ImportError:
        return
    orig = getattr(acc_mod, "map_pytorch_optim_to_deepspeed", None)
    if orig is None or getattr(orig, "_dist_muonclip", False):
        return

    def map_pytorch_optim_to_deepspeed(optimizer):
        if isinstance(optimizer, MuonClip):
            return optimizer
        return orig(optimizer)

    map_pytorch_optim_to_deepspeed._dist_muonclip = True
    acc_mod.map_pytorch_optim_to_deepspeed = map_pytorch_optim_to_deepspeed
