"""Checkpoints survive a process restart and a rebuilt model: bit-identical continuation on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from dist_muonclip import MuonClip

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tests._ckpt_worker", *map(str, args)], check=True, cwd=ROOT, env=env,
                   timeout=300)


def test_resume_in_new_process_is_bit_identical(tmp_path):
    path = tmp_path / "run"
    _run("save", path, 4, 4)
    _run("resume", path, 4, 4)
    _run("straight", path, 4, 4)
    resumed = torch.load(str(path) + ".resumed")
    straight = torch.load(str(path) + ".straight")
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


def test_state_dict_is_keyed_by_parameter_name():
    from tests._tiny_hf import tiny_model

    model = tiny_model("qwen2")
    opt = MuonClip(model, lr=1e-3)
    ids = torch.randint(0, 96, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sd = opt.state_dict()
    names = {n for n, p in model.named_parameters()}
    assert set(sd["state"]) == names
    assert "momentum_buffer" in sd["state"]["model.layers.0.self_attn.q_proj.weight"]
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(sd["state"]["model.layers.0.self_attn.q_proj.bias"])
    assert sd["param_groups"][0]["params"][0] in names
