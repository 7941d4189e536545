#!/usr/bin/env python
"""Which torch ``launch/setup_env.sh`` installs into the environment it prepares, and how.

    python launch/torch_choice.py                 # decide, then install (or keep) torch
    python launch/torch_choice.py --dry-run       # print the decision and the pip command only

On Linux, PyPI's torch wheel is the CUDA build: several GB of nvidia-* packages that a machine
without a GPU never uses. The decision, in order:

1. keep a torch that is already importable here and satisfies the package's ``torch>=2.5``
   (cluster users bring their own build; reinstalling would replace it);
2. a GPU (``nvidia-smi`` on PATH) or a platform whose PyPI wheel is already CPU-only (macOS,
   Windows): the plain pinned install;
3. no GPU on Linux: the plain pinned install when a local CPU build satisfies the pin without
   the network (a wheelhouse in pip's ``find-links``: pip prefers ``2.13.0+cpu`` to ``2.13.0``),
   else PyTorch's CPU wheel index with PyPI as the extra index, and plain PyPI when that index
   cannot be reached (a machine that reaches only PyPI), saying that this is the CUDA build.

The probes are functions of their own so that :func:`choose` is a pure function of their answers
(tested with stubs in ``tests/test_setup_env.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["CPU_INDEX", "PYPI_INDEX", "MIN_TORCH", "Choice", "choose", "installed_torch", "has_nvidia_gpu",
           "local_cpu_build", "index_reachable", "main"]

CPU_INDEX = os.environ.get("DIST_MUONCLIP_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
PYPI_INDEX = "https://pypi.org/simple"
MIN_TORCH = (2, 5)           # setup.py's install_requires: torch>=2.5


@dataclass(frozen=True)
class Choice:
    """``action``: ``keep`` | ``pinned`` | ``cpu-index`` | ``pypi-fallback``; ``pip_args``: the
    arguments after ``python -m pip install`` (empty for ``keep``); ``reason``: one line for the
    person running set-up."""

    action: str
    reason: str
    pip_args: list[str] = field(default_factory=list)


def _release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; ``"2.6.0a0+git1234"`` -> ``(2, 6, 0)``; unparsable -> ``()``."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def choose(*, pin: str, installed: str | None, has_gpu: bool, system: str, local_cpu: Callable[[], bool],
           cpu_index_reachable: Callable[[], bool]) -> Choice:
    """The install decision (see the module doc). ``local_cpu`` (a pip resolution) and
    ``cpu_index_reachable`` (a network round trip) are only called when their answer matters."""
    if installed is not None and _release(installed) >= MIN_TORCH:
        return Choice("keep", f"keeping the installed torch {installed} (satisfies torch>={'.'.join(map(str, MIN_TORCH))})")
    if has_gpu:
        return Choice("pinned", f"NVIDIA GPU found: {pin} from the configured index (the CUDA build)", [pin])
    if system != "Linux":
        return Choice("pinned", f"{system}: the configured index's {pin} is a CPU build", [pin])
    if local_cpu():
        return Choice("pinned", f"no GPU; a local CPU build satisfies {pin}", [pin])
    if cpu_index_reachable():
        return Choice("cpu-index", f"no GPU: {pin} from PyTorch's CPU wheel index ({CPU_INDEX})",
                      ["--index-url", CPU_INDEX, "--extra-index-url", PYPI_INDEX, pin])
    return Choice("pypi-fallback", f"no GPU, but {CPU_INDEX} cannot be reached: {pin} from the configured index, "
                  "which on Linux is the CUDA build (several GB); set DIST_MUONCLIP_TORCH_INDEX to a reachable "
                  "CPU wheel index, or install a CPU torch first (it is kept)", [pin])


# ---- probes ------------------------------------------------------------------------------------

def installed_torch() -> str | None:
    """Version of the torch that imports in this interpreter, or None (absent or broken)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken install counts as none
        return None
    return str(torch.__version__)


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def local_cpu_build(pin: str) -> bool:
    """True when pip resolves ``pin`` to a ``+cpu`` build without any index (``--no-index``: only
    ``find-links`` wheelhouses and local files), i.e. the plain pinned install would pick it."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                               "--ignore-installed", "--quiet", "--report", report, pin],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not os.path.exists(report):
            return False
        with open(report, encoding="utf-8") as f:
            items = json.load(f).get("install", [])
    return any(item.get("metadata", {}).get("name") == "torch" and "+cpu" in item["metadata"].get("version", "")
               for item in items)


def index_reachable(url: str = CPU_INDEX, timeout: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as response:
            return 200 <= response.status < 400
    except Exception:  # noqa: BLE001 - DNS, refused, proxy, TLS: all mean "not reachable"
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pin", default="torch==2.13.0", help="the torch requirement to install (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the decision and the pip command; install nothing")
    args = p.parse_args(argv)
    choice = choose(pin=args.pin, installed=installed_torch(), has_gpu=has_nvidia_gpu(), system=platform.system(),
                    local_cpu=lambda: local_cpu_build(args.pin), cpu_index_reachable=index_reachable)
    command = [sys.executable, "-m", "pip", "install", "-q", *choice.pip_args] if choice.pip_args else []
    print(f"[setup_env] torch: {choice.reason}", flush=True)
    if args.dry_run:
        print(json.dumps({"action": choice.action, "command": command}))
        return 0
    if command:
        return subprocess.run(command, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
