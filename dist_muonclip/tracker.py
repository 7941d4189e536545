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

The transformers glue (``AttentionInterface`` wrappers, :func:`install_hf_tracking`) lives in
:mod:`dist_muonclip.integrations.transformers_attention`; this module never imports transformers
(:meth:`MaxLogitTracker.install_hf` imports the glue on use). The Triton kernel
``dist_muonclip.kernels.max_logit.max_logits_triton`` is used on CUDA when importable.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .integrations.transformers_attention import TrackingHandle

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MaxLogitTracker",
    "max_logits",
    "max_logits_torch",
]

#: Logits materialized at once by the chunked path (elements). 2**22 fp32 = 16 MiB.
DEFAULT_CHUNK_SIZE = 1 << 22


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
    and whenever a sliding window or packed-sequence ids are given without a 4-D mask (the kernel
    takes masks, not those; a 4-D mask already holds them). Float additive masks are passed to the kernel as boolean "attend" masks so that both
    paths count q.k only (an additive bias is not part of the recorded max). Returns ``[H]`` fp32."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    # A 4-D mask already holds the window / packing (as in max_logits_torch, the structural
    # arguments apply only without one), so only mask-free or 2-D-padding calls need the torch path.
    full_mask = attention_mask is not None and attention_mask.ndim == 4
    structural = not full_mask and (sliding_window is not None or segment_ids is not None)
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
    :meth:`install_hf` (done by ``QKClipper``; the glue lives in
    :mod:`dist_muonclip.integrations.transformers_attention`).

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
        self.head_shard: tuple[int, int] | None = None

    def set_head_shard(self, num_shards: int, index: int) -> None:
        """Tensor parallel: this rank computes heads ``[index * H / num_shards, (index + 1) * H /
        num_shards)`` of every layer (ColwiseParallel q/k projections: a contiguous block of heads).
        :meth:`record` then takes ``H / num_shards`` values and writes them at those global
        positions, ``-inf`` elsewhere, so a MAX all-reduce over every rank yields each head's max
        over the data-parallel ranks without mixing heads of different tp ranks."""
        bad = [h for h in self.num_heads if h % num_shards]
        if bad:
            raise ValueError(f"tensor parallel over {num_shards} ranks needs heads divisible by {num_shards}; layers "
                             f"have {self.num_heads} heads: choose a tp size that divides the number of heads")
        self.head_shard = (int(num_shards), int(index)) if num_shards > 1 else None

    def __getstate__(self) -> dict[str, Any]:
        """Strong references to the tracked modules for ``copy.deepcopy`` / ``pickle`` (a copy of
        a model and its optimizer tracks the copied modules, not the original's)."""
        state = dict(self.__dict__)
        state["_index"] = list(self._index.items())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        index = state.pop("_index")
        self.__dict__.update(state)
        self._index = weakref.WeakKeyDictionary(dict(index))

    # -- buffer ------------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """The live ``[num_layers, max_heads]`` fp32 buffer (not a copy)."""
        return self._buf

    def reset(self) -> None:
        """Forget everything recorded (start of a new optimizer step)."""
        self._buf.fill_(float("-inf"))

    @property
    def modules(self) -> list[nn.Module]:
        """The attention modules given at construction that are still alive, in layer order."""
        return sorted(self._index.keys(), key=self._index.__getitem__)

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
        offset = 0
        if self.head_shard is not None and val.numel() == self.num_heads[idx] // self.head_shard[0]:
            offset = val.numel() * self.head_shard[1]     # this tp rank's block of global heads
        elif val.numel() != self.num_heads[idx]:
            raise ValueError(
                f"record(layer={idx}): got {val.numel()} values, layer has {self.num_heads[idx]} heads"
            )
        if self._buf.device != val.device:
            self._buf = self._buf.to(val.device)
        row = self._buf[idx, offset: offset + val.numel()]
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
        """Track the attention modules of an HF model (see
        :func:`dist_muonclip.integrations.transformers_attention.install_hf_tracking`)."""
        from .integrations.transformers_attention import install_hf_tracking

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


def __getattr__(name: str) -> Any:
    # The HF glue moved to integrations/transformers_attention.py; these names stay importable
    # from here (lazily: importing the core must not import the glue).
    if name in ("install_hf_tracking", "TrackingHandle"):
        from .integrations import transformers_attention

        return getattr(transformers_attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
