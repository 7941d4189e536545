"""Attention forward that also returns the per-head max logit (fused QK-Clip tracking).

A flash-attention forward (Dao, arXiv 2205.14135 / 2307.08691) already keeps the running row max
of the logits for its online softmax; keeping it unscaled and exact (max of the fp32 q . k
products, scaled once at the end) gives Kimi K2's S_h (arXiv 2507.20534) with no second pass over
q k^T. The backward reuses PyTorch's cuDNN attention backward (SDPA's own on Hopper; its flash
backward where cuDNN is missing, and for sliding windows, which cuDNN's op does not take): the
forward's output and log-sum-exp are what it needs, so training pays only the difference between
this forward and SDPA's. On Hopper the forward reads q, k, v through TMA tensor descriptors (any
[B, H, S, D] strides with a unit last one, so HF's transposed [B, S, H, D] layout too); a pointer
kernel covers the rest. A causal sliding window (Mistral's ``sliding_window``) skips the key blocks
outside it, forward and backward.

``attention_with_max_logits(q, k, v, scale=, causal=, window=)`` -> (out [B, H, S, D], max_logits [H] fp32).
GQA (Hkv dividing H) is handled in the kernel; the backward expands K/V to H heads when the
flash backward needs it and sums the group's gradients back.

This module imports Triton at import time and defines its kernels at module level; the package
(:mod:`dist_muonclip.kernels`) imports it only when a launcher is first used.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._env import head_dims_supported, split_head_dim, tma_ok
from ._env import interpret as _interpret

__all__ = ["attention_forward_with_max_triton", "attention_with_max_logits", "cudnn_backward", "flash_backward",
           "flash_backward_gqa_native", "forward_uses_tma", "head_dims_supported", "match_grad_layout",
           "split_head_dim"]


# --------------------------------------------------------------------------------------------
# Triton kernels (module level: this module is imported only where Triton runs, see __init__)
# --------------------------------------------------------------------------------------------
@triton.jit
def _online_update(qk, v, m_raw, l_i, acc, scale_log2e, MASKED: tl.constexpr):
    """Fold one block of unscaled logits ``qk`` [M, N] (-inf where hidden when ``MASKED``)
    and its values ``v`` [N, D] into the online softmax; ``m_raw`` stays the exact row max."""
    m_new = tl.maximum(m_raw, tl.max(qk, 1))
    if MASKED:
        # rows with nothing visible yet keep m = -inf: use 0 as the reference to avoid NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    mc = m_ref * scale_log2e
    p = tl.math.exp2(qk * scale_log2e - mc[:, None])
    alpha = tl.math.exp2(m_raw * scale_log2e - mc)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attend(q, kt, q2, kt2, v, cols, offs_m, Sk, window, m_raw, l_i, acc, scale_log2e, mrow, s_mk, row_ok,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr, CAST_F32: tl.constexpr,
            HAS_D2: tl.constexpr, HAS_MASK: tl.constexpr):
    """One key block: ``kt`` [D, N] (and its second head-dim part ``kt2`` [D2, N] when
    ``HAS_D2``: MLA's 192 = 128 + 64, Triton blocks being powers of two) and ``v`` [N, DV] as
    loaded; keys past ``Sk``, after the query row (causal) or ``window`` or more behind it
    (``HAS_WINDOW``) or where the attention mask is 0 (``HAS_MASK``: ``mrow`` [M, 1] points at
    the block rows of a [B, 1 | H, Sq, Sk] uint8 mask) are hidden when ``MASKED`` (blocks every row
    sees whole skip that arithmetic; with a mask every block is masked)."""
    if CAST_F32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, kt)
    if HAS_D2:
        if CAST_F32:
            kt2 = kt2.to(tl.float32)
        qk = tl.dot(q2, kt2, qk)
    if MASKED:
        ok = cols[None, :] < Sk
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None])
        if HAS_WINDOW:
            ok = ok & (cols[None, :] > offs_m[:, None] - window)
        if HAS_MASK:
            mv = tl.load(mrow + cols[None, :] * s_mk, mask=row_ok[:, None] & (cols[None, :] < Sk), other=0)
            ok = ok & (mv != 0)
        qk = tl.where(ok, qk, float("-inf"))
    return _online_update(qk, v, m_raw, l_i, acc, scale_log2e, MASKED)


@triton.jit
def _key_ranges(Sk, m0, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr):
    """Key blocks of query block [m0, m0 + BLOCK_M), in three consecutive ranges:
    [lo, a_end) masked (the sliding window's lower edge), [full_lo, full_end) seen whole by every
    row (no mask arithmetic), [c_lo, hi) masked (causal diagonal, key tail). Blocks wholly
    outside the causal window are never visited: that is where a sliding window saves work."""
    if CAUSAL:
        hi = tl.minimum(Sk, m0 + BLOCK_M)
        full_end = tl.minimum((Sk // BLOCK_N) * BLOCK_N, (m0 // BLOCK_N) * BLOCK_N)
    else:
        hi = Sk
        full_end = (Sk // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:  # row i sees keys j > i - window: every row of the block sees j >= m0 + BLOCK_M - window
        lo = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.maximum(((m0 + BLOCK_M - window + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
    else:
        lo = m0 * 0
        full_lo = m0 * 0
    if HAS_MASK:  # a mask tensor can hide anything: every visited block is masked
        full_end = full_lo
    a_end = tl.minimum(full_lo, hi)
    c_lo = tl.maximum(full_end, a_end)
    return lo, a_end, full_lo, full_end, c_lo, hi


@triton.jit
def _finish_rows(acc, l_i, m_raw, offs_m, Sq, scale, LSE, Mx, pid_bh, pid_m):
    """Store the rows' natural-log LSE (what the flash / cuDNN backward reads) and the block's
    max logit; return the normalized output (fp32). A row that sees no key (a padded query
    under a mask) gets output 0 and LSE +inf, flash attention's convention: the backward's
    P = exp(s - lse) is then 0 there, so such rows pass no gradient."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    row_ok = offs_m < Sq
    lse = tl.where(l_i == 0.0, float("inf"), m_raw * scale + tl.log(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)
    row_max = tl.where(row_ok, m_raw * scale, float("-inf"))
    tl.store(Mx + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, tl.max(row_max, 0))
    return acc / l_safe[:, None]


@triton.jit
def _attn_fwd_max_kernel(
    Q, K, V, O, LSE, Mx, Mask,
    H, Sq, Sk, group, window,
    s_mb, s_mh, s_mq, s_mk,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_os, s_od,
    scale, scale_log2e,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D2: tl.constexpr, HEAD_DV: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    """Pointer loads: one program per (query block, batch x head). q / k head dim HEAD_D + HEAD_D2
    (HEAD_D2 = 0 or a second power-of-two part), value / output head dim HEAD_DV."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal blocks first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = (h // group).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    row_ok = offs_m < Sq
    q_base = Q + b * s_qb + h.to(tl.int64) * s_qh
    q = tl.load(q_base + offs_m[:, None] * s_qs + offs_d[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    k_base = K + b * s_kb + kvh * s_kh
    v_base = V + b * s_vb + kvh * s_vh
    if HEAD_D2 > 0:
        offs_d2 = HEAD_D + tl.arange(0, HEAD_D2)
        q2 = tl.load(q_base + offs_m[:, None] * s_qs + offs_d2[None, :] * s_qd, mask=row_ok[:, None], other=0.0)
        if CAST_F32:
            q2 = q2.to(tl.float32)
    else:
        offs_d2 = offs_d
        q2 = q
    m_raw = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # exact row max of q . k (unscaled)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DV), tl.float32)
    row_ok = offs_m < Sq
    mrow = Mask + (pid_bh // H).to(tl.int64) * s_mb + (pid_bh % H).to(tl.int64) * s_mh + offs_m[:, None] * s_mq
    lo, a_end, full_lo, full_end, c_lo, hi = _key_ranges(Sk, m0, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_MASK)
    for n0 in range(lo, a_end, BLOCK_N):
        cols = n0 + offs_n
        kt = tl.load(k_base + cols[None, :] * s_ks + offs_d[:, None] * s_kd, mask=cols[None, :] < Sk, other=0.0)
        if HEAD_D2 > 0:
            kt2 = tl.load(k_base + cols[None, :] * s_ks + offs_d2[:, None] * s_kd, mask=cols[None, :] < Sk,
                          other=0.0)
        else:
            kt2 = kt
        v = tl.load(v_base + cols[:, None] * s_vs + offs_dv[None, :] * s_vd, mask=cols[:, None] < Sk, other=0.0)
        m_raw, l_i, acc = _attend(q, kt, q2, kt2, v, cols, offs_m, Sk, window, m_raw, l_i, acc, scale_log2e,
                                  mrow, s_mk, row_ok, CAUSAL, HAS_WINDOW, True, CAST_F32, HEAD_D2 > 0, HAS_MASK)
    for n0 in range(full_lo, full_end, BLOCK_N):
        cols = n0 + offs_n
        kt = tl.load(k_base + cols[None, :] * s_ks + offs_d[:, None] * s_kd)
        if HEAD_D2 > 0:
            kt2 = tl.load(k_base + cols[None, :] * s_ks + offs_d2[:, None] * s_kd)
        else:
            kt2 = kt
        v = tl.load(v_base + cols[:, None] * s_vs + offs_dv[None, :] * s_vd)
        m_raw, l_i, acc = _attend(q, kt, q2, kt2, v, cols, offs_m, Sk, window, m_raw, l_i, acc, scale_log2e,
                                  mrow, s_mk, row_ok, CAUSAL, HAS_WINDOW, False, CAST_F32, HEAD_D2 > 0, HAS_MASK)
    for n0 in range(c_lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kt = tl.load(k_base + cols[None, :] * s_ks + offs_d[:, None] * s_kd, mask=cols[None, :] < Sk, other=0.0)
        if HEAD_D2 > 0:
            kt2 = tl.load(k_base + cols[None, :] * s_ks + offs_d2[:, None] * s_kd, mask=cols[None, :] < Sk,
                          other=0.0)
        else:
            kt2 = kt
        v = tl.load(v_base + cols[:, None] * s_vs + offs_dv[None, :] * s_vd, mask=cols[:, None] < Sk, other=0.0)
        m_raw, l_i, acc = _attend(q, kt, q2, kt2, v, cols, offs_m, Sk, window, m_raw, l_i, acc, scale_log2e,
                                  mrow, s_mk, row_ok, CAUSAL, HAS_WINDOW, True, CAST_F32, HEAD_D2 > 0, HAS_MASK)
    out = _finish_rows(acc, l_i, m_raw, offs_m, Sq, scale, LSE, Mx, pid_bh, pid_m)
    tl.store(O + b * s_ob + h.to(tl.int64) * s_oh + offs_m[:, None] * s_os + offs_dv[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_fwd_max_kernel_tma(
    q_desc, k_desc, q2_desc, k2_desc, v_desc, o_desc, LSE, Mx, Mask,
    H, Sq, Sk, group, window,
    s_mb, s_mh, s_mq, s_mk,
    scale, scale_log2e,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D2: tl.constexpr, HEAD_DV: tl.constexpr,
    CAST_F32: tl.constexpr,
):
    """``_attn_fwd_max_kernel`` with tensor-memory-accelerator loads / stores through 4-D
    [B, H, S, D] descriptors: rows past S read as zeros (never the next head's), stores clip.
    ``q2_desc`` / ``k2_desc`` cover the second head-dim part (HEAD_D2 > 0; else unused)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // group
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_D)
    if CAST_F32:
        q = q.to(tl.float32)
    if HEAD_D2 > 0:
        q2 = q2_desc.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_D2)
        if CAST_F32:
            q2 = q2.to(tl.float32)
    else:
        q2 = q
    m_raw = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DV), tl.float32)
    row_ok = offs_m < Sq
    mrow = Mask + (pid_bh // H).to(tl.int64) * s_mb + (pid_bh % H).to(tl.int64) * s_mh + offs_m[:, None] * s_mq
    lo, a_end, full_lo, full_end, c_lo, hi = _key_ranges(Sk, m0, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_MASK)
    for n0 in range(lo, a_end, BLOCK_N):
        kk = k_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D)
        if HEAD_D2 > 0:
            kk2 = k2_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D2)
        else:
            kk2 = kk
        v = v_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_DV)
        m_raw, l_i, acc = _attend(q, kk.T, q2, kk2.T, v, n0 + offs_n, offs_m, Sk, window, m_raw, l_i, acc,
                                  scale_log2e, mrow, s_mk, row_ok, CAUSAL, HAS_WINDOW, True, CAST_F32,
                                  HEAD_D2 > 0, HAS_MASK)
    for n0 in range(full_lo, full_end, BLOCK_N):
        kk = k_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D)
        if HEAD_D2 > 0:
            kk2 = k2_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D2)
        else:
            kk2 = kk
        v = v_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_DV)
        m_raw, l_i, acc = _attend(q, kk.T, q2, kk2.T, v, n0 + offs_n, offs_m, Sk, window, m_raw, l_i, acc,
                                  scale_log2e, mrow, s_mk, row_ok, CAUSAL, HAS_WINDOW, False, CAST_F32,
                                  HEAD_D2 > 0, HAS_MASK)
    for n0 in range(c_lo, hi, BLOCK_N):
        kk = k_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D)
        if HEAD_D2 > 0:
            kk2 = k2_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_D2)
        else:
            kk2 = kk
        v = v_desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, HEAD_DV)
        m_raw, l_i, acc = _attend(q, kk.T, q2, kk2.T, v, n0 + offs_n, offs_m, Sk, window, m_raw, l_i, acc,
                                  scale_log2e, mrow, s_mk, row_ok, CAUSAL, HAS_WINDOW, True, CAST_F32,
                                  HEAD_D2 > 0, HAS_MASK)
    out = _finish_rows(acc, l_i, m_raw, offs_m, Sq, scale, LSE, Mx, pid_bh, pid_m)
    o_desc.store([b, h, m0, 0], out.to(o_desc.dtype).reshape(1, 1, BLOCK_M, HEAD_DV))


FWD_CONFIG_OVERRIDE: dict | None = None

FWD_USE_TMA = True
"""Use the TMA-descriptor forward on Hopper+ when q, k, v are [B, H, S, D] with unit last stride
and 16-byte aligned strides (the pointer kernel otherwise, and under the interpreter)."""


def forward_uses_tma(*ts: torch.Tensor) -> bool:
    return FWD_USE_TMA and tma_ok(*ts)


def _fwd_config(d: int, dv: int | None = None, masked: bool = False) -> dict:
    if _interpret():
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if d + (dv or d) > 256 or masked:
        # a mask tile per stage: 128 x 128 tiles with 3 stages need 257 KB of shared memory
        # (measured: Triton's OutOfResources on an H200, limit 227 KB).
        # MLA (192 + 128): 3 stages of 128-key k / v blocks would need ~240 KB. 128 x 64, 8 warps,
        # 3 stages was the fastest of 6 configurations for MLA on an H200
        # (benchmarks/results/mla_h200.json, forward_sweep).
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    # Measured on an H100 (benchmarks/results/gpu_tune_h100.json): 128 x 128 tiles, 8 warps, 3
    # stages win for the TMA kernel at B = 1, 4 and S = 4096, 8192 (within 2% for the pointer one).
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def _check_window(window: int | None, causal: bool) -> int:
    """``window`` as the kernels take it (0 = none), or ValueError naming the fix."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (keys j with i - window < j <= i) or None, got {window!r}")
    if not causal:
        raise ValueError("window needs causal=True (a sliding window here is the causal one of Mistral / "
                         "transformers' sliding_window_overlay); pass causal=True or window=None")
    return int(window)


def _mask_arg(mask: torch.Tensor | None, query: torch.Tensor, B: int, H: int, Sq: int, Sk: int):
    """(uint8 view or a dummy, its 4 strides with 0 on broadcast dims) for the kernels."""
    if mask is None:
        return query, (0, 0, 0, 0)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4:
        raise TypeError(f"attention_mask must be a 4-D bool tensor (True = attend), got "
                        f"{getattr(mask, 'dtype', type(mask))} of shape {tuple(getattr(mask, 'shape', ()))}")
    if mask.device != query.device:
        raise ValueError(f"attention_mask is on {mask.device}, query on {query.device}")
    try:
        m = mask.expand(B, mask.shape[1], Sq, Sk)
    except RuntimeError:
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"[B, 1 or H, Sq, Sk] = {(B, 1, Sq, Sk)}") from None
    if m.shape[1] not in (1, H):
        raise ValueError(f"attention_mask head dim must be 1 or H={H}, got {m.shape[1]}")
    m = m.view(torch.uint8)
    return m, (m.stride(0), m.stride(1) if m.shape[1] == H else 0, m.stride(2), m.stride(3))


def attention_forward_with_max_triton(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float, causal: bool = True,
    window: int | None = None, attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward only: (out [B, H, Sq, D] in query's dtype, lse [B, H, Sq] fp32, max_logits [H] fp32).

    query / key [B, H | Hkv, S, D], value [B, Hkv, Sk, Dv]: D a power of two in [16, 256] or a
    sum of two (MLA's 192 = 128 + 64, see :func:`split_head_dim`), Dv a power of two; the output
    has Dv. Causal top-left aligned like SDPA's ``is_causal``. ``window`` (causal only): query i sees keys j with
    ``i - window < j <= i`` (transformers' ``sliding_window``, Mistral); key blocks outside the
    window are skipped. ``attention_mask``: an optional 4-D bool "attend" mask broadcastable to
    [B, 1 | H, Sq, Sk] (HF's sdpa mask: padding, packed sequences), applied on top of the
    causal / window structure; rows it hides completely get output 0 and LSE +inf.
    ``max_logits[h]`` is the max over batch and visible positions of ``scale * q . k``, exact up
    to fp32 accumulation order.
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4 or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"need query [B, H, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, Dv]; got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    B, H, Sq, D = query.shape
    Hkv, Sk, DV = key.shape[1], key.shape[2], value.shape[3]
    if key.shape[0] != B or key.shape[3] != D or H % Hkv:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} (same B, D; H % Hkv == 0)")
    if not head_dims_supported(D, DV):
        raise ValueError(f"head dims q/k {D}, v {DV} not supported: q/k needs a power of two in [16, 256] or a sum "
                         "of two (e.g. MLA's 192 = 128 + 64), v a power of two in [16, 256]; use SDPA + "
                         "max_logits_triton for other shapes")
    if not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if query.device.type != "cuda" and not _interpret():
        raise ValueError(f"attention_forward_with_max_triton needs CUDA tensors (got {query.device}); "
                         "use F.scaled_dot_product_attention + max_logits_reference on CPU")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key, value must be on one device, got {query.device}, {key.device}, {value.device}")
    win = _check_window(window, causal)
    mask, s_m = _mask_arg(attention_mask, query, B, H, Sq, Sk)
    d1, d2 = split_head_dim(D)
    cfg = dict(FWD_CONFIG_OVERRIDE or _fwd_config(D, DV, attention_mask is not None))
    num_m = triton.cdiv(Sq, cfg["BLOCK_M"])
    if DV == D:
        out = torch.empty_like(query)
    elif query.transpose(1, 2).is_contiguous():  # HF's [B, S, H, D] layout: keep it for the output
        out = query.new_empty(B, Sq, H, DV).transpose(1, 2)
    else:
        out = query.new_empty(B, H, Sq, DV)
    lse = torch.empty(B, H, Sq, device=query.device, dtype=torch.float32)
    part = torch.empty(B * H * num_m, device=query.device, dtype=torch.float32)
    if forward_uses_tma(query, key, value, out):
        from triton.tools.tensor_descriptor import TensorDescriptor

        bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")

        def desc(t, rows, lo=0, width=None):  # a [.., lo:lo + width] head-dim slice, 16-byte aligned
            width = t.shape[-1] if width is None else width
            part_t = t[..., lo:lo + width]
            return TensorDescriptor(part_t, list(part_t.shape), list(part_t.stride()), [1, 1, rows, width])

        q_d, k_d = desc(query, bm, 0, d1), desc(key, bn, 0, d1)
        q2_d, k2_d = (desc(query, bm, d1, d2), desc(key, bn, d1, d2)) if d2 else (q_d, k_d)
        _attn_fwd_max_kernel_tma[(num_m, B * H)](
            q_d, k_d, q2_d, k2_d, desc(value, bn), desc(out, bm), lse, part, mask,
            H, Sq, Sk, H // Hkv, win, *s_m, float(scale), float(scale) * math.log2(math.e),
            CAUSAL=bool(causal), HAS_WINDOW=win > 0, HAS_MASK=attention_mask is not None, BLOCK_M=bm, BLOCK_N=bn,
            HEAD_D=d1, HEAD_D2=d2, HEAD_DV=DV, CAST_F32=_interpret(), **cfg,
        )
        return out, lse, part.view(B, H, num_m).amax(dim=(0, 2))
    _attn_fwd_max_kernel[(num_m, B * H)](
        query, key, value, out, lse, part, mask,
        H, Sq, Sk, H // Hkv, win, *s_m,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        float(scale), float(scale) * math.log2(math.e),
        CAUSAL=bool(causal), HAS_WINDOW=win > 0, HAS_MASK=attention_mask is not None,
        HEAD_D=d1, HEAD_D2=d2, HEAD_DV=DV, CAST_F32=_interpret(), **cfg,
    )
    return out, lse, part.view(B, H, num_m).amax(dim=(0, 2))


@functools.lru_cache(maxsize=8)
def _cudnn_meta(device: str, d: int):
    """What PyTorch's cuDNN attention forward hands its backward, read off a tiny call: the
    rank of its log-sum-exp tensor and the (unused without dropout) RNG tensors."""
    q = torch.zeros(1, 1, 64, d, device=device, dtype=torch.bfloat16)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, True, False, scale=1.0)
    return res[1].ndim, res[6], res[7]


def cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    """PyTorch's cuDNN attention backward (SDPA's default on Hopper) fed with this forward's
    output and LSE; GQA native."""
    lse_ndim, seed, offset = _cudnn_meta(str(q.device), q.shape[-1])
    lse_c = lse.unsqueeze(-1) if lse_ndim == 4 else lse
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse_c, seed, offset, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
        scale=scale)


class _AttnWithMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window, backward, mask):
        out, lse, mx = attention_forward_with_max_triton(q, k, v, scale=scale, causal=causal, window=window,
                                                         attention_mask=mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.causal, ctx.window, ctx.backend = scale, causal, window, backward
        ctx.mark_non_differentiable(mx)
        return out, mx

    @staticmethod
    def backward(ctx, dout, _dmx):
        q, k, v, out, lse, mask = ctx.saved_tensors
        q, k, v, out = _one_layout(q, k, v, out)
        dout = match_grad_layout(dout, out)
        if mask is not None:
            return (*_masked_backward(dout, q, k, v, out, lse, mask, ctx.causal, ctx.scale, ctx.window),
                    None, None, None, None, None)
        if ctx.window is not None:
            # cuDNN's attention backward op takes no window; flash's does, and skips the hidden blocks
            dq, dk, dv = flash_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.window)
            return dq, dk, dv, None, None, None, None, None
        if ctx.backend in ("auto", "cudnn") and _CUDNN_OK != [False]:
            try:
                dq, dk, dv = cudnn_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)[:3]
                _CUDNN_OK[:] = [True]
                return dq, dk, dv, None, None, None, None, None
            except RuntimeError:
                if ctx.backend == "cudnn":
                    raise
                _CUDNN_OK[:] = [False]
        dq, dk, dv = flash_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale, None)
        return dq, dk, dv, None, None, None, None, None


_MASKED_CUDNN_OK: list[bool] = []


def _masked_backward(dout, q, k, v, out, lse, mask, causal, scale, window):
    """Backward under a mask tensor: PyTorch's cuDNN attention backward with the mask as an
    additive bias (what SDPA itself runs for a bool mask on Hopper), causal / window folded into
    that bias; where cuDNN refuses it, SDPA on the same mask recomputed under autograd (exact,
    one extra forward)."""
    B, H, S, Sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = mask.expand(B, mask.shape[1], S, Sk)
    if causal or window is not None:
        pos_q = torch.arange(S, device=q.device)[:, None]
        pos_k = torch.arange(Sk, device=q.device)[None, :]
        struct = pos_k <= pos_q if causal else torch.ones(S, Sk, dtype=torch.bool, device=q.device)
        if window is not None:
            struct = struct & (pos_k > pos_q - window)
        keep = keep & struct
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
    if _MASKED_CUDNN_OK != [False]:
        try:
            lse_ndim, seed, offset = _cudnn_meta(str(q.device), q.shape[-1])
            lse_c = lse.unsqueeze(-1) if lse_ndim == 4 else lse
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dout, q, k, v, out, lse_c, seed, offset, bias.expand(B, H, S, Sk), None, None, S, Sk, 0.0, False,
                scale=scale)[:3]
            _MASKED_CUDNN_OK[:] = [True]
            return grads
        except RuntimeError:
            _MASKED_CUDNN_OK[:] = [False]
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=keep, scale=scale,
                                                               enable_gqa=q.shape[1] != k.shape[1])
        return torch.autograd.grad(ref, (q_, k_, v_), dout)


def _one_layout(q, k, v, out):
    """q, k, v, out in one layout, q's when it is [B, H, S, D]- or [B, S, H, D]-contiguous (else
    [B, H, S, D]): copies only the tensors that differ. The cuDNN backward op describes tensors
    by their strides but assumes one layout family for all of them; MLA hands mixed ones (HF's
    DeepSeek-V3: q, k concatenated [B, H, S, D]-contiguous, v a [B, S, H, Dnope + Dv] slice)."""
    bshd = q.transpose(1, 2).is_contiguous() and not q.is_contiguous()

    def fit(t):
        if bshd:
            return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)
        return t if t.is_contiguous() else t.contiguous()

    return fit(q), fit(k), fit(v), fit(out)


def match_grad_layout(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``dout`` with ``out``'s strides. PyTorch's cuDNN attention backward describes dO with O's
    strides (SDPA's own autograd formula materializes a matching grad_output first); HF's
    ``out.transpose(1, 2).contiguous()`` hands back a [B, H, S, D] gradient laid out [B, S, H, D]
    while O follows q's layout, and a plain ``.contiguous()`` made them disagree: wrong
    gradients, caught by tests/gpu/test_tracker_gpu.py."""
    if dout.stride() == out.stride():
        return dout
    return torch.empty_like(out).copy_(dout)


_BWD_VARIANT: list[int] = []
_GQA_NATIVE: list[bool] = []


def flash_backward_gqa_native() -> bool | None:
    """Whether this torch's flash backward took Hkv < H directly (None: not probed yet)."""
    return _GQA_NATIVE[0] if _GQA_NATIVE else None
_CUDNN_OK: list[bool] = []


def flash_backward(dout, q, k, v, out, lse, causal, scale, window):
    """PyTorch's flash-attention backward (``aten::_flash_attention_backward``, [B, S, H, D]
    views of the [B, H, S, D] tensors) fed with this forward's output and LSE; ``window`` maps to
    flash's ``window_size_left = window - 1`` (keys j >= i - window + 1), right 0 (causal).

    GQA: recent flash backends take Hkv < H directly (found on the first call); otherwise K/V are
    expanded to H heads and each group's gradients summed back. Non-varlen calls pass undefined
    cumulative-length tensors and, with no dropout, RNG state that is never read; its exact type
    differs across torch versions, so the first call finds the form this torch accepts.
    """
    B, H, S, D = q.shape
    Hkv, Sk, DV = k.shape[1], k.shape[2], v.shape[3]
    if DV != D:  # flash takes one head dim: zero value columns give zero output columns, exactly
        pad = lambda t: torch.nn.functional.pad(t, (0, D - DV))  # noqa: E731
        dq, dk, dv = flash_backward(pad(dout), q, k, pad(v), pad(out), lse, causal, scale, window)
        return dq, dk, dv[..., :DV]
    g = H // Hkv
    op = torch.ops.aten._flash_attention_backward
    win = dict(window_size_left=window - 1, window_size_right=0) if window is not None else {}

    def call(variant, kk, vv):
        if variant == 0:
            rng = torch.empty(2, dtype=torch.uint64, device=q.device)
            unused = torch.empty(0, dtype=torch.uint64, device=q.device)
        else:
            rng = torch.empty((), dtype=torch.int64, device=q.device)
            unused = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = op(dout.transpose(1, 2), q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                        out.transpose(1, 2), lse, None, None, S, Sk, 0.0, causal, rng, unused, scale=scale, **win)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    def run(kk, vv):
        if _BWD_VARIANT:
            return call(_BWD_VARIANT[0], kk, vv)
        err = None
        for variant in (0, 1):
            try:
                res = call(variant, kk, vv)
            except (RuntimeError, TypeError) as e:  # noqa: PERF203 - tried once per process
                err = e
                continue
            _BWD_VARIANT.append(variant)
            return res
        raise RuntimeError(f"PyTorch's flash-attention backward rejected both argument forms: {err}")

    if g > 1 and _GQA_NATIVE != [False]:
        try:
            dq, dk, dv = run(k, v)
            if dk.shape == k.shape:
                _GQA_NATIVE[:] = [True]
                return dq, dk, dv
        except RuntimeError:
            pass
        _GQA_NATIVE[:] = [False]
    if g == 1:
        return run(k, v)
    dq, dk, dv = run(k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1))
    return dq, dk.view(B, Hkv, g, Sk, D).sum(2), dv.view(B, Hkv, g, Sk, D).sum(2)


def attention_with_max_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    attention_mask: torch.Tensor | None = None,
    backward: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention (CUDA) returning ``(out, max_logits [H] fp32)`` in one forward.

    Drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
    enable_gqa=True)`` plus the QK-Clip statistic; with ``window`` (causal only), for SDPA given
    transformers' sliding-window causal mask (query i sees keys ``i - window < j <= i``).
    ``backward``: "cudnn" (PyTorch's cuDNN attention backward, SDPA's default on Hopper), "flash"
    (PyTorch's flash backward) or "auto" (cuDNN, falling back to flash where this torch / GPU has
    no cuDNN attention). A window always takes the flash backward (cuDNN's op has no window).
    ``attention_mask`` (4-D bool, True = attend; padding, packed sequences) takes cuDNN's
    backward with the mask as an additive bias, or SDPA recomputed under autograd.
    """
    if backward not in ("auto", "cudnn", "flash"):
        raise ValueError(f"backward must be 'auto', 'cudnn' or 'flash', got {backward!r}")
    _check_window(window, causal)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return _AttnWithMax.apply(query, key, value, scale, causal, window, backward, attention_mask)
