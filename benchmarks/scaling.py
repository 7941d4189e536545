#!/usr/bin/env python
"""Memory and communication scaling, measured: MuonClip (every engine) vs DeepSpeed's built-in
Muon and AdamW, for a model-size ladder and world sizes W on CPU over gloo (or GPUs over NCCL).

    python benchmarks/scaling.py --quick                # CI: 2 sizes, W in {1, 2, 4}, 3 steps
    python benchmarks/scaling.py --sizes tiny small medium --worlds 1 2 4 --steps 4

Per run and rank it records (the first step is warm-up; numbers are from the last step):

* bytes on the wire per collective kind (ring model of ``dist_muonclip.comm``). MuonClip engines:
  the optimizer's ``CommAccountant`` (+ ``ddp_accounting_hook`` for DDP's all-reduces). DeepSpeed
  engines: a tap on ``torch.distributed``'s Python collectives with the same byte model.
* NS FLOPs actually done on this rank: a counter wrapped around the orthogonalization function
  (``dist_muonclip.optimizer.orthogonalize``; DeepSpeed's ``original_muon.muon_update``), summed
  with :func:`dist_muonclip.newton_schulz.ns_flops` per matrix: redundant orthogonalization shows.
* optimizer-state bytes (distinct storages of the optimizer's state tensors), peak memory
  (``torch.cuda.max_memory_allocated`` on GPU; process RSS high-water mark on CPU: noisy and
  includes the interpreter), step time split into forward+backward and optimizer step (median;
  on GPU after ``torch.cuda.synchronize``; noisy on a shared CPU: bytes, state and FLOPs are the
  deterministic primary measures), and for MuonClip engines the profiler's per-phase times (CUDA
  events on GPU) and memory split.

Device and precision (``--backend nccl``: rank r on ``cuda:r``; ``--precision bf16``; weak scaling
with ``--micro-batch``/``--seq``): see :data:`DEFAULT_OPTIONS`. ``benchmarks/multi_gpu.py`` drives
this module on GPUs.

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

__all__ = ["SIZES", "GPU_SIZES", "ENGINES", "DEFAULT_OPTIONS", "run_engine", "run_world", "main"]

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


# ----------------------------------------------------------------------------------------- taps
class WireTap:
    """Counts bytes of ``torch.distributed`` Python collectives (ring model) while installed.

    DeepSpeed caches some functions at backend construction, so one tap is installed per process
    before anything else (:data:`TAP`) and only counts while ``active``.
    """

    _NAMES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
              "all_gather_single", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
              "reduce_scatter_single", "all_to_all_single", "all_reduce_coalesced")

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, float]] = {}
        self.active = False
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def _record(self, kind: str, nbytes: float) -> None:
        if not self.active:
            return
        c = self.counts.setdefault(kind, {"calls": 0, "bytes": 0.0})
        c["calls"] += 1
        c["bytes"] += nbytes

    def _wrap(self, name: str, fn: Callable) -> Callable:
        import torch
        import torch.distributed as dist

        def nb(t: Any) -> int:
            if isinstance(t, (list, tuple)):
                return sum(nb(x) for x in t)
            return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

        def tapped(*args: Any, **kw: Any) -> Any:
            if self._depth:      # a collective implemented by another tapped one (torch's
                return fn(*args, **kw)   # _all_gather_base calls all_gather_into_tensor): count once
            self._depth += 1
            try:
                count(*args, **kw)
                return fn(*args, **kw)
            finally:
                self._depth -= 1

        def count(*args: Any, **kw: Any) -> None:
            group = kw.get("group")
            w = dist.get_world_size(group)
            f = (w - 1) / w
            if name in ("all_reduce", "all_reduce_coalesced"):
                self._record("all_reduce", 2 * f * nb(kw.get("tensor", kw.get("tensors", args[0] if args else None))))
            elif name in ("reduce", "broadcast"):
                self._record(name, f * nb(kw.get("tensor", args[0] if args else None)))
            elif name in ("all_gather_into_tensor", "_all_gather_base", "all_gather_single"):
                self._record("all_gather", f * nb(kw.get("output_tensor", args[0] if args else None)))
            elif name == "all_gather":
                self._record("all_gather", f * nb(kw.get("tensor_list", args[0] if args else None)))
            elif name in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"):
                self._record("reduce_scatter", f * nb(kw.get("input", args[1] if len(args) > 1 else None)))
            elif name == "reduce_scatter":
                self._record("reduce_scatter", f * nb(kw.get("input_list", args[1] if len(args) > 1 else None)))
            elif name == "all_to_all_single":
                inp = kw.get("input", args[1] if len(args) > 1 else None)
                splits = kw.get("input_split_sizes", args[3] if len(args) > 3 else None)
                rank = dist.get_rank(group)
                es = inp.element_size()
                if splits:
                    self._record("all_to_all", sum(s for r, s in enumerate(splits) if r != rank) * es)
                else:
                    self._record("all_to_all", f * nb(inp))

        return tapped

    def install(self) -> "WireTap":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for mod in (dist, c10d):
            for name in self._NAMES:
                fn = getattr(mod, name, None)
                if fn is not None:
                    self._saved.append((mod, name, fn))
                    setattr(mod, name, self._wrap(name, fn))
        return self

    def remove(self) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()


TAP = WireTap()


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
#: group timeout (None: torch's default; NCCL aborts a rank stuck that long in a collective).
DEFAULT_OPTIONS: dict[str, Any] = {"device": "cpu", "precision": "fp32", "micro_batch": None, "seq": None,
                                   "attn": "eager", "pg_timeout_s": None}


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

    @property
    def micro_batch(self) -> int:
        return self.opts["micro_batch"] or GLOBAL_BATCH // self.world

    def batch(self, step: int):
        import torch

        if self.opts["micro_batch"] is None:
            ids = _batch(step, self.rank, self.world)
        else:     # weak scaling: every rank its own micro-batch
            g = torch.Generator().manual_seed(1000 + 1009 * step + self.rank)
            ids = torch.randint(0, 256, (self.opts["micro_batch"], self.opts["seq"] or SEQ), generator=g)
        return ids.to(self.device)

    def autocast(self) -> Any:
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def ddp_kwargs(self) -> dict[str, Any]:
        return {"device_ids": [self.device.index]} if self.cuda else {}

    def now(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            # read the peak at every timestamp: the profiler resets CUDA's peak counter when a
            # MuonClip step starts, which would otherwise hide forward/backward's activations
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


def _profiled(prof: Any) -> dict[str, Any]:
    last = prof.records[-1]
    return {"phases_s": last["phases_s"], "phases_s_median": _phase_medians(prof.records), "memory": last["memory"]}


def _run_muonclip(model: Any, run: _Run, steps: int, mode: str, ns: NSCounter) -> dict[str, Any]:
    from torch import nn

    import dist_muonclip.optimizer as opt_mod
    from dist_muonclip import MuonClip
    from dist_muonclip.comm import ddp_accounting_hook
    from dist_muonclip.profiler import StepProfiler

    opt = MuonClip(model, lr=0.01, adamw_lr=0.003, ns_backend=run.ns_backend, qk_clip={"tau": 100.0},
                   grad_reduction="external" if mode == "ddp" else "optimizer")
    prof = StepProfiler(None, model=model, print_summary=False).attach(opt)
    fwd = model
    if mode == "ddp" and run.world > 1:
        fwd = nn.parallel.DistributedDataParallel(model, **run.ddp_kwargs())
        fwd.register_comm_hook(prof.accountant, ddp_accounting_hook)
    ns.patch(opt_mod, "orthogonalize")
    flops = []
    try:
        for t in range(steps):
            ids = run.batch(t)
            before = ns.flops

            def fwd_bwd() -> None:
                with run.autocast():
                    loss = fwd(input_ids=ids, labels=ids).loss
                loss.backward()

            def opt_step() -> None:
                opt.step()
                opt.zero_grad(set_to_none=True)

            run.timed(fwd_bwd, opt_step)
            flops.append(ns.flops - before)
    finally:
        ns.remove()
        prof.close()
    last = prof.records[-1]
    return {"comm": last["comm"], "bytes": last["comm_bytes"], "ns_flops": flops[-1], "ns_flops_plan": last["ns_flops"],
            "ns_matrices": ns.matrices // steps, "state_bytes": _state_bytes(opt.state), **run.times(),
            **_profiled(prof)}


def _ds_config(run: _Run, opt_type: str, stage: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
    if params is None:
        params = {"lr": 0.003, "torch_adam": True, "weight_decay": 0.1}
        if opt_type == "Muon":
            params.update(momentum=0.95, ns_method="standard")
    cfg = {"train_batch_size": run.micro_batch * run.world, "train_micro_batch_size_per_gpu": run.micro_batch,
           "gradient_accumulation_steps": 1, "optimizer": {"type": opt_type, "params": params},
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
    if run.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def _train_tapped(fwd_bwd: Callable[[Any], None], opt_step: Callable[[], None], run: _Run, steps: int,
                  ns: NSCounter, ns_patch: tuple[Any, str] | None) -> dict[str, Any]:
    """Run ``steps`` steps counting every torch.distributed collective (tap) and NS FLOPs."""
    TAP.counts.clear()
    TAP.active = True
    if ns_patch is not None:
        ns.patch(*ns_patch)
    flops, snaps = [], []
    try:
        for t in range(steps):
            ids = run.batch(t)
            before = ns.flops
            TAP.counts.clear()
            run.timed(lambda: fwd_bwd(ids), opt_step)
            flops.append(ns.flops - before)
            snaps.append({k: dict(v) for k, v in TAP.counts.items()})
    finally:
        TAP.active = False
        ns.remove()
    comm = snaps[-1]
    return {"comm": comm, "bytes": sum(c["bytes"] for c in comm.values()), "ns_flops": flops[-1],
            "ns_matrices": ns.matrices // steps, **run.times()}


def _run_deepspeed(model: Any, run: _Run, steps: int, opt_type: str, stage: int, ns: NSCounter) -> dict[str, Any]:
    """DeepSpeed's own optimizers (torch AdamW, built-in Muon) at ZeRO ``stage``."""
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None   # no 30 s shm op compile
    from deepspeed.runtime.zero.muon import original_muon as om

    from dist_muonclip.param_split import split_parameters

    muon = {i.name for i in split_parameters(model) if i.use_muon}
    for n, p in model.named_parameters():
        p.use_muon = n in muon       # DeepSpeed's Muon needs every parameter tagged; same split as ours
    TAP.counts.clear()
    TAP.active = True
    try:
        eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                            config=_ds_config(run, opt_type, stage))
    finally:
        TAP.active = False

    def fwd_bwd(ids: Any) -> None:
        eng.backward(eng(input_ids=ids, labels=ids).loss)

    out = _train_tapped(fwd_bwd, eng.step, run, steps, ns, (om, "muon_update") if opt_type == "Muon" else None)
    inner = eng.optimizer.optimizer if hasattr(eng.optimizer, "optimizer") else eng.optimizer
    out["state_bytes"] = _state_bytes(inner.state)
    out["zero_optimizer"] = type(eng.optimizer).__name__
    return out


def _run_adamw_ddp(model: Any, run: _Run, steps: int) -> dict[str, Any]:
    import torch
    from torch import nn

    from dist_muonclip.comm import CommAccountant, ddp_accounting_hook

    acc = CommAccountant()
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.1)
    fwd = model
    if run.world > 1:
        fwd = nn.parallel.DistributedDataParallel(model, **run.ddp_kwargs())
        fwd.register_comm_hook(acc, ddp_accounting_hook)
    for t in range(steps):
        ids = run.batch(t)

        def fwd_bwd() -> None:
            with acc.step():
                with run.autocast():
                    loss = fwd(input_ids=ids, labels=ids).loss
                loss.backward()

        def opt_step() -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        run.timed(fwd_bwd, opt_step)
    comm = acc.steps[-1] if acc.steps else {}
    comm = {k: {"calls": v["calls"], "bytes": v["bytes"]} for k, v in comm.items()}
    return {"comm": comm, "bytes": sum(c["bytes"] for c in comm.values()), "ns_flops": 0, "ns_matrices": 0,
            "state_bytes": _state_bytes(opt.state), **run.times()}


def _missing(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available yet"
        return f"{module} does not import: {type(e).__name__}: {e}"


def _run_muonclip_ds(model: Any, run: _Run, steps: int, stage: int, ns: NSCounter) -> dict[str, Any]:
    """MuonClip through dist_muonclip.deepspeed (ZeRO-0/1/2; bf16 with fp32 masters when the run
    is bf16); bytes from the wire tap (DeepSpeed's collectives and MuonClip's alike); phases from
    the profiler on the inner MuonClip."""
    import dist_muonclip.optimizer as opt_mod
    from dist_muonclip.deepspeed import disable_shm_comm, initialize, muonclip_optimizer
    from dist_muonclip.profiler import StepProfiler

    disable_shm_comm()
    TAP.active = True        # DeepSpeed's first collectives happen in initialize; counted, then cleared
    try:
        cfg = _ds_config(run, "MuonClip", stage, {"lr": 0.01, "adamw_lr": 0.003, "ns_backend": run.ns_backend,
                                                  "qk_clip": {"tau": 100.0}})
        eng, *_ = initialize(model=model, config=cfg)
    finally:
        TAP.active = False
    opt = muonclip_optimizer(eng)
    prof = StepProfiler(None, model=model, print_summary=False).attach(opt)

    def fwd_bwd(ids: Any) -> None:
        eng.backward(eng(input_ids=ids, labels=ids).loss)

    try:
        out = _train_tapped(fwd_bwd, eng.step, run, steps, ns, (opt_mod, "orthogonalize"))
    finally:
        prof.close()
    out["state_bytes"] = _state_bytes(opt.state)
    out.update(_profiled(prof))
    return out


def _fsdp_policy(run: _Run) -> Any:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if run.bf16 else None


def _run_muonclip_fsdp2(model: Any, run: _Run, steps: int, ns: NSCounter) -> dict[str, Any]:
    """MuonClip on FSDP2 (dist_muonclip.fsdp); bytes from the wire tap. FSDP2 issues its
    all-gathers / reduce-scatters through torch.distributed's Python functions."""
    import dist_muonclip.optimizer as opt_mod
    from dist_muonclip import fsdp
    from dist_muonclip.profiler import StepProfiler

    model = fsdp.fully_shard_model(model, None, _fsdp_policy(run))
    opt = fsdp.make_muonclip(model, lr=0.01, adamw_lr=0.003, ns_backend=run.ns_backend, qk_clip={"tau": 100.0})
    prof = StepProfiler(None, model=model, print_summary=False).attach(opt)

    def fwd_bwd(ids: Any) -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        out = _train_tapped(fwd_bwd, opt_step, run, steps, ns, (opt_mod, "orthogonalize"))
    finally:
        prof.close()
    out["state_bytes"] = _state_bytes(opt.state)
    out.update(_profiled(prof))
    return out


def _run_adamw_fsdp2(model: Any, run: _Run, steps: int, ns: NSCounter) -> dict[str, Any]:
    """torch AdamW on the same FSDP2 sharding (the baseline MuonClip-on-FSDP2 is compared with)."""
    import torch

    import dist_muonclip.optimizer as opt_mod
    from dist_muonclip import fsdp

    model = fsdp.fully_shard_model(model, None, _fsdp_policy(run))
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.1)

    def fwd_bwd(ids: Any) -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = _train_tapped(fwd_bwd, opt_step, run, steps, ns, (opt_mod, "orthogonalize"))
    out["state_bytes"] = _state_bytes(opt.state)
    return out


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
    "muonclip_fsdp2": (_run_muonclip_fsdp2, lambda: _missing("dist_muonclip.fsdp")),
    "ds_muon_zero1": (lambda m, r, s, ns: _run_deepspeed(m, r, s, "Muon", 1, ns), lambda: _missing("deepspeed")),
    "adamw_ddp": (lambda m, r, s, ns: _run_adamw_ddp(m, r, s), lambda: None),
    "adamw_ds_zero1": (lambda m, r, s, ns: _run_deepspeed(m, r, s, "AdamW", 1, ns), lambda: _missing("deepspeed")),
    "adamw_fsdp2": (_run_adamw_fsdp2, lambda: _missing("dist_muonclip.fsdp")),
}


def run_engine(rank: int, world: int, engine: str, size: str, steps: int,
               opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """One engine on one model size, on this rank of an initialized process group.

    ``opts``: see :data:`DEFAULT_OPTIONS` (default: CPU, fp32, the global batch split over ranks).
    """
    import gc

    import torch

    from dist_muonclip.models import build_model
    from dist_muonclip.profiler import _rss_hwm_bytes, storage_bytes

    run = _Run(rank, world, opts)
    if run.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(run.device)
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
    out["peak_rss_bytes"] = _rss_hwm_bytes()
    if run.cuda:
        run.now()
        out["peak_bytes"], out["peak_kind"] = run.peak_bytes, "cuda_max_allocated"
    else:
        out["peak_bytes"], out["peak_kind"] = out["peak_rss_bytes"], "rss_high_water"
    out["precision"], out["device"] = run.opts["precision"], str(run.device)
    out["micro_batch"], out["seq"] = run.micro_batch, run.opts["seq"] or SEQ
    del model, runner
    gc.collect()
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
    TAP.install()          # before any DeepSpeed backend caches a collective
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
    import platform
    import subprocess

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "git_commit": commit, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}
    with contextlib.suppress(Exception):
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    return env


def plot(payload: dict[str, Any], prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if r.get("ok")]
    size = max({r["size"] for r in rows}, key=lambda s: list(SIZES).index(s)) if rows else None
    paths = []
    for key, label, fname in (("bytes", "bytes sent per rank per step", "bytes"),
                              ("state_bytes", "optimizer-state bytes per rank", "state"),
                              ("ns_flops", "NS FLOPs per rank per step", "ns_flops")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for engine in dict.fromkeys(r["engine"] for r in rows):
            pts = sorted({(r["world_size"], r[key]) for r in rows if r["engine"] == engine and r["size"] == size
                          and r["rank"] == r["busiest_rank"]})
            if pts and (key != "ns_flops" or any(v for _, v in pts)):
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=engine)
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
        for e, v in d.items():
            if base and base["bytes_mean_per_rank"]:
                v["bytes_ratio_vs_adamw_ds_zero1"] = v["bytes_mean_per_rank"] / base["bytes_mean_per_rank"]
        if "muonclip_ddp" in d:
            d["num_muon_matrices"] = d["muonclip_ddp"]["ns_matrices_total"]
        out["per_size"][size] = d
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI form: sizes tiny+small, W 1 2 4, 3 steps")
    p.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    p.add_argument("--worlds", nargs="+", type=int, default=None)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--steps", type=int, default=None, help="steps per run (first is warm-up)")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"), help="nccl: rank r on cuda:r")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--micro-batch", type=int, default=None, help="per-rank batch (weak scaling; default: the "
                   f"global batch {GLOBAL_BATCH} split over the ranks)")
    p.add_argument("--seq", type=int, default=None, help=f"sequence length with --micro-batch (default {SEQ})")
    p.add_argument("--attn", default="eager", help="HF attention implementation (eager, sdpa)")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default=None, help="file tag (default: quick or full)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw the PNGs of a results JSON")
    args = p.parse_args(argv)
    if args.replot:
        payload = json.loads(Path(args.replot).read_text())
        print(plot(payload, args.replot[: -len(".json")]))
        return 0
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")     # NVLink multicast off (device machines' rule)
    sizes = args.sizes or (["tiny", "small"] if args.quick else ["tiny", "small", "medium", "large"])
    worlds = args.worlds or [1, 2, 4]
    steps = args.steps or (3 if args.quick else 4)
    if steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    tag = args.tag or ("quick" if args.quick else "full")
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
    for w in worlds:
        jobs = [(e, s) for s in sizes for e in engines]
        t0 = time.time()
        opts = {"precision": args.precision, "micro_batch": args.micro_batch, "seq": args.seq, "attn": args.attn}
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
               "skipped": skipped,
               "noise": "step_time_s and peak_rss_bytes are measured on a shared CPU and are noisy; bytes, "
                        "ns_flops and state_bytes are deterministic",
               "rows": rows, "summary": summarize(rows), "wall_s": time.time() - t_start}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"scaling_{tag}.json")
    prefix = os.path.join(args.out_dir, f"scaling_{tag}")
    payload["plots"] = [os.path.basename(x) for x in plot(payload, prefix)]
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(json.dumps(payload["summary"], indent=1))
    if skipped:
        print("skipped:", json.dumps(skipped, indent=1))
    print(f"wrote {path} and {payload['plots']} in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
