"""Per-layer, per-head max attention logits, recorded on device with no host sync.

QK-Clip (Kimi K2, arXiv 2507.20534, Sec. 2.2) needs, for every attention layer and head h,

    S_h = max_{i, j allowed} softmax_scale * q_i^h . k_j^h

where q, k are the post-RoPE query/key vectors softmax sees and "allowed" excludes every
position the attention mask removes (causal, padding, sliding window, packed sequences).

This module provides

* :func:`max_logits_torch`: the chunked torch reference. It never materializes the full
  ``[B, H, S, S]`` logits: queries are processed in row chunks so that at most ``chunk_size``
  logits live at once (memory bounded by the chunk, not by S^2).
* :class:`MaxLogitTracker`: a ``[num_layers, max_heads]`` fp32 buffer of running maxima,
  filled either by the Hugging Face attention hook or by :meth:`MaxLogitTracker.record`
  (custom models).
* :func:`install_hf_tracking`: registers ``dist_muonclip_<impl>`` attention functions in
  transformers' ``AttentionInterface`` (and the matching mask function in
  ``AttentionMaskInterface``) that wrap the model's own implementation (eager / sdpa / flash),
  and points the model's configs at them. The model code is not changed; the returned handle
  restores the original implementation names.

transformers is imported lazily (only by :func:`install_hf_tracking`); the Triton kernel
``dist_muonclip.kernels.max_logit.max_logits_triton`` is used on CUDA when importable.
"""
from __future__ import annotations

import inspect
import math
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MaxLogitTracker",
    "TrackingHandle",
    "install_hf_tracking",
    "max_logits",
    "max_logits_torch",
]

#: Logits materialized at once by the chunked path (elements). 2**22 fp32 = 16 MiB.
DEFAULT_CHUNK_SIZE = 1 << 22

_PREFIX = "dist_muonclip_"


# --------------------------------------------------------------------------------------------
# the math: chunked max logit
# --------------------------------------------------------------------------------------------
def _keep_mask_rows(
    attention_mask: torch.Tensor | None,
    r0: int,
    r1: int,
    k_lo: int,
    k_hi: int,
    *,
    causal: bool,
    sliding_window: int | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean "softmax sees this logit" mask for query rows [r0, r1) and key columns [k_lo, k_hi):
    shape [B|1, H|1, r1-r0, k_hi-k_lo].

    ``attention_mask`` follows transformers' conventions: 4-D bool (True = attend) or 4-D float
    additive (0 = attend, very negative = masked; any value above finfo.min / 2 counts as
    attended, so an additive bias such as ALiBi is *not* part of the recorded max: QK-Clip bounds
    q.k, which is the part W_q/W_k control), or 2-D ``[B, K]`` padding (1 = token) used by the
    flash path, on top of which causality applies.
    """
    keep: torch.Tensor | None = None
    structural = attention_mask is None or attention_mask.ndim == 2
    if attention_mask is not None:
        m = attention_mask
        if m.ndim == 2:
            m = m[:, None, None, k_lo:k_hi].bool()
        else:
            if m.ndim == 3:
                m = m[:, None]
            if m.ndim != 4:
                raise ValueError(f"attention_mask must be 2-D, 3-D or 4-D, got shape {tuple(attention_mask.shape)}")
            m = m[:, :, r0:r1, k_lo:k_hi] if m.shape[2] != 1 else m[..., k_lo:k_hi]  # [.., 1, K]: every row
            if m.dtype != torch.bool:
                m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m.bool()
        keep = m.to(device)
    if structural and (causal or sliding_window is not None or segment_ids is not None):
        qi = torch.arange(r0, r1, device=device)[:, None]
        kj = torch.arange(k_lo, k_hi, device=device)[None, :]
        s = torch.ones(r1 - r0, k_hi - k_lo, dtype=torch.bool, device=device)
        if causal:
            s &= kj <= qi  # top-left alignment, as torch sdpa(is_causal=True) and HF's crop
        if sliding_window is not None:
            s &= kj > qi - sliding_window  # transformers' sliding_window_overlay
        s = s[None, None]
        if segment_ids is not None:  # packed sequences: [B, K] ids, attend within a segment
            seg = segment_ids.to(device)
            s = s & (seg[:, None, r0:r1, None] == seg[:, None, None, k_lo:k_hi])
        keep = s if keep is None else keep & s
    return keep


@torch.no_grad()
def max_logits_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    segment_ids: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-head max of ``scale * q . k`` over the allowed positions, without the full logits.

    Args:
        query: ``[B, H, Q, D]`` (post-RoPE, as passed to the attention function).
        key: ``[B, H_kv, K, D]`` with ``H % H_kv == 0`` (GQA is handled by a grouped matmul,
            never by repeating the keys).
        scale: softmax scale; ``None`` means ``1/sqrt(D)`` (sdpa's default).
        causal: apply a causal mask (only used when ``attention_mask`` is None or 2-D padding).
        attention_mask: see :func:`_keep_mask_rows`.
        sliding_window: keys with ``q - k >= sliding_window`` are masked (structural masks only).
        segment_ids: ``[B, K]`` packed-sequence ids; only same-segment pairs are allowed.
        chunk_size: maximum number of logits materialized at once (elements): queries are
            processed in row chunks and, when one row of the whole batch is already larger, in
            batch slices; the peak extra memory is O(max(chunk_size, H * K)) plus an fp32 copy of
            ``key``.

    Returns:
        ``[H]`` float32 on ``query.device``; ``-inf`` for a head with no allowed position.
    """
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(f"query/key must be [B, H, S, D]; got {tuple(query.shape)} and {tuple(key.shape)}")
    bsz, num_heads, q_len, dim = query.shape
    num_kv = key.shape[1]
    if num_heads % num_kv != 0 or key.shape[-1] != dim:
        raise ValueError(
            f"key shape {tuple(key.shape)} does not match query {tuple(query.shape)}: need H % H_kv == 0 and equal head_dim"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    group = num_heads // num_kv
    kv_len = key.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    per_sample = num_heads * kv_len  # logits of one query row of one sample
    if bsz > 1 and bsz * per_sample > chunk_size:  # also chunk the batch (long contexts, big batches)
        step = max(1, chunk_size // per_sample)
        best_b: torch.Tensor | None = None
        for b0 in range(0, bsz, step):
            b1 = min(bsz, b0 + step)
            mask_b = attention_mask[b0:b1] if attention_mask is not None and attention_mask.shape[0] == bsz \
                else attention_mask
            seg_b = segment_ids[b0:b1] if segment_ids is not None and segment_ids.shape[0] == bsz else segment_ids
            part = max_logits_torch(query[b0:b1], key[b0:b1], scale=scale, causal=causal, attention_mask=mask_b,
                                    sliding_window=sliding_window, segment_ids=seg_b, chunk_size=chunk_size)
            best_b = part if best_b is None else torch.maximum(best_b, part)
        assert best_b is not None
        return best_b
    # fp32 logits: at least as accurate as what softmax sees (bf16 matmul); rounding is monotone,
    # so scaling the max equals the max of the scaled logits. GQA: the G query heads of a key head
    # are stacked into the rows of one bmm (no repeated keys).
    k32 = key.detach().to(torch.float32).reshape(bsz * num_kv, kv_len, dim).transpose(1, 2)  # [B*Hkv, D, K]
    q5 = query.detach().reshape(bsz, num_kv, group, q_len, dim)
    rows = max(1, chunk_size // max(1, bsz * num_heads * kv_len))
    structural = attention_mask is None or attention_mask.ndim == 2
    only_causal = causal and attention_mask is None and sliding_window is None and segment_ids is None
    best = torch.full((num_kv, group), float("-inf"), dtype=torch.float32, device=query.device)
    # one logits buffer reused by every chunk: chunks have different widths (causal), and fresh
    # allocations of growing sizes fragment the host heap (glibc) beyond the chunk budget
    buf = torch.empty(bsz * num_heads * min(rows, q_len) * kv_len, dtype=torch.float32, device=query.device)
    for r0 in range(0, q_len, rows):
        r1 = min(q_len, r0 + rows)
        # causal / window structure: skip key columns no row of this chunk can see
        k_lo, k_hi = 0, kv_len
        if structural and causal:
            k_hi = min(kv_len, r1)
        if structural and sliding_window is not None:
            k_lo = max(0, r0 - sliding_window + 1)
        if k_hi <= k_lo:
            continue
        c, width = r1 - r0, k_hi - k_lo
        qc = q5[:, :, :, r0:r1].to(torch.float32).reshape(bsz * num_kv, group * c, dim)
        out = buf[: bsz * num_heads * c * width].view(bsz * num_kv, group * c, width)
        logits = torch.bmm(qc, k32[:, :, k_lo:k_hi], out=out).view(bsz, num_kv, group, c, width)
        if only_causal:  # columns left of the chunk's diagonal block are all visible
            d0 = r0 - k_lo
            if d0 < width:
                tri = torch.arange(r0, k_hi, device=query.device)[None, :] <= torch.arange(
                    r0, r1, device=query.device)[:, None]
                logits[..., d0:].masked_fill_(~tri, float("-inf"))
        else:
            keep = _keep_mask_rows(attention_mask, r0, r1, k_lo, k_hi, causal=causal, sliding_window=sliding_window,
                                   segment_ids=segment_ids, device=query.device)
            if keep is not None:
                if keep.shape[1] == num_heads and num_heads > 1:
                    keep = keep.reshape(keep.shape[0], num_kv, group, c, width)
                else:
                    keep = keep.unsqueeze(2)  # one mask for every head
                logits.masked_fill_(~keep, float("-inf"))
        best = torch.maximum(best, logits.amax(dim=-1).amax(dim=-1).amax(dim=0))
        del logits
    return (best * scale).reshape(num_heads)


def _triton_fn() -> Callable[..., torch.Tensor] | None:
    try:  # the kernel lives in another module (kernels issue); optional
        from dist_muonclip.kernels.max_logit import max_logits_triton  # type: ignore
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return max_logits_triton


def max_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    segment_ids: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatch: the fused Triton kernel (``dist_muonclip.kernels.max_logit``) for
    ``backend="triton"``, or ``"auto"`` on CUDA when it imports; :func:`max_logits_torch` otherwise
    and whenever a sliding window or packed-sequence ids are given (the kernel takes masks, not
    those). Float additive masks are passed to the kernel as boolean "attend" masks so that both
    paths count q.k only (an additive bias is not part of the recorded max). Returns ``[H]`` fp32."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    structural = sliding_window is not None or segment_ids is not None
    if backend == "triton" or (backend == "auto" and query.is_cuda):
        fn = _triton_fn()
        if fn is None and backend == "triton":
            raise RuntimeError("backend='triton' requested but dist_muonclip.kernels.max_logit is not importable")
        if fn is not None and not structural:
            if scale is None:
                scale = 1.0 / math.sqrt(query.shape[-1])
            mask = attention_mask
            if mask is not None and mask.is_floating_point():
                mask = mask > torch.finfo(mask.dtype).min / 2
            with torch.no_grad():
                return fn(query.detach(), key.detach(), scale=float(scale), causal=causal,
                          attention_mask=mask).to(torch.float32)
    return max_logits_torch(query, key, scale=scale, causal=causal, attention_mask=attention_mask,
                            sliding_window=sliding_window, segment_ids=segment_ids, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# the tracker
# --------------------------------------------------------------------------------------------
class MaxLogitTracker:
    """Running per-layer, per-head max logits: a ``[num_layers, max_heads]`` fp32 device buffer.

    Entries start at ``-inf`` ("nothing recorded": QK-Clip leaves such heads alone). Every
    record is an in-place ``torch.maximum`` on device: no host sync, no autograd (inputs are
    detached), so gradient accumulation over micro-batches yields the max over all of them.

    Custom models call ``tracker.record(layer, max_logits)`` with a ``[H]`` tensor (or list) per
    layer per forward; Hugging Face models are tracked automatically through
    :func:`install_hf_tracking` (done by ``QKClipper``).

    Args:
        num_heads: heads per tracked layer (``len(num_heads)`` = number of layers).
        modules: optional modules, one per layer, so ``record`` / the HF hook can be given a
            module instead of an index.
        chunk_size: chunk budget of :func:`max_logits_torch`.
        backend: "auto" | "torch" | "triton" for :func:`max_logits`.
        track_eval: record also forwards run without autograd (default False: evaluation
            forwards under ``torch.no_grad()`` / ``inference_mode`` between steps must not
            influence the clip). A forward with autograd on is recorded whatever
            ``module.training`` says (a ``from_pretrained`` model left in eval mode still trains).
    """

    def __init__(
        self,
        num_heads: Sequence[int],
        *,
        modules: Sequence[nn.Module] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: str = "auto",
        track_eval: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_heads = [int(h) for h in num_heads]
        if any(h < 1 for h in self.num_heads):
            raise ValueError(f"num_heads must be positive per layer, got {self.num_heads}")
        if modules is not None and len(modules) != len(self.num_heads):
            raise ValueError(f"modules has {len(modules)} entries, num_heads {len(self.num_heads)}")
        self.num_layers = len(self.num_heads)
        self.max_heads = max(self.num_heads, default=1)
        self.chunk_size = int(chunk_size)
        self.backend = backend
        self.track_eval = bool(track_eval)
        self.enabled = True
        self._index: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        for i, m in enumerate(modules or ()):
            self._index[m] = i
        self._buf = torch.full((self.num_layers, self.max_heads), float("-inf"), dtype=torch.float32,
                               device=device)
        self._handles: list[TrackingHandle] = []

    # -- buffer ------------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """The live ``[num_layers, max_heads]`` fp32 buffer (not a copy)."""
        return self._buf

    def reset(self) -> None:
        """Forget everything recorded (start of a new optimizer step)."""
        self._buf.fill_(float("-inf"))

    def layer_index(self, layer: int | nn.Module) -> int:
        if isinstance(layer, nn.Module):
            if layer not in self._index:
                raise ValueError(f"module {type(layer).__name__} is not a tracked attention layer")
            return self._index[layer]
        idx = int(layer)
        if not 0 <= idx < self.num_layers:
            raise ValueError(f"layer index {idx} out of range [0, {self.num_layers})")
        return idx

    @torch.no_grad()
    def record(self, layer: int | nn.Module, max_logits: torch.Tensor | Sequence[float]) -> None:
        """Fold this forward's per-head max logits of ``layer`` into the running max.

        ``max_logits``: ``[H]`` (H = that layer's head count), already multiplied by the softmax
        scale and restricted to unmasked positions. Stays on device (no sync).
        """
        idx = self.layer_index(layer)
        if not self.enabled:
            return
        if isinstance(max_logits, torch.Tensor):
            val = max_logits.detach()
        else:
            val = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in max_logits]).to(self._buf.device)
        val = val.reshape(-1)
        if val.numel() != self.num_heads[idx]:
            raise ValueError(
                f"record(layer={idx}): got {val.numel()} values, layer has {self.num_heads[idx]} heads"
            )
        if self._buf.device != val.device:
            self._buf = self._buf.to(val.device)
        row = self._buf[idx, : val.numel()]
        torch.maximum(row, val.to(torch.float32), out=row)

    @torch.no_grad()
    def observe(
        self,
        layer: int | nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        *,
        scale: float | None = None,
        causal: bool = False,
        attention_mask: torch.Tensor | None = None,
        sliding_window: int | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> None:
        """Compute the max logits of one attention call (see :func:`max_logits`) and record them."""
        if not self.enabled:
            return
        val = max_logits(query, key, scale=scale, causal=causal, attention_mask=attention_mask,
                         sliding_window=sliding_window, segment_ids=segment_ids,
                         chunk_size=self.chunk_size, backend=self.backend)
        self.record(layer, val)

    # -- HF integration ------------------------------------------------------------------------
    def install_hf(self, model: nn.Module) -> TrackingHandle:
        """Track the attention modules of an HF model (see :func:`install_hf_tracking`)."""
        handle = install_hf_tracking(model, self)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Undo every :meth:`install_hf` (restores the models' attention implementations)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> MaxLogitTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# --------------------------------------------------------------------------------------------
# transformers AttentionInterface glue
# --------------------------------------------------------------------------------------------
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


def _fused_attention():
    """``attention_with_max_logits`` when the Triton kernels can run, else None."""
    try:
        from .kernels import triton_available
        from .kernels.attention_max import attention_with_max_logits
    except ImportError:
        return None
    return attention_with_max_logits if triton_available() else None


def _try_fused_sdpa(tracker, module, query, key, value, mask, opts):
    """The cheap path on GPU: one Triton attention forward returns the output and the exact
    per-head max (flash attention's running row max), instead of SDPA plus a second q k^T pass.

    Only for what that kernel computes exactly: causal self-attention with no mask tensor, no
    dropout, no sliding window or packed sequences, query length == key length, no extra SDPA
    arguments (sinks, position bias), bf16/fp16, a power-of-two head dim in [16, 256] shared by
    values (not MLA's wider q/k heads). Returns HF's sdpa output format, or None to fall back.
    """
    q_len, kv_len, d = query.shape[2], key.shape[2], query.shape[-1]
    if (value.shape != key.shape or d < 16 or d > 256 or d & (d - 1)
            or query.dtype not in (torch.bfloat16, torch.float16)):   # what the kernel and cuDNN's backward take
        return None
    extras = set(opts) - {"scaling", "dropout", "is_causal", "sliding_window", "position_ids",
                          "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                          "use_cache", "cache_position", "output_attentions", "past_key_value", "past_key_values"}
    if (query.device.type not in _FUSED_DEVICES or mask is not None or q_len != kv_len or q_len < 2
            or float(opts.get("dropout") or 0.0) != 0.0 or opts.get("sliding_window") is not None
            or opts.get("cu_seq_lens_k") is not None or extras
            or not (opts.get("is_causal") if opts.get("is_causal") is not None else getattr(module, "is_causal", True))):
        return None
    fused = _fused_attention()
    if fused is None:
        return None
    out, smax = fused(query, key, value, scale=opts.get("scaling"), causal=True)
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

    def __init__(self, configs: list[tuple[Any, str | None]], modules: list[nn.Module]) -> None:
        self._configs = configs
        self._modules = [weakref.ref(m) for m in modules]

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
    mods = list(modules) if modules is not None else list(tracker._index.keys())
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
    return TrackingHandle(configs, mods)
