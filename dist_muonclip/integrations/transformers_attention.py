"""transformers glue of the max-logit tracker: records QK-Clip's per-head max logits of any HF
model (Llama, Mistral, Qwen2/3, DeepSeek-V3 MLA, ...) without changing the model.

:func:`install_hf_tracking` registers ``dist_muonclip_<impl>`` attention functions in
transformers' ``AttentionInterface`` (and the matching mask function in
``AttentionMaskInterface``) that wrap the model's own implementation (eager / sdpa / flash), and
points the model's configs at them; the returned :class:`TrackingHandle` restores the original
implementation names. The wrapper hands each call's post-RoPE q, k (and the mask / causal /
sliding-window / packed-sequence structure HF applies) to the core
:class:`dist_muonclip.tracker.MaxLogitTracker`; on CUDA, sdpa calls the fused Triton kernel can
compute exactly (causal, optionally a sliding window) run through
``dist_muonclip.kernels.attention_max`` instead, which returns the output and the max together.

This module imports the core; the core never imports transformers (``MaxLogitTracker.install_hf``
imports this module on use).
"""
from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..kernels._env import head_dims_supported
from ..tracker import MaxLogitTracker

__all__ = ["FUSED_ATTENTION", "TrackingHandle", "install_hf_tracking"]

_PREFIX = "dist_muonclip_"

# module -> tracker (weak both ways: dropping the tracker or the model frees everything)
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, weakref.ref[MaxLogitTracker]] = weakref.WeakKeyDictionary()
_REGISTERED: set[str] = set()


def _segments_from_cu_seqlens(cu: torch.Tensor, length: int) -> torch.Tensor:
    """``cu_seq_lens`` [N+1] (flash varlen, batch 1) -> segment ids [1, length]."""
    pos = torch.arange(length, device=cu.device)
    return (torch.bucketize(pos, cu[1:].to(pos.dtype), right=True)).reshape(1, length)


def _base_function(base: str, module: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        # Models call get_interface(impl, default=<their own eager_attention_forward>): the eager
        # path lives in the model's modeling file, not in the interface.
        fn = None
        for cls in type(module).__mro__:  # wrappers (e.g. FSDP2's FSDP<Class>) subclass the model's class
            fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
            if fn is not None:
                break
        if fn is None:
            raise RuntimeError(
                f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}; "
                "use attn_implementation='sdpa' or record max logits manually (tracker.record)"
            )
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


# Devices on which the fused attention+max kernel replaces SDPA (tests add "cpu" with a stand-in).
_FUSED_DEVICES = ("cuda",)

FUSED_ATTENTION = True
"""Set False to send every tracked sdpa call through SDPA + the standalone max-logit kernel
(benchmarks compare the two; debugging)."""


def _fused_attention():
    """``attention_with_max_logits`` when the Triton kernels can run, else None."""
    try:
        from ..kernels import triton_available
        from ..kernels.attention_max import attention_with_max_logits
    except ImportError:
        return None
    return attention_with_max_logits if triton_available() else None


# mask tensor id -> (weak reference to it, window it was checked against, its kind)
_MASK_KIND: dict[int, tuple[weakref.ref[torch.Tensor], int | None, str]] = {}


def _mask_kind(mask: torch.Tensor, window: int | None) -> str:
    """How HF's 4-D bool "attend" mask relates to the causal mask cut to ``window`` (keys
    j > i - window when one is given), for every batch row:

    * ``"structural"``: equal to it (no padding, no packing): the fused kernel's own causal /
      window masking computes the same attention without reading the mask;
    * ``"within"``: a subset of it (padding, packed sequences on top): the kernel reads the mask
      and still skips the blocks the structure hides;
    * ``"other"``: anything else (a bidirectional or prefix mask, a non-bool or odd-shaped one).

    transformers builds one mask tensor per forward and hands that same object to every layer,
    so the check (one device-to-host sync) runs once per mask and is cached by identity.
    """
    key = id(mask)
    hit = _MASK_KIND.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == window:
        return hit[2]
    kind = "other"
    if mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]:
        pos = torch.arange(mask.shape[-1], device=mask.device)
        want = pos[None, :] <= pos[:, None]
        if window is not None:
            want &= pos[None, :] > pos[:, None] - window
        outside, missing = torch.stack([(mask & ~want).any(), (want & ~mask).any()]).tolist()
        kind = "other" if outside else ("within" if missing else "structural")
    _MASK_KIND[key] = (weakref.ref(mask, lambda _ref, key=key: _MASK_KIND.pop(key, None)), window, kind)
    return kind


def _try_fused_sdpa(tracker, module, query, key, value, mask, opts):
    """The cheap path on GPU: one Triton attention forward returns the output and the exact
    per-head max (flash attention's running row max), instead of SDPA plus a second q k^T pass.

    Only for what that kernel computes exactly: causal self-attention, no dropout, no packed
    sequences, query length == key length, no extra SDPA arguments (sinks, position bias),
    bf16/fp16, head dims the kernel takes (q/k a power of two in [16, 256] or a sum of two, as
    MLA's 192 = 128 + 64; values a power of two: ``kernels._env.head_dims_supported``),
    and no mask tensor or one within the causal mask (+ the module's ``sliding_window``, see
    :func:`_mask_kind`). An exactly causal(+window) mask is not read at all: Mistral-style sliding
    windows take the kernel with its window, which skips the key blocks outside it (SDPA, given
    the mask, computes every block); padding / packing masks are read by the kernel, and the
    backward is cuDNN's with the mask as a bias, as SDPA's. Returns HF's sdpa output format, or
    None to fall back.
    """
    q_len, kv_len, d = query.shape[2], key.shape[2], query.shape[-1]
    if (value.shape[:3] != key.shape[:3] or not head_dims_supported(d, value.shape[-1])
            or query.dtype not in (torch.bfloat16, torch.float16)):   # what the kernel and cuDNN's backward take
        return None
    extras = set(opts) - {"scaling", "dropout", "is_causal", "sliding_window", "position_ids",
                          "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                          "use_cache", "cache_position", "output_attentions", "past_key_value", "past_key_values"}
    window = opts.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        return None
    if (not FUSED_ATTENTION or query.device.type not in _FUSED_DEVICES or q_len != kv_len or q_len < 2
            or float(opts.get("dropout") or 0.0) != 0.0
            or opts.get("cu_seq_lens_k") is not None or extras
            or not (opts.get("is_causal") if opts.get("is_causal") is not None else getattr(module, "is_causal", True))):
        return None
    kind = "structural" if mask is None else _mask_kind(mask, window)
    if kind == "other":
        return None
    fused = _fused_attention()
    if fused is None:
        return None
    out, smax = fused(query, key, value, scale=opts.get("scaling"), causal=True, window=window,
                      attention_mask=mask if kind == "within" else None)
    tracker.record(module, smax)
    return out.transpose(1, 2).contiguous(), None


def _make_wrapper(base: str) -> Callable[..., Any]:
    def tracked_attention(module, query, key, value, attention_mask, *args, **kwargs):
        inner = _base_function(base, module)
        ref = _REGISTRY.get(module)
        tracker = ref() if ref is not None else None
        if tracker is not None and tracker.enabled and (torch.is_grad_enabled() or tracker.track_eval):
            opts = kwargs
            if args:  # positional extras: bind them by the wrapped function's own signature
                opts = dict(inspect.signature(inner).bind_partial(module, query, key, value, attention_mask,
                                                                  *args, **kwargs).arguments)
                opts.update(opts.pop("kwargs", {}))
            mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
            if attention_mask is not None and mask is None:
                raise RuntimeError(
                    f"max-logit tracking cannot read a {type(attention_mask).__name__} mask "
                    f"(attn_implementation {base!r}); use sdpa/eager/flash or tracker.record()"
                )
            if base == "sdpa":
                fused = _try_fused_sdpa(tracker, module, query, key, value, mask, opts)
                if fused is not None:
                    return fused
            is_causal = opts.get("is_causal")
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            q_len, kv_len = query.shape[2], key.shape[2]
            k = key
            if mask is None and is_causal and q_len > 1 and kv_len > q_len:
                k = key[:, :, :q_len]  # transformers' sdpa crops the same way (static-cache prefill)
            segments = None
            cu = opts.get("cu_seq_lens_k")
            if mask is None and isinstance(cu, torch.Tensor) and query.shape[0] == 1:
                segments = _segments_from_cu_seqlens(cu, k.shape[2])
            tracker.observe(
                module, query, k, scale=opts.get("scaling"), causal=bool(is_causal) and q_len > 1,
                attention_mask=mask, sliding_window=opts.get("sliding_window"), segment_ids=segments,
            )
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    tracked_attention.__name__ = f"{_PREFIX}{base}".replace("|", "_")
    return tracked_attention


def _register(base: str) -> str:
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if base == "flex_attention":
        raise ValueError(
            "max-logit tracking does not support attn_implementation='flex_attention' (its BlockMask is "
            "opaque); use 'sdpa', 'eager' or a flash implementation, or record max logits with tracker.record()"
        )
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(f"attention implementation {base!r} is not registered in transformers' AttentionInterface")
    name = f"{_PREFIX}{base}"
    if name not in _REGISTERED:
        AttentionInterface.register(name, _make_wrapper(base))
        mask_base = "eager" if base in ("eager", "paged|eager") else base
        if mask_base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_base])
        _REGISTERED.add(name)
    return name


class TrackingHandle:
    """Undo handle of :func:`install_hf_tracking`: ``remove()`` restores the original attention
    implementation names on every config it changed and stops tracking the modules."""

    def __init__(self, configs: list[tuple[Any, str | None]], modules: list[nn.Module],
                 tracker: MaxLogitTracker | None = None) -> None:
        self._configs = configs
        self._modules = [weakref.ref(m) for m in modules]
        # weak: a dropped optimizer frees its tracker at once (and with it the modules' registration)
        self._tracker = weakref.ref(tracker) if tracker is not None else None

    def __getstate__(self) -> dict[str, Any]:
        """Strong references for ``copy.deepcopy`` / ``pickle``: a copied model's attention modules
        are tracked by the copied tracker (re-registered in :meth:`__setstate__`)."""
        return {"configs": self._configs, "modules": [m for r in self._modules if (m := r()) is not None],
                "tracker": self._tracker() if self._tracker is not None else None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._configs = state["configs"]
        self._modules = [weakref.ref(m) for m in state["modules"]]
        tracker = state["tracker"]
        self._tracker = weakref.ref(tracker) if tracker is not None else None
        if tracker is not None:
            for m in state["modules"]:
                _REGISTRY[m] = weakref.ref(tracker)

    def remove(self) -> None:
        for cfg, old in self._configs:
            cfg._attn_implementation_internal = old
        for ref in self._modules:
            m = ref()
            if m is not None:
                _REGISTRY.pop(m, None)
        self._configs, self._modules = [], []

    def __enter__(self) -> TrackingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_hf_tracking(model: nn.Module, tracker: MaxLogitTracker,
                        modules: Iterable[nn.Module] | None = None) -> TrackingHandle:
    """Route the attention of an HF transformers model through a max-logit-recording wrapper.

    For each config reachable from ``model``'s modules whose ``_attn_implementation`` is X
    (eager, sdpa, flash_attention_2/3/4, paged|eager), registers ``dist_muonclip_X`` in
    ``AttentionInterface`` (a wrapper that records then calls X unchanged) and in
    ``AttentionMaskInterface`` (X's mask builder, so masks are built exactly as for X), and sets
    the config to it. The wrapper records only for modules the tracker knows (``modules``, default:
    those given to the tracker), using the ``scaling`` the model passes (e.g. DeepSeek's mscale),
    the mask the model built (padding, sliding window, packing) or, where the mask is elided
    (sdpa ``is_causal`` fast path, flash), the causal / ``sliding_window`` / ``cu_seq_lens``
    structure the kernel applies.
    """
    mods = list(modules) if modules is not None else tracker.modules
    if not mods:
        raise ValueError("install_hf_tracking: the tracker has no attention modules to track")
    for m in mods:
        ref = _REGISTRY.get(m)
        if ref is not None and ref() is not None and ref() is not tracker:
            raise ValueError(
                f"install_hf_tracking: {type(m).__name__} is already tracked by another MaxLogitTracker "
                "(one optimizer per model; call .close()/.remove() on the other one first)"
            )
    configs: list[tuple[Any, str | None]] = []
    seen: set[int] = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or not hasattr(cfg, "_attn_implementation_internal") or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        old = cfg._attn_implementation_internal
        base = old if old is not None else "eager"
        base = base.removeprefix(_PREFIX)  # e.g. a deepcopy of a tracked model: wrap the same base
        name = _register(base)
        configs.append((cfg, old))
        cfg._attn_implementation_internal = name
    if not configs:
        raise ValueError(
            f"install_hf_tracking: {type(model).__name__} has no transformers config with an attention "
            "implementation; record max logits with tracker.record(layer, max_logits) instead"
        )
    for m in mods:
        _REGISTRY[m] = weakref.ref(tracker)
    return TrackingHandle(configs, mods, tracker)
