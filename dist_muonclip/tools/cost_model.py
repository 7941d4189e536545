"""Analytic cost model of one optimizer step per rank: bytes on the wire, optimizer-state bytes,
Newton-Schulz FLOPs and an estimated step time, for any architecture, world size and engine.

The byte and state formulas mirror what the engines do (``dist_muonclip.optimizer`` with its
plan from :func:`~dist_muonclip.plan.build_plan`, DDP, DeepSpeed ZeRO-1 and its built-in Muon; at
ZeRO-3 DeepSpeed's own traffic and its Muon from :mod:`~dist_muonclip.tools.cost_model_zero3`),
using the byte model of :mod:`dist_muonclip.comm` (all-reduce ``2 (W-1)/W N``, reduce-scatter /
all-gather ``(W-1)/W N``, all-to-all: bytes addressed to other ranks, reduce: ``N`` from every
non-root, broadcast: ``(W-1) N`` from the root). ``benchmarks/scaling.py`` measures the same quantities with the real
:class:`~dist_muonclip.comm.CommAccountant`; ``tests/test_cost_model.py`` checks the two agree.

Parameters come from a real model (:func:`specs_from_model`, exact) or from an HF-style config
(:func:`specs_from_config`: Llama / Mistral / Qwen2 / Qwen3 / DeepSeek-V3 MLA + MoE), so a 70B
model at W=1024 is priced without building it.

Engines (``engine=``):

=====================  =====================================================================
``muonclip_ddp``        DDP all-reduces fp32 grads; owners orthogonalize; updates all-gathered
                        (ns dtype); AdamW sharded by flat slices, slices all-gathered.
``muonclip_optimizer``  no DDP: grads reduced to the rank that needs them (Muon: owner, AdamW:
                        the holder of the flat slice), one reduce per destination and bucket.
``muonclip_zero1``      DeepSpeed ZeRO-1/2 flat fragments (dist_muonclip.deepspeed, two param
                        groups: Muon, AdamW): the engine all-reduces grads and all-gathers
                        partitions; only pieces of matrices cut by a partition boundary travel
                        to the matrix's holder and back.
``muonclip_zero0_bf16`` DeepSpeed ZeRO-0 with bf16 (master slices): the engine all-reduces bf16
                        grads; each rank updates its slice of the fp32 masters of each group;
                        cut-matrix pieces travel as above; one all-gather of the fp32 slices.
``muonclip_fsdp2``      FSDP2 row shards: block params all-gathered in forward and backward (the
                        root's once), grads
                        reduce-scattered; Muon pieces all-to-all'd to owners and back.
``muonclip_hsdp``       HSDP, ``replicas`` x ``W / replicas`` mesh (Replicate, Shard(0)): each replica
                        group is ``muonclip_fsdp2`` at ``W / replicas`` (Muon all-to-alls inside it),
                        the preflight over all W ranks, FSDP2's all-reduce of the gradient shards
                        across the replicas (``all_reduce[replicate]``, predicted, not measured).
``ds_muon_zero1``       DeepSpeed's built-in ``"type": "Muon"`` at ZeRO-1 (DeepSpeed 0.19.8, read
                        from its code and measured: gradients all-reduced, partitions all-gathered;
                        the Muon group sorted by size, and every matrix a rank's partition overlaps
                        orthogonalized whole on that rank, its whole momentum kept there).
``muonclip_zero3``      DeepSpeed ZeRO-3 (dist_muonclip.integrations.deepspeed_zero3): every
                        parameter cut in ``ceil(numel / W)`` pieces; owners by LPT (no rank holds
                        most of a matrix), expert stacks chunked along the cuts; pieces of every
                        matrix all-to-all'd to its owner and the update pieces back; DeepSpeed's
                        own ZeRO-3 traffic (:mod:`~dist_muonclip.tools.cost_model_zero3`: parameter
                        all-gathers, persistent ones after the step, gradient reduce-scatter, one
                        norm all-reduce per sub-group; measured).
``adamw_zero3``         DeepSpeed ZeRO-3 AdamW: the DeepSpeed traffic of ``muonclip_zero3``, Adam
                        moments on the padded partitions.
``ds_muon_zero3``       DeepSpeed's built-in ``"type": "Muon"`` at ZeRO-3 (``cost_model_zero3``):
                        gradients all-reduced, full gradients and momentum gathered per bucket,
                        matrices dealt round-robin, updates and momentums all-gathered per round.
``adamw_ddp``           torch AdamW under DDP (replicated state).
``adamw_zero1``         DeepSpeed ZeRO-1 AdamW (all-reduce grads, all-gather params: measured).
``adamw_fsdp2``         torch AdamW on FSDP2 row shards (the FSDP2 traffic of ``muonclip_fsdp2``).
=====================  =====================================================================

Collective names are those a wire-level count reports (:class:`dist_muonclip.profiler.WireCounter`):
MuonClip's own collectives carry their tag (``all_to_all[muon_to_owner]``), the engine's (DDP,
FSDP2, DeepSpeed) are bare kinds (``all_reduce``, ``all_gather``, ``reduce_scatter``,
``broadcast``: DDP broadcasts the module's buffers from rank 0 at every forward, ``buffer_bytes``).

Step time: ``NS FLOPs of the busiest rank / NS rate + bytes / link bandwidth`` (no overlap
assumed), plus the elementwise optimizer update at HBM bandwidth. An estimate, not a bound: it
leaves out kernel launches, Python and the engines' own step costs. Measured on one H100
(benchmarks/results/multi_gpu_h100x1.json, 1.2B model, W=1, bf16): NS took 1.24x the predicted
time (the NS rate comes from one Llama-3-8B block's large matrices), the whole optimizer step
1.75x (DDP), 1.91x (optimizer-owned reduction), 2.24x (FSDP2), 2.84x / 3.24x (DeepSpeed ZeRO-1 /
2); AdamW's step 3.97x (DDP) and 9.2x (DeepSpeed ZeRO-1). Communication time is not validated
(no multi-GPU run yet). The ``h200`` row's NS rate and elementwise bandwidth are measured (see
HARDWARE): the single-process optimizer step is then predicted within 1.03x (MuonClip) and 1.00x
(fused AdamW). Each engine's own step work (DeepSpeed's gradient copies into its fp32 partitions and
the parameter copy back, DDP's and FSDP2's bookkeeping, torch's AdamW kernel choice) is the
``engine`` term: ``Hardware.engine_bytes_per_param`` extra elementwise bytes per local parameter,
fitted per engine on one H200 at W=1 (1.2B model; benchmarks/time_model.py,
benchmarks/results/multi_gpu_h200x1_time_model.json) and checked on a 2.0B model where it ran
(DeepSpeed ZeRO-1 AdamW: measured / predicted 0.84). Engines without a constant (ZeRO-3, HSDP,
tensor parallel) get no engine term.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from ..comm import bytes_sent
from ..newton_schulz import ns_flops
from ..plan import MatrixItem, build_plan, chunk_ranges, flat_partition, split_on_ranges, split_stacked
from .cost_model_zero3 import (deepspeed_traffic, ds_muon_zero3, sub_groups, zero3_held, zero3_options, zero3_padded,
                               zero3_ranges)

__all__ = ["ParamSpec", "Hardware", "HARDWARE", "ENGINES", "MIXED_BF16", "specs_from_model", "specs_from_config",
           "predict", "scaling_table", "format_table"]

ENGINES = ("muonclip_ddp", "muonclip_optimizer", "muonclip_zero1", "muonclip_zero0_bf16", "muonclip_fsdp2",
           "muonclip_hsdp", "muonclip_zero3", "ds_muon_zero1", "ds_muon_zero3", "adamw_ddp", "adamw_zero1",
           "adamw_fsdp2", "adamw_zero3")


_BLOCK_RE = __import__("re").compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.")


def _in_block(name: str) -> bool:
    """Whether a parameter lives in a repeated decoder block (an FSDP2 unit of its own)."""
    return bool(_BLOCK_RE.search(name))


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter: name, shape, whether Muon updates it, its matrix count/shape."""

    name: str
    shape: tuple[int, ...]
    use_muon: bool
    num_matrices: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def mn(self) -> tuple[int, int]:
        """(m, n) of each matrix (``num_matrices`` of them)."""
        if self.num_matrices > 1:
            return self.shape[-2], self.shape[-1]
        return self.shape[0], self.numel // self.shape[0]


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Numbers the time estimate uses.

    ``ns_tflops``: Newton-Schulz throughput in standard-convention FLOPs
    (:func:`~dist_muonclip.newton_schulz.ns_flops`) per second. ``intra_gbps``: per-rank bus
    bandwidth of a ring collective inside one node; ``inter_gbps``: across nodes (a ring spanning
    nodes runs at its slowest link); ``gpus_per_node``; ``hbm_gbps``: memory bandwidth.
    """

    name: str
    ns_tflops: float
    intra_gbps: float
    inter_gbps: float
    gpus_per_node: int = 8
    hbm_gbps: float = 3350.0
    #: cost-model engine -> extra elementwise bytes per local parameter of the engine's own step work
    engine_bytes_per_param: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def engine_time(self, engine: str, local_params: float) -> float:
        """Seconds of ``engine``'s own step work on ``local_params`` parameters (0 without a constant)."""
        return self.engine_bytes_per_param.get(engine, 0.0) * local_params / (self.hbm_gbps * 1e9)

    def link_gbps(self, world_size: int) -> float:
        return self.intra_gbps if world_size <= self.gpus_per_node else self.inter_gbps


#: Defaults. ns_tflops: measured on one H100 (benchmarks/results/ns_kernels.json, row
#: "llama3_8b_block": one Llama-3-8B block's 7 matrices, 20.81 standard TFLOP in 20.44 ms with the
#: Triton backend = 1018 "standard" TFLOP/s: the symmetric/Gram kernels do fewer real FLOPs than
#: the standard count; bf16 cuBLAS matmul ceiling measured 686 TFLOP/s). Bandwidths are
#: ASSUMPTIONS, not measured here: NVLink 4 is 450 GB/s per direction per GPU, NCCL ring bus
#: bandwidth reaches ~370 GB/s on 8xH100 (public nccl-tests); across nodes 8x400 Gb/s NDR
#: InfiniBand gives 50 GB/s per GPU, ~45 GB/s bus bandwidth. H200 (same links, assumed): both
#: compute constants MEASURED on one H200 (benchmarks/results/optimizer_step_h200.json, 1.135B
#: Llama-3-8B-shaped model): NS 83.2 standard TFLOP of its four buckets in 79.7 ms = 1045 TFLOP/s
#: (per shape: 14336x4096 1114, 4096x14336 1155, 4096x4096 836, 1024x4096 540); hbm_gbps is the
#: bandwidth elementwise optimizer passes reach, not the 4.8 TB/s peak: a fused AdamW step moves
#: 28 bytes per parameter (1.135e9) in 9.54 ms = 3330 GB/s. With them the single-process step is
#: predicted at 87.1 ms (MuonClip, measured 89.6: 1.03x) and 9.54 ms (fused AdamW, the calibration point).
#: Each engine's own step work on one H200 at W=1, as extra elementwise bytes per local parameter at
#: 3330 GB/s: fitted on the 1.2B "gpu-1b" model (benchmarks/time_model.py on
#: benchmarks/results/multi_gpu_h200x1.json; muonclip_zero1 from DeepSpeed ZeRO-1, whose ZeRO-2 run
#: it predicts at measured / predicted 0.94). bf16 parameters and gradients, fp32 state.
H200_ENGINE_BYTES_PER_PARAM = {"muonclip_ddp": 67.8, "muonclip_optimizer": 88.0, "muonclip_fsdp2": 89.2,
                               "muonclip_zero1": 290.0, "adamw_ddp": 61.9, "adamw_fsdp2": 63.0, "adamw_zero1": 175.4}
HARDWARE = {
    "h100": Hardware("H100 SXM (NS rate measured; links assumed)", 1018.0, 370.0, 45.0, 8, 3350.0),
    "h200": Hardware("H200 SXM (NS rate, elementwise bandwidth and engine step costs measured; links assumed)",
                     1045.0, 370.0, 45.0, 8, 3330.0, H200_ENGINE_BYTES_PER_PARAM),
    "h100_torch": Hardware("H100 SXM, torch eager NS (525 TFLOP/s measured)", 525.0, 370.0, 45.0, 8, 3350.0),
}


#: bf16 training: bf16 gradients and parameters on the wire, fp32 masters (sharded engines) and state.
MIXED_BF16 = dict(param_bytes=2, grad_bytes=2, ns_bytes=2, state_elem_bytes=4, master_bytes=4)


# ----------------------------------------------------------------------------------------- specs
def specs_from_model(model: Any, **split_kw: Any) -> list[ParamSpec]:
    """Exact specs of a built model, split Muon/AdamW exactly as ``MuonClip(model)`` does."""
    from ..param_split import matrix_shape, split_parameters

    out = []
    for info in split_parameters(model, **split_kw):
        shape = tuple(info.param.shape)
        b = matrix_shape(shape, info.view)[0] if info.use_muon else 1
        if info.use_muon and info.view == "flatten":
            shape = (shape[0], math.prod(shape[1:]))
        out.append(ParamSpec(info.name, shape, info.use_muon, b))
    return out


def specs_from_config(cfg: dict[str, Any]) -> list[ParamSpec]:
    """Parameter specs of an HF decoder config (dict), in HF's parameter order.

    Supports ``model_type`` llama / mistral / qwen2 (q/k/v biases) / qwen3 (q/k norms) and
    deepseek_v3 (MLA with q LoRA, MoE with shared experts, first ``first_k_dense_replace`` layers
    dense; routed experts as one ``[E, m, n]`` stack per projection, the router as a matrix).
    Embeddings, the LM head, norms and biases go to AdamW, every other matrix to Muon.
    """
    mt = cfg.get("model_type", "llama")
    h, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    inter = cfg["intermediate_size"]
    specs = [ParamSpec("model.embed_tokens.weight", (v, h), False)]

    def M(name: str, *shape: int, b: int = 1) -> None:
        specs.append(ParamSpec(name, tuple(shape), True, b))

    def A(name: str, *shape: int) -> None:
        specs.append(ParamSpec(name, tuple(shape), False))

    for i in range(n_layers):
        p = f"model.layers.{i}."
        if mt == "deepseek_v3":
            qr, kvr = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
            nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
            if qr:
                M(p + "self_attn.q_a_proj.weight", qr, h)
                A(p + "self_attn.q_a_layernorm.weight", qr)
                M(p + "self_attn.q_b_proj.weight", nh * (nope + rope), qr)
            else:
                M(p + "self_attn.q_proj.weight", nh * (nope + rope), h)
            M(p + "self_attn.kv_a_proj_with_mqa.weight", kvr + rope, h)
            A(p + "self_attn.kv_a_layernorm.weight", kvr)
            M(p + "self_attn.kv_b_proj.weight", nh * (nope + vd), kvr)
            M(p + "self_attn.o_proj.weight", h, nh * vd)
            if i < cfg.get("first_k_dense_replace", 0):
                M(p + "mlp.gate_proj.weight", inter, h)
                M(p + "mlp.up_proj.weight", inter, h)
                M(p + "mlp.down_proj.weight", h, inter)
            else:
                e, mi = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
                M(p + "mlp.gate.weight", e, h)
                M(p + "mlp.experts.gate_up_proj", e, 2 * mi, h, b=e)
                M(p + "mlp.experts.down_proj", e, h, mi, b=e)
                si = mi * cfg.get("n_shared_experts", 1)
                M(p + "mlp.shared_experts.gate_proj.weight", si, h)
                M(p + "mlp.shared_experts.up_proj.weight", si, h)
                M(p + "mlp.shared_experts.down_proj.weight", h, si)
        else:
            M(p + "self_attn.q_proj.weight", nh * hd, h)
            if mt == "qwen2":
                A(p + "self_attn.q_proj.bias", nh * hd)
            M(p + "self_attn.k_proj.weight", nkv * hd, h)
            if mt == "qwen2":
                A(p + "self_attn.k_proj.bias", nkv * hd)
            M(p + "self_attn.v_proj.weight", nkv * hd, h)
            if mt == "qwen2":
                A(p + "self_attn.v_proj.bias", nkv * hd)
            M(p + "self_attn.o_proj.weight", h, nh * hd)
            if mt == "qwen3":
                A(p + "self_attn.q_norm.weight", hd)
                A(p + "self_attn.k_norm.weight", hd)
            M(p + "mlp.gate_proj.weight", inter, h)
            M(p + "mlp.up_proj.weight", inter, h)
            M(p + "mlp.down_proj.weight", h, inter)
        A(p + "input_layernorm.weight", h)
        A(p + "post_attention_layernorm.weight", h)
    A("model.norm.weight", h)
    if not cfg.get("tie_word_embeddings", False):
        specs.append(ParamSpec("lm_head.weight", (v, h), False))
    return specs


# ----------------------------------------------------------------------------------------- model
def _plan(specs: Sequence[ParamSpec], world: int, ns_steps: int, *, split: bool = False):
    """The optimizer's plan; ``split``: stacked experts cut into chunks with owners of their own
    (what MuonClip does on the Replicated layout: DDP, optimizer-owned reduction, ZeRO-0)."""
    items = [MatrixItem(s.name, 0, s.num_matrices, *s.mn, "float32", ns_steps) for s in specs if s.use_muon]
    if split and world > 1:
        items = split_stacked(items, world)
    return build_plan(items, world)


def _sharded_plan(specs: Sequence[ParamSpec], world: int, ns_steps: int, ranges_of, *, pin_all: bool):
    """The optimizer's plan on a sharded layout: stacked parameters cut along the layout's ranges
    (``ranges_of(spec)``: per rank, flat ranges), chunks pinned to the rank holding most of them;
    whole matrices too with ``pin_all`` (layouts with an owner hint: DeepSpeed), else placed by
    LPT (FSDP2). Returns ``(plan, ranges by item name)``."""
    items, preferred, where = [], {}, {}
    for s in specs:
        if not s.use_muon:
            continue
        ranges = ranges_of(s)
        item = MatrixItem(s.name, 0, s.num_matrices, *s.mn, "float32", ns_steps)
        for it in split_on_ranges(item, ranges):
            rs = (chunk_ranges(it.start, it.start + it.num_matrices, it.m * it.n, ranges)
                  if it.parent is not None else ranges)
            if pin_all or it.parent is not None:
                sizes = [sum(b - a for a, b in r) for r in rs]
                preferred[it.name] = max(range(world), key=lambda r: (sizes[r], -r))
            where[it.name] = rs
            items.append(it)
    return build_plan(items, world, preferred), where


def _piece_bytes(plan: Any, where: dict[str, list[list[tuple[int, int]]]], world: int, grad_bytes: int,
                 ns_bytes: int) -> tuple[list[float], list[float]]:
    """Per rank, bytes of the sharded engine's two all-to-alls: pieces of matrices it holds but
    does not own go to the owner (gather: the momentum-updated pieces, ``grad_bytes`` = the
    optimizer state's element size), the owner sends the update pieces back (``ns_bytes``)."""
    gather, scatter = [0.0] * world, [0.0] * world
    for name, rs in where.items():
        sizes = [sum(b - a for a, b in x) for x in rs]
        o = plan.owners[name]
        scatter[o] += (sum(sizes) - sizes[o]) * ns_bytes
        for r, n in enumerate(sizes):
            if r != o and n:
                gather[r] += n * grad_bytes
    return gather, scatter


def _shard0_ranges(s: ParamSpec, world: int) -> list[list[tuple[int, int]]]:
    """FSDP2's Shard(0) rows (torch.chunk: ceil(rows / W) per rank) as flat ranges."""
    rows, row = s.shape[0], s.numel // s.shape[0]
    size = -(-rows // world)
    return [[(min(r * size, rows) * row, min((r + 1) * size, rows) * row)] for r in range(world)]


def _chunk_of(numels: Sequence[tuple[str, int]], world: int) -> tuple[int, list[int]]:
    """Equal flat slices (classic ZeRO-1): chunk size and the elements each rank really holds."""
    chunk, segs = flat_partition(list(numels), world)
    return chunk, [sum(s.stop - s.start for s in r) for r in segs]


def _preflight_bytes(specs: Sequence[ParamSpec], world: int, num_logits: int) -> float:
    """The packed all-reduce(MAX): error flag, has-grad + non-finite flags, max logits (fp32)."""
    n = 1 + 2 * len(specs) + num_logits
    return bytes_sent("all_reduce", n * 4, world)


def predict(specs: Sequence[ParamSpec], world_size: int, engine: str, *, rank: int | None = None,
            param_bytes: int = 4, grad_bytes: int = 4, ns_bytes: int = 2, ns_steps: int = 5,
            state_elem_bytes: int = 4, master_bytes: int = 0, buffer_bytes: int = 0,
            num_logits: int = 0, hardware: Hardware | str | None = None, replicas: int = 1,
            zero3: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-rank cost of one step of ``engine`` at ``world_size`` (see module doc).

    Returns ``bytes`` (dict by collective tag, and ``total``), ``state_bytes``, ``ns_flops`` for
    ``rank`` (default: the busiest rank; ``"max"``/``"mean"``/``"per_rank"`` summaries are always
    included) and, with ``hardware``, ``time_s`` (``ns``, ``comm``, ``update``, ``total``).
    ``num_logits``: layers x heads of the QK-Clip max-logit tensor (0 without QK-Clip).
    ``replicas``: ``muonclip_hsdp`` only, the replicate axis of the ``(replicas, W / replicas)``
    mesh (rank ``r`` has shard coordinate ``r % (W / replicas)``). ``zero3``: the ZeRO-3 engines'
    ``zero_optimization`` settings (persistence threshold, reuse distance, sub-group and bucket
    sizes; DeepSpeed's defaults otherwise: :data:`~dist_muonclip.tools.cost_model_zero3.ZERO3_DEFAULTS`).

    Dtypes (bytes per element): ``param_bytes`` of parameters on the wire (all-gathers),
    ``grad_bytes`` of gradients on the wire, ``ns_bytes`` of orthogonalized updates (the NS dtype),
    ``state_elem_bytes`` of momentum / Adam moments, ``master_bytes`` of an fp32 master copy that
    sharded mixed-precision engines keep of their local elements (0: fp32 training, as measured
    on CPU). Defaults describe fp32 training; :data:`MIXED_BF16` is bf16 training with fp32
    masters and state. ``buffer_bytes``: bytes of the module's buffers (e.g. RoPE ``inv_freq``),
    which DDP broadcasts at every forward (``broadcast_buffers=True``, its default): the DDP
    engines only.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is unknown; use one of {ENGINES}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    W = world_size
    if engine == "muonclip_hsdp":
        return _predict_hsdp(specs, W, replicas, rank=rank, hardware=hardware, num_logits=num_logits,
                             kw=dict(param_bytes=param_bytes, grad_bytes=grad_bytes, ns_bytes=ns_bytes,
                                     ns_steps=ns_steps, state_elem_bytes=state_elem_bytes,
                                     master_bytes=master_bytes))
    muon = [s for s in specs if s.use_muon]
    adamw = [s for s in specs if not s.use_muon]
    P = sum(s.numel for s in specs)
    P_muon = sum(s.numel for s in muon)
    P_blocks = sum(s.numel for s in specs if _in_block(s.name))
    per_rank: list[dict[str, float]] = [dict() for _ in range(W)]
    state = [0.0] * W
    flops = [0] * W
    runs = [0] * W          # matrices orthogonalized per rank per step

    if engine.startswith("muonclip"):
        if engine == "muonclip_fsdp2":
            plan, where = _sharded_plan(specs, W, ns_steps, lambda s_: _shard0_ranges(s_, W), pin_all=False)
            f_gather, f_scatter = _piece_bytes(plan, where, W, state_elem_bytes, ns_bytes)
        else:
            plan = _plan(specs, W, ns_steps, split=engine in ("muonclip_ddp", "muonclip_optimizer"))
        owned = [0] * W
        for item in plan.items:
            o = plan.owners[item.name]
            owned[o] += item.numel
            flops[o] += item.flops
            runs[o] += item.num_matrices
        chunk_a, held_a = _chunk_of([(s.name, s.numel) for s in adamw], W)
        for r in range(W):
            b = per_rank[r]
            if W > 1:
                b["all_reduce[preflight]"] = _preflight_bytes(specs, W, num_logits)
            if engine in ("muonclip_ddp", "muonclip_optimizer"):
                state[r] = owned[r] * state_elem_bytes + 2 * held_a[r] * state_elem_bytes
                if W > 1:
                    b["all_gather[muon_from_owner]"] = (W - 1) * owned[r] * ns_bytes
                    if adamw:
                        b["all_gather[adamw_gather]"] = (W - 1) * chunk_a * param_bytes
                if engine == "muonclip_ddp" and W > 1:
                    b["all_reduce"] = bytes_sent("all_reduce", P * grad_bytes, W)
                    if buffer_bytes:   # DDP's buffer broadcast from rank 0
                        b["broadcast"] = bytes_sent("broadcast", buffer_bytes, W, r, 0)
                elif W > 1:   # one reduce per owner / slice holder: every other rank sends its copy
                    b["reduce[grad_reduce]"] = (P_muon - owned[r] + (P - P_muon) - held_a[r]) * grad_bytes
            elif engine == "muonclip_fsdp2":   # row shards: matrices cut into W row blocks (1/W each)
                state[r] = (P_muon / W + 2 * (P - P_muon) / W) * state_elem_bytes + P / W * master_bytes
                if W > 1:
                    # momentum row blocks of the matrices others own travel there, updates come back;
                    # stacked experts are chunked along the shards and owned where they lie: nothing moves
                    b["all_to_all[muon_to_owner]"] = f_gather[r]
                    b["all_to_all[muon_from_owner]"] = f_scatter[r]
                    b["reduce_scatter"] = bytes_sent("reduce_scatter", P * grad_bytes, W)
                    # blocks are gathered in forward and again in backward; the root module
                    # (embeddings, final norm, head) stays unsharded between the two (FSDP2 does
                    # not reshard the root after forward), so it is gathered once (measured)
                    b["all_gather"] = bytes_sent("all_gather", (2 * P_blocks + (P - P_blocks)) * param_bytes, W)
        if engine in ("muonclip_zero1", "muonclip_zero0_bf16"):
            # DeepSpeed ZeRO-1/2 flat partitions, one per param group (dist_muonclip.deepspeed hands
            # DeepSpeed two: the Muon matrices and the AdamW parameters): the engine all-reduces
            # gradients and all-gathers each group's partitions (as adamw_zero1, measured); a matrix
            # is orthogonalized by the rank holding most of it (the layout's owner hint), so only
            # pieces of matrices cut by a partition boundary travel (momentum there, update back).
            # Stacked experts are cut along the partitions, whole experts owned where they lie.
            # Every rank holds 1/W of each group: balanced state. The price: NS load follows the
            # partitions (less balanced than LPT).
            held = {"muon": [0] * W, "adamw": [0] * W}
            muon_ranges: dict[str, list[list[tuple[int, int]]]] = {s_.name: [[] for _ in range(W)] for s_ in muon}
            for kind, group in (("muon", muon), ("adamw", adamw)):
                if not group:
                    continue
                chunk, segs = flat_partition([(s_.name, s_.numel) for s_ in group], W)
                for r, rs in enumerate(segs):
                    for seg in rs:
                        held[kind][r] += seg.stop - seg.start
                        if kind == "muon":
                            muon_ranges[seg.name][r].append((seg.start, seg.stop))
                    if W > 1:
                        b = per_rank[r]
                        if engine == "muonclip_zero1":   # DeepSpeed gathers the updated bit16 partitions
                            b["all_gather"] = b.get("all_gather", 0.0) + (W - 1) * chunk * param_bytes
                        else:                            # MasterSliceLayout: one all-gather of fp32 slices
                            b["all_gather[master_gather]"] = (b.get("all_gather[master_gather]", 0.0)
                                                              + (W - 1) * chunk * 4)
            # owners: the holder of most of each matrix or expert chunk (see above)
            zplan, where = _sharded_plan(muon, W, ns_steps, lambda s_: muon_ranges[s_.name], pin_all=True)
            flops, runs = [0] * W, [0] * W
            for item in zplan.items:
                flops[zplan.owners[item.name]] += item.flops
                runs[zplan.owners[item.name]] += item.num_matrices
            z_gather, z_scatter = _piece_bytes(zplan, where, W, state_elem_bytes, ns_bytes)
            for r in range(W):
                state[r] = (held["muon"][r] + 2 * held["adamw"][r]) * state_elem_bytes
                # fp32 masters: ZeRO-1/2 keep this rank's partitions, ZeRO-0 a full copy on every rank
                state[r] += (held["muon"][r] + held["adamw"][r] if engine == "muonclip_zero1" else P) * master_bytes
                if W == 1:
                    continue
                b = per_rank[r]
                b["all_reduce"] = bytes_sent("all_reduce", P * grad_bytes, W)
                b["all_to_all[muon_to_owner]"] = z_gather[r]
                b["all_to_all[muon_from_owner]"] = z_scatter[r]
        if engine == "muonclip_zero3":
            zplan, where = _sharded_plan(muon, W, ns_steps, lambda s_: zero3_ranges(s_.numel, W), pin_all=False)
            flops, runs = [0] * W, [0] * W
            for item in zplan.items:
                flops[zplan.owners[item.name]] += item.flops
                runs[zplan.owners[item.name]] += item.num_matrices
            z_gather, z_scatter = _piece_bytes(zplan, where, W, state_elem_bytes, ns_bytes)
            h_m, h_a = zero3_held(muon, W), zero3_held(adamw, W)
            # DeepSpeed's own traffic (cost_model_zero3); two param groups, Muon and AdamW
            opts = zero3_options(zero3)
            n_sub = sum(len(sub_groups(g, W, opts["sub_group_size"])) for g in (muon, adamw))
            ds = deepspeed_traffic(specs, W, param_bytes=param_bytes, grad_bytes=grad_bytes, opts=opts,
                                   num_sub_groups=n_sub, reduce_scatter=bool(opts["reduce_scatter"]))
            for r in range(W):
                # MuonClip's state on the elements each rank holds; DeepSpeed's fp32 masters padded
                state[r] = (h_m[r] + 2 * h_a[r]) * state_elem_bytes + zero3_padded(specs, W) * master_bytes
                if W > 1:
                    b = per_rank[r]
                    b["all_to_all[muon_to_owner]"] = z_gather[r]
                    b["all_to_all[muon_from_owner]"] = z_scatter[r]
                    b.update(ds)
    elif engine == "adamw_zero3":
        # DeepSpeed's AdamW on its padded flat partitions (one param group: one sub-group per sub_group_size)
        opts = zero3_options(zero3)
        ds = deepspeed_traffic(specs, W, param_bytes=param_bytes, grad_bytes=grad_bytes, opts=opts,
                               num_sub_groups=len(sub_groups(specs, W, opts["sub_group_size"])),
                               reduce_scatter=bool(opts["reduce_scatter"]))
        for r in range(W):
            state[r] = zero3_padded(specs, W) * (2 * state_elem_bytes + master_bytes)
            per_rank[r].update(ds)
    elif engine == "ds_muon_zero3":
        z = ds_muon_zero3(specs, W, param_bytes=param_bytes, grad_bytes=grad_bytes, state_elem_bytes=state_elem_bytes,
                          master_bytes=master_bytes, ns_steps=ns_steps, zero3=zero3)
        per_rank, state, flops, runs = z["bytes"], z["state"], z["flops"], z["runs"]
    elif engine == "adamw_ddp":
        for r in range(W):
            state[r] = 2 * P * state_elem_bytes
            if W > 1:
                per_rank[r]["all_reduce"] = bytes_sent("all_reduce", P * grad_bytes, W)
                if buffer_bytes:   # DDP's buffer broadcast from rank 0
                    per_rank[r]["broadcast"] = bytes_sent("broadcast", buffer_bytes, W, r, 0)
    elif engine == "adamw_fsdp2":
        # the FSDP2 traffic of muonclip_fsdp2; Adam moments of this rank's rows (exact uneven shards)
        for r in range(W):
            held = sum(b_ - a_ for s_ in specs for a_, b_ in _shard0_ranges(s_, W)[r])
            state[r] = 2 * held * state_elem_bytes + held * master_bytes
            if W > 1:
                per_rank[r]["reduce_scatter"] = bytes_sent("reduce_scatter", P * grad_bytes, W)
                per_rank[r]["all_gather"] = bytes_sent("all_gather", (2 * P_blocks + (P - P_blocks)) * param_bytes, W)
    elif engine in ("adamw_zero1", "ds_muon_zero1"):
        # Measured on DeepSpeed 0.19.8 (benchmarks/results/scaling_*.json): at ZeRO stage 1 the
        # engine all-reduces the full gradient buffer, each rank updates its flat partition of
        # every param group (Muon: two groups, the Muon half and the Adam half) and the updated
        # partitions are all-gathered. Its Muon orthogonalizes every matrix its partition overlaps
        # (stage_1_and_2.get_flat_partition runs muon_update on each tensor of the partition's
        # list): a matrix cut by a partition boundary is orthogonalized on every rank holding a
        # piece (measured: 16 runs for 14 matrices, ds_muon_compare_cpu.json, W=4).
        # DeepSpeed's Muon (MuonWithAuxAdam) sorts its Muon group by size, largest first (stable),
        # before ZeRO flattens and partitions it
        groups = [specs] if engine == "adamw_zero1" else [sorted(muon, key=lambda s_: tuple(s_.shape), reverse=True),
                                                           adamw]
        for r in range(W):
            if W > 1:
                per_rank[r]["all_reduce"] = bytes_sent("all_reduce", P * grad_bytes, W)
        for gi, group in enumerate(groups):
            if not group:
                continue
            chunk, segs = flat_partition([(s.name, s.numel) for s in group], W)
            is_muon = engine == "ds_muon_zero1" and gi == 0
            for r in range(W):
                held = sum(seg.stop - seg.start for seg in segs[r])
                if W > 1:
                    b = per_rank[r]
                    b["all_gather"] = b.get("all_gather", 0.0) + (W - 1) * chunk * param_bytes
                if is_muon:
                    # one flat momentum buffer holding every matrix the partition overlaps in full
                    # (stage_1_and_2._muon_momentum_buffer: each is orthogonalized whole), in the
                    # gradient's dtype (bf16 under bf16 training: measured, multi_gpu_cpu_dryrun.json)
                    by_name = {s.name: s for s in group}
                    overlapped = list(dict.fromkeys(seg.name for seg in segs[r]))
                    state[r] += sum(by_name[n].numel for n in overlapped) * grad_bytes + held * master_bytes
                    for name in overlapped:
                        flops[r] += by_name[name].num_matrices * ns_flops(*by_name[name].mn, ns_steps)
                        runs[r] += by_name[name].num_matrices
                else:
                    state[r] += held * (2 * state_elem_bytes + master_bytes)   # exp_avg, exp_avg_sq
    out_rank = max(range(W), key=lambda r: (flops[r], -r)) if rank is None else rank
    for b in per_rank:
        b["total"] = sum(v for k, v in b.items() if k != "total")
    res: dict[str, Any] = {
        "engine": engine, "world_size": W, "rank": out_rank, "num_params": P, "num_muon_params": P_muon,
        "bytes": per_rank[out_rank], "bytes_per_rank": [b["total"] for b in per_rank],
        "state_bytes": state[out_rank], "state_bytes_per_rank": state,
        "ns_flops": flops[out_rank], "ns_flops_per_rank": flops, "ns_flops_total": sum(flops),
        "ns_flops_max": max(flops), "ns_matrices_per_rank": runs,
        "ns_matrices_total": (sum(s.num_matrices for s in muon) if engine.startswith("muonclip") else None),
    }
    if hardware is not None:
        hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
        t_ns = max(flops) / (hw.ns_tflops * 1e12)
        t_comm = max(b["total"] for b in per_rank) / (hw.link_gbps(W) * 1e9)
        # elementwise update: read+write param, grad read, state read+write (bytes of the local elements)
        local = P if engine.endswith("ddp") else P / W
        t_upd = (local * (2 * param_bytes + grad_bytes) + 2 * max(state)) / (hw.hbm_gbps * 1e9)
        t_eng = hw.engine_time(engine, local)
        res["time_s"] = {"ns": t_ns, "comm": t_comm, "update": t_upd, "engine": t_eng,
                         "total": t_ns + t_comm + t_upd + t_eng,
                         "hardware": hw.name}
    return res


def _predict_hsdp(specs: Sequence[ParamSpec], W: int, R: int, *, rank: int | None, hardware: Any,
                  num_logits: int, kw: dict[str, Any]) -> dict[str, Any]:
    """``muonclip_hsdp`` (module doc): every replica group repeats ``muonclip_fsdp2`` at ``W / R``."""
    if not isinstance(R, int) or R < 1 or W % R:
        raise ValueError(f"replicas={R!r} must be a positive int dividing world_size={W}")
    S = W // R
    shard = [predict(specs, S, "muonclip_fsdp2", rank=s, num_logits=num_logits, **kw) for s in range(S)]
    P = shard[0]["num_params"]
    per_rank, state, flops, runs = [], [], [], []
    for r in range(W):
        base = shard[r % S]
        b = {k: v for k, v in base["bytes"].items() if k not in ("total", "all_reduce[preflight]")}
        if W > 1:
            b["all_reduce[preflight]"] = _preflight_bytes(specs, W, num_logits)
        # this rank's rows (exact uneven shards): momentum for Muon rows, two Adam moments otherwise
        held = {u: sum(b_ - a_ for s_ in specs if s_.use_muon == u for a_, b_ in _shard0_ranges(s_, S)[r % S])
                for u in (True, False)}
        if R > 1:    # FSDP2 all-reduces this rank's reduce-scattered gradient rows across the replicas
            b["all_reduce[replicate]"] = bytes_sent("all_reduce", (held[True] + held[False]) * kw["grad_bytes"], R)
        b["total"] = sum(b.values())
        per_rank.append(b)
        state.append((held[True] + 2 * held[False]) * kw["state_elem_bytes"]
                     + (held[True] + held[False]) * kw["master_bytes"])
        flops.append(base["ns_flops"])
        runs.append(base["ns_matrices_per_rank"][r % S])
    out_rank = max(range(W), key=lambda r: (flops[r], -r)) if rank is None else rank
    res: dict[str, Any] = {
        "engine": "muonclip_hsdp", "world_size": W, "replicas": R, "rank": out_rank, "num_params": P,
        "num_muon_params": shard[0]["num_muon_params"], "bytes": per_rank[out_rank],
        "bytes_per_rank": [b["total"] for b in per_rank], "state_bytes": state[out_rank],
        "state_bytes_per_rank": state, "ns_flops": flops[out_rank], "ns_flops_per_rank": flops,
        "ns_flops_total": sum(flops), "ns_flops_max": max(flops), "ns_matrices_per_rank": runs,
        "ns_matrices_total": R * shard[0]["ns_matrices_total"],
    }
    if hardware is not None:
        hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
        t_ns = max(flops) / (hw.ns_tflops * 1e12)
        t_comm = max(b["total"] for b in per_rank) / (hw.link_gbps(W) * 1e9)
        t_upd = (P / S * (2 * kw["param_bytes"] + kw["grad_bytes"]) + 2 * max(state)) / (hw.hbm_gbps * 1e9)
        res["time_s"] = {"ns": t_ns, "comm": t_comm, "update": t_upd, "total": t_ns + t_comm + t_upd,
                         "hardware": hw.name}
    return res


def scaling_table(cfg_or_specs: Any, worlds: Sequence[int], engines: Sequence[str] = ("muonclip_zero1", "adamw_zero1"),
                  hardware: str = "h100", **kw: Any) -> list[dict[str, Any]]:
    """Rows of predictions per (world size, engine) for a config dict or spec list.
    ``kw`` goes to :func:`predict` (default dtypes: :data:`MIXED_BF16`)."""
    kw = {**MIXED_BF16, **kw}
    specs = specs_from_config(cfg_or_specs) if isinstance(cfg_or_specs, dict) else list(cfg_or_specs)
    rows = []
    for w in worlds:
        for e in engines:
            p = predict(specs, w, e, hardware=hardware, **kw)
            rows.append({"world_size": w, "engine": e, "num_params": p["num_params"],
                         "ns_ms_per_rank": p["time_s"]["ns"] * 1e3, "bytes_per_rank_GB": p["bytes"]["total"] / 1e9,
                         "state_GB_per_rank": max(p["state_bytes_per_rank"]) / 1e9,
                         "comm_ms": p["time_s"]["comm"] * 1e3, "step_ms": p["time_s"]["total"] * 1e3})
    return rows


def format_table(rows: Sequence[dict[str, Any]], baseline: str = "adamw_zero1") -> str:
    """Markdown table. ``comm+opt ms``: gradient/parameter/update communication plus the optimizer
    update (no forward/backward compute, no overlap); ``overhead``: that minus ``baseline``'s."""
    base = {r["world_size"]: r["step_ms"] for r in rows if r["engine"] == baseline}
    lines = ["| W | engine | NS ms/rank | GB sent/rank | state GB/rank | comm ms | comm+opt ms | overhead vs "
             f"{baseline} ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = r["step_ms"] - base[r["world_size"]] if r["world_size"] in base else float("nan")
        lines.append(f"| {r['world_size']} | {r['engine']} | {r['ns_ms_per_rank']:.2f} | {r['bytes_per_rank_GB']:.3f} | "
                     f"{r['state_GB_per_rank']:.2f} | {r['comm_ms']:.1f} | {r['step_ms']:.1f} | {over:+.1f} |")
    return "\n".join(lines)
