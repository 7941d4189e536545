"""DTensor parameters on a device mesh as a MuonClip layout: rows sharded on one mesh axis.

FSDP2 (``fully_shard``) stores every parameter as a ``DTensor`` split on dim 0 (``Shard(0)``) over
the mesh's shard axis, with ``torch.chunk`` semantics: ``R`` rows on ``W`` ranks give chunks of
``ceil(R / W)`` rows, the last non-empty chunk shorter, trailing ranks empty when ``R < W`` (e.g.
3 rows on 4 ranks: 1, 1, 1, 0). ``DTensor._local_tensor`` is the unpadded view of this rank's real
rows, and gradients arrive reduce-scattered (averaged) as ``DTensor`` s with the same placement.
On a 2-D HSDP mesh (``(Replicate(), Shard(0))``) each replica group holds one full copy, sharded
the same way, and FSDP2 all-reduces the gradient shards across the replicate axis.

:class:`Shard0Layout` tells the MuonClip engine (DESIGN.md, "Layouts") which rows each rank of the
shard axis holds. A row shard ``[r0, r1)`` of a parameter whose rows have ``C`` elements is the
flat range ``[r0 * C, r1 * C)`` of its row-major full tensor, so the engine treats it like any
sharded layout: momentum on local rows -> all-to-all of row shards to the owner -> Newton-Schulz
on the assembled matrix -> all-to-all of update rows back; AdamW on local rows; QK-Clip scales the
held rows. Nothing calls ``full_tensor()``.

HSDP: every replica group orthogonalizes its own copy (the optimizer's process group is the shard
axis; the replicate axes only join the preflight's all-reduce of max logits and flags, through
:attr:`Shard0Layout.data_parallel_group`). Replica groups hold bit-identical gradient shards
(FSDP2 all-reduced them) and see the same globally reduced max logits, so they take bit-identical
steps without one extra byte on the replicate axis; orthogonalizing each matrix once globally
would instead send every update to all R replicas (docs/meshes.md has the measured bytes).

This module is core (torch only): :func:`layout_from_params` lets ``MuonClip(model)`` read the
layout from the parameters whatever applied the placements. :mod:`dist_muonclip.integrations.fsdp`
re-exports it with the wrapping helpers (``fully_shard_model``, ``make_muonclip``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .engine.adamw import adamw_state
from .engine.exchange import momentum_buffer
from .layouts import Layout

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

    from .optimizer import MuonClip

__all__ = [
    "STATE_FORMAT",
    "Shard0Layout",
    "get_optimizer_state_dict",
    "init_state_",
    "load_torch_optimizer_state_dict",
    "layout_from_params",
    "unmanaged_dtensors",
    "set_optimizer_state_dict",
    "shard0_rows",
    "torch_optimizer_state_dict",
]

STATE_FORMAT = "dist_muonclip.fsdp.v1"


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard0_rows(num_rows: int, world_size: int, coord: int) -> tuple[int, int]:
    """``(start, stop)`` rows of mesh coordinate ``coord`` for ``Shard(0)`` of ``num_rows`` rows
    (``torch.chunk`` semantics, as DTensor and FSDP2 split)."""
    from torch.distributed.tensor import Shard

    size, offset = Shard.local_shard_size_and_offset(num_rows, world_size, coord)
    return int(offset), int(offset) + int(size)


class Shard0Layout(Layout):
    """Layout of ``DTensor`` parameters whose rows are sharded (``Shard(0)``) on one axis of a device
    mesh and replicated on the others: FSDP2 on a 1-D mesh ``(Shard(0),)``, HSDP on a 2-D mesh
    ``(Replicate(), Shard(0))`` (see module doc).

    Args:
        mesh: the FSDP mesh. Default: taken from the first DTensor parameter the layout sees.
        shard_axis: the mesh axis rows are sharded on. Default: read from the first parameter's
            placements (FSDP2 puts it last: ``mesh.ndim - 1``).
        process_group: the group whose ranks index :meth:`ranges`: this rank's shard-axis group.
            Default: ``mesh.get_group(shard_axis)``. Pass the same group to
            ``MuonClip(process_group=...)`` (:func:`make_muonclip` and ``MuonClip(model)`` do).

    Every parameter must be a ``DTensor`` on this mesh placed ``Shard(0)`` on the shard axis and
    ``Replicate()`` on the others; anything else (``Shard(1)``, a second ``Shard``, tensor
    parallel plans) raises a ``ValueError`` naming the parameter and its placement (a plain
    tensor left unsharded: ``TypeError``) at optimizer construction, before any state exists.
    """

    sharded = True

    def __init__(self, mesh: DeviceMesh | None = None, *, shard_axis: int | None = None,
                 process_group: Any = None) -> None:
        self.mesh = None
        self.shard_axis = shard_axis
        self._group = process_group
        self._dp_group: Any = None
        self._coords: list[int] | None = None   # group rank -> coordinate on the shard axis
        self._ranges: dict[tuple[int, ...], list[list[tuple[int, int]]]] = {}   # full shape -> ranges
        if mesh is not None:
            self._bind(mesh, mesh.ndim - 1 if shard_axis is None else shard_axis)

    # -- mesh and ranks --------------------------------------------------------------------
    def _bind(self, mesh: DeviceMesh, shard_axis: int) -> None:
        if not 0 <= shard_axis < mesh.ndim:
            raise ValueError(f"Shard0Layout: shard_axis={shard_axis} is not an axis of the {mesh.ndim}-D mesh {mesh}")
        coord = mesh.get_coordinate()
        if coord is None:
            raise ValueError(f"Shard0Layout: this rank ({dist.get_rank()}) is not in the mesh {mesh}")
        self.mesh, self.shard_axis = mesh, shard_axis
        if self._group is None:
            self._group = mesh.get_group(shard_axis)
        index = list(coord)
        index[shard_axis] = slice(None)
        ranks = [int(r) for r in mesh.mesh[tuple(index)].reshape(-1).tolist()]   # shard-axis ranks, by coordinate
        group_rank = [dist.get_group_rank(self._group, g) if g in dist.get_process_group_ranks(self._group) else -1
                      for g in ranks]
        if sorted(group_rank) != list(range(len(ranks))) or dist.get_world_size(self._group) != len(ranks):
            raise ValueError(f"process_group does not match the shard axis {shard_axis} of the mesh {mesh}: its ranks "
                             f"must be exactly {ranks}; pass process_group=mesh.get_group({shard_axis}) (or leave it "
                             "None)")
        coords = [0] * len(ranks)
        for c, r in enumerate(group_rank):
            coords[r] = c
        self._coords = coords
        if mesh.ndim > 1:   # the replicate axes join the preflight (max logits) only
            all_ranks = sorted(int(r) for r in mesh.mesh.reshape(-1).tolist())
            self._dp_group = (dist.group.WORLD if all_ranks == list(range(dist.get_world_size()))
                              else dist.new_group(all_ranks, use_local_synchronization=True))

    @property
    def process_group(self) -> Any:
        return self._group

    @property
    def data_parallel_group(self) -> Any:
        """HSDP: every rank of the mesh (replicas see different data: the max logits and flags of
        the preflight are reduced over all of them); ``None`` on a 1-D mesh (the process group)."""
        return self._dp_group

    @property
    def world_size(self) -> int:
        """Ranks on the shard axis (the optimizer's process group)."""
        return self.mesh.size(self.shard_axis) if self.mesh is not None else 1

    # -- the contract ----------------------------------------------------------------------
    def ranges(self, p: Tensor) -> list[list[tuple[int, int]]]:
        """Per group rank, its flat range ``[r0 * C, r1 * C)`` (``r0 == r1`` for an empty shard).
        They depend only on the shape (cached: the engine asks for every parameter on every step)."""
        shape = tuple(p.shape)
        hit = self._ranges.get(shape)
        if hit is not None:
            return hit
        if self._coords is None:
            self.check_param(p, "<parameter>")     # binds the mesh of the first parameter seen
        row = math.prod(shape[1:])
        w = len(self._coords)
        out = []
        for r in range(w):
            r0, r1 = shard0_rows(shape[0], w, self._coords[r])
            out.append([(r0 * row, r1 * row)])     # empty shards: one empty range (r0 == r1)
        self._ranges[shape] = out
        return out

    def local_param(self, p: Tensor) -> Tensor:
        """1-D view of this rank's real (unpadded) rows: writes land in FSDP2's sharded storage."""
        return p._local_tensor.detach().view(-1)

    def local_grad(self, p: Tensor) -> Tensor | None:
        """The reduce-scattered (averaged) gradient rows of this rank, 1-D."""
        g = p.grad
        if g is None:
            return None
        local = g._local_tensor if isinstance(g, _dtensor_cls()) else g
        return local.reshape(-1)

    def full_shape(self, p: Tensor) -> torch.Size:
        return p.shape

    def local_shape(self, p: Tensor) -> torch.Size:
        return p._local_tensor.shape

    # -- validation ------------------------------------------------------------------------
    def check_param(self, p: Tensor, name: str) -> None:
        """Raise a clear error unless ``p`` is a DTensor on this layout's mesh, ``Shard(0)`` on the
        shard axis and ``Replicate()`` on the others, with the local rows ``torch.chunk`` gives."""
        DTensor = _dtensor_cls()
        from torch.distributed.tensor import Replicate, Shard

        if not isinstance(p, DTensor):
            raise TypeError(f"parameter {name!r} (shape {tuple(p.shape)}) is a plain {type(p).__name__}, not an FSDP2 "
                             "DTensor: apply fully_shard to every module that owns parameters and to the root "
                             "(dist_muonclip.fsdp.fully_shard_model does), or use the default Replicated layout "
                             "for DDP models")
        pl = tuple(p.placements)
        shard_axes = [i for i, x in enumerate(pl) if type(x) is Shard and x.dim == 0]
        others_ok = all(type(x) is Replicate for i, x in enumerate(pl) if i not in shard_axes)
        if len(shard_axes) != 1 or not others_ok:
            raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) is a DTensor on a {len(pl)}-D mesh with "
                             f"placements {pl}; Shard0Layout needs Shard(dim=0) on one mesh axis and Replicate() on "
                             "the others (FSDP2's default, HSDP): remove shard_placement_fn / tensor-parallel plans "
                             "for this parameter")
        if self.mesh is None:
            self._bind(p.device_mesh, shard_axes[0] if self.shard_axis is None else self.shard_axis)
        if p.device_mesh != self.mesh:
            raise ValueError(f"parameter {name!r} lives on mesh {p.device_mesh}, other parameters on {self.mesh}; "
                             "MuonClip's Shard0Layout needs all parameters on one FSDP mesh")
        if shard_axes[0] != self.shard_axis:
            raise ValueError(f"parameter {name!r} is sharded on mesh axis {shard_axes[0]} (placements {pl}), other "
                             f"parameters on axis {self.shard_axis}; shard every parameter on the same axis")
        local = p._local_tensor
        rank = dist.get_rank(self._group)
        r0, r1 = shard0_rows(p.shape[0], len(self._coords), self._coords[rank])
        if tuple(local.shape) != (r1 - r0, *p.shape[1:]) or not local.is_contiguous():
            raise ValueError(f"parameter {name!r}: local shard has shape {tuple(local.shape)} (contiguous="
                             f"{local.is_contiguous()}), expected rows [{r0}, {r1}) of {tuple(p.shape)} under "
                             "torch.chunk semantics; this torch version shards differently (please report)")

    def validate(self, params: Sequence[Tensor], names: dict, world_size: int, rank: int) -> None:
        """Placements first (named errors), then the engine's generic tiling check."""
        for p in params:
            self.check_param(p, names.get(p, "<unnamed>"))
        if self.world_size != world_size or dist.get_rank(self._group) != rank:
            raise ValueError(f"MuonClip runs on a process group of {world_size} ranks (this is rank {rank}) but the "
                             f"FSDP mesh has {self.world_size} (this is rank {dist.get_rank(self._group)}): pass "
                             "process_group=layout.process_group (dist_muonclip.fsdp.make_muonclip does)")
        super().validate(params, names, world_size, rank)

    def dtensor_like(self, p: Tensor, local_flat: Tensor) -> Tensor:
        """A ``DTensor`` with ``p``'s global shape and placement whose local rows *are* ``local_flat``
        (a view: DCP loads into it in place)."""
        DTensor = _dtensor_cls()
        local = local_flat.view(self.local_shape(p))
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    # -- engine hooks: eager state, torch-native (DCP) optimizer state dicts ----------------
    def init_optimizer_state(self, optim: MuonClip) -> None:
        """Create all state at construction (DCP and torch's get_state_dict see it on every rank)."""
        init_state_(optim)

    def optimizer_state_dict(self, optim: MuonClip) -> dict[str, Any]:
        """``MuonClip.state_dict()`` for FSDP2: torch's format with DTensor state (see
        :func:`torch_optimizer_state_dict`)."""
        return torch_optimizer_state_dict(optim)

    def load_optimizer_state_dict(self, optim: MuonClip, state_dict: dict[str, Any]) -> bool:
        """``MuonClip.load_state_dict()`` for FSDP2: keyed by position or FQN, DTensor or resharded."""
        _load_state(optim, state_dict)
        return True


def layout_from_params(params: Sequence[Tensor]) -> Shard0Layout | None:
    """The layout the parameters' placements describe, whatever applied them (``fully_shard``,
    :func:`~dist_muonclip.integrations.fsdp.fully_shard_model`, hand-made ``distribute_tensor``;
    ``MuonClip(model)`` first asks :func:`dist_muonclip.tp_layout.tensor_parallel_layout`, so
    tensor-parallel models never get here):
    ``None`` when no parameter is a DTensor (the optimizer's default, Replicated), else a
    :class:`Shard0Layout` bound to the first row-sharded DTensor's mesh and shard axis. Parameters
    it cannot hold are refused by name when the optimizer validates the layout."""
    if not dist.is_available():
        return None
    DTensor = _dtensor_cls()
    from torch.distributed.tensor import Shard

    dts = [p for p in params if isinstance(p, DTensor)]
    if not dts:
        return None
    for p in dts:
        axes = [i for i, x in enumerate(p.placements) if type(x) is Shard and x.dim == 0]
        if len(axes) == 1:
            return Shard0Layout(p.device_mesh, shard_axis=axes[0])
    return Shard0Layout()


def unmanaged_dtensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, param)`` of the model's DTensor parameters that no ``fully_shard`` manages.

    FSDP2 turns every module it is applied to into an ``FSDPModule`` and manages the parameters
    of that module's subtree; a DTensor parameter outside every such subtree was placed by
    something else: ``parallelize_module`` (``ColwiseParallel`` -> ``(Shard(0),)``,
    ``RowwiseParallel`` -> ``(Shard(1),)`` on the tp mesh) or a hand-made ``distribute_tensor``.
    Placements alone cannot tell the two apart (an all-``ColwiseParallel`` model is
    ``(Shard(0),)`` everywhere, like FSDP2 on a 1-D mesh), and the difference matters: FSDP2 ranks
    see different data and hold reduce-scattered gradient rows, TP ranks see the same data and hold
    different heads."""
    if not dist.is_available():
        return []
    DTensor = _dtensor_cls()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2: nothing can be FSDP-managed
        FSDPModule = ()
    managed: set[int] = set()
    for m in model.modules():
        if FSDPModule and isinstance(m, FSDPModule):
            managed.update(id(p) for p in m.parameters())
    return [(n, p) for n, p in model.named_parameters() if isinstance(p, DTensor) and id(p) not in managed]


# ------------------------------------------------------------------------------ checkpoints


def _layout_of(optim: MuonClip) -> Shard0Layout:
    layout = optim.layout
    from .tp_layout import TensorParallelLayout

    if not isinstance(layout, (Shard0Layout, TensorParallelLayout)):
        raise TypeError("this optimizer does not use Shard0Layout; build it with dist_muonclip.fsdp.make_muonclip "
                        "(for replicated models use MuonClip.state_dict())")
    return layout


@torch.no_grad()
def init_state_(optim: MuonClip) -> None:
    """Create every parameter's state (zeros) on every rank, also for empty local shards.

    Same state as the engine creates on first use (1-D local pieces: ``momentum_buffer`` for
    Muon, ``step`` / ``exp_avg`` / ``exp_avg_sq`` for AdamW), so the engine picks it up.
    """
    layout = _layout_of(optim)
    for g in optim.param_groups:
        for p in g["params"]:
            local = layout.local_param(p)
            if g["use_muon"]:
                momentum_buffer(optim.state[p], local, memory_format=torch.contiguous_format)
            else:
                adamw_state(optim.state[p], local, fused=optim.adamw_fused)


def _sync_steps_(optim: MuonClip) -> None:
    """AdamW's ``step`` counter is per parameter but ranks with an empty shard never advance it:
    take the max over ranks so the (replicated) saved value is right whichever rank DCP keeps."""
    layout = _layout_of(optim)
    steps = [optim.state[p]["step"] for g in optim.param_groups if not g["use_muon"] for p in g["params"]]
    if not steps or optim.world_size == 1:
        return
    packed = torch.stack([s.float() for s in steps])
    if optim.comm is not None:    # on the group's device (NCCL: the GPU, also under FSDP2's CPU offload)
        packed = optim.comm.to_device(packed)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=layout.process_group)
    for s, v in zip(steps, packed.tolist()):
        s.fill_(v)


_SKIP_GROUP_KEYS = ("params", "param_names")


def _build_state(optim: MuonClip, key_of) -> dict[str, Any]:
    """``{"state": {key: {...}}, "param_groups": [{..., "params": [key, ...]}]}`` with per-element
    state as ``DTensor`` s whose local shards are views of the optimizer's state."""
    layout = _layout_of(optim)
    init_state_(optim)
    _sync_steps_(optim)
    state: dict[Any, dict[str, Any]] = {}
    groups = []
    for g in optim.param_groups:
        keys = []
        for p in g["params"]:
            key = key_of(p)
            keys.append(key)
            entry: dict[str, Any] = {}
            for k, v in optim.state[p].items():
                if k == "step":
                    entry[k] = v
                elif isinstance(v, Tensor) and v.numel() == layout.local_param(p).numel():
                    entry[k] = layout.dtensor_like(p, v)
                else:
                    raise ValueError(f"optimizer state {k!r} of {optim.param_name(p)!r} has shape {tuple(v.shape)}, "
                                     "not this rank's shard; cannot checkpoint it with DCP")
            state[key] = entry
        groups.append({**{k: v for k, v in g.items() if k not in _SKIP_GROUP_KEYS}, "params": keys})
    return {"state": state, "param_groups": groups}


@torch.no_grad()
def _load_state(optim: MuonClip, state_dict: dict[str, Any]) -> None:
    """Load ``{"state", "param_groups"}`` keyed by FQN or by position (torch's convention: the
    saved groups' ``params`` lists, in order, name this optimizer's parameters). Validated first."""
    _layout_of(optim)
    DTensor = _dtensor_cls()
    init_state_(optim)
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or "state" not in state_dict:
        raise ValueError("optimizer state_dict needs 'state' and 'param_groups' (from "
                         "dist_muonclip.fsdp.get_optimizer_state_dict or torch's get_optimizer_state_dict)")
    if len(saved_groups) != len(optim.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                         f"{len(optim.param_groups)} (rebuild the optimizer with the same split)")
    param_of: dict[Any, Tensor] = {}
    for gi, (sg, g) in enumerate(zip(saved_groups, optim.param_groups)):
        if len(sg["params"]) != len(g["params"]) or sg.get("use_muon", g["use_muon"]) != g["use_muon"]:
            raise ValueError(f"param group {gi} does not match the checkpoint ({len(sg['params'])} saved parameters, "
                             f"{len(g['params'])} here; use_muon {sg.get('use_muon')} vs {g['use_muon']})")
        for key, p in zip(sg["params"], g["params"]):
            if isinstance(key, str) and key != optim.param_name(p) and not key.endswith(optim.param_name(p)) \
                    and not optim.param_name(p).endswith(key):
                raise ValueError(f"param group {gi}: checkpoint parameter {key!r} is at the place of "
                                 f"{optim.param_name(p)!r}; rebuild the model with the same parameter order")
            param_of[key] = p
    copies = []
    for key, s in state_dict["state"].items():
        if key not in param_of:
            raise ValueError(f"optimizer state_dict has state for {key!r}, which no param group lists")
        p = param_of[key]
        name = optim.param_name(p)
        mine = optim.state[p]
        for k, v in s.items():
            if k not in mine:
                raise ValueError(f"state {k!r} of {name!r} is not a state of this optimizer's "
                                 f"{'Muon' if k == 'momentum_buffer' else 'AdamW'} parameters")
            if k == "step":
                copies.append((mine[k], torch.as_tensor(v).reshape(())))
                continue
            if not isinstance(p, DTensor):     # tensor parallel: a parameter TP left replicated (plain)
                if not isinstance(v, Tensor) or isinstance(v, DTensor) or v.shape != p.shape:
                    raise ValueError(f"state {k!r} of {name!r}: expected a plain tensor of shape {tuple(p.shape)}, "
                                     f"got {type(v).__name__} {tuple(v.shape)}")
                copies.append((mine[k], v.reshape(-1)))
                continue
            if not isinstance(v, DTensor) or v.shape != p.shape:
                raise ValueError(f"state {k!r} of {name!r}: expected a DTensor of shape {tuple(p.shape)} (from "
                                 f"get_optimizer_state_dict + dcp.load), got {type(v).__name__} {tuple(v.shape)}")
            if v.placements != p.placements or v.device_mesh != p.device_mesh:
                v = v.redistribute(p.device_mesh, p.placements)
            copies.append((mine[k], v._local_tensor.reshape(-1)))
    for dst, src in copies:
        if dst.numel() and dst.data_ptr() != src.data_ptr():     # dcp.load may have written in place already
            dst.copy_(src)
    for sg, g in zip(saved_groups, optim.param_groups):
        for k, v in sg.items():
            if k not in _SKIP_GROUP_KEYS:
                g[k] = v


def load_torch_optimizer_state_dict(optim: MuonClip, state_dict: dict[str, Any]) -> None:
    """Load a :func:`torch_optimizer_state_dict` dict (keyed by position or FQN; DTensor state
    resharded to this optimizer's placements). Validated before anything changes."""
    _load_state(optim, state_dict)


def get_optimizer_state_dict(model: nn.Module, optim: MuonClip) -> dict[str, Any]:
    """DCP-ready optimizer state of a Shard0 MuonClip, keyed by parameter name (FQN).

    ``{"format", "step", "state": {fqn: {key: DTensor (Shard(0), like the parameter) | step tensor}},
    "param_groups": [{hyperparameters..., "params": [fqn, ...]}]}``. The DTensors' local shards are
    views of the optimizer's own state, so ``dcp.load`` into this dict writes straight into the
    optimizer; :func:`set_optimizer_state_dict` then restores step counters and hyperparameters.
    Collective (one small all-reduce): call it on every rank.
    """
    out = _build_state(optim, optim.param_name)
    return {"format": STATE_FORMAT, "step": torch.tensor(optim.num_steps), **out}


def set_optimizer_state_dict(model: nn.Module, optim: MuonClip, state_dict: dict[str, Any]) -> None:
    """Load a :func:`get_optimizer_state_dict` dict (typically filled by ``dcp.load``, from any
    world size) into ``optim``. Validated before anything changes."""
    if state_dict.get("format") != STATE_FORMAT:
        raise ValueError(f"state_dict has format {state_dict.get('format')!r}, expected {STATE_FORMAT!r} "
                         "(from dist_muonclip.fsdp.get_optimizer_state_dict)")
    _load_state(optim, state_dict)
    optim.num_steps = int(state_dict.get("step", 0))


def torch_optimizer_state_dict(optim: MuonClip) -> dict[str, Any]:
    """``optim.state_dict()`` in torch's own format (state keyed by position in param_groups,
    DTensor values), which ``torch.distributed.checkpoint.state_dict.get_state_dict`` maps to FQNs.
    Used by MuonClip.state_dict() for Shard0 layouts."""
    params = [p for g in optim.param_groups for p in g["params"]]
    index = {p: i for i, p in enumerate(params)}
    return _build_state(optim, index.__getitem__)

