"""Torch references for the Triton kernels (oracles for tests and baselines for benchmarks).

Every function here is plain torch, runs on any device and in any float dtype: float64 runs are
the oracles the kernels are tested against, bf16 runs are "torch eager" in the benchmarks.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "gram_newton_schulz_reference",
    "max_logits_reference",
    "newton_schulz_reference",
    "ns_iteration_reference",
    "sym_product_reference",
]

Schedule = Sequence[tuple[float, float, float]]


def sym_product_reference(
    y: torch.Tensor,
    z: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    gamma: float = 0.0,
) -> torch.Tensor:
    """``alpha * y @ z^T + beta * w + gamma * I`` in float32 (float64 for float64 inputs).

    ``y``, ``z``: [..., m, k]; ``w``: [..., m, m]. This is what ``_sym_kernel`` computes; the kernel
    assumes the result is symmetric (``z = y``, or ``y`` and ``z`` commuting symmetric matrices).
    """
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    z = y if z is None else z
    out = alpha * (y.to(acc) @ z.to(acc).mT)
    if w is not None and beta != 0.0:
        out = out + beta * w.to(acc)
    if gamma != 0.0:
        out = out + gamma * torch.eye(out.shape[-1], dtype=acc, device=out.device)
    return out


def ns_iteration_reference(x: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """One odd-quintic Newton-Schulz iteration on a wide ``x`` [..., m, n] (m <= n), in x's dtype:

        A = X X^T,   B = b A + c A A,   X' = a X + B X

    exactly as torch.optim._muon._zeropower_via_newtonschulz writes it (Keller Jordan's Muon).
    """
    A = x @ x.mT
    B = b * A + c * A @ A
    return a * x + B @ x


def _normalize_wide(x: torch.Tensor, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    X = x.to(dtype)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    return X, transposed


def newton_schulz_reference(
    x: torch.Tensor, schedule: Schedule, *, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Newton-Schulz orthogonalization of ``x`` [m, n] or [B, m, n] with per-iteration ``(a, b, c)``.

    Frobenius-normalizes each matrix (norm clamped at ``eps``, like torch.optim.Muon), iterates on
    the wide orientation and returns the same shape in ``dtype``. With ``dtype=torch.float64`` this
    is the oracle; with bf16 it is "torch eager" (Jordan, "Muon: An optimizer for hidden layers",
    2024; Polar Express, arXiv 2505.16932; CANS, arXiv 2506.10935 only change the schedule).
    """
    X, transposed = _normalize_wide(x, eps, dtype)
    for a, b, c in schedule:
        X = ns_iteration_reference(X, a, b, c)
    return X.mT if transposed else X


def gram_newton_schulz_reference(
    x: torch.Tensor,
    schedule: Schedule,
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float64,
    restart_every: int = 0,
) -> torch.Tensor:
    """Gram Newton-Schulz: the same polynomial iteration carried on the m x m Gram matrix.

    With ``X_{k+1} = P_k X_k``, ``P_k = a I + b A_k + c A_k^2`` and ``A_k = X_k X_k^T``, every
    ``P_k``, ``A_k`` and ``Q_k = P_{k-1} ... P_0`` is a polynomial in ``A_0`` (they commute and are
    symmetric), so ``A_{k+1} = P_k (P_k A_k)`` and ``X_K = Q_K X_0``: only m x m products plus two
    m x m x n ones. In exact arithmetic it equals :func:`newton_schulz_reference`; ``restart_every``
    > 0 rebuilds ``X = Q X_0`` and ``A = X X^T`` after that many iterations to stop the rounding
    drift of the Gram recursion.
    """
    X0, transposed = _normalize_wide(x, eps, dtype)
    m = X0.shape[-2]
    eye = torch.eye(m, dtype=dtype, device=X0.device)
    A = X0 @ X0.mT
    Q = None
    since_restart = 0
    num_iters = len(schedule)
    for k, (a, b, c) in enumerate(schedule):
        if restart_every and since_restart == restart_every:
            X0 = Q @ X0
            A = X0 @ X0.mT
            Q = None
            since_restart = 0
        P = a * eye + b * A + c * (A @ A)
        Q = P if Q is None else P @ Q
        since_restart += 1
        if k + 1 < num_iters:
            A = P @ (P @ A)
    X = X0 if Q is None else Q @ X0
    return X.mT if transposed else X


def max_logits_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Per-head max over batch and positions of the logits softmax sees, materialized in ``dtype``.

    query [B, H, Sq, D], key [B, Hkv, Sk, D] (GQA: query head h reads key head h // (H // Hkv)).
    Logits are ``scale * q . k`` plus an additive float mask; a bool mask (True = attend) and the
    causal mask (key j visible to query i iff j <= i, top-left aligned like SDPA's ``is_causal``)
    remove positions. Returns [H] float32; -inf for a head with no visible position.
    """
    B, H, Sq, D = query.shape
    Hkv = key.shape[1]
    k = key.to(dtype).repeat_interleave(H // Hkv, dim=1)
    s = scale * (query.to(dtype) @ k.mT)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask, float("-inf"))
        else:
            s = s + attention_mask.to(dtype)
    if causal:
        visible = torch.ones(Sq, key.shape[2], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    return s.amax(dim=(0, 2, 3)).float()
