"""Host <-> accelerator copies for CPU optimizer offload (DeepSpeed ``offload_optimizer``).

Under offload the optimizer's tensors (DeepSpeed's fp32 partitions, their gradients, momentum,
AdamW moments) live in host memory, while the process group (NCCL takes CUDA tensors only) and
Newton-Schulz run on the accelerator. DeepSpeed's own offload path does the same thing
(``stage_1_and_2.py``: ``_muon_all_gather_partitions`` packs partition slices into accelerator
buffers for its all-gather, ``complete_grad_norm_calculation_for_cpu_offload`` all-reduces the norm
as an accelerator tensor); it keeps no CPU (gloo) side group. So MuonClip stages what a collective
sends on the group's device and copies results back:

* :func:`to_device` / :func:`cat_to_device`: host -> device through a pinned host buffer with
  ``non_blocking=True`` on an upload stream: the host goes on (the next bucket's momentum) and the
  copy runs beside the kernels already queued (the previous bucket's Newton-Schulz).
* :class:`HostCopy`: device -> host into pinned memory on a side CUDA stream, ordered after the
  work queued so far on the current stream; :meth:`HostCopy.wait` before the host reads it. One
  bucket's updates come back while the next bucket's Newton-Schulz runs on the current stream.

Without CUDA (CPU tests) every function is a plain copy (or none when the tensor is already on
the target device): the same values, bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["to_device", "cat_to_device", "HostCopy"]

_SIDE_STREAMS: dict[tuple[str, torch.device], "torch.cuda.Stream"] = {}


def _pinnable(host: torch.device, device: torch.device) -> bool:
    """A host <-> CUDA copy (pinned memory exists only with an accelerator)."""
    return host.type == "cpu" and device.type == "cuda"


def _side_stream(kind: str, device: torch.device) -> "torch.cuda.Stream":
    """One copy stream per direction (``"h2d"``, ``"d2h"``), CUDA device and process: uploads,
    downloads and the current stream's kernels can all run at once."""
    key = (kind, device)
    s = _SIDE_STREAMS.get(key)
    if s is None:
        s = _SIDE_STREAMS[key] = torch.cuda.Stream(device=device)
    return s


def _upload(pinned: Tensor, device: torch.device) -> Tensor:
    """``pinned`` (host) to ``device`` on the upload stream, without blocking the host. The copy is
    allocated on, and runs on, the upload stream, so it does not wait for the kernels already queued
    on the current stream (the previous bucket's Newton-Schulz); the current stream waits for the
    copy before anything queued after this call."""
    current = torch.cuda.current_stream(device)
    stream = _side_stream("h2d", device)
    with torch.cuda.stream(stream):
        out = pinned.to(device, non_blocking=True)
    current.wait_stream(stream)
    out.record_stream(current)       # freed while the current stream may still read it
    return out


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``: ``t`` itself when it is there; from the host to CUDA through a pinned
    buffer, copied on the upload stream without blocking the host (ordered before the current
    stream's later work)."""
    if t.device == device:
        return t
    if _pinnable(t.device, device):
        src = t if t.is_pinned() else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        return _upload(src, device)
    return t.to(device)


def cat_to_device(pieces: Sequence[Tensor], device: torch.device) -> Tensor:
    """The concatenation of the 1-D ``pieces`` (all on one device) as a new tensor on ``device``.
    From the host to CUDA the pieces are concatenated straight into a pinned buffer (one host
    copy) and uploaded as :func:`to_device` does."""
    if not pieces:
        raise ValueError("cat_to_device: no pieces")
    if pieces[0].device == device:
        return torch.cat(list(pieces))
    if _pinnable(pieces[0].device, device):
        buf = torch.empty(sum(p.numel() for p in pieces), dtype=pieces[0].dtype, pin_memory=True)
        torch.cat(list(pieces), out=buf)
        return _upload(buf, device)
    return torch.cat([p.to(device) for p in pieces])


class HostCopy:
    """``t`` copied to ``device`` (the host), started now, read after :meth:`wait`.

    CUDA -> CPU: into pinned memory on a side stream that first waits for the current stream (so
    the copy sees every kernel and collective wait queued before it, and kernels queued after it
    run beside it). Anything else: a plain copy now (nothing when ``t`` is already there)."""

    def __init__(self, t: Tensor, device: torch.device) -> None:
        self._event = None
        if t.device == device:
            self._out = t
        elif t.is_cuda and device.type == "cpu":
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream = _side_stream("d2h", t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                out.copy_(t, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(stream)
            t.record_stream(stream)      # allocated on the current stream, read on the side one
            self._out = out
        else:
            self._out = t.to(device)

    def wait(self) -> Tensor:
        """The host tensor, once the copy has finished."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._out
