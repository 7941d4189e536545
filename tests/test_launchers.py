"""The launchers in launch/ really start the training entry points on 2 CPU processes (gloo):
deepspeed (hostfile), mpirun (mpi4py rank discovery), SLURM (srun stand-in), and, across two
network namespaces acting as two nodes, torchrun --nnodes=2 with c10d rendezvous and the deepspeed
launcher with --no_ssh --node_rank."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from dist_muonclip.launch_env import _first_slurm_host, discover, spawn_local
from tests.dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STEPS = 10
DS_ARGS = ["--steps", str(STEPS), "--global-batch", "4", "--seq-len", "32"]
# Entry-point runs use the shipped configs as they are (ns_dtype bfloat16): a 2-rank run differs
# from the 1-rank run by gradient summation order, which bf16 Newton-Schulz turns into ~0.4%
# (2^-8) relative noise on each update; over 10 small-lr steps the losses agree to ~1e-4
# (measured), so 2e-3 relative is a safe bound that still fails for a wrong step (loss moves
# by > 1e-2 per step here). The same reference (fp32 forward, ZeRO-1 at W=1) serves every config:
# ZeRO-0/1/2 are the same math, and a bf16 config's forward/backward rounding (2^-8 per op,
# averaged over the batch) moved its losses by <= 6.5e-5 relative (measured, zero2_bf16.json).
LOSS_RTOL = 2e-3


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["DIST_MUONCLIP_DS_SHM"] = "0"       # skip DeepSpeed's shm op compile (plain gloo)
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _run(cmd, env, timeout=400, **kw):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory):
    """One process, configs/zero1.json: the run the 2-process launches must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "ref.json"
    _run([sys.executable, "-m", "dist_muonclip.deepspeed", "--deepspeed_config", "configs/zero1.json", *DS_ARGS,
          "--out", str(out)], _env())
    return json.loads(out.read_text())


def _check_against(result, reference, world):
    assert result["world_size"] == world
    assert result["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    assert result["losses"][-1] < result["losses"][0]        # it trains


# ------------------------------------------------------------------ unit: rank discovery

def test_discover_keeps_torchrun_env_and_reads_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert discover(dict(env)) == env
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_ID": "1234"}
    got = discover(slurm)
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29734"}
    assert _first_slurm_host("a1,b[2-3]") == "a1" and _first_slurm_host("n[03-05,07],x") == "n03"


# ------------------------------------------------------------------ launchers, one machine

@pytest.mark.slow
def test_spawn_local_deadline_and_failure(tmp_path):
    """spawn_local kills a run that outlives its deadline (instead of hanging) and propagates a
    rank's exception like torch.multiprocessing.spawn."""
    import time

    import torch.multiprocessing as mp

    from tests._dist_workers import spawn_failer, spawn_sleeper

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="stuck ranks on 2 processes ran for more than 5"):
        spawn_local(spawn_sleeper, 2, (str(tmp_path),), timeout=5, what="stuck ranks")
    assert time.monotonic() - t0 < 60
    assert sorted(os.listdir(tmp_path)) == ["started0", "started1"]
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 fails on purpose"):
        spawn_local(spawn_failer, 2, timeout=120)


@pytest.mark.parametrize("config, stage, bf16", [
    ("configs/zero1.json", 1, False),
    (None, 2, True),      # the launcher's default CONFIG: configs/zero2_bf16.json
])
def test_deepspeed_launcher_with_hostfile(ds_reference, tmp_path, config, stage, bf16):
    """launch/deepspeed.sh: deepspeed launcher, hostfile 'localhost slots=2', configs/zero1.json
    and the script's default config (zero2_bf16.json)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "out.json"
    env = _env(HOSTFILE=str(hostfile))
    if config is None:
        env.pop("CONFIG", None)
    else:
        env["CONFIG"] = config
    _run(["bash", "launch/deepspeed.sh", "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1",
          "--master_port", str(free_port()), "--", *DS_ARGS, "--out", str(out)], env)
    result = json.loads(out.read_text())
    assert (result["layout"], result["zero_stage"], result["bf16"]) == ("flat_fragments(zero)", stage, bf16)
    _check_against(result, ds_reference, 2)


@pytest.mark.slow
def test_mpirun_with_mpi4py_discovery(ds_reference, tmp_path):
    """launch/mpirun.sh: 2 MPI ranks, ranks from mpi4py, configs/zero2.json (same math as ZeRO-1)."""
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py mpich)")
    if shutil.which("mpirun", path=_env()["PATH"]) is None:
        pytest.skip("no mpirun on PATH (pip install mpich, or apt-get install openmpi-bin)")
    out = tmp_path / "out.json"
    _run(["bash", "launch/mpirun.sh", "--", "-m", "dist_muonclip.deepspeed", "--deepspeed_config",
          "configs/zero2.json", *DS_ARGS, "--out", str(out)],
         _env(NP="2", MASTER_ADDR="127.0.0.1", PYTHON=sys.executable))
    result = json.loads(out.read_text())
    assert result["layout"] == "flat_fragments(zero)" and result["zero_stage"] == 2
    _check_against(result, ds_reference, 2)


@pytest.mark.slow
def test_slurm_script_under_srun_stand_in(ds_reference, tmp_path):
    """launch/slurm.sbatch run as SLURM would run it: a stand-in `srun` starts 2 tasks with the
    SLURM_* variables srun sets; launch_env turns them into torch.distributed's env. Runs
    configs/zero0.json (DeepSpeed all-reduces, MuonClip's Replicated layout)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        # stand-in for srun: start SLURM_NTASKS tasks on this host with srun's variables
        while [[ "$1" == --* ]]; do shift; done
        pids=()
        for ((i = 0; i < SLURM_NTASKS; i++)); do
            SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)
        done
        rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
        """))
    (fake / "srun").chmod(0o755)
    out = tmp_path / "out.json"
    env = _env(SLURM_NTASKS="2", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=ROOT,
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SRUN=str(fake / "srun"),
               PYTHON=sys.executable)
    _run(["bash", "launch/slurm.sbatch", "--", "-m", "dist_muonclip.deepspeed", "--deepspeed_config",
          "configs/zero0.json", *DS_ARGS, "--out", str(out)], env)
    result = json.loads(out.read_text())
    assert (result["layout"], result["zero_stage"], result["bf16"]) == ("replicated", 0, False)
    _check_against(result, ds_reference, 2)


# ------------------------------------------------------------------ two nodes: network namespaces

TRAIN_ARGS = ["--steps", "5", "--batch-size", "4", "--seq-len", "32", "--override", "hidden_size=64",
              "--override", "intermediate_size=128", "--override", "num_hidden_layers=2", "--ns-dtype", "float32",
              "--ns-backend", "torch", "--eval-batches", "1", "--warmup-steps", "2", "--no-progress",
              "--device", "cpu", "--attn-implementation", "eager"]
NODE_A, NODE_B = "10.231.0.1", "10.231.0.2"   # private test range, only inside our namespaces


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair: node A 10.231.0.1, node B 10.231.0.2."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed: cannot create network namespaces")
    tag = f"dmc{os.getpid() % 100000}"
    ns = (f"{tag}a", f"{tag}b")
    res = _ip("netns", "add", ns[0])
    if res.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (needs root / CAP_SYS_ADMIN): {res.stderr.strip()}")
    created = [ns[0]]
    va, vb = f"{tag}va", f"{tag}vb"
    steps = [("netns", "add", ns[1]),
             ("link", "add", va, "type", "veth", "peer", "name", vb),
             ("link", "set", va, "netns", ns[0]), ("link", "set", vb, "netns", ns[1]),
             ("-n", ns[0], "addr", "add", f"{NODE_A}/24", "dev", va),
             ("-n", ns[1], "addr", "add", f"{NODE_B}/24", "dev", vb),
             ("-n", ns[0], "link", "set", "lo", "up"), ("-n", ns[1], "link", "set", "lo", "up"),
             ("-n", ns[0], "link", "set", va, "up"), ("-n", ns[1], "link", "set", vb, "up")]
    try:
        for args in steps:
            r = _ip(*args)
            if r.returncode != 0:
                _ip("link", "delete", va)       # if it was left in the root namespace
                pytest.skip(f"network namespace setup failed at 'ip {' '.join(args)}': {r.stderr.strip()}")
            if args[:2] == ("netns", "add"):
                created.append(args[2])
        yield {"ns": ns, "dev": (va, vb)}
    finally:
        for n in created:       # deleting a namespace also deletes the veth end inside it
            _ip("netns", "delete", n)


def _run_on_both_nodes(two_nodes, cmd_for_node, env_for_node, timeout=400):
    """Start ``cmd_for_node(node)`` inside each namespace at once; wait; fail with the logs."""
    procs = []
    for node, ns in enumerate(two_nodes["ns"]):
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *cmd_for_node(node)], env=env_for_node(node),
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_no_ssh(two_nodes, ds_reference, tmp_path):
    """launch/deepspeed.sh on two namespaces acting as two nodes, as on a cluster without ssh: the
    same two-host hostfile on both, --no_ssh --node_rank 0/1, rendezvous at node A; configs/zero1.json
    trains across them like the one-process reference."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "out.json"     # written by global rank 0 only
    port = str(free_port())
    _run_on_both_nodes(
        two_nodes,
        lambda node: ["bash", "launch/deepspeed.sh", "--no_ssh", "--node_rank", str(node), "--master_addr", NODE_A,
                      "--master_port", port, "--", *DS_ARGS, "--out", str(out)],
        lambda node: _env(HOSTFILE=str(hostfile), CONFIG="configs/zero1.json",
                          GLOO_SOCKET_IFNAME=two_nodes["dev"][node]))
    result = json.loads(out.read_text())
    assert (result["layout"], result["zero_stage"]) == ("flat_fragments(zero)", 1)
    _check_against(result, ds_reference, 2)


@pytest.mark.slow
def test_torchrun_two_nodes_c10d_matches_single_process(two_nodes, tmp_path):
    """torchrun --nnodes=2 (launch/torchrun_multinode.sh, c10d rendezvous on node A) runs
    launch/train.py with MuonClip across two namespaces; its per-step losses, and its final
    parameters and optimizer state (the checkpoints both runs write at the end), equal the
    single-process run's (fp32 NS: only the reduction order differs, ~1e-6 relative)."""
    import torch

    ref = tmp_path / "ref.json"
    _run([sys.executable, "launch/train.py", *TRAIN_ARGS, "--out", str(ref), "--save", str(tmp_path / "ref_ckpt")],
         _env())
    port = free_port()
    _run_on_both_nodes(
        two_nodes,
        lambda node: ["bash", "launch/torchrun_multinode.sh", "--", "launch/train.py", *TRAIN_ARGS,
                      "--out", str(tmp_path / f"node{node}.json"), "--save", str(tmp_path / "ckpt")],
        lambda node: _env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{NODE_A}:{port}", RDZV_ID="dmc_test",
                          LOCAL_ADDR=(NODE_A, NODE_B)[node], GLOO_SOCKET_IFNAME=two_nodes["dev"][node],
                          RDZV_CONF=f"is_host={int(node == 0)}", TORCHRUN=os.path.join(BIN, "torchrun")))
    log0 = tmp_path / "node0.json"      # only global rank 0 writes --out; either node may get rank 0
    log1 = tmp_path / "node1.json"
    got = json.loads((log0 if log0.exists() else log1).read_text())
    want = json.loads(ref.read_text())
    assert got["world_size"] == 2 and want["world_size"] == 1
    assert [r["loss"] for r in got["steps"]] == pytest.approx([r["loss"] for r in want["steps"]], rel=1e-4)
    assert got["final_eval_loss"] == pytest.approx(want["final_eval_loss"], rel=1e-4)
    # final parameters and MuonClip state: the checkpoint global rank 0 wrote (full state, by name)
    # against the single-process one; tolerance of tests/test_distributed.py (fp32, reduction order
    # only: measured <= 1e-6 on these O(0.1) weights)
    got_ck = torch.load(tmp_path / "ckpt" / "step_0000005.pt", map_location="cpu", weights_only=False)
    want_ck = torch.load(tmp_path / "ref_ckpt" / "step_0000005.pt", map_location="cpu", weights_only=False)
    assert got_ck["world_size"] == 2 and want_ck["world_size"] == 1
    assert got_ck["model"].keys() == want_ck["model"].keys()
    for k, v in want_ck["model"].items():
        torch.testing.assert_close(got_ck["model"][k], v, atol=5e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    got_state, want_state = got_ck["optimizer"]["state"], want_ck["optimizer"]["state"]
    assert got_state.keys() == want_state.keys() and want_state
    for name, entry in want_state.items():
        for key, v in entry.items():
            torch.testing.assert_close(got_state[name][key], v, atol=5e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}.{key}: {m}")
