"""Runtime facts the kernel modules share (kept here so none of them imports another)."""
from __future__ import annotations

import os


def interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
