"""launch/train.py's deepspeed engine (--deepspeed_config): 2-rank DeepSpeed runs against the
single-process run of the same script, resume at another world size, config-driven optimizer and
scheduler, and the errors for what train.py cannot run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_muonclip.launch_env import free_port
from launch import train as train_mod

REPO = Path(__file__).resolve().parent.parent
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DIST_MUONCLIP_DS_SHM="0")


def _argv(*extra: str, steps: int = 10) -> list[str]:
    argv = ["--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2", "--log-every", "5",
            "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--device", "cpu", "--lr", "1e-2",
            "--ns-dtype", "float32"]
    for k, v in TINY.items():
        argv += ["--override", f"{k}={v}"]
    return argv + list(extra)


def _config(tmp_path: Path, stage: int, **extra) -> str:
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6, **extra}))
    return str(path)


def _launch(argv: list[str], out: Path, nproc: int) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), *argv, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(REPO / "launch" / "train.py"), *argv, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


# fp32 throughout (NS too): the 2-rank DeepSpeed run differs from the single process only in the
# summation order of the gradient reduction (each rank's mean over half the tokens, DeepSpeed's
# flat all-reduce / reduce-scatter, then / W), O(1 ulp) per step; measured loss differences
# <= 4.8e-7 (2 ulps) over 10 steps, grad norms within 5e-7 relative. 2e-5 leaves room for
# drift; a wrong data slice or a gradient summed instead of averaged moves the loss by > 1e-2
# within a few steps (lr 1e-2).
LOSS_TOL = 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, stage", [("muonclip", 1), ("muonclip", 2), ("adamw", 1)])
def test_two_ranks_deepspeed_match_single_process(tmp_path, optimizer, stage):
    """torchrun, 2 gloo ranks, --deepspeed_config (no optimizer section: train.py's flags build the
    optimizer, train.py's schedule sets the lr, --grad-clip becomes gradient_clipping) against the
    plain single-process train.py run."""
    argv = _argv("--optimizer", optimizer)
    single = train_mod.train(train_mod.parse_args(argv))
    two = _launch(argv + ["--deepspeed_config", _config(tmp_path, stage)], tmp_path / "two.json", 2)
    assert two["world_size"] == 2 and two["engine"] == "deepspeed"
    for r1, r2 in zip(single["steps"], two["steps"], strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=0, abs=LOSS_TOL), r1["step"]
        assert r2["lr"] == pytest.approx(r1["lr"], rel=1e-12)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)   # same global pre-clip norm
    assert two["final_eval_loss"] == pytest.approx(single["final_eval_loss"], rel=0, abs=LOSS_TOL)
    if optimizer == "muonclip":   # QK-Clip's max logits reach the log through the DeepSpeed client
        assert two["steps"][-1]["metrics"]["max_logit_per_layer"] == pytest.approx(
            single["steps"][-1]["metrics"]["max_logit_per_layer"], rel=1e-4)


@pytest.mark.slow
def test_resume_at_another_world_size(tmp_path):
    """Save at step 5 of a 2-rank ZeRO-2 run (step_0000005/ with MuonClip's full-state export),
    resume in one process: steps 6-10 continue the uninterrupted 2-rank run."""
    cfg = _config(tmp_path, 2)
    argv = _argv("--deepspeed_config", cfg)
    full = _launch(argv + ["--save", str(tmp_path / "ckpt"), "--save-every", "5"], tmp_path / "full.json", 2)
    assert (tmp_path / "ckpt" / "step_0000005").is_dir()
    resumed = _launch(argv + ["--resume", str(tmp_path / "ckpt" / "step_0000005")], tmp_path / "resumed.json", 1)
    assert resumed["start_step"] == 5 and resumed["world_size"] == 1
    for r1, r2 in zip(full["steps"][5:], resumed["steps"], strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=0, abs=LOSS_TOL), r1["step"]


@pytest.mark.slow
def test_config_optimizer_and_scheduler_drive_the_run(tmp_path):
    """A config with a MuonClip section and a WarmupLR scheduler (one process): the logged lr is
    the scheduler's (train.py's own schedule is off), the optimizer is the section's."""
    cfg = _config(tmp_path, 1, optimizer={"type": "MuonClip", "params": {"lr": 0.02, "adamw_lr": 0.004,
                                                                           "ns_dtype": "float32"}},
                  scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02,
                                                            "warmup_num_steps": 4, "warmup_type": "linear"}})
    log = _launch(_argv("--deepspeed_config", cfg, steps=6), tmp_path / "log.json", 1)
    # WarmupLR: lr of step t = 0.02 * min(1, max(0, t - 1) / 4)... read back exactly as DeepSpeed computes it
    lrs = [r["lr"] for r in log["steps"]]
    assert lrs[0] == 0.0 and lrs[-1] == pytest.approx(0.02) and lrs == sorted(lrs)
    assert all(math.isfinite(r["loss"]) for r in log["steps"])
    assert log["steps"][-1]["loss"] < log["steps"][1]["loss"]


def test_cli_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_mod.parse_args(_argv("--deepspeed_config", str(tmp_path / "missing.json")))
    assert "--deepspeed_config" in capsys.readouterr().err
    cfg = _config(tmp_path, 1)
    for extra, words in [(("--engine", "deepspeed"), "needs --deepspeed_config"),
                         (("--deepspeed_config", cfg, "--fsdp"), "cannot be combined"),
                         (("--deepspeed_config", cfg, "--grad-reduction", "optimizer"), "does not apply")]:
        with pytest.raises(SystemExit):
            train_mod.parse_args(_argv(*extra))
        assert words in capsys.readouterr().err
    from launch.engines_deepspeed import prepare_train_config

    bad = tmp_path / "gas.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        prepare_train_config(str(bad), batch_size=8, world_size=2, grad_clip=1.0)
    got = prepare_train_config(cfg, batch_size=8, world_size=2, grad_clip=0.5)
    assert (got["train_batch_size"], got["train_micro_batch_size_per_gpu"], got["gradient_clipping"]) == (8, 4, 0.5)
