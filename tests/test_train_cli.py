"""launch/train.py's command line and console output, as a newcomer meets them: one default per flag
in ``--help``, ``--grad-clip`` doing what its help says under optimizer-owned reduction, and the
console line printing a gradient norm instead of ``n/a`` (issue 13, item 10)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import train as train_mod

REPO = Path(__file__).resolve().parent.parent
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def _help_entries(monkeypatch) -> dict[str, str]:
    """``--flag`` -> its whole help entry (flag line and wrapped help lines, joined)."""
    monkeypatch.setenv("COLUMNS", "200")   # fewer wrapped lines; the checks do not depend on width
    entries: dict[str, str] = {}
    current = None
    for line in train_mod.build_parser().format_help().splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_shows_one_default_per_flag(monkeypatch):
    """Pins the doubled defaults a newcomer saw: ``(default llama-gqa) (default: None)``."""
    entries = _help_entries(monkeypatch)
    assert len(entries) > 30, sorted(entries)
    for flag, text in entries.items():
        assert len(re.findall(r"\bdefault\b", text, flags=re.I)) <= 1, text
        assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text, text
    # the flags whose default is derived after parsing state it once, in the same form
    expected = {"--model": "(default: llama-gqa)", "--lr": "(default: muonclip 0.01, adamw 0.001)",
                "--adamw-lr": "(default: 0.003)", "--grad-clip": "(default: 1.0)", "--steps": "(default: 200)",
                "--grad-reduction": "(default: external)", "--profile-wire": "(default: True)",
                "--seed": "(default: 0)", "--save-every": "(default: 0)"}
    for flag, default in expected.items():
        assert default in entries[flag], entries[flag]
    # every flag that has a value of its own shows it
    for action in train_mod.build_parser()._actions:   # argparse exposes no public list of actions
        if action.help == "==SUPPRESS==" or not action.option_strings or action.option_strings[0] == "-h":
            continue
        if not (action.default is None or action.default is False or action.default == []):   # 0 is a value
            assert "(default: " in entries[action.option_strings[0]], entries[action.option_strings[0]]


@pytest.mark.parametrize("grad_clip, expected", [(None, 1.0), ("0.5", 0.5), ("0", None)])
def test_grad_clip_reaches_muonclip_under_optimizer_owned_reduction(grad_clip, expected):
    """Pins the flag table that said optimizer-owned reduction turns clipping off: ``--grad-clip``
    (default 1.0) becomes MuonClip's ``max_grad_norm``, 0 turns it off."""
    from dist_muonclip.models import build_model, load_model_config

    argv = ["--grad-reduction", "optimizer", "--no-qk-clip"] + ([] if grad_clip is None else ["--grad-clip", grad_clip])
    args = train_mod.parse_args(argv)
    model = build_model(load_model_config(None, overrides=TINY), seed=0, vocab_size=256)
    optimizer = train_mod.build_optimizer(args, model)
    assert optimizer.max_grad_norm == expected
    # DDP (external reduction) clips before step(): MuonClip must not clip a second time
    assert train_mod.build_optimizer(train_mod.parse_args(["--no-qk-clip"]), model).max_grad_norm is None


def test_format_grad_norm_falls_back_to_the_optimizer_metric():
    fmt = train_mod.format_grad_norm
    assert fmt(1.23456, {"grad_norm": 9.0}, optimizer_norm_is_global=True) == "1.235"   # the engine's wins
    assert fmt(float("nan"), {"grad_norm": 2.5}, optimizer_norm_is_global=True) == "2.500"
    assert fmt(float("nan"), {"grad_norm": 2.5}, optimizer_norm_is_global=False) == "2.500 (this rank's share)"
    assert fmt(float("nan"), {}, optimizer_norm_is_global=True) == "n/a"
    assert fmt(float("nan"), None, optimizer_norm_is_global=True) == "n/a"
    assert fmt(float("nan"), {"grad_norm": None}, optimizer_norm_is_global=True) == "n/a"   # JSON null: inf/nan


def _tiny_argv(*extra: str, steps: int = 2) -> list[str]:
    argv = ["--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "1",
            "--log-every", "1", "--eval-every", "0", "--eval-batches", "1", "--no-progress", "--device", "cpu",
            "--lr", "1e-2", "--ns-dtype", "float32"]
    for k, v in TINY.items():
        argv += ["--override", f"{k}={v}"]
    return argv + list(extra)


@pytest.mark.slow
def test_console_prints_the_global_grad_norm_with_optimizer_owned_reduction(tmp_path):
    """Pins ``grad norm n/a`` on the console under ``--grad-reduction optimizer`` at W=2.

    Oracle: the single-process DDP-engine run, whose ``clip_grad_norm_`` measures the same global
    batch's gradient norm before clipping. With fp32 Newton-Schulz the 2-rank trajectory equals the
    single process up to fp32 reduction order (4.8e-7 on losses, test_train_entry), so rtol 1e-5;
    the console prints 3 decimals, hence an absolute 6e-4 on the printed value (half a unit of the
    last printed digit plus that rounding)."""
    torch.set_num_threads(1)
    oracle = train_mod.train(train_mod.parse_args(_tiny_argv()))
    oracle_norms = [row["grad_norm"] for row in oracle["steps"]]
    assert all(n is not None and n > 1.0 for n in oracle_norms), oracle_norms   # so clipping at 1.0 is active

    from dist_muonclip.launch_env import free_port

    out = tmp_path / "log.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "launch" / "train.py"), *_tiny_argv("--grad-reduction", "optimizer"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads(out.read_text())
    assert log["world_size"] == 2
    printed = re.findall(r"step\s+(\d+)/2 \| loss \S+ \| lr \S+ \| grad norm (\S+) \|", proc.stdout)
    assert [int(s) for s, _ in printed] == [1, 2], proc.stdout
    for (_, text), row, want in zip(printed, log["steps"], oracle_norms):
        metric = row["metrics"]["grad_norm"]                 # MuonClip's global pre-clip norm
        assert math.isclose(metric, want, rel_tol=1e-5), (metric, want)
        assert abs(float(text) - want) <= 6e-4, (text, want)
    # the loss trajectory confirms the clip happened inside step() (else step 2 would differ)
    for got, want in zip(log["steps"], oracle["steps"]):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5), (got["loss"], want["loss"])
