"""Faults: crash-safe checkpoints, ``--resume DIR`` as both first start and restart, elastic restart.

Issue 18. Oracles: the uninterrupted run of the same command (same seeds, same data); on CPU
every engine here is deterministic, so the interrupted-and-resumed run must end bit for bit equal
(``param_sha256`` from ``--out``, and every tensor of the final checkpoint's model and optimizer
state compared with ``torch.equal``, no tolerance).

Cheapest first: the file layer (:mod:`launch.checkpoint_files`) with no training; single-process
train.py in this process; train.py killed mid-save in a subprocess; torchrun with
``--max-restarts 2`` and one of two workers killed with SIGKILL (DDP by default; optimizer-owned,
FSDP2 and DeepSpeed marked slow). Ports: free ones (free_port), never fixed: parallel runs on one box must not join each other's rendezvous.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from launch import checkpoint_files as cf
from launch import train as train_mod
from dist_muonclip.launch_env import free_port

REPO = Path(__file__).resolve().parent.parent
# explicit --model-config: the preset-name lookup broke when models.py moved into support/
MODEL_CONFIG = str(REPO / "configs" / "models" / "llama-gqa.json")
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
STEPS, SAVE_EVERY = 8, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices on a shared 2-core machine: one intra-op thread (see test_train_entry)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _argv(*extra: str, steps: int = STEPS) -> list[str]:
    argv = ["--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2",
            "--log-every", "4", "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--device", "cpu",
            "--model-config", MODEL_CONFIG, "--ns-dtype", "float32", "--qk-clip-tau", "0.5"]
    for k, v in TINY.items():
        argv += ["--override", f"{k}={v}"]
    return argv + list(extra)


def _run(argv: list[str]) -> dict:
    return train_mod.train(train_mod.parse_args(argv))


def _assert_same_state(a, b, where: str = "") -> None:
    """Recursive bit-for-bit equality of two checkpoint payloads (tensors: torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):   # e.g. DeepSpeed's LossScaler: no __eq__
        assert type(a) is type(b), where
        _assert_same_state(vars(a), vars(b), f"{where}.{type(a).__name__}")
    else:
        assert a == b, where


def _final_pt(directory: Path, steps: int = STEPS) -> dict:
    ck = torch.load(directory / f"step_{steps:07d}.pt", weights_only=False)
    return {"model": ck["model"], "optimizer": ck["optimizer"], "step": ck["step"]}


# -- the file layer ---------------------------------------------------------------------------
def test_publish_verify_and_detect_truncation_and_bit_flips(tmp_path):
    """A published file verifies; a truncated one and a same-size one with a flipped byte are
    reported naming the file."""
    final = tmp_path / "step_0000003.pt"
    tmp = cf.clear_tmp(final)
    tmp.write_bytes(os.urandom(4096))
    cf.publish_file(tmp, final)
    assert not tmp.exists() and cf.verify(final)
    data = final.read_bytes()
    final.write_bytes(data[:1000])
    with pytest.raises(cf.CheckpointCorruptError, match=r"step_0000003\.pt has 1000 bytes, 4096"):
        cf.verify(final)
    final.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(cf.CheckpointCorruptError, match=r"step_0000003\.pt does not match the SHA-256"):
        cf.verify(final)


def test_directory_manifest_names_the_bad_file(tmp_path):
    final = tmp_path / "step_0000005"
    tmp = cf.clear_tmp(final)
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"x" * 100)
    (tmp / "sub" / "b.bin").write_bytes(b"y" * 100)
    cf.publish_dir(tmp, final)
    assert cf.verify(final) and not tmp.exists()
    (final / "sub" / "b.bin").write_bytes(b"y" * 10)
    with pytest.raises(cf.CheckpointCorruptError, match=r"sub/b\.bin has 10 bytes"):
        cf.verify(final)
    (final / "sub" / "b.bin").unlink()
    with pytest.raises(cf.CheckpointCorruptError, match=r"sub/b\.bin is missing"):
        cf.verify(final)


def test_resolve_skips_temporary_names_and_falls_back_past_corrupt(tmp_path):
    """Newest first; a killed save (``*.tmp``) is never a candidate; a corrupt newest one is
    skipped with a warning naming it; an empty or missing directory means a fresh start (None);
    all corrupt raises (starting fresh would silently discard the run)."""
    assert cf.resolve(tmp_path / "missing", kind="file", is_checkpoint=Path.is_file) is None
    assert cf.resolve(tmp_path, kind="file", is_checkpoint=Path.is_file) is None
    for n in (2, 4):
        t = cf.clear_tmp(tmp_path / f"step_{n:07d}.pt")
        t.write_bytes(bytes([n]) * 64)
        cf.publish_file(t, tmp_path / f"step_{n:07d}.pt")
    (tmp_path / "step_0000006.pt.tmp").write_bytes(b"partial")
    assert cf.resolve(tmp_path, kind="file", is_checkpoint=Path.is_file) == tmp_path / "step_0000004.pt"
    (tmp_path / "step_0000004.pt").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_0000004\.pt.*has 10 bytes"):
        assert cf.resolve(tmp_path, kind="file", is_checkpoint=Path.is_file) == tmp_path / "step_0000002.pt"
    (tmp_path / "step_0000002.pt").write_bytes(b"\0" * 10)
    with pytest.raises(cf.CheckpointCorruptError, match="every checkpoint is corrupt"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cf.resolve(tmp_path, kind="file", is_checkpoint=Path.is_file)
    with pytest.raises(ValueError, match="no such checkpoint"):
        cf.resolve(tmp_path / "step_0000009.pt", kind="file", is_checkpoint=Path.is_file)


def test_fault_spec_is_validated():
    os.environ["DMC_FAULT"] = "save-4"
    try:
        with pytest.raises(ValueError, match="DMC_FAULT='save-4'"):
            cf.fault_point("save", 4, 0)
    finally:
        del os.environ["DMC_FAULT"]


# -- single process, in this process ------------------------------------------------------------
def test_resume_dir_is_first_start_then_restart_and_falls_back_past_truncation(tmp_path):
    """``--resume DIR`` on an empty DIR trains from step 0 exactly like a run without it; the same
    command after a truncation of the newest checkpoint resumes from the previous one with a
    warning naming the file and ends bit-identical to the uninterrupted run."""
    plain = _run(_argv("--save", str(tmp_path / "plain")))
    ck = tmp_path / "ck"
    first = _run(_argv("--save", str(ck), "--save-every", str(SAVE_EVERY), "--resume", str(ck)))
    assert first["start_step"] == 0 and first["param_sha256"] == plain["param_sha256"]
    final_before = _final_pt(ck)
    # run again to STEPS: the newest checkpoint (step 8) is truncated, step 6 is the fallback
    latest = ck / f"step_{STEPS:07d}.pt"
    latest.write_bytes(latest.read_bytes()[:5000])
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*step_{STEPS:07d}\.pt.*truncated"):
        again = _run(_argv("--save", str(ck), "--save-every", str(SAVE_EVERY), "--resume", str(ck)))
    assert again["start_step"] == 6
    assert again["param_sha256"] == plain["param_sha256"]
    _assert_same_state(final_before, _final_pt(ck))


def test_resume_explicit_corrupt_file_raises_naming_it(tmp_path):
    _run(_argv("--save", str(tmp_path), steps=2))
    path = tmp_path / "step_0000002.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"step_0000002\.pt does not match the SHA-256"):
        _run(_argv("--resume", str(path), steps=4))


# -- subprocesses: kill mid-save, elastic restart --------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMC_FAULT")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def _python_train(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_kill_during_save_leaves_previous_latest_and_same_command_resumes(tmp_path):
    """SIGKILL between writing step 6's file and publishing it: DIR holds step_3 and the
    temporary step_6 only; the same command again resumes from 3, ignores (and replaces) the
    partial save and ends bit-identical to the uninterrupted run."""
    ck = tmp_path / "ck"
    argv = _argv("--save", str(ck), "--save-every", str(SAVE_EVERY), "--resume", str(ck),
                 "--out", str(tmp_path / "out.json"))
    killed = _python_train(argv, _env(DMC_FAULT="save:6:0"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000003.pt", "step_0000003.pt.sha256",
                                                     "step_0000006.pt.tmp"]
    done = _python_train(argv, _env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr and "step_0000003.pt at step 3" in done.stdout + done.stderr
    assert not (ck / "step_0000006.pt.tmp").exists()
    plain = _run(_argv("--save", str(tmp_path / "plain")))
    assert json.loads((tmp_path / "out.json").read_text())["param_sha256"] == plain["param_sha256"]
    _assert_same_state(_final_pt(tmp_path / "plain"), _final_pt(ck))


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill torchrun AND its workers: the workers are not all in torchrun's process group (a
    timed-out DeepSpeed restart left both workers running, reparented to init, holding ports)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for p in children:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _torchrun(argv: list[str], out: Path, port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--max-restarts=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--monitor-interval=0.5",
           str(REPO / "launch" / "train.py"), *argv, "--out", str(out)]
    # own session: on a timeout the agent AND its workers are killed (killing only torchrun orphans them)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=float(os.environ.get('DMC_TORCHRUN_TIMEOUT', 420)))
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        err += "\n[test] torchrun timed out after 420 s: killed its process group"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


ENGINES = {
    "ddp": ([], "file"),
    "optimizer-owned": (["--grad-reduction", "optimizer"], "file"),
    "fsdp": (["--fsdp"], "dir"),
    "deepspeed": (["--deepspeed_config", str(REPO / "configs" / "zero1.json")], "dir"),
}


def _final_state(case: str, directory: Path) -> dict:
    """The final checkpoint's model + optimizer tensors (.pt payload, or every file of the
    directory loaded: DCP shards / DeepSpeed files, compared tensor for tensor)."""
    if ENGINES[case][1] == "file":
        return _final_pt(directory)
    root = directory / f"step_{STEPS:07d}"
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != cf.MANIFEST):
        rel = f.relative_to(root).as_posix()
        if f.suffix in (".pt", ".distcp"):
            out[rel] = torch.load(f, weights_only=False) if f.suffix == ".pt" else f.read_bytes()
    return out


# The restarted rendezvous hung in earlier sessions (DeepSpeed twice, DDP once under load). Causes:
# (1) with the c10d rendezvous the workers share the agent's store and their keys carry no
# per-restart prefix, so a restarted rank could read a dead rank's gloo address from the previous
# attempt (measured: "connectFullMesh ... Connection refused" after the restart, then a hang; more
# likely with DeepSpeed's slower start): launch/train.py prefixes the keys with
# TORCHELASTIC_RESTART_COUNT; (2) fixed endpoint ports shared by every checkout's run of this file
# on the box: free ports now; (3) a timed-out torchrun's workers outlived it holding ports: killed.
# -m full: each case takes ~35 s.
@pytest.mark.parametrize("case", [
    pytest.param("ddp", marks=pytest.mark.full),
    pytest.param("optimizer-owned", marks=[pytest.mark.slow, pytest.mark.full]),
    pytest.param("fsdp", marks=[pytest.mark.slow, pytest.mark.full]),
    pytest.param("deepspeed", marks=[pytest.mark.slow, pytest.mark.full]),
])
def test_elastic_restart_after_sigkill_of_one_worker_is_bit_identical(tmp_path, case):
    """torchrun --max-restarts 2 (c10d rendezvous) runs train.py with --save/--save-every/--resume
    on one DIR; rank 1 is SIGKILLed at the start of a random step (fires once: marker file);
    torchrun restarts both workers, which resume from the latest complete checkpoint. The job
    must exit 0 with the uninterrupted run's param_sha256 and bit-identical final model and
    optimizer state."""
    extra, _ = ENGINES[case]
    kill_at = random.Random(f"issue18-{case}").randint(SAVE_EVERY + 1, STEPS - 1)
    runs = {}
    for name, env in (("plain", _env()),
                      ("killed", _env(DMC_FAULT=f"step:{kill_at}:1", DMC_FAULT_MARKER=str(tmp_path / "fired")))):
        ck = tmp_path / name
        proc = _torchrun(_argv(*extra, "--save", str(ck), "--save-every", str(SAVE_EVERY), "--resume", str(ck)),
                         tmp_path / f"{name}.json", free_port(), env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / "fired").exists(), "the fault never fired: the test would prove nothing"
    resumed_from = (kill_at // SAVE_EVERY) * SAVE_EVERY
    assert runs["plain"]["start_step"] == 0 and runs["killed"]["start_step"] == resumed_from, kill_at
    assert runs["killed"]["param_sha256"] == runs["plain"]["param_sha256"]
    _assert_same_state(_final_state(case, tmp_path / "plain"), _final_state(case, tmp_path / "killed"))


def _torchrun_once(argv: list[str], out: Path, port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """2 workers, no restarts (the job fails when one worker dies)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(REPO / "launch" / "train.py"), *argv, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out_s, err = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out_s, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out_s, err)


@pytest.mark.slow
@pytest.mark.full
@pytest.mark.parametrize("case", ["fsdp", "deepspeed"])
def test_kill_during_save_then_rerun_resumes(tmp_path, case):
    """Directory checkpoints (FSDP2 DCP, DeepSpeed tags) at W=2: rank 0 is SIGKILLed after every
    rank wrote step 6 under its temporary name and before it published it; the job fails,
    DIR holds the complete step_3 and the partial step_6.tmp; the same command again resumes
    from 3 and ends bit-identical to the uninterrupted run. Then the newest checkpoint's largest
    file is truncated and the command resumes from the previous one (warning naming the file)."""
    extra, _ = ENGINES[case]
    ck = tmp_path / "killed"
    argv = _argv(*extra, "--save", str(ck), "--save-every", str(SAVE_EVERY), "--resume", str(ck))
    plain = _torchrun_once(_argv(*extra, "--save", str(tmp_path / "plain")), tmp_path / "plain.json", free_port(), _env())
    assert plain.returncode == 0, plain.stderr[-4000:]
    # rank 0 publishes: killed after every rank wrote step 6 under the temporary name, before the rename
    killed = _torchrun_once(argv, tmp_path / "killed.json", free_port(), _env(DMC_FAULT="save:6:0"))
    assert killed.returncode != 0
    names = {p.name for p in ck.iterdir() if p.name.startswith("step_")}
    assert names == {"step_0000003", "step_0000006.tmp"}, names
    assert (ck / "step_0000003" / cf.MANIFEST).is_file()
    again = _torchrun_once(argv, tmp_path / "killed.json", free_port(), _env())
    assert again.returncode == 0, again.stderr[-4000:]
    log = json.loads((tmp_path / "killed.json").read_text())
    assert log["start_step"] == 3
    assert log["param_sha256"] == json.loads((tmp_path / "plain.json").read_text())["param_sha256"]
    _assert_same_state(_final_state(case, tmp_path / "plain"), _final_state(case, ck))
    # truncation of the newest complete checkpoint: resume falls back to step 6 with a warning
    newest = ck / f"step_{STEPS:07d}"
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != cf.MANIFEST), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    fallback = _torchrun_once(argv, tmp_path / "fallback.json", free_port(), _env())
    assert fallback.returncode == 0, fallback.stderr[-4000:]
    assert f"skipping checkpoint {newest}" in fallback.stderr and victim.name in fallback.stderr
    log = json.loads((tmp_path / "fallback.json").read_text())
    assert log["start_step"] == 6 and log["param_sha256"] == json.loads((tmp_path / "plain.json").read_text())["param_sha256"]


# -- fail fast, together (dist_muonclip.engine.failfast) ----------------------------------------
@pytest.mark.parametrize("mode,world", [
    ("ddp", 2), ("optimizer", 2),
    pytest.param("fsdp", 2, marks=pytest.mark.full),
    pytest.param("optimizer", 4, marks=pytest.mark.full),
])
def test_one_rank_failing_in_newton_schulz_fails_every_rank_fast(tmp_path, mode, world):
    """After a clean step, Newton-Schulz raises (an out-of-memory error) on the last rank: every
    rank must raise PeerFailure in the same step naming that rank, the phase and the original
    exception, instead of waiting in the owner's scatter until the process group timeout. The
    30 s bound is generous for a loaded 2-core box (measured: benchmarks/results/fail_fast_cpu.json);
    without fail-fast the spawn deadline (240 s) would expire."""
    from benchmarks import fail_fast

    bad = world - 1
    res = fail_fast.run(mode, world, bad, str(tmp_path), timeout=240)
    for r in res:
        assert r["raised"] == "PeerFailure", r
        assert r["step"] == 1, r
        assert r["message"].startswith(f"rank {bad} failed in muon: OutOfMemoryError: {fail_fast.MESSAGE}"), r
        assert r["message"].endswith("the process group was aborted"), r
        assert r["delay_s"] < 30, r
    assert res[bad]["cause"] == "OutOfMemoryError"


def test_single_process_errors_pass_through_unchanged(monkeypatch):
    """No process group: the phase's own exception reaches the caller, not wrapped."""
    from dist_muonclip import MuonClip, ns_split

    model = torch.nn.Linear(8, 8, bias=False)
    opt = MuonClip(model, lr=0.02, ns_backend="torch")
    model(torch.randn(4, 8)).sum().backward()

    def boom(*a, **k):
        raise torch.OutOfMemoryError("no memory")
    monkeypatch.setattr(ns_split, "orthogonalize", boom)
    with pytest.raises(torch.OutOfMemoryError, match="no memory"):
        opt.step()


@pytest.mark.full
@pytest.mark.parametrize("case", ["ddp", "deepspeed"])
def test_elastic_restart_after_a_failing_newton_schulz_is_bit_identical(tmp_path, case):
    """torchrun --max-restarts 2: Newton-Schulz raises once on rank 1 mid-run; both ranks raise
    PeerFailure, exit, are restarted by the agent and resume from the latest checkpoint. The job
    exits 0 with the uninterrupted run's parameters."""
    fail_at = random.Random("issue18-ns").randint(SAVE_EVERY + 1, STEPS - 1)
    runs = {}
    for name, env in (("plain", _env()),
                      ("failed", _env(DMC_FAULT=f"ns:{fail_at}:1", DMC_FAULT_MARKER=str(tmp_path / "fired")))):
        ck = tmp_path / name
        proc = _torchrun(_argv(*ENGINES[case][0], "--save", str(ck), "--save-every", str(SAVE_EVERY), "--resume", str(ck)),
                         tmp_path / f"{name}.json", free_port(), env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        if name == "failed":
            assert "rank 1 failed in muon" in proc.stderr and "injected failure in Newton-Schulz" in proc.stderr, \
                proc.stderr[-5000:]
    assert (tmp_path / "fired").exists()
    assert runs["failed"]["start_step"] == (fail_at // SAVE_EVERY) * SAVE_EVERY
    assert runs["failed"]["param_sha256"] == runs["plain"]["param_sha256"]
