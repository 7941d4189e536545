"""Shared helpers for the GPU benchmarks: environment record, timing, ceiling."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch

__all__ = ["environment", "git_commit", "git_dirty", "median_ms", "matmul_ceiling_tflops", "write_json"]


def git_commit() -> str:
    """HEAD of this checkout; ``DMC_GIT_COMMIT`` names it for a run from a copy of the tree
    without ``.git`` (the device machine), else "unknown"."""
    env = os.environ.get("DMC_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a copy without .git still benchmarks
        return "unknown"


def git_dirty() -> bool | None:
    """Whether the checkout has uncommitted changes (``None``: not a git checkout)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=True).stdout
    except Exception:  # noqa: BLE001
        return None
    return bool(out.strip())


def environment(modules: tuple[str, ...] = ("triton", "deepspeed", "transformers")) -> dict:
    """The record every benchmark JSON carries: device (GPU name and SM count, or the CPU), torch,
    CUDA and Python versions, the versions of ``modules`` ("not importable: ..." when missing),
    the git commit (and whether the tree was dirty) and the UTC time. The one copy for every
    benchmark (multi_gpu.py adds its NCCL and topology fields on top)."""
    env: dict = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                 "git_commit": git_commit(), "git_dirty": git_dirty(),
                 "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                   cuda=torch.version.cuda, gpu_count=torch.cuda.device_count(),
                   devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    else:
        env.update(device=platform.processor() or platform.machine() or "cpu", gpu_count=0)
    for mod in modules:
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            env[mod] = f"not importable: {type(e).__name__}: {e}"[:200]
    return env


def median_ms(fn, *, warmup_ms: float = 100, rep_ms: float = 400) -> float:
    """Median wall time of ``fn`` on the GPU, CUDA events (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """Measured bf16 matmul ceiling: torch.mm (cuBLAS) on random n x n x n operands."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b), warmup_ms=300, rep_ms=1000)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
