"""Fused elementwise passes of the Muon step (CUDA): momentum + Nesterov input in one pass, and
decoupled weight decay + update in one pass.

torch runs each as two kernels (``buf.lerp_(g, 1 - mu)`` then ``g.lerp(buf, mu)``;
``p.mul_(1 - lr * wd)`` then ``p.add_(u, alpha=-lr * scale)``), reading the operands twice:
24 and 18 bytes per fp32 element; these read and write each operand once (16 and 10 bytes with a
bf16 update). The arithmetic is torch's, in fp32 (``at::lerp``'s two-branch form, then
``mul`` and ``add`` with alpha as fused multiply-adds); tests/gpu compares the bits with torch's.
Used only on CUDA tensors (:func:`dist_muonclip.functional.muon_momentum_` /
:func:`~dist_muonclip.functional.muon_apply_`); the CPU keeps torch's loops.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["momentum_nesterov_triton", "apply_update_triton"]

BLOCK = 4096


@triton.jit
def _lerp(a, b, w):
    # at::lerp: weight < 0.5 ? a + w * (b - a) : b - (b - a) * (1 - w)
    d = b - a
    return tl.where(w < 0.5, tl.fma(w, d, a), tl.fma(-d, 1.0 - w, b))


@triton.jit
def _momentum_kernel(g_ptr, b_ptr, v_ptr, n, w_buf, w_out, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    b = _lerp(b, g, w_buf)
    tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)
    if NESTEROV:
        v = _lerp(g, b, w_out)
    else:
        v = b
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(p_ptr, u_ptr, n, decay, alpha, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
    if DECAY:
        p = (p * decay).to(p_ptr.dtype.element_ty).to(tl.float32)   # mul_ stores in p's dtype
    tl.store(p_ptr + offs, tl.fma(alpha, u, p).to(p_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def momentum_nesterov_triton(grads: Sequence[Tensor], bufs: Sequence[Tensor], *, momentum: float,
                             nesterov: bool) -> list[Tensor]:
    """``buf.lerp_(g, 1 - momentum)``; returns ``g.lerp(buf, momentum)`` (nesterov) or a copy of
    ``buf``, one pass per tensor. Contiguous same-shape CUDA tensors."""
    out = []
    for g, b in zip(grads, bufs):
        v = torch.empty_like(g, memory_format=torch.contiguous_format)
        n = g.numel()
        if n:
            _momentum_kernel[_grid(n)](g, b, v, n, 1 - momentum, momentum, NESTEROV=nesterov, BLOCK=BLOCK)
        out.append(v)
    return out


def apply_update_triton(params: Sequence[Tensor], updates: Sequence[Tensor], *, decay: float, alpha: float
                        ) -> None:
    """``p.mul_(decay)`` (when ``decay != 1``) then ``p.add_(u, alpha=alpha)``, one pass per tensor."""
    for p, u in zip(params, updates):
        n = p.numel()
        if n:
            _apply_kernel[_grid(n)](p, u, n, decay, alpha, DECAY=decay != 1.0, BLOCK=BLOCK)
