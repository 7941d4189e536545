"""Runtime facts the kernel modules share (kept here so none of them imports another), importable
without Triton (the transformers glue asks :func:`head_dims_supported` before importing a kernel)."""
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


def split_head_dim(d: int) -> tuple[int, int] | None:
    """The kernel's two power-of-two parts of a q / k head dim (Triton blocks are powers of two):
    ``(d, 0)`` for a power of two in [16, 256], ``(d1, d2)`` with d1 the largest power of two
    below d and d2 = d - d1 a power of two >= 16 (MLA's 192 = 128 + 64), else None."""
    if d < 16 or d > 256:
        return None
    if d & (d - 1) == 0:
        return d, 0
    d1 = 1 << (d.bit_length() - 1)
    d2 = d - d1
    return (d1, d2) if d2 >= 16 and d2 & (d2 - 1) == 0 else None


def head_dims_supported(d: int, dv: int) -> bool:
    """Whether the fused kernel takes q / k head dim ``d`` and value head dim ``dv``."""
    return split_head_dim(d) is not None and 16 <= dv <= 256 and dv & (dv - 1) == 0
