"""Pure functions of the MuonClip update (no optimizer state, no process groups).

For a hidden matrix W (m x n) with gradient G at step t (DESIGN.md; torch.optim.Muon):

    B_t = mu * B_{t-1} + (1 - mu) * G_t              momentum buffer (EMA form, as torch.optim.Muon)
    V_t = (1 - mu) * G_t + mu * B_t   (nesterov)     or V_t = B_t
    O_t = NS(V_t) * scale(m, n)
    W_t = (1 - lr * weight_decay) * W_{t-1} - lr * O_t

The EMA form equals DESIGN.md's ``M_t = mu M_{t-1} + G_t`` up to the constant factor (1 - mu),
which the Frobenius normalization inside NS removes, so the update is the same; we keep torch's
form so that ``momentum_buffer`` means the same thing as in ``torch.optim.Muon``.

``scale``: ``"match_rms_adamw"`` = 0.2 * sqrt(max(m, n)) gives the update the RMS of an AdamW
update so one learning rate serves both (Moonlight, arXiv 2502.16982: NS(V) has singular values
~1, hence RMS 1 / sqrt(max(m, n))); ``"rms_0.4"`` = 0.4 * sqrt(max(m, n)), update RMS 0.4 (the
scale of GAD-cell/muon-clip, used by ``dist_muonclip.compat`` for its users); ``"original"`` =
sqrt(max(1, m / n)) is Keller Jordan's (``None`` means the same, as in torch.optim.Muon);
``"none"`` = 1.

``lr`` may be a 1-element tensor (torch.optim's tensor lr): the arithmetic below is then done
with the tensor in the same order as torch.optim.Muon, so results stay bit-identical to it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["ADJUST_LR_FNS", "update_scale", "muon_momentum_", "muon_apply_"]

ADJUST_LR_FNS = ("match_rms_adamw", "original", "none", "rms_0.4")


def update_scale(m: int, n: int, adjust_lr_fn: str | None) -> float:
    """Multiplier of the orthogonalized update of an ``m x n`` matrix (see module doc)."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if adjust_lr_fn in ("original", None):
        return math.sqrt(max(1.0, m / n))
    if adjust_lr_fn == "none":
        return 1.0
    if adjust_lr_fn == "rms_0.4":
        return 0.4 * math.sqrt(max(m, n))
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is unknown; use one of {ADJUST_LR_FNS}")


def muon_momentum_(
    grads: Sequence[Tensor], bufs: Sequence[Tensor], *, momentum: float, nesterov: bool
) -> list[Tensor]:
    """Update momentum buffers in place and return the NS inputs ``V_t`` (new tensors).

    ``grads[i]`` and ``bufs[i]`` have the same shape (any: full matrices, row shards or flat
    fragments; the recurrence is elementwise). Grads are not modified.
    """
    if _multi_tensor(grads, bufs):
        # CUDA only (the CPU keeps the loop below, bit for bit): one fused pass per tensor when
        # Triton is there, else torch's multi-tensor lerp kernels, one launch per list
        if _fused_ok(grads, bufs):
            from .kernels import momentum_nesterov_triton
            return momentum_nesterov_triton(grads, bufs, momentum=momentum, nesterov=nesterov)
        torch._foreach_lerp_(list(bufs), list(grads), 1 - momentum)
        return list(torch._foreach_lerp(list(grads), list(bufs), momentum)) if nesterov else \
            [b.clone() for b in bufs]
    out = []
    for g, buf in zip(grads, bufs):
        buf.lerp_(g, 1 - momentum)
        out.append(g.lerp(buf, momentum) if nesterov else buf.clone())
    return out


def _multi_tensor(*lists: Sequence[Tensor]) -> bool:
    """Whether torch's multi-tensor (``_foreach``) kernels apply: CUDA tensors of one dtype and
    device per position in every list."""
    first = lists[0]
    if not first or not all(len(x) == len(first) for x in lists):
        return False
    dev, dtypes = first[0].device, [x[0].dtype for x in lists]
    return dev.type == "cuda" and all(t.device == dev and t.dtype == d for x, d in zip(lists, dtypes) for t in x)


def _fused_ok(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    """Whether the fused Triton passes apply: Triton on this CUDA device, contiguous same-shape pairs."""
    from .kernels import triton_available
    return triton_available(str(a[0].device)) and all(
        x.is_contiguous() and y.is_contiguous() and x.shape == y.shape for x, y in zip(a, b))


def muon_apply_(
    params: Sequence[Tensor], updates: Sequence[Tensor], *, lr: float | Tensor, weight_decay: float, scale: float
) -> None:
    """``p <- (1 - lr * weight_decay) * p - lr * scale * update`` in place (decoupled weight decay).

    Same operation order as torch.optim.Muon so single-matrix results are bit-identical, also
    for a tensor ``lr`` (``lr * scale`` is then a tensor op, as there).
    """
    updates = [u if u.shape == p.shape else u.reshape(p.shape) for p, u in zip(params, updates)]
    if not isinstance(lr, Tensor) and _multi_tensor(params, updates):
        if _fused_ok(params, updates):
            from .kernels import apply_update_triton
            apply_update_triton(params, updates, decay=1 - lr * weight_decay, alpha=-lr * scale)
            return
        if weight_decay != 0:
            torch._foreach_mul_(list(params), 1 - lr * weight_decay)
        torch._foreach_add_(list(params), updates, alpha=-lr * scale)
        return
    for p, u in zip(params, updates):
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        p.add_(u if u.shape == p.shape else u.reshape(p.shape), alpha=-lr * scale)
