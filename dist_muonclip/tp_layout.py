"""Tensor parallel (and FSDP2 x tensor parallel) DTensor parameters as a MuonClip layout.

``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` places a linear weight
``Shard(0)`` / ``Shard(1)`` on the tp mesh axis; parameters of modules it leaves alone stay plain
tensors, the same on every tp rank. ``fully_shard`` over such a model on a 2-D ``(dp, tp)`` mesh
adds a row shard on the dp axis (``(_StridedShard(0), Shard(0))``, ``(Shard(0), Shard(1))``,
``(Shard(0), Replicate())`` for the parameters TP left alone).

:class:`TensorParallelLayout` describes all of these to the engine the one way it understands
(DESIGN.md, "Layouts"): per rank of the mesh, the sorted flat element ranges of the full tensor it
holds. They are computed once per (shape, placements) at validation, by redistributing an index
tensor from ``Replicate`` to the parameter's placements (a local chunking, no communication) and
exchanging the per-rank ranges with one ``all_gather_object``: whatever the placements (row
shards, column shards whose ranges are one per row, strided shards), the engine then runs its
ordinary sharded pipeline on the mesh's ranks: momentum on local pieces -> all-to-all of pieces to
the owner, who assembles the *whole* matrix from the pieces of both mesh axes -> Newton-Schulz once
-> all-to-all of each rank's update piece back. Nothing calls ``full_tensor()``.

Elements replicated over the tp axis (plain tensors, ``Replicate()`` on tp) are held by several
ranks: their ranges overlap. The exchange copies (never adds) pieces into the owner's matrix, and
sends every holder its update piece, so every copy takes the same update; AdamW runs on each
holder's copy from the same (tp-identical) gradient. Cost: such matrices travel once per holder,
and their momentum/AdamW state is kept by every holder (like the parameter itself).

QK-Clip: each tp rank computes attention with its own heads (``heads / tp``, a contiguous block
of the global heads: ColwiseParallel's row shard). :attr:`head_shard` tells the tracker to write
its local heads at their global positions (``-inf`` elsewhere), so the preflight's all-reduce
(MAX) over the whole mesh yields each global head's max over the data-parallel ranks only: heads
never mix across tp ranks. The clip then scales the global rows of ``W_q`` / ``W_k`` that each
rank holds.

Optimizer state is created eagerly and checkpointed as FSDP2's is (``DTensor`` state with the
parameter's placements: :func:`dist_muonclip.fsdp.get_optimizer_state_dict` + DCP, loadable on
another mesh shape). Limits (refused by name): heads must divide by tp; a QK-Clip target cut
over tp in row chunks that do not hold whole heads, unless its output is gathered over tp (a
fused ``[q; k; v]`` projection under plain ``ColwiseParallel``: :func:`check_heads_local`);
``max_grad_norm`` (it would count tp-replicated elements once per holder).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layouts import Layout

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["TensorParallelLayout", "check_heads_local", "check_tensor_parallel_options", "is_tensor_parallel",
           "output_gathered", "tensor_parallel_layout"]


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def _runs(idx: Tensor) -> list[tuple[int, int]]:
    """Sorted flat indices -> maximal ``[start, stop)`` runs."""
    if idx.numel() == 0:
        return []
    breaks = torch.nonzero(idx[1:] != idx[:-1] + 1).reshape(-1) + 1
    starts = torch.cat([idx.new_zeros(1), breaks]).tolist()
    stops = torch.cat([breaks, idx.new_tensor([idx.numel()])]).tolist()
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, stops)]


def _is_tp_placement(p: Tensor) -> bool:
    """A placement FSDP2 alone never makes: ``Shard(d>0)``, or shards on two mesh axes."""
    from torch.distributed.tensor import Shard

    shards = [x for x in p.placements if isinstance(x, Shard)]
    return len(shards) > 1 or any(x.dim != 0 for x in shards)


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether the model's DTensors come from tensor parallelism: a DTensor parameter that no
    ``fully_shard`` manages (``parallelize_module`` placed it: an all-``ColwiseParallel`` model is
    ``(Shard(0),)`` like FSDP2, so placements alone cannot tell), or an FSDP2 parameter also placed
    on a tp axis (``Shard(1)``, or shards on two axes)."""
    from .dtensor_layout import unmanaged_dtensors

    if unmanaged_dtensors(model):
        return True
    DTensor = _dtensor_cls()
    return any(isinstance(p, DTensor) and _is_tp_placement(p) for p in model.parameters())


def check_tensor_parallel_options(*, max_grad_norm: Any = None, layout: TensorParallelLayout | None = None,
                                  clip_layers: Sequence[Any] = ()) -> None:
    """Options the tensor-parallel layout cannot serve yet, refused by name before any state; with
    ``layout`` and QK-Clip's ``clip_layers``, also :func:`check_heads_local`."""
    if max_grad_norm is not None:
        raise ValueError("max_grad_norm is not supported with tensor parallel yet (elements replicated over the tp "
                         "axis would be counted once per tp rank); leave max_grad_norm=None and clip with "
                         "torch.nn.utils.clip_grad_norm_ on the DTensor gradients before step()")
    if isinstance(layout, TensorParallelLayout) and layout.head_shard is not None:
        check_heads_local(clip_layers, layout)


def _tp_row_shard(p: Tensor, dim: int, layout: TensorParallelLayout) -> bool:
    """Whether ``p`` is cut on its dim ``dim`` over the layout's tp axis (``Shard(dim)`` there)."""
    from torch.distributed.tensor import Shard

    if not isinstance(p, _dtensor_cls()):
        return False
    mesh, names = p.device_mesh, tuple(p.device_mesh.mesh_dim_names or ())
    tp_names = tuple(layout.mesh.mesh_dim_names or ())
    if mesh == layout.mesh:
        axis = layout.tp_axis
    elif tp_names and tp_names[layout.tp_axis] in names:
        axis = names.index(tp_names[layout.tp_axis])
    else:
        return False                                 # on a dp sub-mesh only: replicated over tp
    pl = p.placements[axis]
    return isinstance(pl, Shard) and pl.dim % p.ndim == dim


def output_gathered(module: nn.Module) -> bool:
    """Whether ``parallelize_module`` gave ``module`` a ``ColwiseParallel`` whose output layout is
    ``Replicate()`` (transformers' ``colwise_gather_output``): its output is all-gathered over tp,
    so every tp rank computes every head from it. Read from the style's output hook (torch keeps
    no other record of the style); ``False`` when no such hook is found."""
    from torch.distributed.tensor import Replicate

    for hook in module._forward_hooks.values():
        for cell in getattr(hook, "__closure__", None) or ():
            try:
                fn = cell.cell_contents
            except ValueError:                       # an empty cell
                continue
            if isinstance(fn, functools.partial) and \
                    getattr(fn.func, "__qualname__", "").endswith("ColwiseParallel._prepare_output_fn") and fn.args:
                return all(isinstance(x, Replicate) for x in fn.args[0])
    return False


def _owner_module(root: nn.Module, p: Tensor) -> nn.Module | None:
    for m in root.modules():
        if any(q is p for q in m.parameters(recurse=False)):
            return m
    return None


def check_heads_local(clip_layers: Sequence[Any], layout: TensorParallelLayout) -> None:
    """QK-Clip under tensor parallel needs every tp rank to compute the heads whose rows it holds.

    For each clip target (``W_q``, ``W_k``, the q/k blocks of a fused QKV projection, MLA's
    ``q_b_proj`` / ``kv_b_proj``) cut on its rows over tp (``ColwiseParallel``), tp rank ``r`` must
    hold the q (k) rows of exactly the ``r``-th block of query (key) heads: then its attention
    computes those heads, the tracker writes them at their global positions and the clip scales
    the rows it holds. Separate projections and per-head interleaved fused ones (GPT-NeoX
    ``[q_h; k_h; v_h]``) are cut that way when tp divides the heads. A ``[q; k; v]`` concatenation
    (Phi-3 ``qkv_proj``, ``Wqkv``) is not: tp rank 0 holds q rows of every head and rank 1 the k and
    v rows, and the model's attention slices q/k/v from a chunk that holds none of them whole.
    Such a projection is accepted only when its output is gathered over tp (``ColwiseParallel(
    output_layouts=Replicate())``, :func:`output_gathered`): every rank then computes every head,
    the tracker records all of them, and the clip maps each head's global rows to whichever rank
    holds them. Anything else raises ``ValueError`` naming the parameter and the fixes.
    """
    tp, _ = layout.head_shard or (1, 0)
    for layer in clip_layers:
        if layer.num_heads % tp:
            continue          # MaxLogitTracker.set_head_shard refuses it next, naming the head counts
        for t in layer.targets:
            if not _tp_row_shard(t.param, t.dim, layout):
                continue
            n = t.param.shape[t.dim]
            size = -(-n // tp)                       # torch.chunk: the first chunks are ceil(n / tp)
            bad = None
            for b in range(t.num_blocks):
                want = b * tp // t.num_blocks
                for start, length, kind in t.segments:
                    lo = t.offset + b * t.block + start
                    if kind.endswith("_shared"):
                        continue
                    if t.num_blocks % tp or not (want * size <= lo and lo + length <= (want + 1) * size):
                        bad = bad or (b, kind, lo, lo + length, want)
            if bad is None:
                continue
            owner = _owner_module(layer.module, t.param)
            if owner is not None and output_gathered(owner):
                continue                             # every tp rank computes every head
            b, kind, lo, hi, want = bad
            raise ValueError(
                f"QK-Clip under tensor parallel: parameter {t.name!r} is cut on its rows over {tp} tp ranks "
                f"({size} rows each) in chunks that do not hold whole heads: the {kind} rows [{lo}, {hi}) of "
                f"head {b} are not in tp rank {want}'s rows [{want * size}, {(want + 1) * size}), so the attention "
                "on a tp rank does not compute the heads whose rows it holds (a fused [q; k; v] projection cut "
                "by ColwiseParallel, or fewer key heads than tp ranks). Fix: order the fused rows per head ([q_h; k_h; v_h], GPT-NeoX, Megatron), "
                "split it into q_proj / k_proj / v_proj, or gather its output over tp: "
                "ColwiseParallel(output_layouts=Replicate()) on it and RowwiseParallel(input_layouts=Replicate()) "
                "on the output projection (transformers' 'colwise_gather_output' plan; every tp rank then "
                "computes every head)")


def tensor_parallel_layout(model: nn.Module) -> TensorParallelLayout | None:
    """``MuonClip(model)``'s reading of a tensor-parallel model (``None`` when it is not one)."""
    if not dist.is_available() or not is_tensor_parallel(model):
        return None
    DTensor = _dtensor_cls()
    meshes = {p.device_mesh for p in model.parameters() if isinstance(p, DTensor)}
    roots = {m._get_root_mesh() if hasattr(m, "_get_root_mesh") else m for m in meshes}
    if len(roots) != 1:
        raise ValueError(f"tensor parallel: the parameters live on {len(roots)} unrelated device meshes; MuonClip "
                         "needs one (dp, tp) mesh (slice the tp and dp meshes from one init_device_mesh)")
    from .dtensor_layout import unmanaged_dtensors

    mesh = next(iter(roots))
    # FSDP2 alone with a shard_placement_fn (Shard(1) on a 1-D mesh): every rank computes every head
    heads_split = bool(unmanaged_dtensors(model)) or mesh.ndim > 1
    return TensorParallelLayout(mesh, heads_split=heads_split)


class TensorParallelLayout(Layout):
    """Tensor parallel, alone or under FSDP2 (see module doc).

    Args:
        mesh: the whole device mesh (1-D ``(tp,)`` or 2-D ``(dp, tp)``); the optimizer's process
            group is all of its ranks.
        tp_axis: the mesh axis heads are split on. Default: the axis named ``"tp"``, else the last.
        heads_split: whether ranks on the tp axis compute different heads (``parallelize_module``);
            ``False`` for FSDP2 alone with column shards (``shard_placement_fn``), where every rank
            computes every head.
    """

    sharded = True

    def __init__(self, mesh: DeviceMesh, *, tp_axis: int | None = None, heads_split: bool = True) -> None:
        names = tuple(mesh.mesh_dim_names or ())
        self.mesh = mesh
        self.tp_axis = tp_axis if tp_axis is not None else (names.index("tp") if "tp" in names else mesh.ndim - 1)
        if not 0 <= self.tp_axis < mesh.ndim:
            raise ValueError(f"TensorParallelLayout: tp_axis={self.tp_axis} is not an axis of the {mesh.ndim}-D "
                             f"mesh {mesh}")
        coord = mesh.get_coordinate()
        if coord is None:
            raise ValueError(f"TensorParallelLayout: this rank ({dist.get_rank()}) is not in the mesh {mesh}")
        self._ranks = sorted(int(r) for r in mesh.mesh.reshape(-1).tolist())
        self._group = (dist.group.WORLD if self._ranks == list(range(dist.get_world_size()))
                       else dist.new_group(self._ranks, use_local_synchronization=True))
        self._tp = (mesh.size(self.tp_axis), int(coord[self.tp_axis])) if heads_split else None
        self._ranges: dict[Any, list[list[tuple[int, int]]]] = {}

    @property
    def process_group(self) -> Any:
        return self._group

    @property
    def head_shard(self) -> tuple[int, int] | None:
        """``(tp size, this rank's tp coordinate)``: which block of heads this rank computes."""
        return self._tp

    # -- the contract ----------------------------------------------------------------------
    @staticmethod
    def _key(p: Tensor) -> Any:
        pl = tuple(p.placements) if isinstance(p, _dtensor_cls()) else None
        return tuple(p.shape), pl

    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        hit = self._ranges.get(self._key(p))
        if hit is None:
            raise ValueError(f"TensorParallelLayout: no ranges for a parameter of shape {tuple(p.shape)}; the "
                             "optimizer validates (and computes) them at construction and add_param_group")
        return hit

    def local_param(self, p: Tensor) -> Tensor:
        t = p._local_tensor if isinstance(p, _dtensor_cls()) else p
        return t.detach().view(-1)

    def local_grad(self, p: Tensor) -> Tensor | None:
        g = p.grad
        if g is None:
            return None
        if isinstance(g, _dtensor_cls()):
            if g.placements != p.placements:     # e.g. a Partial gradient: same placements as the weight
                g = g.redistribute(p.device_mesh, p.placements)
            g = g._local_tensor
        return g.reshape(-1)

    def local_shape(self, p: Tensor) -> torch.Size:
        return (p._local_tensor if isinstance(p, _dtensor_cls()) else p).shape

    # -- validation ------------------------------------------------------------------------
    def check_param(self, p: Tensor, name: str) -> None:
        DTensor = _dtensor_cls()
        if not isinstance(p, DTensor):
            return                                   # plain: replicated over the whole mesh
        mesh = p.device_mesh
        root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
        if root != self.mesh and mesh != self.mesh:
            raise ValueError(f"parameter {name!r} lives on mesh {mesh}, not on the tensor-parallel mesh {self.mesh} "
                             "(or a slice of it): build the dp and tp meshes from one init_device_mesh")
        local = p._local_tensor
        if not local.is_contiguous():
            raise ValueError(f"parameter {name!r}: its local shard {tuple(local.shape)} is not contiguous")

    def _local_indices(self, p: Tensor, name: str) -> Tensor:
        """This rank's flat indices of ``p``'s full tensor, in local (row-major) order."""
        DTensor = _dtensor_cls()
        if not isinstance(p, DTensor):
            return torch.arange(p.numel())
        from torch.distributed.tensor import Replicate

        mesh = p.device_mesh
        idx = torch.arange(p.numel(), dtype=torch.int64, device=p._local_tensor.device).view(p.shape)
        d = DTensor.from_local(idx, mesh, [Replicate()] * mesh.ndim, run_check=False)
        local = d.redistribute(mesh, p.placements).to_local().reshape(-1).cpu()
        if local.numel() != p._local_tensor.numel():
            raise ValueError(f"parameter {name!r}: placements {tuple(p.placements)} give {local.numel()} local "
                             f"elements, the local shard has {p._local_tensor.numel()}")
        if local.numel() > 1 and not bool((local[1:] > local[:-1]).all()):
            raise ValueError(f"parameter {name!r}: placements {tuple(p.placements)} hold elements out of row-major "
                             "order on this rank; TensorParallelLayout needs local shards in full-tensor order")
        return local

    def validate(self, params: Sequence[Tensor], names: dict, world_size: int, rank: int) -> None:
        """Placements first (named errors), then each (shape, placements)'s per-rank ranges, once,
        exchanged across the mesh, and a check that together they cover every element."""
        for p in params:
            self.check_param(p, names.get(p, "<unnamed>"))
        if dist.get_world_size(self._group) != world_size or dist.get_rank(self._group) != rank:
            raise ValueError(f"MuonClip runs on a process group of {world_size} ranks (this is rank {rank}) but the "
                             f"tensor-parallel mesh has {dist.get_world_size(self._group)}: leave process_group "
                             "None (MuonClip(model) uses layout.process_group)")
        todo, seen = [], set()
        for p in params:
            key = self._key(p)
            if key not in self._ranges and key not in seen:
                seen.add(key)
                todo.append((key, _runs(self._local_indices(p, names.get(p, "<unnamed>")))))
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, todo, group=self._group)
        for i, (key, _) in enumerate(todo):
            self._ranges[key] = [list(gathered[r][i][1]) for r in range(world_size)]
        for p in params:
            ranges = self.ranges(p)
            merged = sorted(r for per_rank in ranges for r in per_rank if r[1] > r[0])
            pos = 0
            for a, b in merged:
                if a > pos:
                    break
                pos = max(pos, b)
            if pos != p.numel():
                raise ValueError(f"tensor-parallel ranges of {names.get(p)!r} cover {pos} of {p.numel()} elements")
            local = sum(b - a for a, b in ranges[rank])
            if self.local_param(p).numel() != local:
                raise ValueError(f"layout: local view of {names.get(p)!r} has {self.local_param(p).numel()} "
                                 f"elements, its ranges say {local}")

    def full_shape(self, p: Tensor) -> torch.Size:
        return p.shape

    def dtensor_like(self, p: Tensor, local_flat: Tensor) -> Tensor:
        """State shaped like ``p``: a DTensor with ``p``'s placements whose local shard *is*
        ``local_flat`` (DCP loads into it in place), or the plain tensor for a replicated ``p``."""
        DTensor = _dtensor_cls()
        if not isinstance(p, DTensor):
            return local_flat.view(p.shape)
        return DTensor.from_local(local_flat.view(self.local_shape(p)), p.device_mesh, p.placements,
                                  run_check=False, shape=p.shape, stride=p.stride())

    # -- engine hooks: eager state, DCP optimizer state dicts (as FSDP2's) -------------------
    def init_optimizer_state(self, optim: Any) -> None:
        from .dtensor_layout import init_state_

        init_state_(optim)

    def optimizer_state_dict(self, optim: Any) -> dict[str, Any]:
        from .dtensor_layout import torch_optimizer_state_dict

        return torch_optimizer_state_dict(optim)

    def load_optimizer_state_dict(self, optim: Any, state_dict: dict[str, Any]) -> bool:
        from .dtensor_layout import load_torch_optimizer_state_dict

        load_torch_optimizer_state_dict(optim, state_dict)
        return True
