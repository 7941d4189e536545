"""``import dist_muonclip.hf`` in a script that uses accelerate and never imports transformers.

The hooks for transformers and accelerate are installed when those modules are imported
(:mod:`dist_muonclip.integrations.hf_imports`), never by importing them ourselves. Each scenario
runs in a fresh interpreter (``python -m benchmarks.scenarios.accelerate_ds`` or ``python -c``),
since this test process has imported transformers already.

CPU limit (accelerate's, not ours): accelerate counts one process under DeepSpeed on CPU, so the
accelerate runs are W=1 (the two-rank accelerate run with an HF model is
tests/test_hf.py::test_accelerate_deepspeed_plugin_with_dummy_optim_matches_single_process; the real
path on a GPU is ``benchmarks/hf_gpu.py --only accelerate-deepspeed``). accelerate 1.16's DeepSpeed
plugin imports transformers itself when it starts (``DeepSpeedPlugin.select`` ->
``set_deepspeed_weakref``), so "never imports transformers" is checked where the user's script
stands before ``Accelerator(...)``: after ``import dist_muonclip.hf`` and accelerate's imports.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from benchmarks.scenarios import accelerate_ds as A  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# W=1: no gradient reduction; the run differs from the plain MuonClip oracle only in DeepSpeed's flat
# fp32 copies and kernel choices (measured 3.0e-8 after 2 steps); 1e-6 flags any real difference
# (one wrong hyperparameter or optimizer moves parameters by >= 1e-4 per step)
ATOL = 1e-6
STEPS = 2


def _python(args: list[str], tmp_path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MASTER_PORT", None)
    out = subprocess.run([sys.executable, *args], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _scenario(tmp_path, *args: str) -> dict:
    path = str(tmp_path / "out.pt")
    _python(["-m", "benchmarks.scenarios.accelerate_ds", path, "--steps", str(STEPS), *args], tmp_path)
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def oracle():
    return A.train_single(STEPS)


def _check_common(o: dict, oracle: dict, *, offload: bool) -> None:
    # what the script had done before accelerate's DeepSpeed plugin started: no transformers, and
    # accelerate already patched by `import dist_muonclip.hf` (not by a transformers hook)
    assert o["before"]["transformers_imported"] is False
    assert o["before"]["patched"] == {"deepspeed": True, "hf_deepspeed": False, "trainer": False, "accelerate": True}
    assert o["before"]["offload_map_patched"] is True
    assert o["distributed_type"] == "DistributedType.DEEPSPEED" and o["num_processes"] == 1
    assert o["is_adapter"] and o["inner"] == "MuonClip" and o["layout"] == "flat_fragments(zero)"
    assert o["offload"] is offload and o["num_steps"] == STEPS
    muon, adamw = o["groups"]
    assert muon["use_muon"] and not adamw["use_muon"]
    for key, want in A.WANT.items():
        group = adamw if key.startswith("adamw_") else muon
        name = {"adamw_lr": "lr", "adamw_betas": "betas", "adamw_eps": "eps"}.get(key, key)
        assert group[name] == pytest.approx(want), key
    assert adamw["weight_decay"] == pytest.approx(A.WANT["weight_decay"])   # adamw_weight_decay follows it
    # the split on the plain model: hidden matrices only; embedding, lm_head (found by name), norm, biases AdamW
    assert o["muon_names"] == [f"blocks.{i}.{j}.weight" for i in range(2) for j in (0, 2)]
    assert o["params"].keys() == oracle.keys()
    for k in oracle:
        torch.testing.assert_close(o["params"][k], oracle[k], atol=ATOL, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_accelerate_only_script_json_type_muonclip_matches_oracle(oracle, tmp_path):
    """``"type": "MuonClip"`` in the JSON, ``DummyOptim(lr, weight_decay)`` filling its "auto"
    values, ZeRO-2: the optimizer accelerate builds is our adapter around MuonClip with the JSON's
    and DummyOptim's hyperparameters, and its steps equal plain MuonClip's."""
    o = _scenario(tmp_path, "--stage", "2")
    _check_common(o, oracle, offload=False)
    assert o["zero_stage"] == 2


@pytest.mark.slow
def test_accelerate_only_script_instance_with_offload_matches_oracle(oracle, tmp_path):
    """``accelerator.prepare(model, MuonClip(model))`` with ``offload_optimizer: cpu`` (ZeRO-1):
    accelerate would swap a client optimizer for DeepSpeedCPUAdam; the accelerate hook of
    ``import dist_muonclip.hf`` keeps the MuonClip instance, with no transformers import."""
    o = _scenario(tmp_path, "--stage", "1", "--route", "instance", "--offload")
    _check_common(o, oracle, offload=True)
    assert o["zero_stage"] == 1 and o["is_instance"]


def test_import_hf_imports_neither_transformers_nor_accelerate(tmp_path):
    """``import dist_muonclip.hf`` patches transformers and accelerate when they are imported, in
    either order, and importing a model first (modeling_utils imports
    transformers.integrations.deepspeed half-way through its own import) meets no half-initialized
    module."""
    code = textwrap.dedent("""
        import sys
        import dist_muonclip.hf as hf
        assert "transformers" not in sys.modules and "accelerate" not in sys.modules, sorted(sys.modules)
        assert hf.patched() == {"deepspeed": True, "hf_deepspeed": False, "trainer": False, "accelerate": False}
        from transformers import LlamaForCausalLM     # modeling_utils -> integrations.deepspeed
        assert hf.patched()["hf_deepspeed"] and not hf.patched()["trainer"]
        from transformers import Trainer               # trainer -> accelerate
        assert all(hf.patched().values()), hf.patched()
        import accelerate.accelerator as acc_mod
        import transformers.integrations.deepspeed as hf_ds
        import transformers.trainer as hf_trainer
        assert hf_trainer.deepspeed_init is hf_ds.deepspeed_init
        assert hf_ds.deepspeed_init.__wrapped__ is not None            # ours (functools.wraps)
        assert acc_mod.map_pytorch_optim_to_deepspeed.__module__ == "dist_muonclip.integrations.hf_deepspeed"
        # modules keep their own loader (the hook only wrapped it for one import)
        assert type(hf_trainer.__loader__).__name__ == "SourceFileLoader", hf_trainer.__loader__
        assert type(hf_trainer.__spec__.loader).__name__ == "SourceFileLoader"
        from dist_muonclip.integrations import hf_imports
        assert hf_imports.pending() == [] and not any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path)
        print("OK")
    """)
    assert _python(["-c", code], tmp_path).stdout.strip().endswith("OK")


def test_when_imported_runs_once_after_the_import_or_at_once(tmp_path, monkeypatch):
    """The hook calls back after the module's code ran (its names exist), once; a module already
    imported gets the call at once; a failing import keeps the hook for the next attempt."""
    from dist_muonclip.integrations import hf_imports

    pkg = tmp_path / "hookpkg_x"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 41\n")
    (pkg / "bad.py").write_text("import os\nif os.environ.get('HOOKPKG_FAIL'):\n    raise RuntimeError('no')\n"
                                "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    try:
        hf_imports.when_imported("hookpkg_x.mod", lambda m: seen.append((m.__name__, m.VALUE)))
        hf_imports.when_imported("hookpkg_x.bad", lambda m: seen.append((m.__name__, m.VALUE)))
        assert seen == [] and "hookpkg_x.mod" in hf_imports.pending()
        import hookpkg_x.mod
        assert seen == [("hookpkg_x.mod", 41)] and type(hookpkg_x.mod.__loader__).__name__ == "SourceFileLoader"
        monkeypatch.setenv("HOOKPKG_FAIL", "1")
        with pytest.raises(RuntimeError):
            import hookpkg_x.bad  # noqa: F401
        assert "hookpkg_x.bad" in hf_imports.pending() and len(seen) == 1
        monkeypatch.delenv("HOOKPKG_FAIL")
        import hookpkg_x.bad  # noqa: F401,F811
        assert seen[-1] == ("hookpkg_x.bad", 1) and "hookpkg_x.bad" not in hf_imports.pending()
        hf_imports.when_imported("hookpkg_x.mod", lambda m: seen.append(("again", m.VALUE)))
        assert seen[-1] == ("again", 41)                  # already imported: called at once
    finally:
        for name in ("hookpkg_x.bad", "hookpkg_x.mod", "hookpkg_x"):
            sys.modules.pop(name, None)
