"""Runs tests/kernels_interpret_cases.py (Triton kernels vs torch references on CPU) in a fresh
process with TRITON_INTERPRET=1.

Triton builds its jit'd standard library (tl.max, tl.cdiv, ...) in the mode in force when it is
first imported; any earlier test that imports triton in compiled mode would make every
interpreted kernel fail, so the interpreter cases get a process of their own.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "kernels_interpret_cases.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"interpreter kernel cases failed ({summary}):\n{res.stdout[-8000:]}\n{res.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary, summary
