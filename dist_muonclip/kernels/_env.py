"""Runtime facts the kernel modules share (kept here so none of them imports another)."""
from __future__ import annotations

import functools
import os

import torch


def interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _tma_device(device_index: int) -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_ok(*ts: torch.Tensor) -> bool:
    """True when TMA tensor descriptors can carry every one of ``ts``: compiled (not interpreted)
    Triton with host descriptors, a Hopper+ GPU, unit last stride, 16-byte aligned base and strides."""
    if interpret() or not ts[0].is_cuda or not _tma_device(ts[0].device.index or 0):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and not any((s * t.element_size()) % 16 for s in t.stride()[:-1]) for t in ts)
