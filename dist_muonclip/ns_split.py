"""Per-block Newton-Schulz (``ns_split``): orthogonalize blocks of an attention projection separately.

``MuonClip(model, ns_split=...)``:

* ``None`` (default): every Muon matrix is orthogonalized whole.
* ``"qkv"``: the q, k and v blocks of a fused QKV projection (:mod:`dist_muonclip.qk_layers` row
  orders; GPT-2's transposed ``Conv1D``: column blocks) are three matrices.
* ``"heads"``: each head's rows of W_q, W_k and W_v (separate or fused) and each head's columns of
  the output projection W_o are matrices of their own (torchtitan's Kimi recipes, DeepSpeed
  ``per_head_muon``, dion ``split_sizes``).

Each block is updated as a Muon matrix of its own: ``NS(block) * update_scale(block shape)``, so
with ``adjust_lr_fn="match_rms_adamw"`` every head's update has RMS 0.2 like any matrix. The
engine's pipeline is unchanged: the owner assembles the whole matrix as always (any layout) and
:func:`orthogonalize_blocks` cuts, orthogonalizes same-shape blocks as one batch and reassembles;
the update scale of the whole matrix the engine applies afterwards is divided out per block.
MLA projections (DeepSeek) stay whole.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .newton_schulz import orthogonalize
from .qk_layers import FUSED_QKV_NAMES, as_config, fused_blocks, fused_order, head_counts, resolve_attr, \
    weight_and_bias

__all__ = ["NS_SPLITS", "BlockSplit", "find_block_splits", "orthogonalize_blocks"]

NS_SPLITS = (None, "qkv", "heads")


@dataclasses.dataclass(frozen=True)
class BlockSplit:
    """Blocks of a matrix along ``dim`` (0: rows, 1: columns); each block is the concatenation of
    its ``[start, stop)`` ranges along ``dim``; indices not in any block are not expected."""

    dim: int
    blocks: tuple[tuple[tuple[int, int], ...], ...]

    def index(self, b: int, device: torch.device) -> Tensor:
        return torch.cat([torch.arange(a, z, device=device) for a, z in self.blocks[b]])


def _contiguous(dim: int, sizes: Sequence[int]) -> BlockSplit:
    out, pos = [], 0
    for s in sizes:
        out.append(((pos, pos + s),))
        pos += s
    return BlockSplit(dim, tuple(out))


def _fused_split(mode: str, order: str, heads: int, kv: int, d: int, dim: int) -> BlockSplit:
    if order == "per_head":          # [q_h; k_h; v_h] per head
        if mode == "heads":
            return _contiguous(dim, [d] * 3 * heads)
        return BlockSplit(dim, tuple(tuple((3 * d * h + j * d, 3 * d * h + (j + 1) * d) for h in range(heads))
                                     for j in range(3)))
    if mode == "heads":
        return _contiguous(dim, [d] * (heads + 2 * kv))
    return _contiguous(dim, [heads * d, kv * d, kv * d])


def find_block_splits(model: nn.Module | None, mode: str | None, *, model_config: Any = None,
                      names: dict | None = None) -> dict[Tensor, BlockSplit]:
    """``{weight: BlockSplit}`` for the attention projections of ``model`` under ``ns_split=mode``.
    Raises ``ValueError`` (naming the option) when ``mode`` asks for blocks nobody can find."""
    if mode not in NS_SPLITS:
        raise ValueError(f"ns_split={mode!r} is unknown; use one of {NS_SPLITS}")
    if mode is None:
        return {}
    if model is None:
        raise ValueError(f"ns_split={mode!r} needs the model (MuonClip(model, ...)) to find the attention "
                         "projections; with param groups leave ns_split=None")
    explicit = as_config(model_config)
    default = as_config(getattr(model, "config", None))
    out: dict[Tensor, BlockSplit] = {}
    for name, module in model.named_modules():
        cfg = explicit or getattr(module, "config", None) or default
        for attr in FUSED_QKV_NAMES:
            obj = resolve_attr(module, attr) if cfg is not None else None
            w, _ = weight_and_bias(obj) if obj is not None else (None, None)
            if w is None or w.ndim != 2 or isinstance(obj, nn.Parameter):
                continue
            order, kv_fixed = fused_order(cfg, attr, name, "auto")
            heads, kv, d = head_counts(cfg, name)
            kv = kv_fixed or kv
            dim = 1 if type(obj).__name__ == "Conv1D" else 0
            d, _ = fused_blocks(name, attr, w.shape[dim], heads, kv, d, order)
            out[w] = _fused_split(mode, order, heads, kv, d, dim)
            break
        if mode != "heads" or cfg is None:
            continue
        projs = {a: weight_and_bias(resolve_attr(module, a))[0] for a in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if projs["q_proj"] is None or projs["k_proj"] is None or projs["v_proj"] is None:
            continue
        heads, kv, d = head_counts(cfg, name)
        d = d or projs["q_proj"].shape[0] // heads
        for a, count in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
            w = projs[a]
            if w.shape[0] != count * d:
                raise ValueError(f"ns_split='heads': {name}.{a} has {w.shape[0]} rows, expected {count} heads x {d}; "
                                 "fix the head counts in model_config or use ns_split=None")
            out[w] = _contiguous(0, [d] * count)
        o = projs["o_proj"]
        if o is not None:
            if o.shape[1] != heads * d:
                raise ValueError(f"ns_split='heads': {name}.o_proj has {o.shape[1]} columns, expected {heads} x {d}")
            out[o] = _contiguous(1, [d] * heads)
    if not out:
        raise ValueError(f"ns_split={mode!r}: no attention projection found in {type(model).__name__} (q_proj/k_proj/"
                         f"v_proj or a fused one named {FUSED_QKV_NAMES}); use ns_split=None")
    return out


def orthogonalize_blocks(matrices: Sequence[Tensor], splits: Sequence[BlockSplit | None],
                         scale_fn: Callable[[int, int], float], **ns_kw: Any) -> Tensor:
    """Orthogonalize the ``[k, m, n]`` ``matrices`` (one entry per unit) into one ``[B, m, n]``
    tensor; a unit with a :class:`BlockSplit` has each block orthogonalized as a matrix of its
    own and multiplied by ``scale_fn(block) / scale_fn(m, n)`` (module doc). Same-shape blocks
    form one batch. Without splits: exactly the engine's whole-matrix call."""
    if all(s is None for s in splits):
        if len(matrices) == 1 and matrices[0].shape[0] == 1:   # unbatched: bit-identical to torch.optim.Muon
            return orthogonalize(matrices[0][0], **ns_kw).unsqueeze(0)
        return orthogonalize(torch.cat(matrices), **ns_kw)
    full = torch.cat(matrices)
    m, n = full.shape[-2:]
    owner = [s for mat, s in zip(matrices, splits) for _ in range(mat.shape[0])]
    pieces: dict[tuple[int, int], list[tuple[int, BlockSplit | None, int, Tensor]]] = {}
    for i, s in enumerate(owner):
        if s is None:
            pieces.setdefault((m, n), []).append((i, None, 0, full[i]))
            continue
        for b in range(len(s.blocks)):
            x = full[i].index_select(s.dim, s.index(b, full.device))
            pieces.setdefault(tuple(x.shape), []).append((i, s, b, x))
    out = None
    for shape, group in pieces.items():
        ortho = orthogonalize(torch.stack([x for *_, x in group]), **ns_kw)
        if out is None:
            out = full.new_empty(full.shape, dtype=ortho.dtype)
        ratio = scale_fn(*shape) / scale_fn(m, n)
        for (i, s, b, _), o in zip(group, ortho):
            if s is None:
                out[i] = o
            else:
                out[i].index_copy_(s.dim, s.index(b, full.device), o * ratio)
    return out
