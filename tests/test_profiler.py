"""StepProfiler and WireCounter: phases, bytes on the wire, NS FLOPs and memory per step, traces,
summary, TensorBoard / W&B output, launch/train.py --profile.

Oracles: NS FLOPs from the parameter shapes (ns_flops per Muon matrix); storage sizes computed by
hand (numel x element size); allocations of known size for the memory windows; the ring byte
model applied by hand to collectives of known size; the optimizer's own CommAccountant; the
analytic cost model (exact per-rank bytes of DDP and FSDP2 steps, engine traffic included); two
independent counting mechanisms (autograd-key kernels, a TorchDispatchMode) against each other.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_muonclip import MuonClip
from dist_muonclip.newton_schulz import ns_flops
from dist_muonclip.profiler import (PHASES, StepProfiler, WireCounter, load_trace, profile_optimizer, reset_rss_peak,
                                    rss_status, storage_bytes)
from tests._tiny_hf import tiny_model
from tests.dist_utils import run_distributed, values

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _train(model, opt, steps, rank=0, world=1, fwd=None, after_step=None):
    fwd = fwd or model
    for t in range(steps):
        ids = torch.randint(0, 96, (8 // world, 16), generator=torch.Generator().manual_seed(100 + t))
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()


def test_single_process_record_contents(tmp_path, capsys):
    model = tiny_model("llama")
    opt = MuonClip(model, lr=0.01, ns_backend="torch", qk_clip={"tau": 0.1})
    out = tmp_path / "trace.json"
    with profile_optimizer(opt, out=str(out), model=model) as prof:
        _train(model, opt, 3)
    assert opt.profiler is None                       # detached at exit
    recs = prof.records
    assert [r["step"] for r in recs] == [0, 1, 2]
    # every phase a single-process step runs was timed, each with a positive duration
    for r in recs:
        assert {"preflight", "ns", "apply", "adamw", "qk_clip"} <= set(r["phases_s"]) <= set(PHASES)
        assert all(v > 0 for v in r["phases_s"].values())
        assert r["comm"] == {} and r["comm_bytes"] == 0   # one process: no collective
        assert r["comm_counted"] == "wire"
    # NS FLOPs: every Muon matrix once per step (oracle from the shapes)
    expected = sum(ns_flops(*sorted(p.shape), 5) for g in opt.param_groups if g["use_muon"] for p in g["params"])
    assert all(r["ns_flops"] == expected for r in recs)
    mem = recs[-1]["memory"]
    assert mem["params"] == sum(p.numel() * 4 for p in model.parameters())
    assert mem["grads"] == mem["params"]              # fp32 grads for every parameter, before zero_grad
    assert mem["optimizer_state"] == sum(t.numel() * t.element_size() for s in opt.state.values()
                                         for t in s.values() if torch.is_tensor(t))
    assert mem["peak_kind"] == "rss_per_window"       # Linux: VmHWM reset per window
    assert mem["step_peak"] >= mem["step_start"] > 0
    assert mem["peak"] == max(mem["step_peak"], mem["between_steps_peak"])
    assert 0 <= mem["temporaries"] <= mem["step_peak"] - mem["step_start"]
    # trace files
    data = json.loads(out.read_text())
    assert data["world_size"] == 1 and len(data["steps"]) == 3
    with open(tmp_path / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[1]["ns_flops"]) == expected and "phase_s.ns" in rows[0]
    printed = capsys.readouterr().out
    assert "NS GFLOP on this rank" in printed and "adamw" in printed


class _KnownAllocations(torch.optim.Optimizer):
    """``step()`` keeps a new state tensor of ``state_bytes`` on its first call and makes one
    temporary of ``temp_bytes`` (written, so its pages are resident) that it frees again."""

    def __init__(self, params, temp_bytes: int, state_bytes: int):
        super().__init__(params, {})
        self.temp_bytes, self.state_bytes = temp_bytes, state_bytes

    @torch.no_grad()
    def step(self, closure=None):
        p = self.param_groups[0]["params"][0]
        if "buf" not in self.state[p]:
            self.state[p]["buf"] = torch.ones(self.state_bytes // 4)
        tmp = torch.ones(self.temp_bytes // 4)
        del tmp


@pytest.mark.skipif(not reset_rss_peak(), reason="needs /proc/self/clear_refs (Linux) for per-window RSS peaks")
def test_cpu_memory_windows_measure_known_allocations():
    """Pins the per-window memory split on CPU (a regression test for 'temporaries' being the
    process's lifetime RSS peak minus params/grads/state: 620 MB reported for a 13.6 MB state).
    Between steps an 80 MiB 'activation' is made and freed; the step keeps 48 MiB of new state on
    its first call and makes a 64 MiB temporary on every call. Oracle: those sizes.

    Sizes above glibc's largest dynamic mmap threshold (32 MiB) are mapped fresh and unmapped on
    free, so each raises RSS by its size; 4 MiB of tolerance covers page rounding, Python objects
    and the allocator's bookkeeping (measured: under 0.3 MiB)."""
    param = torch.nn.Parameter(torch.zeros(4))
    opt = _KnownAllocations([param], temp_bytes=64 * MIB, state_bytes=48 * MIB)
    act = 80 * MIB
    with profile_optimizer(opt, print_summary=False) as prof:
        starts = []
        for _ in range(3):
            starts.append(rss_status()[0])
            x = torch.ones(act // 4)              # forward + backward: activations, freed before step()
            del x
            param.grad = torch.ones(4)
            opt.step()
    tol = 4 * MIB
    for rec, rss0 in zip(prof.records, starts):
        mem = rec["memory"]
        assert mem["peak_kind"] == "rss_per_window"
        assert mem["between_steps_peak"] - rss0 == pytest.approx(act, abs=tol)
        assert mem["temporaries"] == pytest.approx(64 * MIB, abs=tol)     # the new state is not a temporary
        assert mem["step_peak"] - mem["step_start"] == pytest.approx(64 * MIB + (48 * MIB if rec["step"] == 0 else 0),
                                                                     abs=tol)
        assert mem["optimizer_state"] == 48 * MIB
        assert mem["peak"] == max(mem["step_peak"], mem["between_steps_peak"])


def test_constructor_path_and_existing_accountant():
    """MuonClip(..., profiler=prof) + prof.attach(opt); an existing accountant is reused."""
    from dist_muonclip.comm import CommAccountant

    model = tiny_model("llama")
    prof = StepProfiler(print_summary=False)
    acc = CommAccountant()
    opt = MuonClip(model, lr=0.01, ns_backend="torch", profiler=prof, accountant=acc)
    prof.attach(opt)
    prof.attach(opt)                                  # idempotent
    assert prof.accountant is acc
    _train(model, opt, 2)
    prof.close()
    assert len(prof.records) == 2 and "ns" in prof.records[0]["phases_s"]


def test_manual_step_one_record_per_training_step():
    """Pins manual stepping (DeepSpeed steps its inner optimizer once per parameter group: with
    one record per optimizer.step() the last record of a training step held only the second
    group's window and no bytes). Two optimizer.step() calls per training step, one record each
    training step, holding both calls' NS phases; the sizes are those at the end of the last
    optimizer step (before zero_grad)."""
    model = tiny_model("llama")
    opt = MuonClip(model, lr=0.01, ns_backend="torch")
    prof = StepProfiler(print_summary=False, manual_step=True).attach(opt)
    one = []
    for t in range(2):
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(t))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.step()
        one.append(prof._cpu_phases.get("ns", 0.0) > 0)
        opt.zero_grad(set_to_none=True)
        prof.step()
    prof.close()
    assert len(prof.records) == 2 and all(one)
    expected = sum(p.numel() * 4 for p in model.parameters())
    assert all(r["memory"]["grads"] == expected for r in prof.records)


def test_engine_wrapper_and_master_copies():
    """Pins the profile of DeepSpeed-style engines (AdamW under ZeRO reported grads 0 and, on
    every rank, rank 0/1): attaching to a wrapper that is not a torch optimizer profiles the torch
    optimizer it holds (``.optimizer``); tensors that optimizer steps that are not the model's
    (flat fp32 master partitions) are reported as ``master_params`` and their gradients count in
    ``grads``. Oracle: sizes by hand."""
    model = torch.nn.Linear(8, 4, bias=False)                  # 32 parameters
    master = torch.nn.Parameter(torch.zeros(16))               # a flat partition of half of them

    class Wrapper:                                             # what deepspeed's ZeRO optimizer looks like here
        optimizer = torch.optim.AdamW([master], lr=0.1)

    wrapper = Wrapper()
    with profile_optimizer(wrapper, model=model, print_summary=False) as prof:
        model(torch.ones(2, 8)).sum().backward()
        master.grad = torch.ones(16)
        wrapper.optimizer.step()
    assert prof.optimizer is wrapper.optimizer and prof.rank == 0 and prof.world_size == 1
    mem = prof.records[-1]["memory"]
    assert mem["params"] == 32 * 4 and mem["master_params"] == 16 * 4
    assert mem["grads"] == 32 * 4 + 16 * 4
    assert mem["optimizer_state"] == 2 * 16 * 4 + 4             # exp_avg, exp_avg_sq, step


def test_storage_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 10)
    assert storage_bytes([a, a[2:], a.view(-1), None, torch.zeros(3, dtype=torch.float64)]) == 400 + 24


def test_bad_input():
    with pytest.raises(ValueError, match="out="):
        StepProfiler("trace.txt")
    with pytest.raises(ValueError, match="wire="):
        StepProfiler(wire="everything")
    with pytest.raises(ValueError, match="mechanism="):
        WireCounter("pcap")
    with pytest.raises(TypeError, match="optimizer"):
        StepProfiler().attach(object())
    model = tiny_model("llama")
    opt1 = MuonClip(model, lr=0.01)
    prof = StepProfiler().attach(opt1)
    with pytest.raises(ValueError, match="manual_step=True"):
        prof.step()
    with pytest.raises(ValueError, match="already attached"):
        prof.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    prof.close()


def test_tensorboard_and_wandb_receive_the_records(tmp_path, monkeypatch):
    """The per-step scalars the profiler sends to TensorBoard and to an offline W&B run, read back
    from the event file and the run's transaction log, equal its records."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tests.test_metrics import _offline_wandb_run, _wandb_history_when_closed

    run = _offline_wandb_run(tmp_path, monkeypatch)
    try:
        model = tiny_model("llama")
        opt = MuonClip(model, lr=0.01, ns_backend="torch")
        with profile_optimizer(opt, model=model, log_dir=str(tmp_path / "tb"), wandb_run=run,
                               print_summary=False) as prof:
            _train(model, opt, 3)
        run_dir = run.dir.rsplit("/files", 1)[0]
    finally:
        run.finish()
    recs = prof.records
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    # TensorBoard stores float32
    assert [e.step for e in acc.Scalars("profile/ns_gflops")] == [0, 1, 2]
    for name, key in (("profile/ns_gflops", lambda r: r["ns_flops"] / 1e9),
                      ("profile/phase_ms/ns", lambda r: r["phases_s"]["ns"] * 1e3),
                      ("profile/memory/optimizer_state", lambda r: r["memory"]["optimizer_state"]),
                      ("profile/memory/temporaries", lambda r: r["memory"]["temporaries"])):
        assert [e.value for e in acc.Scalars(name)] == pytest.approx([key(r) for r in recs], rel=1e-6), name
    hist = _wandb_history_when_closed(run_dir)
    assert [h["_step"] for h in hist] == [0, 1, 2]
    for h, r in zip(hist, recs):
        assert h["profile/ns_gflops"] == pytest.approx(r["ns_flops"] / 1e9, rel=1e-12)
        assert h["profile/phase_ms/ns"] == pytest.approx(r["phases_s"]["ns"] * 1e3, rel=1e-12)
        assert h["profile/memory/params"] == r["memory"]["params"]


# --------------------------------------------------------------------------------------------
# W=2: wire counts against the ring model, the accountant, a second mechanism and the cost model
# --------------------------------------------------------------------------------------------
def _collectives_of_known_size(rank, world):
    """Each collective and point-to-point kind, with tensors of known size; returns the counts and the expected
    bytes sent by this rank (dist_muonclip.comm's byte model: ring for all-reduce and gathers, star for reduce and broadcast)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from dist_muonclip.comm import comm_tag

    f = (world - 1) / world
    with WireCounter() as wc:
        dist.all_reduce(torch.ones(10))                                          # 40 B
        dist.broadcast(torch.ones(6, dtype=torch.float64), src=0)                # 48 B, root sends W-1 copies
        dist.reduce(torch.ones(7), dst=world - 1)                                # 28 B from every non-root
        dist.all_gather([torch.empty(3) for _ in range(world)], torch.ones(3))   # out 12 W B
        dist.all_gather_into_tensor(torch.empty(5 * world), torch.ones(5))       # out 20 W B
        dist.reduce_scatter_tensor(torch.empty(4), torch.ones(4 * world))        # in 16 W B
        # uneven all-to-all: rank r sends (r + 1) * (peer + 1) rows of 2 bf16 to each peer
        splits = [(rank + 1) * (p + 1) for p in range(world)]
        recv = [(p + 1) * (rank + 1) for p in range(world)]
        dist.all_to_all_single(torch.empty(sum(recv), 2, dtype=torch.bfloat16),
                               torch.ones(sum(splits), 2, dtype=torch.bfloat16), recv, splits)
        dist.all_to_all([torch.empty(3) for _ in range(world)], [torch.ones(3) for _ in range(world)])  # 12 B/peer
        dist.all_reduce_coalesced([torch.ones(10), torch.ones(10)])             # one call, 80 B
        dist.gather(torch.ones(5), [torch.empty(5) for _ in range(world)] if rank == 0 else None, dst=0)  # 20 B
        dist.scatter(torch.empty(5), [torch.ones(5) for _ in range(world)] if rank == 0 else None, src=0)
        if rank == 0:                                                            # point to point: 36 B
            dist.send(torch.ones(9), 1)
        elif rank == 1:
            dist.recv(torch.empty(9), 0)
        nxt, prv = (rank + 1) % world, (rank - 1) % world                        # a ring of 16 B sends
        for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(4), nxt),
                                         dist.P2POp(dist.irecv, torch.empty(4), prv)]):
            w.wait()
        with comm_tag("mine"):
            funcol.all_reduce(torch.ones(8), "sum", dist.group.WORLD).wait()    # functional: 32 B, tagged
        dist.barrier()
    expected = {"all_reduce": 2 * f * (40 + 80), "broadcast": (world - 1) * 48 if rank == 0 else 0.0,
                "reduce": 0.0 if rank == world - 1 else 28.0, "all_gather": f * (12 * world + 20 * world),
                "reduce_scatter": f * 16 * world,
                "all_to_all": sum(s for p, s in enumerate(splits) if p != rank) * 2 * 2 + (world - 1) * 12,
                "gather": 0.0 if rank == 0 else 20.0, "scatter": (world - 1) * 20.0 if rank == 0 else 0.0,
                "send": 16.0 + (36 if rank == 0 else 0), "recv": 0.0,   # counted at the sender
                "all_reduce[mine]": 2 * f * 32, "barrier": 0.0}
    calls = {"all_reduce": 2, "broadcast": 1, "reduce": 1, "all_gather": 2, "reduce_scatter": 1, "all_to_all": 2,
             "gather": 1, "scatter": 1, "send": 1 + (rank == 0), "recv": 1 + (rank == 1),
             "all_reduce[mine]": 1, "barrier": 1}
    return wc.counts, expected, calls


def _ddp_worker(rank, world, out):
    from torch import nn

    model = tiny_model("llama")
    opt = MuonClip(model, lr=0.01, ns_backend="torch", qk_clip={"tau": 0.1})
    ddp = nn.parallel.DistributedDataParallel(model)       # no comm hook: DDP's C++ reducer all-reduces
    other = WireCounter("dispatch_mode")                   # the second mechanism, over the same steps
    acc_steps, other_steps = [], []
    with profile_optimizer(opt, out=out, model=model, print_summary=False) as prof:
        other.start()
        _train(model, opt, 3, rank, world, fwd=ddp,
               after_step=lambda: (other_steps.append(other.take()), acc_steps.append(dict(opt.accountant.steps[-1]))))
        other.stop()
    assert prof.wire.mechanism == "kernel"
    scalars = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                  if torch.is_tensor(t) and t.ndim == 0)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return prof.records, scalars, other_steps, acc_steps, buffers, _collectives_of_known_size(rank, world)


def test_two_ranks_ddp_wire_counts_match_ring_model_accountant_and_cost_model(tmp_path):
    """Per rank and step, the profiler's wire-level bytes under DDP (without any comm hook: DDP's
    own C++ all-reduce and its buffer broadcast are seen) equal the analytic model exactly, per
    collective (plus DDP's one-off bucket rebuild in step 1); MuonClip's tagged collectives equal its CommAccountant's; the dispatch-mode
    mechanism counts the same calls and bytes; collectives of known size cost what the ring model
    says; each rank's NS FLOPs are those of the matrices it owns; load_trace merges both ranks."""
    from dist_muonclip.cost_model import predict, specs_from_model

    out = str(tmp_path / "t.json")
    outs = values(run_distributed(_ddp_worker, 2, out, tmp_path=tmp_path / "res", timeout=240))
    model = tiny_model("llama")
    specs = specs_from_model(model)
    cfg = model.config
    total_flops = sum(ns_flops(*sorted(s.shape), 5) for s in specs if s.use_muon)
    assert sum(o[0][-1]["ns_flops"] for o in outs) == total_flops    # each matrix once across ranks
    for rank, (recs, scalars, other_steps, acc_steps, buffers, known) in enumerate(outs):
        p = predict(specs, 2, "muonclip_ddp", rank=rank, num_logits=cfg.num_hidden_layers * cfg.num_attention_heads,
                    buffer_bytes=buffers)
        assert buffers > 0 and "broadcast" in p["bytes"]            # RoPE inv_freq: broadcast every forward
        for r, other, acc in zip(recs, other_steps, acc_steps, strict=True):
            got = {k: c["bytes"] for k, c in r["comm"].items()}
            if r["step"] == 1:
                # DDP rebuilds its buckets in the second iteration: rank 0 broadcasts the bucket
                # indices and sizes (2 more small broadcasts, once per run; not in the model; in the
                # star model only the root sends)
                extra = got["broadcast"] - p["bytes"]["broadcast"]
                assert r["comm"]["broadcast"]["calls"] == 3 and (0 < extra < 1024 if rank == 0 else extra == 0)
                got["broadcast"] = p["bytes"]["broadcast"]
            assert got == pytest.approx({k: v for k, v in p["bytes"].items() if k != "total"}, abs=1e-6)
            assert {k: (c["calls"], c["bytes"]) for k, c in other.items()} == {
                k: (c["calls"], c["bytes"]) for k, c in r["comm"].items()}
            assert {k: (c["calls"], c["bytes"]) for k, c in acc.items()} == {
                k: (c["calls"], c["bytes"]) for k, c in r["comm"].items() if "[" in k}
            assert r["ns_flops"] == p["ns_flops"]
        # the model prices tensor state; the profiler also holds AdamW's 0-d step counters
        assert recs[-1]["memory"]["optimizer_state"] == p["state_bytes"] + scalars
        counts, expected, calls = known
        assert {k: c["bytes"] for k, c in counts.items()} == pytest.approx(expected, abs=1e-9)
        assert {k: c["calls"] for k, c in counts.items()} == calls
    merged = load_trace(out)
    assert sorted((r["rank"], r["step"]) for r in merged) == [(r, s) for r in range(2) for s in range(3)]


@pytest.mark.slow
def test_train_py_fsdp_profile_whole_step_bytes_match_cost_model(tmp_path):
    """``torchrun --nproc_per_node=2 launch/train.py --fsdp --profile trace.json`` (3 steps): every
    rank writes its JSON and CSV trace, rank 0 prints the summary, every step has MuonClip's
    phases, and the bytes on the wire of every step are exactly the cost model's for the whole
    FSDP2 step (FSDP2's all-gathers and reduce-scatters plus MuonClip's all-to-alls and preflight),
    per collective, plus the training loop's two tagged 4-byte all-reduces (gradient norm, loss).
    Pins the profiler seeing the engine's traffic (before, only MuonClip's collectives)."""
    from dist_muonclip.cost_model import predict, specs_from_model
    from dist_muonclip.launch_env import free_port
    from dist_muonclip.models import build_model, load_model_config

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    argv = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "1", "--log-every", "3",
            "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--device", "cpu", "--fsdp",
            "--profile", str(tmp_path / "trace.json")]
    for k, v in tiny.items():
        argv += ["--override", f"{k}={v}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "launch" / "train.py"), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dist_muonclip profile: rank 0/2" in proc.stdout and "all_to_all[muon_to_owner]" in proc.stdout
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "trace*"))) == [
        "trace.csv", "trace.json", "trace.rank1.csv", "trace.rank1.json"]
    recs = load_trace(tmp_path / "trace.json")
    assert sorted((r["rank"], r["step"]) for r in recs) == [(r, s) for r in range(2) for s in range(3)]
    cfg = load_model_config(overrides=tiny)
    specs = specs_from_model(build_model(cfg))
    f = 1 / 2
    for r in recs:
        assert {"preflight", "to_owner", "ns", "from_owner", "apply", "adamw", "qk_clip"} <= set(r["phases_s"])
        p = predict(specs, 2, "muonclip_fsdp2", rank=r["rank"],
                    num_logits=cfg["num_hidden_layers"] * cfg["num_attention_heads"])
        expected = {k: v for k, v in p["bytes"].items() if k != "total"}
        expected.update({"all_reduce[grad_norm]": 2 * f * 4, "all_reduce[loss]": 2 * f * 4})
        assert {k: c["bytes"] for k, c in r["comm"].items()} == pytest.approx(expected, abs=1e-6), (r["rank"], r["step"])
        assert r["memory"]["params"] > 0 and r["memory"]["grads"] == r["memory"]["params"]   # fp32 local shards
    with open(tmp_path / "trace.rank1.csv") as fh:
        rows = list(csv.DictReader(fh))
    last = [r for r in recs if r["rank"] == 1][-1]
    assert float(rows[-1]["bytes.all_to_all[muon_to_owner]"]) == last["comm"]["all_to_all[muon_to_owner]"]["bytes"]
    assert float(rows[-1]["bytes.all_gather"]) == last["comm"]["all_gather"]["bytes"]
