"""MuonClip on FSDP2 (``torch.distributed.fsdp.fully_shard``) models: the Shard0 layout.

FSDP2 stores every parameter as a ``DTensor`` split on dim 0 over a 1-D device mesh, with
``torch.chunk`` semantics: ``R`` rows on ``W`` ranks give chunks of ``ceil(R / W)`` rows, the
last non-empty chunk shorter, trailing ranks empty when ``R < W`` (e.g. 3 rows on 4 ranks:
1, 1, 1, 0). FSDP2 pads its internal storage to equal chunks; ``DTensor._local_tensor`` is the
unpadded view of this rank's real rows, and gradients arrive reduce-scattered (averaged) as
``DTensor`` s with the same placement.

:class:`Shard0Layout` tells the MuonClip engine (DESIGN.md, "Layouts") which rows each rank
holds. A row shard ``[r0, r1)`` of a parameter whose rows have ``C`` elements is the flat range
``[r0 * C, r1 * C)`` of its row-major full tensor, so the engine treats it like any sharded
layout: momentum on local rows -> all-to-all of row shards to the owner -> Newton-Schulz on the
assembled matrix -> all-to-all of update rows back; AdamW on local rows; QK-Clip scales the held
rows. Nothing calls ``full_tensor()``.

Usage (one call; see also :func:`fully_shard_model` and :func:`make_muonclip`)::

    from dist_muonclip import fsdp
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = fsdp.fully_shard_model(model, mp_policy=policy)   # fully_shard per decoder block, then the root
    opt = fsdp.make_muonclip(model, lr=2e-2)

Checkpoints with ``torch.distributed.checkpoint`` (DCP), any world size on load::

    sd = {"model": get_model_state_dict(model), "optim": fsdp.get_optimizer_state_dict(model, opt)}
    dcp.save(sd, checkpoint_id=path)
    # later, any world size: build model + optimizer the same way, then
    sd = {"model": get_model_state_dict(model), "optim": fsdp.get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)          # reads into the (re-sharded) templates in place
    set_model_state_dict(model, sd["model"]); fsdp.set_optimizer_state_dict(model, opt, sd["optim"])
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..engine.adamw import adamw_state
from ..engine.exchange import momentum_buffer
from ..layouts import Layout

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

    from ..optimizer import MuonClip

__all__ = [
    "STATE_FORMAT",
    "Shard0Layout",
    "find_blocks",
    "fully_shard_model",
    "get_optimizer_state_dict",
    "init_state_",
    "make_muonclip",
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
    """Layout of ``DTensor`` parameters placed ``(Shard(0),)`` on one 1-D device mesh (FSDP2).

    Args:
        mesh: the FSDP mesh. Default: taken from the first DTensor parameter the layout sees.
        process_group: the group whose ranks index :meth:`ranges`. Default: the mesh's group.
            Pass the same group to ``MuonClip(process_group=...)`` (:func:`make_muonclip` does).

    Every parameter must be a ``DTensor`` on this mesh with placements ``(Shard(0),)``;
    anything else (``Shard(1)``, ``Replicate()``, 2-D meshes with tensor parallelism or HSDP)
    raises a ``ValueError`` naming the parameter and its placement (a plain tensor left
    unsharded: ``TypeError``) at optimizer construction, before any state exists.
    """

    sharded = True

    def __init__(self, mesh: DeviceMesh | None = None, *, process_group: Any = None) -> None:
        self.mesh = mesh
        self._group = process_group
        self._coords: list[int] | None = None   # group rank -> mesh coordinate
        self._ranges: dict[tuple[int, ...], list[list[tuple[int, int]]]] = {}   # full shape -> ranges
        if mesh is not None:
            self._bind(mesh)

    # -- mesh and ranks --------------------------------------------------------------------
    def _bind(self, mesh: DeviceMesh) -> None:
        if mesh.ndim != 1:
            raise ValueError(f"Shard0Layout needs a 1-D device mesh, got a {mesh.ndim}-D mesh {mesh}; 2-D meshes "
                             "(HSDP, FSDP + tensor parallel) are not supported")
        self.mesh = mesh
        if self._group is None:
            self._group = mesh.get_group()
        ranks = [int(r) for r in mesh.mesh.reshape(-1).tolist()]
        group_rank = [dist.get_group_rank(self._group, g) for g in ranks]
        if sorted(group_rank) != list(range(len(ranks))):
            raise ValueError(f"process_group does not match the FSDP mesh {mesh}: its ranks must be exactly the "
                             "mesh's ranks; pass process_group=mesh.get_group() (or leave it None)")
        coords = [0] * len(ranks)
        for c, r in enumerate(group_rank):
            coords[r] = c
        self._coords = coords

    @property
    def process_group(self) -> Any:
        return self._group

    @property
    def world_size(self) -> int:
        return self.mesh.size() if self.mesh is not None else 1

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
        """Raise a clear error unless ``p`` is a ``(Shard(0),)`` DTensor on this layout's mesh."""
        DTensor = _dtensor_cls()
        from torch.distributed.tensor import Shard

        if not isinstance(p, DTensor):
            raise TypeError(f"parameter {name!r} (shape {tuple(p.shape)}) is a plain {type(p).__name__}, not an FSDP2 "
                             "DTensor: apply fully_shard to every module that owns parameters and to the root "
                             "(dist_muonclip.fsdp.fully_shard_model does), or use the default Replicated layout "
                             "for DDP models")
        if p.device_mesh.ndim != 1:
            raise ValueError(f"parameter {name!r} is a DTensor on a {p.device_mesh.ndim}-D mesh with placements "
                             f"{p.placements}: Shard0Layout supports FSDP2 on a 1-D mesh only (no HSDP, no tensor "
                             "parallel); shard with fully_shard(module, mesh=<1-D mesh>)")
        pl = p.placements
        if len(pl) != 1 or type(pl[0]) is not Shard or pl[0].dim != 0:
            raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) has DTensor placements {pl}; Shard0Layout "
                             "needs (Shard(dim=0),) (FSDP2's default): remove shard_placement_fn / tensor-parallel "
                             "plans for this parameter")
        if self.mesh is None:
            self._bind(p.device_mesh)
        elif p.device_mesh != self.mesh:
            raise ValueError(f"parameter {name!r} lives on mesh {p.device_mesh}, other parameters on {self.mesh}; "
                             "MuonClip's Shard0Layout needs all parameters on one FSDP mesh")
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


# ------------------------------------------------------------------------------ wrapping
def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class is in a transformers model's
    ``_no_split_modules`` (decoder layers), else the items of every top-most ``nn.ModuleList``."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if blocks:
            return blocks
    blocks, inside = [], set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, nn.ModuleList):
            for child in m:
                if any(True for _ in child.parameters()):
                    blocks.append(child)
            inside.update(id(x) for x in m.modules())
    return blocks


def fully_shard_model(model: nn.Module, mesh: DeviceMesh | None = None, mp_policy: Any = None, *,
                      reshard_after_forward: bool = True, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Apply FSDP2 the usual way: ``fully_shard`` on every block (see :func:`find_blocks`), then on
    the root (embeddings, final norm, head). Returns ``model`` (sharded in place).

    Args:
        mesh: 1-D device mesh; default: all ranks, device type from the backend (NCCL -> cuda).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, e.g.
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``:
            fp32 sharded parameters and optimizer state, bf16 compute, fp32 gradient reduction.
        reshard_after_forward: passed to ``fully_shard`` for the blocks (the root keeps FSDP2's
            default).
        blocks: modules to shard individually instead of :func:`find_blocks`' choice.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fully_shard_model needs an initialized process group (torch.distributed."
                           "init_process_group, e.g. under torchrun)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"fully_shard_model takes a 1-D mesh (pure FSDP), got {mesh.ndim}-D {mesh}")
    if mp_policy is None:
        mp_policy = MixedPrecisionPolicy()
    blocks = find_blocks(model) if blocks is None else list(blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def make_muonclip(model: nn.Module, **kwargs: Any) -> MuonClip:
    """``MuonClip`` for a model sharded with ``fully_shard``: the Shard0 layout on the model's mesh, the mesh's
    process group, gradients reduced by FSDP2 (``grad_reduction="external"``). Optimizer state
    is created eagerly so DCP sees the same keys on every rank."""
    from ..optimizer import MuonClip

    mesh = next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)
    if mesh is None:
        raise ValueError("make_muonclip: the model has no DTensor parameters; shard it first with "
                         "dist_muonclip.fsdp.fully_shard_model(model) or torch's fully_shard")
    layout = kwargs.pop("layout", None) or Shard0Layout(mesh)
    kwargs.setdefault("process_group", layout.process_group)
    opt = MuonClip(model, layout=layout, **kwargs)
    init_state_(opt)
    return opt


# ------------------------------------------------------------------------------ checkpoints


def _layout_of(optim: MuonClip) -> Shard0Layout:
    layout = optim.layout
    if not isinstance(layout, Shard0Layout):
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
    device = layout.local_param(optim.param_groups[0]["params"][0]).device   # NCCL needs device tensors
    packed = torch.stack([s.float().to(device) for s in steps])
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
