"""Cost model of MuonClip under tensor parallel, alone and under FSDP2 (``muonclip_fsdp_tp``).

Mirrors :class:`dist_muonclip.tp_layout.TensorParallelLayout` on a ``(dp, tp)`` mesh (rank =
``dp_coord * tp + tp_coord``, ``dp = 1`` for TP alone), from parameter specs and a TP plan
(``"col"``: ColwiseParallel, rows split over tp; ``"row"``: RowwiseParallel, columns split over
tp; absent: left replicated over tp). FSDP2 then splits each tp piece's rows over dp
(``torch.chunk`` semantics; exact for sizes that divide evenly, as in the measured runs).

Per rank it predicts the optimizer's bytes (the engine's accountant: the preflight all-reduce,
the two all-to-alls of pieces to owners and of update pieces back; elements held by several tp
ranks travel from and to every holder) and its state (momentum per Muon element held, two Adam
moments per AdamW element held); with ``tokens``, also the model's own traffic (TP's activation
all-reduces, FSDP2's all-gathers and reduce-scatters over dp: :func:`model_traffic`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..comm import bytes_sent
from ..plan import MatrixItem, build_plan
from .cost_model import ParamSpec

__all__ = ["COLWISE", "OPTIMIZER_TAGS", "ROWWISE", "megatron_plan", "mesh_table", "model_traffic", "predict_fsdp_tp",
           "tp_ranges"]


#: linear layers a Megatron-style plan cuts on their rows (ColwiseParallel) / columns (RowwiseParallel)
COLWISE = ("q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def megatron_plan(names: Sequence[str]) -> dict[str, str]:
    """The TP plan the tests and ``benchmarks/scaling.py`` use, by parameter name: the weights of
    :data:`COLWISE` modules ``"col"``, of :data:`ROWWISE` modules ``"row"`` (routed experts
    excepted); embeddings, norms, MLA's down projections and the LM head stay replicated."""
    plan = {}
    for n in names:
        parts = n.split(".")
        if len(parts) < 2 or parts[-1] != "weight":
            continue
        if parts[-2] in COLWISE:
            plan[n] = "col"
        elif parts[-2] in ROWWISE and ".experts." not in n:
            plan[n] = "row"
    return plan


def _chunk(n: int, k: int, i: int) -> tuple[int, int]:
    size = -(-n // k)
    return min(i * size, n), min((i + 1) * size, n)


def _blocks(spec: ParamSpec, style: str | None, dp: int, tp: int) -> list[tuple[int, int, int, int]]:
    """Per rank of the ``(dp, tp)`` mesh, the block ``(row0, row1, col0, col1)`` of ``spec``'s full
    tensor (viewed as rows x the rest) it holds."""
    rows = spec.shape[0]
    row = spec.numel // rows
    out = []
    for d in range(dp):
        for t in range(tp):
            if style == "col":
                t0, t1 = _chunk(rows, tp, t)
                d0, d1 = _chunk(t1 - t0, dp, d)
                out.append((t0 + d0, t0 + d1, 0, row))
            elif style == "row":
                c0, c1 = _chunk(row, tp, t)
                r0, r1 = _chunk(rows, dp, d)
                out.append((r0, r1, c0, c1))
            elif style is None:
                r0, r1 = _chunk(rows, dp, d)
                out.append((r0, r1, 0, row))
            else:
                raise ValueError(f"{spec.name}: TP style {style!r} is unknown; use 'col', 'row' or None")
    return out


def tp_ranges(spec: ParamSpec, style: str | None, dp: int, tp: int) -> list[list[tuple[int, int]]]:
    """Per rank of the ``(dp, tp)`` mesh, the flat ranges of ``spec``'s full tensor it holds."""
    if style == "row" and len(spec.shape) != 2:
        raise ValueError(f"{spec.name}: RowwiseParallel needs a 2-D weight, got {spec.shape}")
    row = spec.numel // spec.shape[0]
    out = []
    for r0, r1, c0, c1 in _blocks(spec, style, dp, tp):
        if r1 <= r0 or c1 <= c0:
            out.append([])
        elif style != "row":              # whole rows: one contiguous range
            out.append([(r0 * row, r1 * row)])
        else:                             # a column block: one range per row
            out.append([(i * row + c0, i * row + c1) for i in range(r0, r1)])
    return out


def _sizes(spec: ParamSpec, style: str | None, dp: int, tp: int) -> list[int]:
    """Elements per rank of :func:`tp_ranges` without listing the ranges (fast at scale)."""
    return [max(r1 - r0, 0) * max(c1 - c0, 0) for r0, r1, c0, c1 in _blocks(spec, style, dp, tp)]


def _local_spec(spec: ParamSpec, style: str | None, tp: int, t: int) -> ParamSpec:
    """``spec`` as tp rank ``t`` holds it (what FSDP2 then shards over dp)."""
    r0, r1, c0, c1 = _blocks(spec, style, 1, tp)[t]
    shape = (r1 - r0, c1 - c0) if style == "row" else (r1 - r0, *spec.shape[1:])
    return ParamSpec(spec.name, shape, spec.use_muon, spec.num_matrices)


def model_traffic(specs: Sequence[ParamSpec], dp: int, tp: int, plan: Mapping[str, str], *, tokens: int,
                  act_bytes: int = 4, param_bytes: int = 4, grad_bytes: int = 4,
                  ranks: Sequence[int] | None = None) -> list[dict[str, float]]:
    """Per rank of the ``(dp, tp)`` mesh, the model's own bytes per step (untagged on the wire):

    * ``all_reduce``: TP's activations, ``tokens`` (this rank's batch x sequence) rows each: the
      output of every ``RowwiseParallel`` module in forward (a Partial sum, ``shape[0]`` wide) and
      the input gradient of every ``ColwiseParallel`` module in backward (``shape[1]`` wide),
      over the tp ranks;
    * ``all_gather`` / ``reduce_scatter``: FSDP2 over dp on each tp rank's pieces (the
      ``muonclip_fsdp2`` model of :func:`dist_muonclip.tools.cost_model.predict` at ``W = dp``
      on the tp-local shapes).

    ``ranks``: only these ranks (default: all), in that order.

    Exact on the measured CPU runs (benchmarks/scaling.py ``muonclip_fsdp_tp``, fp32); assumes every
    planned module runs once per forward (no weight sharing, no activation recomputation).
    """
    from ..comm import bytes_sent as sent
    from .cost_model import predict

    act = 0.0
    for s in specs:
        style = plan.get(s.name)
        if style is not None and tp > 1:
            act += sent("all_reduce", tokens * (s.shape[0] if style == "row" else s.numel // s.shape[0]) * act_bytes,
                        tp)
    out = []
    for r in (range(dp * tp) if ranks is None else ranks):
        d, t = divmod(r, tp)
        b: dict[str, float] = {"all_reduce": act} if act else {}
        if dp > 1:
            loc = [_local_spec(s, plan.get(s.name), tp, t) for s in specs]
            f = predict(loc, dp, "muonclip_fsdp2", rank=d, param_bytes=param_bytes, grad_bytes=grad_bytes)["bytes"]
            b.update({k: f[k] for k in ("all_gather", "reduce_scatter") if k in f})
        out.append(b)
    return out


def predict_fsdp_tp(specs: Sequence[ParamSpec], dp: int, tp: int, plan: Mapping[str, str], *, grad_bytes: int = 4,
                    ns_bytes: int = 2, ns_steps: int = 5, num_logits: int = 0,
                    tokens: int | None = None, optimizer: str = "muonclip") -> dict[str, Any]:
    """Per-rank optimizer bytes and state elements of ``muonclip_fsdp_tp`` (module doc);
    ``optimizer="adamw"``: torch AdamW on the same model (``adamw_fsdp_tp``: two moments per
    element held, no optimizer collectives, NS 0).

    ``plan``: parameter name -> ``"col"`` / ``"row"`` (names absent: replicated over tp).
    ``grad_bytes``: momentum element size (pieces to owners); ``ns_bytes``: Newton-Schulz dtype
    size (update pieces back). ``tokens`` (this rank's batch x sequence): also the model's own
    traffic of :func:`model_traffic` (fp32), so that the bytes are every byte on the wire.
    Returns ``{"bytes_per_rank": [{tag: bytes}], "state_numel_per_rank", "ns_flops_per_rank",
    "ns_matrices_per_rank", "owners"}`` (each matrix orthogonalized once, on its owner).
    """
    if optimizer not in ("muonclip", "adamw"):
        raise ValueError(f"optimizer={optimizer!r}: use 'muonclip' or 'adamw'")
    if optimizer == "adamw":
        specs = [ParamSpec(s.name, s.shape, False, s.num_matrices) for s in specs]
    W = dp * tp
    for s in specs:
        if plan.get(s.name) not in (None, "col", "row") or (plan.get(s.name) == "row" and len(s.shape) != 2):
            raise ValueError(f"{s.name}: TP style {plan.get(s.name)!r} is not 'col', 'row' (2-D weights) or None")
    items = [MatrixItem(s.name, 0, s.num_matrices, *s.mn, "float32", ns_steps) for s in specs if s.use_muon]
    owners = build_plan(items, W, {}).owners
    flops, runs = [0] * W, [0] * W
    for it in items:
        flops[owners[it.name]] += it.flops
        runs[owners[it.name]] += it.num_matrices
    to_owner, from_owner = [0.0] * W, [0.0] * W
    state = [0] * W
    for s in specs:
        sizes = _sizes(s, plan.get(s.name), dp, tp)
        for r, n in enumerate(sizes):
            state[r] += n * (1 if s.use_muon else 2)
        if not s.use_muon:
            continue
        o = owners[s.name]
        from_owner[o] += (sum(sizes) - sizes[o]) * ns_bytes
        for r, n in enumerate(sizes):
            if r != o:
                to_owner[r] += n * grad_bytes
    pre = bytes_sent("all_reduce", (1 + 2 * len(specs) + num_logits) * 4, W) if W > 1 else 0.0
    per_rank = [{"all_reduce[preflight]": pre, "all_to_all[muon_to_owner]": to_owner[r],
                 "all_to_all[muon_from_owner]": from_owner[r]} if optimizer == "muonclip" else {} for r in range(W)]
    if tokens is not None:
        for b, m in zip(per_rank, model_traffic(specs, dp, tp, plan, tokens=tokens, grad_bytes=grad_bytes)):
            b.update(m)
    return {"engine": f"{optimizer}_fsdp_tp", "dp": dp, "tp": tp, "bytes_per_rank": per_rank,
            "state_numel_per_rank": state, "ns_flops_per_rank": flops, "ns_matrices_per_rank": runs,
            "owners": dict(owners)}


#: MuonClip's own collectives (the rest on the wire is the model's: FSDP2, TP, HSDP's replicate all-reduce)
OPTIMIZER_TAGS = ("all_reduce[preflight]", "all_to_all[muon_to_owner]", "all_to_all[muon_from_owner]")
_GIB = 2.0 ** 30


def mesh_table(cfg: Mapping[str, Any], meshes: Sequence[tuple[int, int]] = ((1, 8), (2, 8), (4, 8), (8, 8)), *,
               tokens: int = 8192) -> list[dict[str, Any]]:
    """Predicted per-rank cost of one step on 2-D meshes for an HF config (``specs_from_config``):
    ``muonclip_fsdp_tp`` on ``(dp, tp)`` (:func:`megatron_plan`; fp32 momentum and moments, bf16
    Newton-Schulz updates; the model's traffic for ``tokens`` per dp rank in bf16 activations and
    all-gathers, fp32 reduce-scatters) and ``muonclip_hsdp`` on ``(replicas, shard)`` = the same
    shape (same dtypes), beside ``muonclip_fsdp2`` at the same W. GiB per rank are the most loaded rank's; NS TFLOP the busiest rank's."""
    from .cost_model import predict, specs_from_config

    # as the TP rows: bf16 parameter all-gathers, fp32 gradients / momentum pieces / state, bf16
    # updates; FSDP2's fp32 parameter shards are the parameters, not optimizer state (no masters)
    dtypes = dict(param_bytes=2, grad_bytes=4, ns_bytes=2, state_elem_bytes=4, master_bytes=0)
    specs = specs_from_config(dict(cfg))
    plan = megatron_plan([s.name for s in specs])
    heads = int(cfg["num_attention_heads"]) * int(cfg["num_hidden_layers"])
    rows = []
    for dp, tp in meshes:
        W = dp * tp
        p = predict_fsdp_tp(specs, dp, tp, plan, grad_bytes=4, ns_bytes=2, num_logits=heads)
        model = model_traffic(specs, dp, tp, plan, tokens=tokens, act_bytes=2, param_bytes=2, grad_bytes=4,
                              ranks=range(tp))          # dp coordinate 0: the others move the same bytes
        f = predict(specs, W, "muonclip_fsdp2", num_logits=heads, **dtypes)
        row = {"mesh": f"{dp} x {tp}", "world_size": W, "engine": "muonclip_fsdp_tp",
               "optimizer_GiB_per_rank": max(sum(b.values()) for b in p["bytes_per_rank"]) / _GIB,
               "optimizer_GiB_all_ranks": sum(sum(b.values()) for b in p["bytes_per_rank"]) / _GIB,
               "model_GiB_per_rank": max(sum(b.values()) for b in model) / _GIB,
               "state_GiB_per_rank": max(p["state_numel_per_rank"]) * 4 / _GIB,
               "ns_TFLOP_per_rank": max(p["ns_flops_per_rank"]) / 1e12,
               "fsdp2_same_W": {"optimizer_GiB_per_rank": sum(f["bytes"].get(k, 0.0) for k in OPTIMIZER_TAGS) / _GIB,
                                "state_GiB_per_rank": max(f["state_bytes_per_rank"]) / _GIB,
                                "ns_TFLOP_per_rank": f["ns_flops_max"] / 1e12}}
        rows.append(row)
        if dp > 1:
            h = predict(specs, W, "muonclip_hsdp", replicas=dp, num_logits=heads, **dtypes)
            rows.append({"mesh": f"{dp} x {tp}", "world_size": W, "engine": "muonclip_hsdp",
                         "optimizer_GiB_per_rank": sum(h["bytes"].get(k, 0.0) for k in OPTIMIZER_TAGS) / _GIB,
                         "model_GiB_per_rank": sum(v for k, v in h["bytes"].items()
                                                   if k not in OPTIMIZER_TAGS and k != "total") / _GIB,
                         "state_GiB_per_rank": max(h["state_bytes_per_rank"]) / _GIB,
                         "ns_TFLOP_per_rank": h["ns_flops_max"] / 1e12})
    return rows
