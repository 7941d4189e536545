"""Newton-Schulz orthogonalization with Triton kernels (batched, symmetric-product savings).

One odd-quintic NS iteration on a wide X [m, n] (m <= n) is (Jordan's Muon; coefficients per
iteration from Jordan, Polar Express arXiv 2505.16932 or CANS arXiv 2506.10935):

    A = X X^T            symmetric: ``_sym_kernel`` computes one triangle and mirrors it (m^2 n / 2 FMAs)
    B = b A + c A A      A symmetric, so A A = A A^T: the same kernel, b A fused in its epilogue (m^3 / 2)
    X' = a X + B X       ``_gemm_axpy_kernel``: a plain product with the a X term fused in the epilogue

i.e. 1.5 m^2 n + 0.5 m^3 FMAs per iteration instead of 2 m^2 n + m^3. Each kernel has a TMA
(tensor-descriptor) variant, used on Hopper when all operands are row-major with 16-byte aligned
strides, and a pointer variant for everything else.

All three take a batch of same-shape matrices [Bt, rows, cols] with arbitrary strides (int64
batch offsets), so a tall input is read through its transposed view (no transpose copy) and the
last iteration writes straight into the output in the input's orientation. Operands are bf16,
accumulation fp32, every intermediate rounded once to bf16 (torch eager rounds A A, c A A,
b A + ... separately, so the kernels are at least as accurate).

Gram Newton-Schulz (``gram_newton_schulz_triton``) carries the iteration on the m x m Gram
matrix: ``P_k = a I + b A_k + c A_k^2``, ``Q_{k+1} = P_k Q_k``, ``A_{k+1} = P_k (P_k A_k)`` (all
polynomials in A_0, hence symmetric and commuting, so every product is a one-triangle
``_sym_kernel`` call) and ``X_K = Q_K X_0``. For m << n it needs far fewer FLOPs (the idea of
"Gram Newton-Schulz", tridao.me/blog/2026/gram-newton-schulz; its reference code runs in fp16 with a
restart at iteration 2, ours in bf16 with a restart after 3, chosen by our own float64 study); a restart
(``X = Q X_0``, ``A = X X^T``) every ``restart_every`` iterations keeps bf16 rounding in check.

This module imports Triton and defines its kernels at module level (``TRITON_INTERPRET=1``, for
the CPU tests, must be set before it is imported); the package (:mod:`dist_muonclip.kernels`) and
the core (:mod:`dist_muonclip.newton_schulz`) import it only when the Triton backend is used.
"""
from __future__ import annotations

import collections
import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._env import interpret as _interpret
from ._env import tma_ok

__all__ = ["clear_graph_cache", "gemm_axpy", "gemm_config", "gram_newton_schulz_triton", "newton_schulz_triton",
           "ns_kernel_flops", "sym_config", "sym_product"]

Schedule = Sequence[tuple[float, float, float]]


@triton.jit
def _sym_kernel(
    Y, Z, W, C, Tiles,
    m, k,
    s_yb, s_yr, s_yc,
    s_zb, s_zr, s_zc,
    s_wb, s_wr, s_wc,
    s_cb, s_cr, s_cc,
    alpha, beta, gamma,
    HAS_W: tl.constexpr, HAS_GAMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr, CAST_F32: tl.constexpr,
):
    """C = alpha * Y Z^T + beta * W + gamma * I for a symmetric result, lower triangle only.

    Y, Z: [Bt, m, k]; W, C: [Bt, m, m]. A tile is computed when it holds an element on or
    below the diagonal; it stores its lower part at (r, c) and its strictly-lower part
    mirrored at (c, r), so every element of C is written exactly once.
    """
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    # (row block, col block) of this program from the host-built list of lower tiles: no
    # program is launched for a tile strictly above the diagonal (no branch around the loop,
    # no wasted wave slots).
    row0 = tl.load(Tiles + 2 * pid) * BLOCK_M
    col0 = tl.load(Tiles + 2 * pid + 1) * BLOCK_N
    offs_r = row0 + tl.arange(0, BLOCK_M)
    offs_c = col0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    y_ptrs = Y + bid * s_yb + offs_r[:, None] * s_yr + offs_k[None, :] * s_yc
    z_ptrs = Z + bid * s_zb + offs_k[:, None] * s_zc + offs_c[None, :] * s_zr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(k, BLOCK_K)):
        if EVEN:
            y = tl.load(y_ptrs)
            z = tl.load(z_ptrs)
        else:
            k_left = k - kk * BLOCK_K
            y = tl.load(y_ptrs, mask=(offs_r[:, None] < m) & (offs_k[None, :] < k_left), other=0.0)
            z = tl.load(z_ptrs, mask=(offs_k[:, None] < k_left) & (offs_c[None, :] < m), other=0.0)
        if CAST_F32:
            y = y.to(tl.float32)
            z = z.to(tl.float32)
        acc = tl.dot(y, z, acc)
        y_ptrs += BLOCK_K * s_yc
        z_ptrs += BLOCK_K * s_zc
    out = acc * alpha
    in_bounds = (offs_r[:, None] < m) & (offs_c[None, :] < m)
    if HAS_W:
        w_ptrs = W + bid * s_wb + offs_r[:, None] * s_wr + offs_c[None, :] * s_wc
        if EVEN:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=in_bounds, other=0.0)
        out += beta * w.to(tl.float32)
    if HAS_GAMMA:
        out += tl.where(offs_r[:, None] == offs_c[None, :], gamma, 0.0)
    out = out.to(C.dtype.element_ty)
    c_base = C + bid * s_cb
    c_ptrs = c_base + offs_r[:, None] * s_cr + offs_c[None, :] * s_cc
    # Mirror: store the transposed tile through row-major pointers so the store stays
    # coalesced and vectorized (a per-element mask or column-major pointers would not).
    ct_ptrs = c_base + offs_c[:, None] * s_cr + offs_r[None, :] * s_cc
    out_t = tl.trans(out)
    if col0 + BLOCK_N <= row0:
        # Tile strictly below the diagonal: only bounds masks (none when sizes divide).
        if EVEN:
            tl.store(c_ptrs, out)
            tl.store(ct_ptrs, out_t)
        else:
            tl.store(c_ptrs, out, mask=in_bounds)
            tl.store(ct_ptrs, out_t, mask=tl.trans(in_bounds))
    else:
        # Tile on the diagonal: lower part as is, strictly-lower part mirrored.
        lower = in_bounds & (offs_c[None, :] <= offs_r[:, None])
        tl.store(c_ptrs, out, mask=lower)
        strict = in_bounds & (offs_c[None, :] < offs_r[:, None])
        tl.store(ct_ptrs, out_t, mask=tl.trans(strict))

@triton.jit
def _gemm_axpy_kernel(
    Bm, X, O,
    m, n, k,
    s_bb, s_br, s_bc,
    s_xb, s_xr, s_xc,
    s_ob, s_or, s_oc,
    a,
    HAS_AX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN: tl.constexpr, CAST_F32: tl.constexpr,
):
    """O = a * X[:m] + Bm @ X with Bm [Bt, m, k], X [Bt, k, n] (k == m when HAS_AX)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(m, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b_ptrs = Bm + bid * s_bb + offs_r[:, None] * s_br + offs_k[None, :] * s_bc
    x_ptrs = X + bid * s_xb + offs_k[:, None] * s_xr + offs_c[None, :] * s_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(k, BLOCK_K)):
        if EVEN:
            bt = tl.load(b_ptrs)
            xt = tl.load(x_ptrs)
        else:
            k_left = k - kk * BLOCK_K
            bt = tl.load(b_ptrs, mask=(offs_r[:, None] < m) & (offs_k[None, :] < k_left), other=0.0)
            xt = tl.load(x_ptrs, mask=(offs_k[:, None] < k_left) & (offs_c[None, :] < n), other=0.0)
        if CAST_F32:
            bt = bt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(bt, xt, acc)
        b_ptrs += BLOCK_K * s_bc
        x_ptrs += BLOCK_K * s_xr
    in_bounds = (offs_r[:, None] < m) & (offs_c[None, :] < n)
    if HAS_AX:
        x_own_ptrs = X + bid * s_xb + offs_r[:, None] * s_xr + offs_c[None, :] * s_xc
        if EVEN:
            x_own = tl.load(x_own_ptrs)
        else:
            x_own = tl.load(x_own_ptrs, mask=in_bounds, other=0.0)
        acc += a * x_own.to(tl.float32)
    o_ptrs = O + bid * s_ob + offs_r[:, None] * s_or + offs_c[None, :] * s_oc
    if EVEN:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=in_bounds)

@triton.jit
def _sym_kernel_tma(
    y_desc, z_desc, w_desc, c_desc, ct_desc, C, W, Tiles,
    m, k, s_cb, s_cr, s_cc, s_wb, s_wr, s_wc,
    alpha, beta, gamma,
    HAS_W: tl.constexpr, HAS_GAMMA: tl.constexpr, W_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CAST_F32: tl.constexpr,
):
    """``_sym_kernel`` with tensor-memory-accelerator (TMA) loads / stores: row-major operands
    with 16-byte aligned strides; out-of-range rows read as zeros and are clipped on store."""
    pid = tl.program_id(0)
    bid = tl.program_id(1)
    row0 = tl.load(Tiles + 2 * pid) * BLOCK_M
    col0 = tl.load(Tiles + 2 * pid + 1) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(k, BLOCK_K)):
        y = y_desc.load([bid, row0, kk * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
        z = z_desc.load([bid, col0, kk * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
        if CAST_F32:
            y = y.to(tl.float32)
            z = z.to(tl.float32)
        acc = tl.dot(y, z.T, acc)
    out = acc * alpha
    offs_r = row0 + tl.arange(0, BLOCK_M)
    offs_c = col0 + tl.arange(0, BLOCK_N)
    if HAS_W:
        if W_TMA:
            w = w_desc.load([bid, row0, col0]).reshape(BLOCK_M, BLOCK_N)
        else:  # straight to registers: keeps shared memory for the main-loop stages
            w = tl.load(W + bid.to(tl.int64) * s_wb + offs_r[:, None] * s_wr + offs_c[None, :] * s_wc,
                        mask=(offs_r[:, None] < m) & (offs_c[None, :] < m), other=0.0)
        out += beta * w.to(tl.float32)
    if HAS_GAMMA:
        out += tl.where(offs_r[:, None] == offs_c[None, :], gamma, 0.0)
    out = out.to(C.dtype.element_ty)
    out_t = tl.trans(out)
    if col0 + BLOCK_N <= row0:
        c_desc.store([bid, row0, col0], out.reshape(1, BLOCK_M, BLOCK_N))
        ct_desc.store([bid, col0, row0], out_t.reshape(1, BLOCK_N, BLOCK_M))
    else:
        c_base = C + bid.to(tl.int64) * s_cb
        in_bounds = (offs_r[:, None] < m) & (offs_c[None, :] < m)
        lower = in_bounds & (offs_c[None, :] <= offs_r[:, None])
        tl.store(c_base + offs_r[:, None] * s_cr + offs_c[None, :] * s_cc, out, mask=lower)
        strict = in_bounds & (offs_c[None, :] < offs_r[:, None])
        tl.store(c_base + offs_c[:, None] * s_cr + offs_r[None, :] * s_cc, out_t, mask=tl.trans(strict))

@triton.jit
def _gemm_axpy_kernel_tma(
    b_desc, x_desc, xo_desc, o_desc,
    m, n, k, a,
    HAS_AX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, CAST_F32: tl.constexpr,
):
    """``_gemm_axpy_kernel`` with TMA loads / stores (row-major, 16-byte aligned operands)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1)
    num_pid_m = tl.cdiv(m, BLOCK_M)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(k, BLOCK_K)):
        bt = b_desc.load([bid, row0, kk * BLOCK_K]).reshape(BLOCK_M, BLOCK_K)
        xt = x_desc.load([bid, kk * BLOCK_K, col0]).reshape(BLOCK_K, BLOCK_N)
        if CAST_F32:
            bt = bt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(bt, xt, acc)
    if HAS_AX:
        acc += a * xo_desc.load([bid, row0, col0]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
    o_desc.store([bid, row0, col0], acc.to(o_desc.dtype).reshape(1, BLOCK_M, BLOCK_N))



# ---------------------------------------------------------------------------------------------
# launch configuration

def sym_config(m: int, k: int, fused: bool = False) -> dict:
    """Tiles of ``_sym_kernel``; ``fused``: the b A + c A A call (an epilogue operand W to load).

    Measured per role on an H100 (benchmarks/results/gpu_tune_h100.json, TMA kernels): 128 x 128
    tiles, 4 warps, 5 stages up to m = 4096, with W read through TMA in the fused call; beyond,
    128 x 256 (X X^T) and 256 x 128 (fused, W through plain loads) with 8 warps and 3 stages.
    """
    if _interpret():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1, W_TMA=False)
    if m <= 4096:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5, W_TMA=fused)
    if fused:
        return dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, W_TMA=False)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, W_TMA=False)


def gemm_config(m: int, n: int, k: int) -> dict:
    if _interpret():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    stages = 4 if (m >= 8192 or m * n <= 1024 * 1024) else 3
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages)


# Benchmarks override these to sweep tile shapes without editing the module.
SYM_CONFIG_OVERRIDE: dict | None = None
GEMM_CONFIG_OVERRIDE: dict | None = None


GEMM_BACKEND = "triton"
"""Backend of the a X + B X product: "triton" (``_gemm_axpy_kernel``) or "cublas"
(``torch.baddbmm``, cuBLAS fusing the a X term into its epilogue, one bf16 rounding like ours), used
where every operand is a contiguous CUDA tensor; Triton for strided views and the interpreter."""

USE_TMA = True
"""Use the TMA (tensor descriptor) kernels where every operand allows it (Hopper+, row-major,
16-byte aligned strides); the pointer kernels otherwise (transposed views, odd strides, older GPUs)."""

SYM_W_VIA_TMA: bool | None = None
"""Epilogue operand W of the TMA sym kernel through TMA (shared memory) or plain loads; None: as
the tile config says (``sym_config``'s ``W_TMA``)."""


def _tma_ok(*ts: torch.Tensor) -> bool:
    return USE_TMA and tma_ok(*ts)


def _desc(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@functools.lru_cache(maxsize=128)
def _lower_tiles(m: int, bm: int, bn: int, group_m: int, device: str) -> torch.Tensor:
    """Flat int32 [2 T] list of (row block, col block) of the tiles of an m x m matrix that hold
    an element on or below the diagonal, in grouped (L2-friendly) order: GROUP_M row blocks at a
    time, column blocks inner."""
    num_m, num_n = -(-m // bm), -(-m // bn)
    tiles = []
    for g0 in range(0, num_m, group_m):
        rows = range(g0, min(num_m, g0 + group_m))
        for pn in range(num_n):
            for pm in rows:
                if pn * bn <= pm * bm + bm - 1:
                    tiles += [pm, pn]
    return torch.tensor(tiles, dtype=torch.int32, device=device)


def sym_product(y, z=None, w=None, *, out, alpha=1.0, beta=0.0, gamma=0.0) -> torch.Tensor:
    """out = alpha * y z^T + beta * w + gamma * I (symmetric result) for [Bt, m, k] views."""
    z = y if z is None else z
    bt, m, k = y.shape
    cfg = dict(SYM_CONFIG_OVERRIDE or sym_config(m, k, w is not None and beta != 0.0))
    even = m % cfg["BLOCK_M"] == 0 and m % cfg["BLOCK_N"] == 0 and k % cfg["BLOCK_K"] == 0
    w_tma = cfg.pop("W_TMA", False) if SYM_W_VIA_TMA is None else SYM_W_VIA_TMA
    tiles = _lower_tiles(m, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.pop("GROUP_M"), str(y.device))
    grid = (tiles.numel() // 2, bt)
    wt = w if w is not None else out
    if _tma_ok(y, z, wt, out):
        bm_, bn_, bk_ = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
        _sym_kernel_tma[grid](
            _desc(y, [1, bm_, bk_]), _desc(z, [1, bn_, bk_]), _desc(wt, [1, bm_, bn_]),
            _desc(out, [1, bm_, bn_]), _desc(out, [1, bn_, bm_]), out, wt, tiles, m, k,
            *_strides3(out), *_strides3(wt),
            float(alpha), float(beta), float(gamma),
            HAS_W=w is not None and beta != 0.0, HAS_GAMMA=gamma != 0.0, W_TMA=w_tma,
            BLOCK_M=bm_, BLOCK_N=bn_, BLOCK_K=bk_, CAST_F32=_interpret(), **cfg,
        )
        return out
    _sym_kernel[grid](
        y, z, wt, out, tiles, m, k,
        *_strides3(y), *_strides3(z), *_strides3(wt), *_strides3(out),
        float(alpha), float(beta), float(gamma),
        HAS_W=w is not None and beta != 0.0, HAS_GAMMA=gamma != 0.0,
        EVEN=even, CAST_F32=_interpret(), **cfg,
    )
    return out


def gemm_axpy(bm, x, *, out, a=0.0) -> torch.Tensor:
    """out = a * x + bm @ x for bm [Bt, m, k], x [Bt, k, n] (a != 0 needs k == m)."""
    if GEMM_BACKEND == "cublas" and bm.is_cuda and not _interpret() and all(
            t.is_contiguous() for t in (bm, x, out)):
        if a != 0.0:
            return torch.baddbmm(x, bm, x, beta=float(a), out=out)
        return torch.bmm(bm, x, out=out)
    bt, m, k = bm.shape
    n = x.shape[-1]
    cfg = dict(GEMM_CONFIG_OVERRIDE or gemm_config(m, n, k))
    even = m % cfg["BLOCK_M"] == 0 and n % cfg["BLOCK_N"] == 0 and k % cfg["BLOCK_K"] == 0
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), bt)
    if _tma_ok(bm, x, out):
        bm_, bn_, bk_ = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
        _gemm_axpy_kernel_tma[grid](
            _desc(bm, [1, bm_, bk_]), _desc(x, [1, bk_, bn_]), _desc(x, [1, bm_, bn_]), _desc(out, [1, bm_, bn_]),
            m, n, k, float(a), HAS_AX=a != 0.0,
            BLOCK_M=bm_, BLOCK_N=bn_, BLOCK_K=bk_, CAST_F32=_interpret(), **cfg,
        )
        return out
    _gemm_axpy_kernel[grid](
        bm, x, out, m, n, k,
        *_strides3(bm), *_strides3(x), *_strides3(out),
        float(a), HAS_AX=a != 0.0,
        EVEN=even, CAST_F32=_interpret(), **cfg,
    )
    return out


# ---------------------------------------------------------------------------------------------
# host entry points

def _check_inputs(x: torch.Tensor, schedule: Schedule, eps: float) -> list[tuple[float, float, float]]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be [m, n] or [B, m, n], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.device.type != "cuda" and not _interpret():
        raise ValueError(
            f"newton_schulz_triton needs a CUDA tensor (got device {x.device}); use the torch "
            "backend on CPU, or set TRITON_INTERPRET=1 before the first call for the interpreter")
    try:
        sched = [tuple(float(v) for v in abc) for abc in schedule]
    except (TypeError, ValueError) as err:
        raise TypeError(f"schedule must be a sequence of (a, b, c) float triples: {err}") from None
    if any(len(abc) != 3 for abc in sched):
        raise ValueError(f"schedule must hold (a, b, c) triples, got {schedule!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if x.shape[-1] * x.shape[-2] >= 2**31:
        raise ValueError(f"one matrix must have < 2**31 elements, got shape {tuple(x.shape)}")
    return sched


def _prepare(x: torch.Tensor, eps: float, dtype: torch.dtype = torch.bfloat16):
    """Normalized [Bt, M, N] copy in ``dtype``, its wide view [Bt, m, n], and whether it is transposed."""
    xb = x.unsqueeze(0) if x.ndim == 2 else x
    if dtype == torch.bfloat16:
        # Same normalization as torch.optim.Muon: bf16 Frobenius norm clamped at eps, bf16 division.
        xb = xb.to(torch.bfloat16)
        x0 = xb / torch.linalg.vector_norm(xb, dim=(-2, -1), keepdim=True).clamp(min=eps)
    else:  # fp16: normalize in fp32 first (a raw gradient or its norm may exceed fp16's range)
        xf = xb.float()
        x0 = (xf / torch.linalg.vector_norm(xf, dim=(-2, -1), keepdim=True).clamp(min=eps)).to(dtype)
    transposed = x0.shape[-2] > x0.shape[-1]
    return x0, (x0.mT if transposed else x0), transposed


GRAM_MIN_ASPECT = 2.5
"""``method="auto"`` uses Gram NS when the long side is at least this many times the short one."""

GRAM_MAX_A = 4.0
"""... and when no iteration's ``a`` exceeds this. Large first-iteration coefficients (Polar
Express a = 8.3, CANS) multiply the bf16 rounding noise on the tiny eigenvalues of the Gram
matrix by a^2 per iteration; on ill-conditioned inputs this drove Gram NS to hundreds of times
torch eager's error in our float64 comparisons, while Jordan's schedule (a = 3.4) stayed below it."""

_GRAPH_MAX_WORK = 2**36
"""``cuda_graph=None`` captures a CUDA graph when batch * m^2 * n is at most this (launch-bound sizes)."""

_GRAPHS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def clear_graph_cache() -> None:
    """Drop the captured CUDA graphs (keyed by shape, not by launch configuration: benchmarks that
    change configurations call this between them)."""
    _GRAPHS.clear()
_GRAPH_CACHE_SIZE = 16


def newton_schulz_triton(
    x: torch.Tensor,
    schedule: Schedule,
    *,
    eps: float = 1e-7,
    method: str = "auto",
    restart_every: int = 3,
    cuda_graph: bool | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Orthogonalize ``x`` [m, n] or [B, m, n] with NS iterations ``schedule`` = [(a, b, c), ...].

    Frobenius-normalizes each matrix (clamped at ``eps``), iterates on the wide orientation
    (a tall input is read and written through transposed strides, never copied) and returns the
    same shape in bf16. Matches :func:`.reference.newton_schulz_reference` up to bf16 rounding.

    ``method``: "standard" (X X^T, b A + c A^2, a X + B X per iteration), "gram" (Gram NS, see
    :func:`gram_newton_schulz_triton`) or "auto" (Gram when max(m, n) >= GRAM_MIN_ASPECT *
    min(m, n), where it needs far fewer FLOPs, and max a <= GRAM_MAX_A). ``cuda_graph``: replay a cached CUDA graph of the
    whole iteration (None = for small, launch-bound sizes on CUDA). ``compute_dtype``: operand /
    intermediate dtype, bf16 (default, measured on the H100) or fp16 (same tensor-core rate, 8x
    finer rounding; opt-in: accuracy checked in float64 studies on CPU and the interpreter, not yet
    timed on a GPU). With fp16 "auto" also allows Gram NS for large-a schedules, since the drift
    that rules them out in bf16 stayed below torch eager's error there. The result is bf16 either way.
    """
    sched = _check_inputs(x, schedule, eps)
    if method not in ("auto", "standard", "gram"):
        raise ValueError(f"method must be 'auto', 'standard' or 'gram', got {method!r}")
    if restart_every < 0:
        raise ValueError(f"restart_every must be >= 0, got {restart_every}")
    if compute_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be torch.bfloat16 or torch.float16, got {compute_dtype}")
    M, N = x.shape[-2:]
    if method == "auto":
        long = max(M, N) >= GRAM_MIN_ASPECT * min(M, N)
        mild = compute_dtype == torch.float16 or all(abs(a) <= GRAM_MAX_A for a, _, _ in sched)
        method = "gram" if long and mild else "standard"
    if method == "gram":
        run = functools.partial(_ns_gram, sched=sched, eps=eps, restart_every=restart_every, dtype=compute_dtype)
    else:
        run = functools.partial(_ns_standard, sched=sched, eps=eps, dtype=compute_dtype)
    bt = x.shape[0] if x.ndim == 3 else 1
    if cuda_graph is None:
        cuda_graph = (x.is_cuda and not _interpret() and not torch.cuda.is_current_stream_capturing()
                      and bt * min(M, N) ** 2 * max(M, N) <= _GRAPH_MAX_WORK)
    if cuda_graph:
        return _graph_call(run, x, (tuple(x.shape), x.dtype, x.device, tuple(sched), eps, method, restart_every,
                                         compute_dtype))
    return run(x)


def _graph_call(run, x: torch.Tensor, key: tuple) -> torch.Tensor:
    """Replay a cached CUDA graph of ``run`` for inputs shaped like ``x`` (LRU of a few shapes)."""
    entry = _GRAPHS.get(key)
    if entry is None:
        static_in = x.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles outside the capture
            run(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run(static_in)
        entry = (graph, static_in, static_out)
        _GRAPHS[key] = entry
        while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    graph, static_in, static_out = entry
    static_in.copy_(x)
    graph.replay()
    return static_out.clone()


def _ns_standard(x: torch.Tensor, *, sched, eps: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    x0, X, transposed = _prepare(x, eps, dtype)
    if not sched:
        return x0.to(torch.bfloat16).reshape(x.shape)
    bt, m, n = X.shape
    dev = X.device
    A = torch.empty(bt, m, m, device=dev, dtype=dtype)
    Bm = torch.empty_like(A)
    out = torch.empty(x0.shape, device=dev, dtype=torch.bfloat16)  # input orientation, always bf16
    out_w = out.mT if transposed else out
    bufs = [torch.empty(bt, m, n, device=dev, dtype=dtype) for _ in range(min(2, len(sched) - 1))]
    cur = X
    for i, (a, b, c) in enumerate(sched):
        sym_product(cur, out=A)                                    # A = X X^T
        sym_product(A, None, A, out=Bm, alpha=c, beta=b)           # B = b A + c A A
        dst = out_w if i == len(sched) - 1 else bufs[i % 2]
        gemm_axpy(Bm, cur, out=dst, a=a)                   # X = a X + B X
        cur = dst
    return out.reshape(x.shape)


def gram_newton_schulz_triton(
    x: torch.Tensor, schedule: Schedule, *, eps: float = 1e-7, restart_every: int = 3
) -> torch.Tensor:
    """Gram Newton-Schulz (see module docstring): same contract as :func:`newton_schulz_triton`.

    Worth it when the wide side is much longer than the short one (n >= ~2 m): an iteration costs
    about 2 m^3 symmetric FMAs instead of 1.5 m^2 n + 0.5 m^3. ``restart_every`` (default 3,
    0 = never) rebuilds X and its Gram matrix from Q X_0 to bound the drift of the bf16 Gram
    recursion (without it the error grows past torch eager's on ill-conditioned inputs).
    """
    return newton_schulz_triton(x, schedule, eps=eps, method="gram", restart_every=restart_every,
                                cuda_graph=False)


def _ns_gram(x: torch.Tensor, *, sched, eps: float, restart_every: int,
             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    x0, X0, transposed = _prepare(x, eps, dtype)
    if not sched:
        return x0.to(torch.bfloat16).reshape(x.shape)
    bt, m, n = X0.shape
    dev = X0.device
    mk = lambda: torch.empty(bt, m, m, device=dev, dtype=dtype)  # noqa: E731
    A, T, P, Q, Qn = mk(), mk(), mk(), mk(), mk()
    out = torch.empty(x0.shape, device=dev, dtype=torch.bfloat16)
    out_w = out.mT if transposed else out
    xbufs: list[torch.Tensor] = []
    sym_product(X0, out=A)                                          # A_0 = X_0 X_0^T
    have_q = False
    since = 0
    for k, (a, b, c) in enumerate(sched):
        if restart_every and since == restart_every:
            if len(xbufs) < 2:
                xbufs.append(torch.empty(bt, m, n, device=dev, dtype=dtype))
            xnew = xbufs[0] if X0 is not xbufs[0] else xbufs[-1]
            gemm_axpy(Q, X0, out=xnew)                      # X = Q X_0 (restart)
            X0 = xnew
            sym_product(X0, out=A)                                  # A = X X^T
            have_q, since = False, 0
        sym_product(A, None, A, out=P, alpha=c, beta=b, gamma=a)   # P = a I + b A + c A^2
        if have_q:
            sym_product(P, Q, out=Qn)                               # Q <- P Q (commuting, symmetric)
            Q, Qn = Qn, Q
            p_cur = P
        else:
            Q, P = P, Q                                      # Q = P; old Q buffer is scratch
            p_cur = Q
        have_q = True
        since += 1
        if k + 1 < len(sched):
            sym_product(p_cur, A, out=T)                            # T = P A
            sym_product(p_cur, T, out=A)                            # A <- P T = P^2 A
    gemm_axpy(Q, X0, out=out_w)                             # X_K = Q X_0
    return out.reshape(x.shape)


def ns_kernel_flops(m: int, n: int, steps: int, *, symmetric: bool = True) -> int:
    """FLOPs of ``steps`` NS iterations on one m x n matrix (2 per multiply-add), counting only
    what the kernels compute: with ``symmetric`` the two Gram-type products cost half."""
    m, n = min(m, n), max(m, n)
    if symmetric:
        per = m * m * n + m * m * m + 2 * m * m * n
    else:
        per = 2 * m * m * n + 2 * m * m * m + 2 * m * m * n
    return per * steps
