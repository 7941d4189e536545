#!/usr/bin/env python
"""Memory and communication scaling, measured: MuonClip (every engine) vs DeepSpeed's built-in
Muon and AdamW, for a model-size ladder and world sizes W on CPU over gloo (or GPUs over NCCL).

    python benchmarks/scaling.py --quick                # CI: 2 sizes, W in {1, 2, 4}, 3 steps
    python benchmarks/scaling.py --sizes tiny small medium --worlds 1 2 4 --steps 4
    python benchmarks/scaling.py --sizes tiny small medium --worlds 1 2 3 4 --steps 3 --no-isolate \
        --engines muonclip_ds_zero3 adamw_ds_zero3 ds_muon_zero3 --tag zero3     # DeepSpeed ZeRO-3

ZeRO-3 engines (not in ``--quick``): MuonClip through ``dist_muonclip.deepspeed`` at stage 3,
DeepSpeed's own AdamW (``torch_adam``) and its built-in Muon (``"reduce_scatter": false``, which it
requires), with ``stage3_param_persistence_threshold`` = :data:`ZERO3_PERSISTENCE` (``--zero3
KEY=N`` adds ``zero_optimization`` settings; each row records the section it ran with).

Per run and rank it records (the first step is warm-up; numbers are from the last step):

* bytes on the wire per collective kind, for every engine alike: the library profiler's
  :class:`~dist_muonclip.profiler.WireCounter` (every collective of the process, counted at the
  dispatcher: DDP's reducer, FSDP2, DeepSpeed and MuonClip; byte model of ``dist_muonclip.comm``;
  MuonClip's own collectives carry their tags). A step's bytes are those issued between the end
  of the previous optimizer step and the end of this one.
* NS FLOPs actually done on this rank: a counter wrapped around the orthogonalization function
  (``dist_muonclip.ns_split.orthogonalize``; DeepSpeed's ``original_muon.muon_update``), summed
  with :func:`dist_muonclip.newton_schulz.ns_flops` per matrix: redundant orthogonalization shows.
* optimizer-state bytes (distinct storages of the optimizer's state tensors); memory from the
  profiler (``dist_muonclip.profiler``: per-window peaks, the optimizer step's temporaries): on GPU
  ``torch.cuda`` allocator numbers; on CPU the resident set with its high-water mark reset at
  the start of each engine run and of each window (``/proc/self/clear_refs``), so each engine's
  ``peak_bytes`` is its own; ``peak_rss_rise_bytes`` is that peak minus the RSS when the engine's
  run began (before its model was built). By default every (engine, size) runs in fresh
  processes (``--isolate``; ``--quick`` shares one process group per W to stay within CI time,
  where RSS rises are lower bounds: memory freed by an earlier engine is reused); step time
  split into forward+backward and optimizer step (median; on GPU after
  ``torch.cuda.synchronize``; noisy on a shared CPU: bytes, state and FLOPs are the deterministic
  primary measures), and for MuonClip engines the profiler's per-phase times (CUDA events on GPU).

Device and precision (``--backend nccl``: rank r on ``cuda:r``; ``--precision bf16``; weak scaling
with ``--micro-batch``/``--seq``): see :data:`DEFAULT_OPTIONS`. ``benchmarks/multi_gpu.py`` drives
this module on GPUs.

Mesh engines (at W a multiple of 2 above 1): ``muonclip_hsdp`` (HSDP on a ``(2, W/2)`` mesh) and
``muonclip_fsdp_tp`` (FSDP2 x tensor parallel on ``(W/2, 2)``, Megatron-style plan; docs/meshes.md),
``adamw_fsdp_tp`` (torch AdamW on the same model).

Engines whose integration module does not import yet are skipped with the reason in the JSON.
Writes ``benchmarks/results/scaling_<tag>.json`` and three PNG plots.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = ["SIZES", "GPU_SIZES", "ENGINES", "MESH_ENGINES", "ZERO3_ENGINES", "DEFAULT_OPTIONS", "mesh_applies",
           "run_engine", "run_world", "main"]

# Llama-style ladder (byte vocabulary 256, GQA 2:1). Parameter counts in the JSON.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "medium": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2),
    "large": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
    "xl": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8),
    # GPU sizes (benchmarks/multi_gpu.py): Llama-style, head_dim 128, GQA 4:1, a 32k vocabulary
    # (the batches still draw ids below 256). ~1.2B and ~2.0B parameters.
    "gpu-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "gpu-2b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=28, num_attention_heads=20,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
}
GPU_SIZES = ("gpu-1b", "gpu-2b")
GLOBAL_BATCH, SEQ = 8, 32


def model_config(size: str) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": 256, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "attention_bias": False, **SIZES[size]}


# ----------------------------------------------------------------------------------------- counters
class NSCounter:
    """Wraps an orthogonalization entry point and sums NS FLOPs of the matrices it is given."""

    def __init__(self, ns_steps: int = 5) -> None:
        self.flops = 0
        self.matrices = 0
        self.ns_steps = ns_steps
        self._saved: list[tuple[Any, str, Any]] = []

    def add(self, shape: tuple[int, ...]) -> None:
        from dist_muonclip.newton_schulz import ns_flops

        b = 1
        for d in shape[:-2]:
            b *= d
        self.matrices += b
        self.flops += b * ns_flops(shape[-2], shape[-1], self.ns_steps)

    def patch(self, module: Any, name: str) -> "NSCounter":
        orig = getattr(module, name)

        def counted(x: Any, *args: Any, **kw: Any) -> Any:
            self.add(tuple(x.shape))
            return orig(x, *args, **kw)

        self._saved.append((module, name, orig))
        setattr(module, name, counted)
        return self

    def remove(self) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()


# ----------------------------------------------------------------------------------------- engines
#: How a run is set up (``run_engine(..., opts=)``); the defaults are the CPU benchmark's:
#: ``device`` "cpu" or "cuda" (this rank's GPU, ``cuda:LOCAL_RANK``); ``precision`` "fp32" or "bf16"
#: (DDP-style engines: fp32 parameters + ``torch.autocast`` bf16; DeepSpeed: ``"bf16": {"enabled":
#: true}`` with fp32 masters; FSDP2: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``);
#: ``micro_batch``/``seq``: per-rank batch (weak scaling; ``None``: GLOBAL_BATCH split over the
#: ranks, strong scaling); ``attn``: the HF attention implementation; ``pg_timeout_s``: the process
#: group timeout (None: torch's default; NCCL aborts a rank stuck that long in a collective);
#: ``zero3``: extra ``zero_optimization`` keys of the ZeRO-3 runs (e.g. ``stage3_max_reuse_distance``).
DEFAULT_OPTIONS: dict[str, Any] = {"device": "cpu", "precision": "fp32", "micro_batch": None, "seq": None,
                                   "attn": "eager", "pg_timeout_s": None, "zero3": None}


def _batch(step: int, rank: int, world: int):
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=g)
    per = GLOBAL_BATCH // world
    return ids[rank * per:(rank + 1) * per]


class _Run:
    """One run's device, precision, batches and timing. On GPU every timestamp is taken after
    ``torch.cuda.synchronize`` (so a time covers the kernels it launched, not just their launch);
    forward+backward and the optimizer step are timed separately and together."""

    def __init__(self, rank: int, world: int, opts: dict[str, Any] | None = None) -> None:
        import torch

        self.rank, self.world = rank, world
        # which batch this rank trains on: its data-parallel coordinate (tensor-parallel ranks of one
        # dp coordinate share a batch: benchmarks/scaling.py's FSDP x TP runs set these)
        self.data_rank, self.data_world = rank, world
        self.opts = {**DEFAULT_OPTIONS, **(opts or {})}
        if self.opts["precision"] not in ("fp32", "bf16"):
            raise ValueError(f"precision={self.opts['precision']!r}: use 'fp32' or 'bf16'")
        self.cuda = self.opts["device"] == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.bf16 = self.opts["precision"] == "bf16"
        self.ns_backend = "auto" if self.cuda else "torch"    # Triton NS on GPU, torch on CPU
        self.fwd_bwd_s: list[float] = []
        self.opt_s: list[float] = []
        self.step_s: list[float] = []
        self.peak_bytes = 0
        self.start_bytes = 0
        self.peak_kind = "cuda_allocated" if self.cuda else "rss_per_window"

    @property
    def micro_batch(self) -> int:
        return self.opts["micro_batch"] or GLOBAL_BATCH // self.data_world

    def batch(self, step: int):
        import torch

        if self.opts["micro_batch"] is None:
            ids = _batch(step, self.data_rank, self.data_world)
        else:     # weak scaling: every rank its own micro-batch
            g = torch.Generator().manual_seed(1000 + 1009 * step + self.data_rank)
            ids = torch.randint(0, 256, (self.opts["micro_batch"], self.opts["seq"] or SEQ), generator=g)
        return ids.to(self.device)

    def autocast(self) -> Any:
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def ddp_kwargs(self) -> dict[str, Any]:
        return {"device_ids": [self.device.index]} if self.cuda else {}

    def start_memory(self) -> None:
        """Start this engine's memory measurement: reset the peak, note what is in use now."""
        import torch

        from dist_muonclip.profiler import reset_rss_peak, rss_status

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes, self.peak_kind = int(torch.cuda.memory_allocated(self.device)), "cuda_allocated"
        else:
            per_window = reset_rss_peak()
            st = rss_status()
            self.start_bytes = st[0] if st else 0
            self.peak_kind = "rss_per_window" if per_window else "rss_lifetime"

    def window_peak(self) -> int:
        """The peak since :meth:`start_memory` (on GPU the profiler's windows are read in :meth:`now`)."""
        import torch

        from dist_muonclip.profiler import rss_hwm_bytes, rss_status

        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        st = rss_status()
        return st[1] if st and self.peak_kind == "rss_per_window" else rss_hwm_bytes()

    def now(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            # the profiler resets CUDA's peak counter at each window; its records hold each
            # window's peak (see _measure), this reading covers what runs after the last one
            self.peak_bytes = max(self.peak_bytes, int(torch.cuda.max_memory_allocated(self.device)))
        return time.perf_counter()

    def timed(self, fwd_bwd: Callable[[], None], opt_step: Callable[[], None]) -> None:
        t0 = self.now()
        fwd_bwd()
        t1 = self.now()
        opt_step()
        t2 = self.now()
        self.fwd_bwd_s.append(t1 - t0)
        self.opt_s.append(t2 - t1)
        self.step_s.append(t2 - t0)

    def times(self) -> dict[str, Any]:
        return {"step_times_s": self.step_s, "fwd_bwd_times_s": self.fwd_bwd_s, "opt_times_s": self.opt_s}


def _state_bytes(state: Any) -> int:
    import torch

    from dist_muonclip.profiler import storage_bytes

    # tensor state only: per-parameter scalar step counters (ndim 0) are left out
    return storage_bytes(t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.ndim > 0)


def _phase_medians(records: list[dict[str, Any]]) -> dict[str, float]:
    """Median per phase over the profiler's records after the first (warm-up) step."""
    recs = records[1:] or records
    names = dict.fromkeys(k for r in recs for k in r.get("phases_s", {}))
    return {k: statistics.median(r.get("phases_s", {}).get(k, 0.0) for r in recs) for k in names}


def _measure(run: _Run, model: Any, opt: Any, steps: int, fwd_bwd: Callable[[Any], None],
             opt_step: Callable[[], None], ns: NSCounter, ns_patch: tuple[Any, str] | None,
             engine_step: bool = False) -> dict[str, Any]:
    """Run ``steps`` training steps under the library profiler (wire-level bytes of every
    collective, memory windows, MuonClip's phases) with ``ns`` counting NS FLOPs; returns the
    last step's numbers. ``opt``: the torch optimizer whose ``step()`` the engine calls (for
    DeepSpeed, the inner one); ``engine_step``: ``opt_step`` is an engine step that may call
    ``opt.step()`` several times and communicate after it (the profiler steps manually)."""
    from dist_muonclip.profiler import StepProfiler

    init_peak = run.window_peak()                 # model build and engine set-up, before the first window
    prof = StepProfiler(None, model=model, print_summary=False, device=run.device,
                        manual_step=engine_step).attach(opt)
    if engine_step:
        inner_step = opt_step

        def opt_step() -> None:
            inner_step()
            prof.step()

    if ns_patch is not None:
        ns.patch(*ns_patch)
    flops = []
    try:
        for t in range(steps):
            ids = run.batch(t)
            before = ns.flops
            run.timed(lambda: fwd_bwd(ids), opt_step)
            flops.append(ns.flops - before)
    finally:
        ns.remove()
        prof.close()
    last = prof.records[-1]
    # the profiler's windows (forward+backward, step; each peak read before its counter is reset)
    # cover the run after set-up
    run.peak_bytes = max([run.peak_bytes, init_peak] + [r["memory"]["peak"] for r in prof.records])
    out = {"comm": last["comm"], "bytes": last["comm_bytes"], "comm_counted": last["comm_counted"],
           "ns_flops": flops[-1], "ns_matrices": ns.matrices // steps,
           "state_bytes": _state_bytes(opt.state), "memory": last["memory"], **run.times()}
    if prof.records[-1].get("phases_s"):
        out.update(phases_s=last["phases_s"], phases_s_median=_phase_medians(prof.records))
    if hasattr(opt, "plan"):
        out["ns_flops_plan"] = last["ns_flops"]
    return out


def _measure_replicated(run: _Run, model: Any, opt: Any, steps: int, ns: NSCounter,
                        ns_patch: tuple[Any, str] | None, *, ddp: bool) -> dict[str, Any]:
    """:func:`_measure` of a replicated model stepped by a plain torch optimizer, wrapped in DDP
    when ``ddp`` and W > 1."""
    from torch import nn

    fwd = nn.parallel.DistributedDataParallel(model, **run.ddp_kwargs()) if ddp and run.world > 1 else model

    def fwd_bwd(ids: Any) -> None:
        with run.autocast():
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _measure(run, model, opt, steps, fwd_bwd, opt_step, ns, ns_patch)


def _run_muonclip(model: Any, run: _Run, steps: int, mode: str, ns: NSCounter) -> dict[str, Any]:
    """MuonClip on replicated parameters: under DDP (DDP all-reduces; its C++ reducer's
    collectives are counted at the dispatcher like any other) or with optimizer-owned reduction."""
    import dist_muonclip.ns_split as opt_mod
    from dist_muonclip import MuonClip

    opt = MuonClip(model, lr=0.01, adamw_lr=0.003, ns_backend=run.ns_backend, qk_clip={"tau": 100.0},
                   grad_reduction="external" if mode == "ddp" else "optimizer")
    return _measure_replicated(run, model, opt, steps, ns, (opt_mod, "orthogonalize"), ddp=mode == "ddp")


#: ZeRO-3 runs: parameters of at most this many elements stay gathered (DeepSpeed's
#: ``stage3_param_persistence_threshold``; its default 1e5 would keep every matrix of the CPU
#: ladder whole, so the ladder uses a threshold that keeps only the norm weights whole, as a
#: Llama-3-8B keeps its 4096-element norms under the default).
ZERO3_PERSISTENCE = 1024


def _ds_config(run: _Run, opt_type: str, stage: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
    if params is None:
        params = {"lr": 0.003, "torch_adam": True, "weight_decay": 0.1}
        if opt_type == "Muon":
            params.update(momentum=0.95, ns_method="standard")
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = ZERO3_PERSISTENCE
        zero.update(run.opts.get("zero3") or {})
        if "reduce_scatter" in zero:
            zero["reduce_scatter"] = bool(zero["reduce_scatter"])
        if opt_type == "Muon":      # DeepSpeed refuses Muon with reduce_scatter (stage3.py)
            zero["reduce_scatter"] = False
    cfg = {"train_batch_size": run.micro_batch * run.world, "train_micro_batch_size_per_gpu": run.micro_batch,
           "gradient_accumulation_steps": 1, "optimizer": {"type": opt_type, "params": params},
           "zero_optimization": zero, "steps_per_print": 10 ** 9}
    if run.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _run_deepspeed(model: Any, run: _Run, steps: int, opt_type: str, stage: int, ns: NSCounter) -> dict[str, Any]:
    """DeepSpeed's own optimizers (torch AdamW, built-in Muon) at ZeRO ``stage``; the profiler
    sits on the torch optimizer DeepSpeed steps inside its ZeRO wrapper."""
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None   # no 30 s shm op compile
    from deepspeed.runtime.zero.muon import original_muon as om

    from dist_muonclip.param_split import split_parameters

    muon = {i.name for i in split_parameters(model) if i.use_muon}
    for n, p in model.named_parameters():
        p.use_muon = n in muon       # DeepSpeed's Muon needs every parameter tagged; same split as ours
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                        config=_ds_config(run, opt_type, stage))

    def fwd_bwd(ids: Any) -> None:
        eng.backward(eng(input_ids=ids, labels=ids).loss)

    inner = eng.optimizer.optimizer if hasattr(eng.optimizer, "optimizer") else eng.optimizer
    out = _measure(run, model, inner, steps, fwd_bwd, eng.step, ns,
                   (om, "muon_update") if opt_type == "Muon" else None, engine_step=True)
    out["zero_optimizer"] = type(eng.optimizer).__name__
    if stage == 3:          # the settings the cost model reads (dist_muonclip.tools.cost_model_zero3)
        out["zero_optimization"] = _ds_config(run, opt_type, stage)["zero_optimization"]
    return out


def _run_adamw_ddp(model: Any, run: _Run, steps: int, ns: NSCounter) -> dict[str, Any]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.1)
    return _measure_replicated(run, model, opt, steps, ns, None, ddp=True)


def _missing(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available yet"
        return f"{module} does not import: {type(e).__name__}: {e}"


def _run_muonclip_ds(model: Any, run: _Run, steps: int, stage: int, ns: NSCounter) -> dict[str, Any]:
    """MuonClip through dist_muonclip.deepspeed (ZeRO-0/1/2/3; bf16 with fp32 masters when the run
    is bf16); phases from the profiler on the inner MuonClip."""
    import dist_muonclip.ns_split as opt_mod
    from dist_muonclip.deepspeed import disable_shm_comm, initialize, muonclip_optimizer

    disable_shm_comm()
    cfg = _ds_config(run, "MuonClip", stage, {"lr": 0.01, "adamw_lr": 0.003, "ns_backend": run.ns_backend,
                                              "qk_clip": {"tau": 100.0}})
    eng, *_ = initialize(model=model, config=cfg)

    def fwd_bwd(ids: Any) -> None:
        eng.backward(eng(input_ids=ids, labels=ids).loss)

    out = _measure(run, model, muonclip_optimizer(eng), steps, fwd_bwd, eng.step, ns, (opt_mod, "orthogonalize"),
                   engine_step=True)
    if stage == 3:
        out["zero_optimization"] = cfg["zero_optimization"]
    return out


def _fsdp_policy(run: _Run) -> Any:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if run.bf16 else None


def _run_fsdp2(model: Any, run: _Run, steps: int, ns: NSCounter, muonclip: bool) -> dict[str, Any]:
    """MuonClip (dist_muonclip.fsdp) or torch AdamW on the same FSDP2 sharding."""
    import torch

    import dist_muonclip.ns_split as opt_mod
    from dist_muonclip import fsdp

    model = fsdp.fully_shard_model(model, None, _fsdp_policy(run))
    if muonclip:
        opt = fsdp.make_muonclip(model, lr=0.01, adamw_lr=0.003, ns_backend=run.ns_backend, qk_clip={"tau": 100.0})
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.1)

    def fwd_bwd(ids: Any) -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _measure(run, model, opt, steps, fwd_bwd, opt_step, ns, (opt_mod, "orthogonalize") if muonclip else None)


#: engine name -> (runner(model, run, steps, ns), reason-to-skip-or-None (evaluated lazily))
ENGINES: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[], str | None]]] = {
    "muonclip_ddp": (lambda m, r, s, ns: _run_muonclip(m, r, s, "ddp", ns), lambda: None),
    "muonclip_optimizer": (lambda m, r, s, ns: _run_muonclip(m, r, s, "optimizer", ns), lambda: None),
    "muonclip_ds_zero0": (lambda m, r, s, ns: _run_muonclip_ds(m, r, s, 0, ns),
                          lambda: _missing("dist_muonclip.deepspeed")),
    "muonclip_ds_zero1": (lambda m, r, s, ns: _run_muonclip_ds(m, r, s, 1, ns),
                          lambda: _missing("dist_muonclip.deepspeed")),
    "muonclip_ds_zero2": (lambda m, r, s, ns: _run_muonclip_ds(m, r, s, 2, ns),
                          lambda: _missing("dist_muonclip.deepspeed")),
    "muonclip_ds_zero3": (lambda m, r, s, ns: _run_muonclip_ds(m, r, s, 3, ns),
                          lambda: _missing("dist_muonclip.deepspeed")),
    "muonclip_fsdp2": (lambda m, r, s, ns: _run_fsdp2(m, r, s, ns, True), lambda: _missing("dist_muonclip.fsdp")),
    "ds_muon_zero1": (lambda m, r, s, ns: _run_deepspeed(m, r, s, "Muon", 1, ns), lambda: _missing("deepspeed")),
    "adamw_ddp": (_run_adamw_ddp, lambda: None),
    "adamw_ds_zero1": (lambda m, r, s, ns: _run_deepspeed(m, r, s, "AdamW", 1, ns), lambda: _missing("deepspeed")),
    "adamw_fsdp2": (lambda m, r, s, ns: _run_fsdp2(m, r, s, ns, False), lambda: _missing("dist_muonclip.fsdp")),
    # ZeRO-3 (issue 16): every parameter cut across all ranks
    "ds_muon_zero3": (lambda m, r, s, ns: _run_deepspeed(m, r, s, "Muon", 3, ns), lambda: _missing("deepspeed")),
    "adamw_ds_zero3": (lambda m, r, s, ns: _run_deepspeed(m, r, s, "AdamW", 3, ns), lambda: _missing("deepspeed")),
}


# ----------------------------------------------------------------------------------------- meshes
#: HSDP and FSDP x TP: the second mesh axis has this size (HSDP: replicas; FSDP x TP: tp), the
#: other ``W / MESH_AXIS``; they run at W a multiple of it above 1 (:func:`mesh_applies`)
MESH_AXIS = 2


def mesh_applies(engine: str, world: int) -> bool:
    """Whether ``engine`` runs at ``world`` (the mesh engines need ``W`` a multiple of MESH_AXIS)."""
    return engine not in MESH_ENGINES or (world > 1 and world % MESH_AXIS == 0)


def _step_fns(model: Any, opt: Any) -> tuple[Callable[[Any], None], Callable[[], None]]:
    def fwd_bwd(ids: Any) -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fwd_bwd, opt_step


def _run_hsdp(model: Any, run: _Run, steps: int, ns: NSCounter) -> dict[str, Any]:
    """MuonClip on HSDP: ``fully_shard`` on a ``(replicate, shard)`` mesh of ``(MESH_AXIS, W /
    MESH_AXIS)``; ``MuonClip(model)`` reads the layout (each replica group orthogonalizes its matrices)."""
    from torch.distributed.device_mesh import init_device_mesh

    import dist_muonclip.ns_split as opt_mod
    from dist_muonclip import MuonClip, fsdp

    mesh = init_device_mesh(run.device.type, (MESH_AXIS, run.world // MESH_AXIS),
                            mesh_dim_names=("replicate", "shard"))
    model = fsdp.fully_shard_model(model, mesh, _fsdp_policy(run))
    opt = MuonClip(model, lr=0.01, adamw_lr=0.003, ns_backend=run.ns_backend, qk_clip={"tau": 100.0})
    out = _measure(run, model, opt, steps, *_step_fns(model, opt), ns, (opt_mod, "orthogonalize"))
    out["mesh"] = {"replicate": MESH_AXIS, "shard": run.world // MESH_AXIS}
    return out


def _run_fsdp_tp(model: Any, run: _Run, steps: int, ns: NSCounter, muonclip: bool = True) -> dict[str, Any]:
    """MuonClip (or torch AdamW, ``muonclip=False``) on FSDP2 x tensor parallel: ``parallelize_module`` with the Megatron-style plan of
    :func:`dist_muonclip.tools.cost_model_tp.megatron_plan` (q/k/v/gate/up ColwiseParallel, o/down
    RowwiseParallel) on a tp axis of MESH_AXIS, ``fully_shard`` on the ``W / MESH_AXIS`` dp axis
    (TP alone at W = MESH_AXIS); ``MuonClip(model)`` reads TensorParallelLayout."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import dist_muonclip.ns_split as opt_mod
    from dist_muonclip import MuonClip, fsdp
    from dist_muonclip.tools.cost_model_tp import megatron_plan

    dp, tp = run.world // MESH_AXIS, MESH_AXIS
    run.data_rank, run.data_world = run.rank // tp, dp      # tp ranks of one dp coordinate: one batch
    plan = megatron_plan([n for n, _ in model.named_parameters()])
    styles = {n[: -len(".weight")]: ColwiseParallel() if s == "col" else RowwiseParallel() for n, s in plan.items()}
    if dp == 1:
        tp_mesh = init_device_mesh(run.device.type, (tp,), mesh_dim_names=("tp",))
        parallelize_module(model, tp_mesh, styles)
    else:
        mesh = init_device_mesh(run.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], styles)
        model = fsdp.fully_shard_model(model, mesh["dp"], _fsdp_policy(run))
    if muonclip:
        opt = MuonClip(model, lr=0.01, adamw_lr=0.003, ns_backend=run.ns_backend, qk_clip={"tau": 100.0})
    else:    # per-parameter loop: foreach cannot mix the plain / DTensor parameters of different meshes
        opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.1, foreach=False)
    out = _measure(run, model, opt, steps, *_step_fns(model, opt), ns,
                   (opt_mod, "orthogonalize") if muonclip else None)
    out["mesh"], out["tp_plan"] = {"dp": dp, "tp": tp}, plan
    return out


#: the mesh engines (their own entries of ENGINES)
MESH_ENGINES: dict[str, tuple[Callable[..., dict[str, Any]], Callable[[], str | None]]] = {
    "muonclip_hsdp": (_run_hsdp, lambda: _missing("dist_muonclip.fsdp")),
    "muonclip_fsdp_tp": (_run_fsdp_tp, lambda: _missing("torch.distributed.tensor.parallel")),
    "adamw_fsdp_tp": (lambda m, r, s, ns: _run_fsdp_tp(m, r, s, ns, False),
                      lambda: _missing("torch.distributed.tensor.parallel")),
}
ENGINES.update(MESH_ENGINES)

#: DeepSpeed ZeRO-3 engines: left out of ``--quick`` (CI time); measured by
#: ``--sizes tiny small medium --worlds 1 2 3 4 --engines <these> --tag zero3``.
ZERO3_ENGINES = ("muonclip_ds_zero3", "adamw_ds_zero3", "ds_muon_zero3")


def _release_memory() -> None:
    """Free what an earlier engine left (Python garbage, glibc's free heap) before the next one."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _warm_imports(engine: str) -> None:
    import transformers.models.llama.modeling_llama  # noqa: F401

    import dist_muonclip.ns_split  # noqa: F401
    if "ds" in engine:
        import deepspeed  # noqa: F401

        import dist_muonclip.deepspeed  # noqa: F401
    if "fsdp" in engine:
        import dist_muonclip.fsdp  # noqa: F401


def run_engine(rank: int, world: int, engine: str, size: str, steps: int,
               opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """One engine on one model size, on this rank of an initialized process group.

    ``opts``: see :data:`DEFAULT_OPTIONS` (default: CPU, fp32, the global batch split over ranks).
    """
    import torch

    from dist_muonclip.models import build_model
    from dist_muonclip.profiler import storage_bytes

    run = _Run(rank, world, opts)
    _warm_imports(engine)         # libraries loaded now do not count in this run's memory rise
    _release_memory()
    run.start_memory()
    with torch.device(run.device):       # initialize on the device (a 1B model initializes in ~1 s on a GPU)
        model = build_model(model_config(size), seed=0, attn_implementation=run.opts["attn"])
    ns = NSCounter()
    runner, _ = ENGINES[engine]
    out = runner(model, run, steps, ns)
    out["num_params"] = sum(p.numel() for p in model.parameters())
    out["param_bytes"] = storage_bytes(model.parameters())
    out["step_time_s"] = statistics.median(out["step_times_s"][1:] or out["step_times_s"])
    out["opt_time_s"] = statistics.median(out["opt_times_s"][1:] or out["opt_times_s"])
    out["fwd_bwd_time_s"] = statistics.median(out["fwd_bwd_times_s"][1:] or out["fwd_bwd_times_s"])
    if run.cuda:
        run.now()
    out["peak_bytes"], out["peak_kind"] = run.peak_bytes, run.peak_kind
    out["peak_rss_rise_bytes" if not run.cuda else "peak_rise_bytes"] = max(0, run.peak_bytes - run.start_bytes)
    if not run.cuda:
        out["peak_rss_bytes"] = run.peak_bytes
    out["precision"], out["device"] = run.opts["precision"], str(run.device)
    out["micro_batch"], out["seq"], out["steps"] = run.micro_batch, run.opts["seq"] or SEQ, steps
    del model, runner
    _release_memory()
    if run.cuda:
        torch.cuda.empty_cache()
    torch.distributed.barrier()
    return out


# ----------------------------------------------------------------------------------------- spawn
def _agreed_out_of_time(deadline: float | None, device: Any) -> bool:
    """Whether the wall-clock ``deadline`` has passed, agreed by all ranks (one all-reduce MAX),
    so that every rank skips the same jobs and no collective is left waiting."""
    import torch
    import torch.distributed as dist

    if deadline is None:
        return False
    flag = torch.tensor([1.0 if time.time() > deadline else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str]], steps: int, result_dir: str,
            backend: str, opts: dict[str, Any] | None = None, deadline: float | None = None) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TORCHDYNAMO_DISABLE="1")
    torch.set_num_threads(1)
    opts = dict(opts or {})
    if backend == "nccl":
        torch.cuda.set_device(rank)
        opts["device"] = "cuda"
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    kw = {}
    if opts.get("pg_timeout_s"):     # a hung collective aborts the rank (NCCL watchdog) instead of blocking
        import datetime

        kw["timeout"] = datetime.timedelta(seconds=opts["pg_timeout_s"])
    dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    results = []
    path = os.path.join(result_dir, f"rank{rank}.json")
    for engine, size in jobs:
        if _agreed_out_of_time(deadline, device):
            res = {"ok": False, "skipped": True, "error": "skipped: --budget-s reached"}
        else:
            try:
                res = {"ok": True, **run_engine(rank, world, engine, size, steps, opts)}
            except Exception as e:  # noqa: BLE001 - record and go on with the next engine
                res = {"ok": False, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-3000:]}
                if backend == "nccl":
                    with contextlib.suppress(Exception):
                        torch.cuda.empty_cache()
                with contextlib.suppress(Exception):
                    dist.barrier()
        results.append({"engine": engine, "size": size, "rank": rank, **res})
        with open(path + ".tmp", "w") as f:       # after every job: a run killed later keeps these
            json.dump(results, f)
        os.replace(path + ".tmp", path)
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, jobs: list[tuple[str, str]], steps: int, *, backend: str = "gloo",
              timeout: float = 900, opts: dict[str, Any] | None = None, deadline: float | None = None,
              tolerate_failure: bool = False) -> list[dict[str, Any]]:
    """All ``jobs`` (engine, size) on one W-process group; returns every rank's records.

    ``deadline`` (``time.time()`` value): jobs not started by then are recorded as skipped.
    ``tolerate_failure``: a run that is killed (``timeout``) or crashes returns the records its
    ranks wrote so far, plus a failed record for every job without one, instead of raising.
    """
    from dist_muonclip.launch_env import free_port, spawn_local

    result_dir = tempfile.mkdtemp(prefix="scaling_")
    failure = None
    try:
        spawn_local(_worker, world, (world, free_port(), jobs, steps, result_dir, backend, opts, deadline),
                    timeout=timeout, what=f"scaling world {world}")
    except Exception as e:  # noqa: BLE001
        if not tolerate_failure:
            raise
        failure = f"{type(e).__name__}: {e}"
    out = []
    for r in range(world):
        path = os.path.join(result_dir, f"rank{r}.json")
        recs = []
        if os.path.exists(path):
            with open(path) as f:
                recs = json.load(f)
        done = {(x["engine"], x["size"]) for x in recs}
        recs += [{"engine": e, "size": s, "rank": r, "ok": False, "error": f"not run: {failure}"}
                 for e, s in jobs if (e, s) not in done]
        out.extend(recs)
    return out

# ----------------------------------------------------------------------------------------- report
def _environment() -> dict[str, Any]:
    from benchmarks._common import environment

    return environment(("deepspeed",))


def plot(payload: dict[str, Any], prefix: str, size: str | None = None) -> list[str]:
    """Three PNGs (bytes, state, NS FLOPs per rank vs W) for one model ``size`` (default: the
    largest one measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r.get("ok")]
    if size is None:
        size = max({r["size"] for r in rows}, key=lambda s: list(SIZES).index(s)) if rows else None
    paths = []
    for key, label, fname in (("bytes", "bytes sent per rank per step", "bytes"),
                              ("state_bytes", "optimizer-state bytes per rank", "state"),
                              ("ns_flops", "NS FLOPs per rank per step", "ns_flops")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, engine in enumerate(dict.fromkeys(r["engine"] for r in rows)):
            pts = sorted({(r["world_size"], r[key]) for r in rows if r["engine"] == engine and r["size"] == size
                          and r["rank"] == r["busiest_rank"]})
            if pts and (key != "ns_flops" or any(v for _, v in pts)):
                # engines often coincide (ZeRO-1 = ZeRO-2): shrinking markers of distinct shapes keep all visible
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^v<>PX*"[i % 10],
                                markersize=11 - 0.7 * (i % 10), markerfacecolor="none",
                                linestyle="-" if engine.startswith("muonclip") else ":", label=engine)
                if key == "ns_flops":   # the sum over ranks: flat = no redundant orthogonalization
                    tot: dict[int, float] = {}
                    for r in rows:
                        if r["engine"] == engine and r["size"] == size:
                            tot[r["world_size"]] = tot.get(r["world_size"], 0) + r["ns_flops"]
                    ws = sorted(tot)
                    ax.plot(ws, [tot[w] for w in ws], linestyle="--", color=line.get_color(),
                            label=f"{engine} (sum over ranks)")
        ax.set_xlabel("world size W")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{label}\n(model '{size}', busiest rank)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{prefix}_{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison the README quotes, at the largest W measured."""
    ok = [r for r in rows if r.get("ok")]
    if not ok:
        return {}
    w = max(r["world_size"] for r in ok)
    out: dict[str, Any] = {"world_size": w, "per_size": {}}
    for size in dict.fromkeys(r["size"] for r in ok):
        sel = {(r["engine"], r["rank"]): r for r in ok if r["size"] == size and r["world_size"] == w}
        engines = dict.fromkeys(e for e, _ in sel)
        d: dict[str, Any] = {}
        for e in engines:
            ranks = [sel[(e, r)] for r in range(w) if (e, r) in sel]
            d[e] = {"ns_matrices_total": sum(r["ns_matrices"] for r in ranks),
                    "ns_flops_total": sum(r["ns_flops"] for r in ranks),
                    "bytes_mean_per_rank": statistics.mean(r["bytes"] for r in ranks),
                    "bytes_max_per_rank": max(r["bytes"] for r in ranks),
                    "state_bytes_max_per_rank": max(r["state_bytes"] for r in ranks)}
        base = d.get("adamw_ds_zero1")
        base3 = d.get("adamw_ds_zero3")
        for e, v in d.items():
            if base and base["bytes_mean_per_rank"]:
                v["bytes_ratio_vs_adamw_ds_zero1"] = v["bytes_mean_per_rank"] / base["bytes_mean_per_rank"]
            if base3 and base3["bytes_mean_per_rank"]:       # ZeRO-3 runs: against AdamW at the same stage
                v["bytes_ratio_vs_adamw_ds_zero3"] = v["bytes_mean_per_rank"] / base3["bytes_mean_per_rank"]
                v["state_ratio_vs_adamw_ds_zero3"] = v["state_bytes_max_per_rank"] / base3["state_bytes_max_per_rank"]
        if "muonclip_ddp" in d:
            d["num_muon_matrices"] = d["muonclip_ddp"]["ns_matrices_total"]
        out["per_size"][size] = d
    return out


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` runs added to an earlier results JSON (``--append``): rows of the same (engine,
    size, W) replaced, every stage's arguments and environment kept."""
    done = {(r["engine"], r["size"], r["world_size"]) for r in new["rows"]}
    rows = [r for r in old["rows"] if (r["engine"], r["size"], r["world_size"]) not in done] + new["rows"]
    stages = old.get("stages") or [{k: old.get(k) for k in ("args", "environment", "steps", "wall_s")}]
    stages.append({k: new.get(k) for k in ("args", "environment", "steps", "wall_s")})
    out = {**new, "rows": rows, "stages": stages, "models": {**old.get("models", {}), **new["models"]},
           "skipped": {**old.get("skipped", {}), **new["skipped"]},
           "excluded": [x for x in dict.fromkeys(old.get("excluded", []) + new["excluded"])   # unless measured since
                        if not any(r.get("ok") and _excluded([x], r["engine"], r["size"], r["world_size"])
                                   for r in rows)],
           "wall_s": sum(st.get("wall_s") or 0 for st in stages)}
    out["summary"] = summarize(rows)
    return out


def _excluded(patterns: list[str], engine: str, size: str, world: int) -> bool:
    for pat in patterns:
        parts = pat.split(":")
        if len(parts) != 3:
            raise ValueError(f"--exclude {pat!r}: use ENGINE:SIZE:W ('*' for any)")
        if all(p in ("*", v) for p, v in zip(parts, (engine, size, str(world)))):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI form: sizes tiny+small, W 1 2 4, 3 steps")
    p.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    p.add_argument("--worlds", nargs="+", type=int, default=None)
    p.add_argument("--engines", nargs="+", default=None, choices=list(ENGINES),
                   help="default: every engine (--quick: all but the ZeRO-3 ones, measured in scaling_zero3.json)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (first is warm-up)")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"), help="nccl: rank r on cuda:r")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--micro-batch", type=int, default=None, help="per-rank batch (weak scaling; default: the "
                   f"global batch {GLOBAL_BATCH} split over the ranks)")
    p.add_argument("--seq", type=int, default=None, help=f"sequence length with --micro-batch (default {SEQ})")
    p.add_argument("--attn", default="eager", help="HF attention implementation (eager, sdpa)")
    p.add_argument("--zero3", nargs="+", default=[], metavar="KEY=N",
                   help="extra zero_optimization settings of the ZeRO-3 engines, e.g. stage3_max_reuse_distance=0 "
                   f"(stage3_param_persistence_threshold is {ZERO3_PERSISTENCE} unless given)")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default=None, help="file tag (default: quick or full)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the PNGs of a results JSON")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run every (engine, size) in fresh processes, so each run's memory is its own "
                   "(default: on, off with --quick to stay within CI time)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="ENGINE:SIZE:W",
                   help="runs to leave out (too slow or too big for this machine), recorded in the JSON; "
                   "'*' matches anything, e.g. muonclip_ds_zero0:xl:4 or '*:xl:4'")
    p.add_argument("--append", action="store_true",
                   help="add these runs to an existing scaling_<tag>.json (same engine/size/W replaced)")
    p.add_argument("--plot-size", default=None, choices=list(SIZES), help="model size the plots show (default: largest)")
    p.add_argument("--job-timeout", type=float, default=3600, help="seconds per isolated run before it is killed")
    args = p.parse_args(argv)
    if args.engines is None:
        args.engines = [e for e in ENGINES if not (args.quick and e in ZERO3_ENGINES)]
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        print(plot(payload, args.replot[: -len(".json")], args.plot_size))
        return 0
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")     # NVLink multicast off (device machines' rule)
    sizes = args.sizes or (["tiny", "small"] if args.quick else ["tiny", "small", "medium", "large"])
    worlds = args.worlds or [1, 2, 4]
    steps = args.steps or (3 if args.quick else 4)
    if steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    tag = args.tag or ("quick" if args.quick else "full")
    zero3 = {}
    for kv in args.zero3:
        k, _, v = kv.partition("=")
        if not k or not v.isdigit():
            p.error(f"--zero3 {kv!r}: use KEY=N with N a non-negative integer, e.g. stage3_max_reuse_distance=0")
        zero3[k] = int(v)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")   # DeepSpeed's Muon is torch.compile'd: eager on CPU
    t_start = time.time()
    skipped = {}
    engines = []
    for e in args.engines:
        reason = ENGINES[e][1]()
        if reason is None:
            engines.append(e)
        else:
            skipped[e] = reason
    # integration engines import but may still lack the benchmark hook: tried, errors recorded
    rows: list[dict[str, Any]] = []
    isolate = (not args.quick) if args.isolate is None else args.isolate
    for w in worlds:
        jobs = [(e, s) for s in sizes for e in engines
                if not _excluded(args.exclude, e, s, w) and mesh_applies(e, w)]
        t0 = time.time()
        opts = {"precision": args.precision, "micro_batch": args.micro_batch, "seq": args.seq, "attn": args.attn,
                "zero3": zero3}
        if isolate:        # fresh processes per (engine, size): each run's memory is its own
            recs = []
            for job in jobs:
                tj = time.time()
                got = run_world(w, [job], steps, backend=args.backend, opts=opts, timeout=args.job_timeout,
                                tolerate_failure=True)
                recs += got
                print(f"  W={w} {job[1]} {job[0]}: {time.time() - tj:.0f} s"
                      + ("" if all(r.get("ok") for r in got) else f" FAILED: {got[0].get('error', '')[:200]}"),
                      flush=True)
        else:
            recs = run_world(w, jobs, steps, backend=args.backend, opts=opts)
        print(f"W={w}: {len(jobs)} runs in {time.time() - t0:.0f} s", flush=True)
        for r in recs:
            r["world_size"] = w
        for (e, s) in jobs:
            grp = [r for r in recs if r["engine"] == e and r["size"] == s and r.get("ok")]
            if grp:
                busiest = max(grp, key=lambda r: (r["ns_flops"], r["bytes"], -r["rank"]))["rank"]
                for r in grp:
                    r["busiest_rank"] = busiest
            for r in recs:
                if r["engine"] == e and r["size"] == s and not r.get("ok"):
                    skipped.setdefault(e, r["error"])
        rows.extend(recs)
    payload = {"what": "scaling benchmark: bytes on the wire, NS FLOPs, optimizer state, peak memory, step time "
                       "per rank (last step of each run; the first is warm-up)",
               "environment": _environment(), "args": vars(args), "steps": steps,
               "global_batch": GLOBAL_BATCH, "seq_len": SEQ,
               "models": {s: {"config": model_config(s)} for s in sizes},
               "skipped": skipped, "excluded": args.exclude, "isolated_processes": isolate,
               "bytes_counted": "wire",
               "noise": "step_time_s and peak_rss_bytes are measured on a shared CPU and are noisy; bytes, "
                        "ns_flops and state_bytes are deterministic",
               "memory": "CPU: resident set (peak_rss_bytes: high-water mark of the engine's run, reset at its "
                         "start through /proc/self/clear_refs; peak_rss_rise_bytes: that minus the RSS when the run "
                         "began, before its model was built)" + ("; each run in fresh processes" if isolate else
                         "; runs share one process group per W, so a rise is a lower bound (memory freed by an "
                         "earlier run is reused)"),
               "rows": rows, "summary": summarize(rows), "wall_s": time.time() - t_start}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"scaling_{tag}.json")
    if args.append and os.path.exists(path):      # a ladder measured in stages: one JSON
        payload = _merge(json.loads(Path(path).read_text()), payload)
    prefix = os.path.join(args.out_dir, f"scaling_{tag}")
    payload["plots"] = [os.path.basename(x) for x in plot(payload, prefix, args.plot_size)]
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(json.dumps(payload["summary"], indent=1))
    if skipped:
        print("skipped:", json.dumps(skipped, indent=1))
    print(f"wrote {path} and {payload['plots']} in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
