"""MuonClip on FSDP2 (fully_shard, Shard(0) DTensors) on W gloo processes: layout, numerics
against the single-process oracle, QK-Clip on row shards, bytes on the wire, DCP resharding."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")

from tests import _fsdp_workers as F
from tests.dist_utils import run_distributed, values

STEPS = 10
ENGINE_STEPS, ENGINE_MAX_NORM = 3, 0.5
# Tolerance: fp32 everywhere (ns_dtype="float32"); the FSDP2 run differs from the oracle only in
# the summation order of the gradient reduce-scatter (~1e-7 relative per step), which
# Newton-Schulz and 10 steps of momentum amplify to ~1e-5 on O(0.1) weights (same bound as
# test_distributed's engines).
ATOL, RTOL = 5e-5, 1e-4


def _assert_same_params(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


def test_find_blocks_picks_decoder_layers_then_module_lists():
    """fully_shard_model's unit of sharding: HF decoder layers (``_no_split_modules``), else the
    items of top-most ModuleLists (no process group needed)."""
    from torch import nn

    from dist_muonclip.fsdp import find_blocks

    model = F.build_model("deepseek_v3")
    assert find_blocks(model) == list(model.model.layers)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4)]))
                                         for _ in range(3)])
            self.acts = nn.ModuleList([nn.ReLU()])          # no parameters: not a block

    net = Net()
    assert find_blocks(net) == list(net.blocks)


def test_layout_matches_dtensor_shards(fsdp_runs):
    """Ranges, local views and reduced gradients equal the DTensor's own rows at W=4 (7 rows:
    2, 2, 2, 1; 3 rows on 4 ranks: 1, 1, 1, 0; a [3, 5, 4] stack split on its stack dim), and
    writes through the view reach FSDP2's storage."""
    world = 4
    outs = fsdp_runs[world]["layout"]
    for rank, out in enumerate(outs):
        assert out["write_ok"]
        for name, o in out.items():
            if name == "write_ok":
                continue
            assert o["local_ok"], (rank, name)
            # gradient: FSDP2's reduce-scatter average vs one process on the whole batch (fp32
            # summation order only)
            assert o["grad_err"] < 1e-6, (rank, name, o["grad_err"])
    rows = {"a.weight": 7, "b.weight": 3, "stack": 3}
    for name, nrows in rows.items():
        ranges = outs[0][name]["ranges"]
        per_row = {"a.weight": 12, "b.weight": 7, "stack": 20}[name]
        chunk = -(-nrows // world)          # torch.chunk: ceil(rows / W) rows per rank, trailing ranks short
        want = []
        for r in range(world):
            r0, r1 = min(r * chunk, nrows), min((r + 1) * chunk, nrows)
            want.append([(r0 * per_row, r1 * per_row)])
        assert ranges == want, (name, ranges)
    if world == 4:
        assert outs[3]["b.weight"]["numel"] == 0 and outs[3]["stack"]["numel"] == 0


def test_unsupported_placements_raise_with_the_name(fsdp_runs):
    """At construction and through ``add_param_group`` afterwards. Regression for the latter:
    a Shard(1) DTensor or a plain tensor added to a Shard0 optimizer was accepted silently (no
    placement check, no eager state, so DCP saw different keys on different ranks)."""
    errors = fsdp_runs[4]["placement_errors"][0]
    assert "'1.weight'" in errors["shard1"] and "Shard(dim=1)" in errors["shard1"]
    assert "'1.weight'" in errors["replicate"] and "Replicate()" in errors["replicate"]
    assert "'1.weight'" in errors["plain"] and "not an FSDP2 DTensor" in errors["plain"]
    assert "'0.weight'" in errors["mesh2d"] and "2-D mesh" in errors["mesh2d"]
    assert errors["no_layout"] == "Shard0Layout"          # MuonClip(model) reads it from the DTensors
    assert "'0.weight'" in errors["replicated"] and "leave layout=None" in errors["replicated"]
    assert errors["add_shard1"].startswith("ValueError") and "'extra.shard1'" in errors["add_shard1"] \
        and "Shard(dim=1)" in errors["add_shard1"]
    assert errors["add_plain"].startswith("TypeError") and "'extra.plain'" in errors["add_plain"] \
        and "not an FSDP2 DTensor" in errors["add_plain"]
    # valid additions: a 5-row matrix (rows 2, 2, 1, 0 on 4 ranks) and a 5-element vector get
    # their state at once on every rank, empty shards included, and DCP sees the same keys everywhere
    for rank, out in enumerate(fsdp_runs[4]["placement_errors"]):
        added = out["added"]
        assert added["groups_unchanged_by_errors"], rank
        rows = [2, 2, 1, 0][rank]
        assert added["w"] == {"momentum_buffer": (rows * 8,)}, (rank, added)
        assert added["v"] == {"exp_avg": (rows,), "exp_avg_sq": (rows,), "step": ()}, (rank, added)
        assert added["dcp_keys"] == ["0.weight", "1.weight", "extra.v", "extra.w"], (rank, added)


@pytest.fixture(scope="module")
def oracles():
    out = {}
    for kind in ("llama", "deepseek_v3"):
        model, _, clipped = F.train_single(kind, STEPS)
        out[kind] = ({k: v.detach().clone() for k, v in model.named_parameters()}, clipped)
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Every gloo scenario of this module, one spawn per world size (W=2 first: it writes the
    checkpoint that W=4 and W=1 resume): ``runs[world][name]`` = per-rank outputs."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    ckpt = str(tmp / "ckpt")
    # a one-process run's full, name-keyed checkpoint (MuonClip.state_dict()) after 5 steps
    model, opt, _ = F.train_single("deepseek_v3", 5)
    full = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "optim": opt.state_dict()}
    train = "fsdp_train_worker"
    plan = {
        2: {"llama": (train, ("llama", STEPS)), "deepseek_v3": (train, ("deepseek_v3", STEPS)),
            "mixed_precision": (train, ("llama", STEPS, True)),
            "save": (train, ("llama", 5, False, ckpt, None, 0, "fsdp")),
            "engine": ("engine_worker", (ENGINE_STEPS, ENGINE_MAX_NORM, str(tmp / "engine_ckpt"))),
            "optimizer_clip": ("optimizer_clip_worker", (ENGINE_STEPS, ENGINE_MAX_NORM))},
        4: {"layout": ("layout_worker", ()), "placement_errors": ("placement_error_worker", ()),
            "llama": (train, ("llama", STEPS)), "deepseek_v3": (train, ("deepseek_v3", STEPS)),
            "resume": (train, ("llama", 5, False, None, ckpt, 5, "torch")),
            "from_full": (train, ("deepseek_v3", 5, False, None, None, 5, "fsdp", full))},
        1: {"resume": (train, ("llama", 5, False, None, ckpt, 5, "fsdp"))},
    }
    runs = {}
    for world, calls in plan.items():
        outs = values(run_distributed(F.calls_worker, world, list(calls.values()), tmp_path=tmp / f"w{world}"))
        runs[world] = {name: [o[i] for o in outs] for i, name in enumerate(calls)}
    return runs


@pytest.mark.parametrize("kind", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world, kind, oracles, fsdp_runs):
    """GQA (llama) and MLA + MoE (DeepSeek-V3) under fully_shard: parameters after 10 steps equal
    one process on the global batch, with QK-Clip rescaling heads on every step; optimizer state
    is exactly this rank's shard; extra bytes on the wire within 2 x Muon bytes / W."""
    want, clipped = oracles[kind]
    assert all(c > 0 for c in clipped), clipped          # the clip is really active
    outs = fsdp_runs[world][kind]
    for out in outs:
        _assert_same_params(out["params"], want)
        assert out["clipped"] == clipped                 # same heads clipped, from globally reduced S
    # ZeRO memory: each rank's optimizer state is its shard of the parameters, nothing more
    for out in outs:
        assert out["state_numel"] == out["expected_state_numel"]
    _check_extra_bytes(outs, kind, world, STEPS)


def _check_extra_bytes(outs, kind, world, steps):
    """The accountant: MuonClip's only traffic on top of FSDP2's own all-gathers and
    reduce-scatters is one all-to-all of row shards to the owners and one back (plus the packed
    preflight all-reduce of flags and max logits): exactly the rows that change rank, and per
    rank and step at most 2 x (Muon matrix bytes) / W."""
    muon_numel, sent = _muon_numel_and_bytes(kind, world)
    muon_bytes = 4 * muon_numel
    for r, out in enumerate(outs):
        acc = out["acc"]
        assert out["num_steps"] == steps
        assert set(acc) <= {"all_to_all[muon_to_owner]", "all_to_all[muon_from_owner]", "all_reduce[preflight]"}, acc
        a2a = acc["all_to_all[muon_to_owner]"]["bytes"] + acc["all_to_all[muon_from_owner]"]["bytes"]
        assert a2a == steps * sent[r]                    # exactly the rows that change rank
        extra_per_step = sum(c["bytes"] for c in acc.values()) / steps
        assert extra_per_step <= 2 * muon_bytes / world, (r, extra_per_step, 2 * muon_bytes / world)


def _muon_numel_and_bytes(kind, world):
    """Muon elements, and per rank the bytes it must send: its rows of matrices others own
    (gather) plus, for matrices it owns, the update rows held elsewhere (scatter)."""
    from dist_muonclip import MuonClip
    from dist_muonclip.fsdp import shard0_rows
    from dist_muonclip.param_split import matrix_shape
    from dist_muonclip.plan import MatrixItem, build_plan

    model = F.build_model(kind)
    opt = MuonClip(model, qk_clip=False, **F.OPT_KW)
    items, params, preferred, stacked = [], {}, {}, []
    for gi, g in enumerate(opt.param_groups):
        if g["use_muon"]:
            for p in g["params"]:
                name = opt.param_name(p)
                b, m, n = matrix_shape(p.shape, opt._views[p])
                if b > 1:   # fused experts: the experts each rank holds are a chunk owned there (no traffic)
                    for r in range(world):
                        r0, r1 = shard0_rows(p.shape[0], world, r)
                        if r1 > r0:
                            items.append(MatrixItem(f"{name}[{r0}:{r1}]", gi, r1 - r0, m, n, str(p.dtype),
                                                    g["ns_steps"]))
                            preferred[f"{name}[{r0}:{r1}]"] = r
                    stacked.append(p)
                    continue
                items.append(MatrixItem(name, gi, b, m, n, str(p.dtype), g["ns_steps"]))
                params[name] = p
    plan = build_plan(items, world, preferred)
    sent = [0] * world
    for name, p in params.items():
        row = p[0].numel()
        local = [(stop - start) * row for start, stop in (shard0_rows(p.shape[0], world, r) for r in range(world))]
        owner = plan.owners[name]
        for r in range(world):
            if r != owner:
                sent[r] += local[r] * 4                      # gather: my rows to the owner
        sent[owner] += (p.numel() - local[owner]) * 4        # scatter: update rows to their holders
    return sum(p.numel() for p in [*params.values(), *stacked]), sent


def test_mixed_precision_bf16_params_fp32_reduce(fsdp_runs):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): sharded parameters and all
    optimizer state stay fp32, and the run equals a one-process emulation of the same precision
    policy (bf16 forward/backward per micro-batch, fp32 gradient average, fp32 MuonClip)."""
    want = {k: v.detach() for k, v in F.train_single_mixed_precision("llama", STEPS, 2).named_parameters()}
    outs = fsdp_runs[2]["mixed_precision"]
    for out in outs:
        assert all(c > 0 for c in out["clipped"]), out["clipped"]   # QK-Clip clips heads on every step
        assert set(out["param_dtypes"].values()) == {torch.float32}
        assert set(out["state_dtypes"].values()) == {torch.float32}
        for k in want:
            # The emulation runs the same bf16 ops in the same order; at W=2 the fp32 average of two
            # gradients is exact, so the runs agree bit for bit on CPU (measured max diff 0.0,
            # vs 6e-2 between this run and the fp32 oracle); 1e-6 leaves room for other kernels.
            torch.testing.assert_close(out["params"][k], want[k], atol=1e-6, rtol=0.0, msg=lambda m, k=k: f"{k}: {m}")


def test_dcp_save_at_2_load_at_4_and_1(oracles, fsdp_runs):
    """DCP checkpoint written at W=2 after 5 steps, resharded on load at W=4 (through torch's
    get_state_dict / set_state_dict: optimizer state keyed by FQN, DTensor values) and at W=1
    (through dist_muonclip.fsdp.get/set_optimizer_state_dict); 5 more steps equal the
    uninterrupted 10-step run."""
    want, _ = oracles["llama"]
    for world in (4, 1):
        for out in fsdp_runs[world]["resume"]:
            _assert_same_params(out["params"], want)


def test_resume_from_one_process_checkpoint_at_4(oracles, fsdp_runs):
    """Across engines: a one-process (or DDP) run's full name-keyed checkpoint (model state_dict +
    MuonClip.state_dict()) after 5 steps loads into the FSDP2 model at W=4 (each rank keeps its
    rows; the MLA model has 3-row matrices, so rank 3 holds empty shards) and 5 more steps equal
    the uninterrupted 10-step run."""
    want, _ = oracles["deepseek_v3"]
    for out in fsdp_runs[4]["from_full"]:
        _assert_same_params(out["params"], want)


def test_train_engine_clips_global_norm_and_checkpoints(fsdp_runs):
    """launch/engines_fsdp.FSDPEngine (train.py --fsdp): the gradient norm it computes on shards is
    the one-process full-batch norm; clipping to half of it gives the one-process clipped run;
    its DCP checkpoint reloads into a differently initialized model bit for bit. MuonClip's own
    ``max_grad_norm`` on the Shard0 layout gives the same norms and parameters."""
    from dist_muonclip import MuonClip

    steps, max_norm = ENGINE_STEPS, ENGINE_MAX_NORM
    model = F.build_model("llama")
    opt = MuonClip(model, qk_clip=F.QK["llama"], **F.OPT_KW)
    norms = []
    for t in range(steps):
        ids = F.global_batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(n > max_norm for n in norms)              # the clip really scales every step
    outs = fsdp_runs[2]["engine"]
    want = {k: v.detach() for k, v in model.named_parameters()}
    # MuonClip(max_grad_norm=...) does the same clip inside step() from the local rows
    for out in outs + fsdp_runs[2]["optimizer_clip"]:
        # norm: fp32 sums in a different order (shards, then all-reduce): ~1e-7 relative
        assert out["norms"] == pytest.approx(norms, rel=1e-5)
        _assert_same_params(out["params"], want)
    for out in outs:
        assert out["loaded_step"] == steps and out["loaded_extra"] == {"note": "x"}
        assert out["state_equal"]
        for k in want:
            assert torch.equal(out["reloaded_params"][k], out["params"][k]), k


@pytest.mark.slow
def test_train_py_fsdp_under_torchrun_matches_single_process(tmp_path):
    """``torchrun --nproc_per_node=2 launch/train.py --fsdp`` (MuonClip, fp32 NS) against the
    single-process run of the same global batches: per-step losses agree to a few fp32 ulps
    (summation order of the reduce-scatter only; a wrong update moves the loss by ~1e-3 per
    step) and the process group exits cleanly (return code 0). Its DCP checkpoint of step 4
    resumes in one process (``--fsdp`` at W=1) and reproduces steps 4-7."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from launch import train

    assert "fsdp" in train.ENGINES
    repo = Path(__file__).resolve().parent.parent
    argv = ["--steps", "8", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2", "--log-every", "4",
            "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--device", "cpu", "--lr", "1e-2",
            "--ns-dtype", "float32", "--optimizer", "muonclip"]
    for k, v in {"hidden_size": 32, "intermediate_size": 60, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2}.items():
        argv += ["--override", f"{k}={v}"]
    single = train.train(train.parse_args(argv))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(repo / "launch" / "train.py"), *argv, "--fsdp", "--out", str(tmp_path / "two.json"),
           "--save", str(tmp_path / "ck"), "--save-every", "4"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["engine"] == "fsdp"
    # ~1 ulp of fp32 at loss values 3-6 is 2.4e-7-4.8e-7; 2e-6 allows a few ulps of drift
    for r1, r2 in zip(single["steps"], two["steps"], strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=0, abs=2e-6), r1["step"]
    assert (tmp_path / "ck" / "step_0000004" / ".metadata").is_file()
    resumed = train.train(train.parse_args(argv + ["--fsdp", "--resume", str(tmp_path / "ck" / "step_0000004")]))
    assert resumed["start_step"] == 4
    # resumed in one process: same reduction order as the single-process run from step 4 on
    for r1, r2 in zip(single["steps"][4:], resumed["steps"], strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=0, abs=2e-6), r1["step"]
