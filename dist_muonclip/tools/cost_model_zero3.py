"""Cost model of DeepSpeed ZeRO-3 (issue 16): DeepSpeed's own traffic, and its built-in Muon.

Read from DeepSpeed 0.19.8 (``deepspeed/runtime/zero/stage3.py``, ``partitioned_param_coordinator.py``,
``parameter_offload.py``, ``runtime/comm/coalesced_collectives.py``) and checked against wire-level
counts of ``benchmarks/scaling.py`` on CPU (``benchmarks/results/scaling_zero3.json``). Used by
:func:`dist_muonclip.tools.cost_model.predict` for ``muonclip_zero3``, ``adamw_zero3`` and
``ds_muon_zero3``. Parameters are the cost model's ``ParamSpec`` objects (``name``, ``shape``,
``numel``, ``use_muon``, ``num_matrices``, ``mn``).

What one optimizer step of ZeRO-3 puts on the wire, per rank (``ps = ceil(numel / W)``, the
padded piece of a parameter every rank holds):

* **parameter all-gathers** (``all_gather``, ``param_bytes``): a parameter of at most
  ``stage3_param_persistence_threshold`` elements is *persistent*: never released, re-gathered once
  after every optimizer step (``_post_step``). Every other parameter is gathered when forward
  needs it; after its module's forward it is released unless it is needed again within
  ``stage3_max_reuse_distance`` elements of parameters (``__params_to_release``: the walk over the
  recorded trace counts the forward modules after it and the backward modules before its own
  backward, about twice the parameters after it), in which case backward gathers it again.
  Each gather of a parameter is ``(W - 1) ps`` elements (``all_gather_coalesced``).
  The prefetcher also keeps a parameter whose backward use it has already scanned: the model
  counts that only when all non-persistent parameters fit in one prefetch bucket (then nothing is
  re-gathered); on larger models it leaves it out, so with the defaults it may count up to
  ``stage3_max_live_parameters`` (1e9) elements of backward re-gathers that DeepSpeed skips (an
  upper bound; exact on every measured run, the reuse-distance rule checked with the prefetcher
  off).
* **gradient reduction**: ``reduce_scatter`` of every gradient padded to ``W ps``
  (``reduce_scatter_coalesced``); with ``"reduce_scatter": false`` (required by DeepSpeed's Muon)
  an ``all_reduce`` of the unpadded gradients instead (``__avg_scatter_contiguous_grads``).
* **gradient norm**: one fp64 all-reduce per sub-group (``get_grad_norm_direct``; a param group is
  cut into sub-groups of ``sub_group_size`` local elements, ``_create_fp16_sub_groups``).

DeepSpeed's built-in Muon at ZeRO-3 (``_apply_muon_to_accumulated_grads``, ``_muon_update_sub_group``;
its Muon group sorted by shape, largest first, ``original_muon.py``; a model built under
``deepspeed.zero.Init`` shows empty shapes there and keeps its order, which this model does not
follow): per Muon sub-group, in chunks
of at most ``reduce_bucket_size`` elements (whole parameters), the full gradients are all-gathered,
then the momentum partitions; the chunk's matrices are dealt round-robin, ``W`` per round, and rank
``r`` orthogonalizes the ``r``-th of each round; each round all-gathers the updates and the updated
momentums, every rank sending a buffer of the round's largest matrix (zeros if it had none). All
four gathers are in the communication dtype (``grad_bytes``), and so is the momentum it keeps, the
whole padded Muon partition of every rank. At large ``W`` a chunk holds fewer matrices than ranks:
each round then costs every rank ``(W - 1)`` times its largest matrix, twice, and the NS work sits on
the first ranks only.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..comm import bytes_sent
from ..newton_schulz import ns_flops

__all__ = ["ZERO3_DEFAULTS", "zero3_options", "partition_numel", "zero3_ranges", "zero3_held", "zero3_padded",
           "sub_groups", "regathered", "deepspeed_traffic", "ds_muon_zero3"]

#: DeepSpeed 0.19.8's defaults of the ``zero_optimization`` keys the model reads.
ZERO3_DEFAULTS: dict[str, int] = {
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "sub_group_size": 1_000_000_000,
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
}

#: Bytes of the gradient-norm all-reduce per sub-group: one fp64 (``get_norm_dtype``).
NORM_BYTES = 8


def zero3_options(zero3: Mapping[str, Any] | None) -> dict[str, int]:
    """:data:`ZERO3_DEFAULTS` updated with ``zero3`` (a DeepSpeed ``zero_optimization`` section; keys
    the model does not read, such as ``stage``, are ignored), plus ``reduce_scatter`` (default on)."""
    out = dict(ZERO3_DEFAULTS)
    out["reduce_scatter"] = 1
    for k, v in (zero3 or {}).items():
        if k == "reduce_scatter":
            if v not in (True, False):
                raise ValueError(f"zero3['reduce_scatter']={v!r}: use true or false")
            out[k] = int(v)
        elif k in out:
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"zero3[{k!r}]={v!r}: use a non-negative number of elements")
            out[k] = int(v)
    return out


def partition_numel(numel: int, world: int) -> int:
    """``ps``: the elements every rank holds of a parameter (``Parameter.partition_numel``)."""
    return -(-numel // world)


def zero3_ranges(numel: int, world: int) -> list[list[tuple[int, int]]]:
    """Per rank, the flat range of a parameter it holds: ``[r ps, min((r + 1) ps, numel))``."""
    ps = partition_numel(numel, world)
    return [[(r * ps, min((r + 1) * ps, numel))] if r * ps < numel else [] for r in range(world)]


def zero3_held(specs: Sequence[Any], world: int) -> list[int]:
    """Per rank, the elements of ``specs`` it really holds (MuonClip's state lives on these)."""
    held = [0] * world
    for s in specs:
        for r, rs in enumerate(zero3_ranges(s.numel, world)):
            held[r] += sum(b - a for a, b in rs)
    return held


def zero3_padded(specs: Sequence[Any], world: int) -> int:
    """Elements of ``specs`` every rank keeps in DeepSpeed's flat partitions (padded: ``sum ps``)."""
    return sum(partition_numel(s.numel, world) for s in specs)


def sub_groups(group: Sequence[Any], world: int, sub_group_size: int) -> list[list[Any]]:
    """A param group cut into sub-groups of about ``sub_group_size`` local elements
    (``_create_fp16_sub_groups``: a sub-group closes once it reaches the size)."""
    if not group:
        return []
    if sub_group_size >= zero3_padded(group, world):
        return [list(group)]
    out, cur, size = [], [], 0
    for s in group:
        cur.append(s)
        size += partition_numel(s.numel, world)
        if size >= sub_group_size or s is group[-1]:
            out.append(cur)
            cur, size = [], 0
    return out


def regathered(specs: Sequence[Any], opts: Mapping[str, int]) -> list[Any]:
    """The non-persistent parameters released after forward and gathered again in backward: those
    whose backward use lies ``stage3_max_reuse_distance`` or more elements of parameters after
    their forward use (twice the parameters used after them, ``specs`` in forward order). None when
    all non-persistent parameters fit in one prefetch (``stage3_prefetch_bucket_size`` and
    ``stage3_max_live_parameters``): the first prefetch of a step then scans the whole trace, and
    a parameter whose later use it has scanned is not released."""
    persist = opts["stage3_param_persistence_threshold"]
    window = min(opts["stage3_prefetch_bucket_size"], opts["stage3_max_live_parameters"])
    if sum(s.numel for s in specs if s.numel > persist) < window:
        return []
    after, out = 0, []
    for s in reversed(specs):
        if s.numel > opts["stage3_param_persistence_threshold"] and 2 * after >= opts["stage3_max_reuse_distance"]:
            out.append(s)
        after += s.numel
    return out


def deepspeed_traffic(specs: Sequence[Any], world: int, *, param_bytes: int, grad_bytes: int, num_sub_groups: int,
                      opts: Mapping[str, int], reduce_scatter: bool = True) -> dict[str, float]:
    """DeepSpeed ZeRO-3's own collectives in one step on every rank (module doc), by kind."""
    W = world
    if W == 1:
        return {}
    gathered = zero3_padded(specs, W) + zero3_padded(regathered(specs, opts), W)   # persistent: after the step
    out = {"all_gather": bytes_sent("all_gather", W * gathered * param_bytes, W)}
    if reduce_scatter:
        out["reduce_scatter"] = bytes_sent("reduce_scatter", W * zero3_padded(specs, W) * grad_bytes, W)
        out["all_reduce"] = 0.0
    else:
        out["all_reduce"] = bytes_sent("all_reduce", sum(s.numel for s in specs) * grad_bytes, W)
    out["all_reduce"] += num_sub_groups * bytes_sent("all_reduce", NORM_BYTES, W)
    return out


def _chunks(group: Sequence[Any], bucket: int) -> list[list[Any]]:
    """Whole parameters in runs of at most ``bucket`` elements (at least one each)."""
    out, start = [], 0
    while start < len(group):
        end, numel = start, 0
        while end < len(group) and (end == start or numel + group[end].numel <= bucket):
            numel += group[end].numel
            end += 1
        out.append(list(group[start:end]))
        start = end
    return out


def ds_muon_zero3(specs: Sequence[Any], world: int, *, param_bytes: int, grad_bytes: int, state_elem_bytes: int,
                  master_bytes: int, ns_steps: int, zero3: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed's ``"type": "Muon"`` at ZeRO-3 (module doc). Returns per rank ``bytes`` (dicts by
    kind), ``state``, ``flops``, ``runs`` (matrices orthogonalized)."""
    W = world
    opts = zero3_options(zero3)
    muon = sorted((s for s in specs if s.use_muon), key=lambda s: tuple(s.shape), reverse=True)
    adamw = [s for s in specs if not s.use_muon]
    groups = {"muon": sub_groups(muon, W, opts["sub_group_size"]), "adamw": sub_groups(adamw, W, opts["sub_group_size"])}
    common = deepspeed_traffic(specs, W, param_bytes=param_bytes, grad_bytes=grad_bytes, opts=opts,
                               num_sub_groups=len(groups["muon"]) + len(groups["adamw"]), reduce_scatter=False)
    muon_gather = 0.0
    flops, runs = [0] * W, [0] * W
    for sg in groups["muon"]:
        for chunk in _chunks(sg, opts["reduce_bucket_size"]):
            if W > 1:   # full gradients, then momentum partitions (_partitioned_buffers_all_gather)
                muon_gather += 2 * bytes_sent("all_gather", W * zero3_padded(chunk, W) * grad_bytes, W)
            for base in range(0, len(chunk), W):
                rnd = chunk[base:base + W]
                for r, s in enumerate(rnd):
                    flops[r] += s.num_matrices * ns_flops(*s.mn, ns_steps)
                    runs[r] += s.num_matrices
                # updates and momentums, one buffer of the round's largest matrix from every rank
                muon_gather += 2 * bytes_sent("all_gather", W * max(s.numel for s in rnd) * grad_bytes, W)
    bytes_ = dict(common)
    if W > 1:
        bytes_["all_gather"] = bytes_.get("all_gather", 0.0) + muon_gather
    p_muon, p_adamw = zero3_padded(muon, W), zero3_padded(adamw, W)
    state = p_muon * grad_bytes + 2 * p_adamw * state_elem_bytes + (p_muon + p_adamw) * master_bytes
    return {"bytes": [dict(bytes_) for _ in range(W)], "state": [state] * W, "flops": flops, "runs": runs}
