"""Tests of launch/train.py: schedule, single-process loop vs an in-test oracle, determinism,
bit-identical resume, and a 2-process torchrun/gloo run against the single-process run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_muonclip.data import batch_for_step
from dist_muonclip.models import available_presets, build_model, load_model_config
from launch import train as train_mod

REPO = Path(__file__).resolve().parent.parent
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster, and avoids OpenMP spin-waits fighting other
    processes on a shared 2-core CI machine (which made these tests 5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_argv(tmp_path: Path, *extra: str, steps: int = 8) -> list[str]:
    argv = ["--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2",
            "--log-every", "4", "--eval-every", "0", "--eval-batches", "1", "--no-progress",
            "--device", "cpu"]
    for k, v in TINY.items():
        argv += ["--override", f"{k}={v}"]
    return argv + list(extra)


def _run(argv: list[str]) -> dict:
    return train_mod.train(train_mod.parse_args(argv))


def _has_muonclip() -> bool:
    try:
        from dist_muonclip import MuonClip  # noqa: F401
    except ImportError:
        return False
    return True


OPTIMIZERS = ["adamw", pytest.param("muonclip", marks=pytest.mark.skipif(
    not _has_muonclip(), reason="dist_muonclip.MuonClip not available yet"))]


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    f = [train_mod.lr_factor(s, total_steps=10, warmup_steps=4) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    # cosine from 1 (first step after warmup) to 0.1 (last step): 0.1 + 0.9 * (1 + cos(pi*k/5)) / 2
    for k, s in enumerate(range(4, 10)):
        assert f[s] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * k / 5)), rel=1e-12, abs=0)
    assert train_mod.lr_factor(0, total_steps=5, warmup_steps=0) == 1.0


def test_presets_build_the_advertised_architectures():
    """Each preset builds offline with the byte vocabulary and 1-5M parameters; the
    architecture-specific parts that QK-Clip must handle are really there."""
    assert set(available_presets()) >= {"llama-gqa", "mistral", "qwen2", "qwen3", "deepseek-v3"}
    for name in available_presets():
        model = build_model(load_model_config(name))
        n = sum(p.numel() for p in model.parameters())
        assert 1e6 <= n <= 5e6, (name, n)
        assert model.config.vocab_size == 256
        names = {k for k, _ in model.named_parameters()}
        if name in ("llama-gqa", "mistral", "qwen2", "qwen3"):
            assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
        if name == "qwen2":
            assert "model.layers.0.self_attn.q_proj.bias" in names
        if name == "qwen3":
            assert "model.layers.0.self_attn.q_norm.weight" in names
        if name == "mistral":
            assert model.config.sliding_window == 64
        if name == "deepseek-v3":
            assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in names  # MLA
            assert any(".mlp.experts." in k for k in names)                        # MoE


def test_single_process_run_equals_in_test_oracle_and_learns(tmp_path):
    """The script's loop (data, loss, schedule, clipping, AdamW) equals a direct re-implementation
    bit for bit on CPU (same ops in the same order, deterministic kernels), and the loss falls."""
    steps, lr = 8, 1e-2
    log = _run(_tiny_argv(tmp_path, "--optimizer", "adamw", "--lr", str(lr), "--save", str(tmp_path / "ck"),
                          steps=steps))

    model = build_model(load_model_config(overrides=TINY), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    for step in range(steps):
        factor = (step + 1) / 2 if step < 2 else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 2) / 5))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        x, y = batch_for_step(step, global_batch=4, seq_len=32, seed=0)
        loss = F.cross_entropy(model(input_ids=x, use_cache=False).logits.reshape(-1, 256), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    assert [r["loss"] for r in log["steps"]] == losses
    saved = torch.load(tmp_path / "ck" / f"step_{steps:07d}.pt", weights_only=False)
    for name, p in model.state_dict().items():
        assert torch.equal(saved["model"][name], p), name
    # learning: from ln(256) = 5.55 at init to clearly below (8 steps at lr 1e-2 reach ~3.5)
    assert losses[0] == pytest.approx(math.log(256), abs=0.1)
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0
    assert log["final_eval_loss"] < losses[0] - 1.0


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_same_seed_is_deterministic_and_resume_is_bit_identical(tmp_path, optimizer):
    """Pins that a checkpoint holds everything the run depends on (model, optimizer state, step,
    RNG; the sampler is stateless): stopping at step 3 and resuming gives the same losses and the
    same final model and optimizer state as the uninterrupted run."""
    base = _tiny_argv(tmp_path, "--optimizer", optimizer, steps=6)
    full = _run(base + ["--save", str(tmp_path / "full"), "--save-every", "3"])
    again = _run(base)
    assert [r["loss"] for r in full["steps"]] == [r["loss"] for r in again["steps"]]

    resumed = _run(base + ["--resume", str(tmp_path / "full" / "step_0000003.pt"),
                           "--save", str(tmp_path / "resumed")])
    assert resumed["start_step"] == 3
    assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in full["steps"][3:]]
    a = torch.load(tmp_path / "full" / "step_0000006.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "step_0000006.pt", weights_only=False)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            w = b["optimizer"]["state"][key][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (key, k)


def _has_qk_clip() -> bool:
    try:
        import dist_muonclip.qk_clip  # noqa: F401
    except ImportError:
        return False
    return _has_muonclip()


@pytest.mark.skipif(not _has_qk_clip(), reason="dist_muonclip.qk_clip not available yet")
def test_qk_clip_flags_reach_the_optimizer(tmp_path):
    """--qk-clip-tau is the threshold MuonClip clips at (a tau below the tiny model's max logits
    clips heads and reports per-layer max logits); --no-qk-clip turns tracking and clipping off."""
    low = _run(_tiny_argv(tmp_path, "--qk-clip-tau", "0.05", steps=3))
    metrics = low["steps"][-1]["metrics"]
    assert len(metrics["max_logit_per_layer"]) == TINY["num_hidden_layers"]
    assert max(metrics["max_logit_per_layer"]) > 0.05
    assert metrics["qk_clip/num_heads_clipped"] > 0
    off = _run(_tiny_argv(tmp_path, "--no-qk-clip", steps=3))
    assert "max_logit_per_layer" not in off["steps"][-1]["metrics"]
    # with the default tau = 100 nothing is clipped, so the run equals the --no-qk-clip run
    default = _run(_tiny_argv(tmp_path, steps=3))
    assert default["steps"][-1]["metrics"]["qk_clip/num_heads_clipped"] == 0
    assert [r["loss"] for r in default["steps"]] == [r["loss"] for r in off["steps"]]


from dist_muonclip.launch_env import free_port as _free_port  # noqa: E402


_MUONCLIP_MARK = pytest.mark.skipif(not _has_muonclip(), reason="dist_muonclip.MuonClip not available yet")
_DDP_CASES = {"adamw": ("adamw", ()), "muonclip": ("muonclip", ()),
              # no DDP: MuonClip reduce-scatters gradients to owners itself (no clipping possible before it)
              "muonclip-optimizer-reduction": ("muonclip", ("--grad-reduction", "optimizer", "--grad-clip", "0"))}


def _ddp_argv(case: str) -> list[str]:
    optimizer, extra = _DDP_CASES[case]
    return _tiny_argv(Path("."), "--optimizer", optimizer, "--lr", "1e-2", "--ns-dtype", "float32", *extra,
                      steps=10)


def _torchrun(argv: list[str], out_dir: Path) -> dict:
    """Run launch/train.py on 2 gloo ranks, writing out_dir/log.json and checkpoints under out_dir/ckpt."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(REPO / "launch" / "train.py"), *argv,
           "--out", str(out_dir / "log.json"), "--save", str(out_dir / "ckpt")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out_dir / "log.json").read_text())


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """case -> (log, dir) of a 10-step 2-rank run checkpointed at steps 5 and 10 (run once, shared)."""
    cache: dict[str, tuple[dict, Path]] = {}

    def get(case: str) -> tuple[dict, Path]:
        if case not in cache:
            out = tmp_path_factory.mktemp(case)
            cache[case] = (_torchrun(_ddp_argv(case) + ["--save-every", "5"], out), out)
        return cache[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    "adamw",
    pytest.param("muonclip", marks=_MUONCLIP_MARK),
    pytest.param("muonclip-optimizer-reduction", marks=_MUONCLIP_MARK),
])
def test_torchrun_two_ranks_gloo_matches_single_process(tmp_path, case, two_rank_runs):
    """2-process DDP over gloo vs one process on the same global batch (fp32 throughout; for
    MuonClip Newton-Schulz runs in fp32 too). Under torchrun MuonClip runs its distributed mode
    (each matrix orthogonalized by its owner rank, updates gathered) on DDP's all-reduced
    gradients, or, with --grad-reduction optimizer, without DDP on gradients it reduce-scatters
    itself; this pins both modes against the single-process optimizer.

    The runs differ only in floating-point summation order: each rank's loss is the mean over its
    half of the tokens and DDP averages the two halves' gradients (bucketed), where the single
    process reduces all tokens in one kernel. These are O(1 ulp) differences per step (measured:
    losses within 5e-7 over 20 steps of the default model, for both optimizers). AdamW's
    per-entry normalisation m / sqrt(v) magnifies rounding noise in near-zero gradient entries
    (measured here: max |param diff| 8e-6 for AdamW, 3e-7 for MuonClip with fp32 NS), so
    parameters are compared at atol 1e-4 = 1% of one step's lr; a real bug (a wrong data slice,
    gradients summed instead of averaged) moves parameters by ~lr = 1e-2 per step.
    """
    single = _run(_ddp_argv(case) + ["--save", str(tmp_path / "one")])
    assert single["world_size"] == 1
    two, two_dir = two_rank_runs(case)
    assert two["world_size"] == 2
    # ~1 ulp of fp32 at loss values 3-6 is 2.4e-7-4.8e-7; 2e-6 allows a few ulps of drift.
    for r1, r2 in zip(single["steps"], two["steps"], strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=0, abs=2e-6), r1["step"]
    a = torch.load(tmp_path / "one" / "step_0000010.pt", weights_only=False)["model"]
    b = torch.load(two_dir / "ckpt" / "step_0000010.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
@_MUONCLIP_MARK
def test_torchrun_checkpoint_resume_is_bit_identical(tmp_path, two_rank_runs):
    """Pins the distributed checkpoint path: MuonClip's state_dict() is a collective under torchrun
    (every rank must call it, rank 0 writes), and resuming the 2-rank run from its step-5
    checkpoint at 2 ranks reproduces the uninterrupted run's losses and final model bit for bit."""
    full, full_dir = two_rank_runs("muonclip")
    resumed = _torchrun(_ddp_argv("muonclip") + ["--resume", str(full_dir / "ckpt" / "step_0000005.pt")],
                        tmp_path)
    assert resumed["start_step"] == 5 and resumed["world_size"] == 2
    assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in full["steps"][5:]]
    a = torch.load(full_dir / "ckpt" / "step_0000010.pt", weights_only=False)
    b = torch.load(tmp_path / "ckpt" / "step_0000010.pt", weights_only=False)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_cli_rejects_bad_flags_before_training(capsys):
    for argv, message in [(["--steps", "0"], "--steps must be >= 1"),
                          (["--override", "hidden_size"], "KEY=VALUE"),
                          (["--model", "llama-gqa", "--model-config", "x.json"], "not both"),
                          (["--grad-clip", "-1"], "--grad-clip"),
                          (["--grad-reduction", "optimizer", "--optimizer", "adamw"], "needs --optimizer muonclip")]:
        with pytest.raises(SystemExit):
            train_mod.parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        load_model_config("gpt5")

