"""Per-head max attention logit with a fused Triton kernel (for Kimi K2's QK-Clip).

QK-Clip (Kimi K2, arXiv 2507.20534) needs, per query head h, S_h = max over batch and positions of
the logits softmax sees: ``scale * q_i . k_j`` (+ additive mask), causal / padding positions
excluded. Materializing [B, H, Sq, Sk] costs more than the attention itself; this kernel tiles
q k^T flash-attention style (Dao et al., arXiv 2205.14135) and keeps only a running elementwise
max tile per program: one matrix product per tile, no exp, no P V product, nothing written but
one float per (batch, head, query block). Tiles fully inside the visible region run without any
mask arithmetic; only diagonal / boundary tiles (or every tile when a mask tensor is given) pay
for masking.

GQA: query head h reads key head h // (H // Hkv). Causal is top-left aligned (key j visible to
query i iff j <= i), like SDPA's ``is_causal``.

This module imports Triton and defines its kernel at module level; the package
(:mod:`dist_muonclip.kernels`) imports it only when the launcher is first used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._env import interpret as _interpret

__all__ = ["max_logits_triton"]


@triton.jit
def _max_logit_kernel(
    Q, K, Mask, Out,
    H, Sq, Sk, D, group,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_mb, s_mh, s_mq, s_mk,
    scale,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,  # 0 none, 1 additive float, 2 bool
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, CAST_F32: tl.constexpr,
):
    """Out[b, h, pid_m] = max over query block pid_m and all visible keys of the logits."""
    # Causal work grows with the query block: launch the longest blocks first (LPT order)
    # so that the short ones fill the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = (h // group).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    q_ptrs = Q + b * s_qb + h.to(tl.int64) * s_qh + offs_m[:, None] * s_qs + offs_d[None, :] * s_qd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    k_base = K + b * s_kb + kvh * s_kh
    m_base = Mask + b * s_mb + h.to(tl.int64) * s_mh
    run = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)

    if CAUSAL:
        hi = tl.minimum(Sk, m0 + BLOCK_M)
    else:
        hi = Sk
    # Tiles [n0, n0 + BLOCK_N) visible to every row of the block: no mask arithmetic.
    if MASK_KIND == 0:
        full_end = (Sk // BLOCK_N) * BLOCK_N
        if CAUSAL:
            full_end = tl.minimum(full_end, (m0 // BLOCK_N) * BLOCK_N)
    else:
        full_end = 0
    for n0 in range(0, full_end, BLOCK_N):
        k_ptrs = k_base + (n0 + offs_n)[None, :] * s_ks + offs_d[:, None] * s_kd
        if EVEN_D:
            kt = tl.load(k_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
        if CAST_F32:
            kt = kt.to(tl.float32)
        run = tl.maximum(run, tl.dot(q, kt))
    if MASK_KIND == 0:
        run = run * scale
    # Boundary tiles: causal diagonal, key tail, or every tile when a mask tensor is given.
    for n0 in range(full_end, hi, BLOCK_N):
        cols = n0 + offs_n
        k_ptrs = k_base + cols[None, :] * s_ks + offs_d[:, None] * s_kd
        kt = tl.load(k_ptrs, mask=(cols[None, :] < Sk) & (offs_d[:, None] < D), other=0.0)
        if CAST_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt) * scale
        ok = cols[None, :] < Sk
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None])
        if MASK_KIND != 0:
            inb = row_ok[:, None] & (cols[None, :] < Sk)
            mv = tl.load(m_base + offs_m[:, None] * s_mq + cols[None, :] * s_mk, mask=inb, other=0)
            if MASK_KIND == 1:
                s = s + mv.to(tl.float32)
            else:
                ok = ok & (mv != 0)
        run = tl.maximum(run, tl.where(ok, s, float("-inf")))
    run = tl.where(row_ok[:, None], run, float("-inf"))
    best = tl.max(tl.max(run, axis=1), axis=0)
    tl.store(Out + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, best)



def _config(d: int) -> dict:
    block_d = max(16, 1 << (d - 1).bit_length())
    if _interpret():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=4)


# Benchmarks override this to sweep tile shapes without editing the module.
CONFIG_OVERRIDE: dict | None = None


def _mask_view(mask: torch.Tensor, B: int, Sq: int, Sk: int) -> torch.Tensor:
    if mask.ndim == 2:  # [B, Sk] padding mask (1 / True = keep), the cheap form
        if mask.shape != (B, Sk):
            raise ValueError(f"a 2-D attention_mask must be [B, Sk] = {(B, Sk)}, got {tuple(mask.shape)}")
        mask = mask.bool() if mask.dtype != torch.bool and not mask.is_floating_point() else mask
        return mask[:, None, None, :].expand(B, 1, Sq, Sk)
    if mask.ndim != 4:
        raise ValueError(
            f"attention_mask must be [B, Sk] or 4-D broadcastable to [B, 1, Sq, Sk], got shape {tuple(mask.shape)}")
    try:
        return mask.expand(B, mask.shape[1], Sq, Sk)
    except RuntimeError:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} does not broadcast to [B, 1 or H, Sq, Sk] = "
            f"{(B, 1, Sq, Sk)}") from None


def max_logits_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head max logit: [H] float32, max over batch and positions of ``scale * q k^T`` (+ mask).

    query [B, H, Sq, D], key [B, Hkv, Sk, D] (H divisible by Hkv; any float dtype, any strides).
    ``attention_mask``: None; an additive float mask or a bool mask (True = attend) broadcastable
    to [B, 1, Sq, Sk] (or [B, H, Sq, Sk]), as HF passes to attention functions; or the cheaper
    [B, Sk] key-padding form (nonzero / True = keep). Positions excluded by the causal flag or a
    bool / -inf mask never count; a head with no visible position gives -inf. Matches
    :func:`.reference.max_logits_reference` up to fp32 accumulation order.
    """
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        raise TypeError("query and key must be torch.Tensors")
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(
            f"query must be [B, H, Sq, D] and key [B, Hkv, Sk, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    B, H, Sq, D = query.shape
    Bk, Hkv, Sk, Dk = key.shape
    if Bk != B or Dk != D or Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"key {tuple(key.shape)} does not match query {tuple(query.shape)}: need the same B and D and "
            "H divisible by Hkv")
    if query.device.type != "cuda" and not _interpret():
        raise ValueError(f"max_logits_triton needs CUDA tensors (got {query.device}); use the torch tracker on CPU")
    if key.device != query.device:
        raise ValueError(f"query and key are on different devices: {query.device} vs {key.device}")
    if not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    mask_kind, mask = 0, query  # dummy pointer when there is no mask
    s_m = (0, 0, 0, 0)
    if attention_mask is not None:
        if attention_mask.device != query.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, query on {query.device}")
        mask = _mask_view(attention_mask, B, Sq, Sk)
        if mask.shape[1] not in (1, H):
            raise ValueError(f"attention_mask head dim must be 1 or H={H}, got {mask.shape[1]}")
        if mask.dtype == torch.bool:
            mask_kind = 2
            mask = mask.view(torch.uint8)
        elif mask.is_floating_point():
            mask_kind = 1
        else:
            raise TypeError(f"attention_mask must be bool or float, got {attention_mask.dtype}")
        s_m = (mask.stride(0), mask.stride(1) if mask.shape[1] == H else 0, mask.stride(2), mask.stride(3))
    cfg = dict(CONFIG_OVERRIDE or _config(D))
    num_m = triton.cdiv(Sq, cfg["BLOCK_M"])
    partial = torch.empty(B * H * num_m, device=query.device, dtype=torch.float32)
    if Sq == 0 or Sk == 0:
        return torch.full((H,), float("-inf"), device=query.device)
    _max_logit_kernel[(num_m, B * H)](
        query, key, mask, partial,
        H, Sq, Sk, D, H // Hkv,
        *query.stride(), *key.stride(), *s_m,
        float(scale),
        CAUSAL=bool(causal), MASK_KIND=mask_kind, EVEN_D=D == cfg["BLOCK_D"], CAST_F32=_interpret(),
        **cfg,
    )
    return partial.view(B, H, num_m).amax(dim=(0, 2))
