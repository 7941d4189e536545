"""launch/setup_env.sh's torch decision (launch/torch_choice.py), with stubbed probes, and the
set-up's own text (issue 13, item 10: a newcomer without a GPU got PyPI's CUDA build and its
nvidia packages; a cluster user's own torch would have been replaced)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import torch_choice

REPO = Path(__file__).resolve().parent.parent

PIN = "torch==2.13.0"


def _never() -> bool:
    raise AssertionError("probe called although the decision did not need it")


def _choose(**kw):
    base = dict(pin=PIN, installed=None, has_gpu=False, system="Linux", local_cpu=lambda: False,
                cpu_index_reachable=lambda: True)
    return torch_choice.choose(**{**base, **kw})


@pytest.mark.parametrize("version", ["2.5.0", "2.6.0+cu124", "2.13.0+cpu", "2.14.0a0+git1234", "3.0.0"])
def test_a_compatible_installed_torch_is_kept_without_probing(version):
    choice = _choose(installed=version, has_gpu=True, local_cpu=_never, cpu_index_reachable=_never)
    assert choice.action == "keep" and choice.pip_args == [] and version in choice.reason


@pytest.mark.parametrize("version", ["2.4.1", "1.13.1+cu117", "garbage"])
def test_an_incompatible_installed_torch_is_replaced(version):
    assert _choose(installed=version).action == "cpu-index"


def test_gpu_gets_the_plain_pinned_install():
    choice = _choose(has_gpu=True, local_cpu=_never, cpu_index_reachable=_never)
    assert (choice.action, choice.pip_args) == ("pinned", [PIN])


@pytest.mark.parametrize("system", ["Darwin", "Windows"])
def test_platforms_whose_pypi_wheel_is_cpu_get_the_plain_pinned_install(system):
    choice = _choose(system=system, local_cpu=_never, cpu_index_reachable=_never)
    assert (choice.action, choice.pip_args) == ("pinned", [PIN])


def test_no_gpu_with_a_local_cpu_build_installs_the_pin_without_the_cpu_index():
    choice = _choose(local_cpu=lambda: True, cpu_index_reachable=_never)
    assert (choice.action, choice.pip_args) == ("pinned", [PIN])


def test_no_gpu_uses_pytorchs_cpu_index_with_pypi_as_extra():
    choice = _choose()
    assert choice.action == "cpu-index"
    assert choice.pip_args == ["--index-url", torch_choice.CPU_INDEX, "--extra-index-url", torch_choice.PYPI_INDEX,
                               PIN]


def test_unreachable_cpu_index_falls_back_to_plain_pypi_and_says_it_is_the_cuda_build():
    choice = _choose(cpu_index_reachable=lambda: False)
    assert (choice.action, choice.pip_args) == ("pypi-fallback", [PIN])
    assert "CUDA build" in choice.reason and "DIST_MUONCLIP_TORCH_INDEX" in choice.reason


def test_dry_run_on_this_machine_reports_the_real_probes():
    """This interpreter has a compatible torch (the suite imports it): the decision is to keep it,
    and --dry-run installs nothing."""
    import torch

    proc = subprocess.run([sys.executable, str(REPO / "launch" / "torch_choice.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == (f"[setup_env] torch: keeping the installed torch {torch.__version__} "
                        "(satisfies torch>=2.5)"), proc.stdout
    assert json.loads(lines[-1]) == {"action": "keep", "command": []}


def test_min_torch_matches_setup_py():
    """torch_choice keeps what the package accepts: its bound is setup.py's install_requires."""
    text = (REPO / "setup.py").read_text()
    assert f'"torch>={".".join(map(str, torch_choice.MIN_TORCH))}"' in text


def test_setup_env_installs_torch_through_the_choice_and_constrains_the_rest():
    """The script, not only the helper: torch comes from torch_choice.py, and the package install
    is constrained to the torch present afterwards (no CUDA build swapped in by a dependency)."""
    text = (REPO / "launch" / "setup_env.sh").read_text()
    assert 'launch/torch_choice.py" --pin "$_torch"' in text
    assert 'pip install -q -c "$_constraint" -e "$_root[$_extras]"' in text
    assert 'pip install -q "$_torch"' not in text   # the unconditional pinned install a newcomer hit
    proc = subprocess.run(["bash", "-n", str(REPO / "launch" / "setup_env.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


_BUILD_EDITABLE = """
import json, sys, tempfile, warnings
from setuptools import build_meta
with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    build_meta.build_editable(out)
print(json.dumps([f"{w.category.__name__}: {str(w.message).strip()[:300]}" for w in caught]))
"""


def test_editable_install_emits_no_setuptools_warning(tmp_path):
    """Pins the set-up noise a newcomer saw (issue 13, item 10): setuptools warnings about an
    undeclared data package, then its "Editable installation ... folders with the same name"
    notice, which pip prints on every set-up. The editable wheel is built with setuptools' PEP 660
    hook (what ``pip install -e .`` runs), every warning recorded."""
    proc = subprocess.run([sys.executable, "-c", _BUILD_EDITABLE], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
