"""CPU optimizer offload over NCCL on a real GPU (issue 16 item 2; CPU stand-in: tests/test_offload.py).

The H200 run failed with ``No backend type associated with device type cpu`` when MuonClip's state
lived in host memory and the process group was NCCL. Here a one-rank NCCL group and a MuonClip
whose parameters (so its state, like DeepSpeed's offloaded partitions) are on the CPU, on a sharded
layout: the preflight, the pieces to owners and the updates back run on the GPU, Newton-Schulz too,
and the run equals the single-process CPU run.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_transfers_pinned_and_overlapped_on_cuda():
    """Host -> device through pinned memory without blocking the host; device -> host into pinned
    memory on a side stream ordered after the current stream's work; values equal."""
    from dist_muonclip.transfers import HostCopy, cat_to_device, to_device

    dev = torch.device("cuda", torch.cuda.current_device())
    pieces = [torch.randn(1000), torch.randn(3000)]
    x = cat_to_device(pieces, dev)
    assert x.device == dev and torch.equal(x.cpu(), torch.cat(pieces))
    m = torch.randn(4, 64, 32)
    y = to_device(m, dev)
    assert torch.equal(y.cpu(), m)
    z = y @ y.transpose(1, 2)                   # queued on the current stream
    out = HostCopy(z, torch.device("cpu")).wait()
    assert out.is_pinned() and torch.equal(out, z.cpu())


def _train(model, opt, steps: int) -> dict:
    for t in range(steps):
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(t))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("in_flight", [None, 1])
def test_cpu_state_over_nccl_equals_cpu_run(in_flight):
    """CPU parameters and state, a one-rank NCCL group, a sharded layout (cuts mid-row): every
    collective runs on staged GPU tensors (before the fix: the preflight all-reduce raised), NS on
    the GPU; equal to the plain CPU run within fp32 (CPU vs GPU fp32 matmul summation order in NS,
    ~1e-7 on the tiny model's O(0.1) weights, 3 steps; 1e-5 absolute is far below a lost or wrong
    update, ~lr = 2e-2 per element). TF32 is off for the run: it would round NS to ~1e-3."""
    from benchmarks.scenarios.tiny_hf import tiny_model
    from dist_muonclip import MuonClip
    from dist_muonclip.launch_env import free_port
    from dist_muonclip.layouts import FlatRangesLayout

    kw = dict(lr=0.02, adamw_lr=0.01, weight_decay=0.1, ns_dtype="float32", ns_backend="torch", qk_clip={"tau": 0.1})
    model = tiny_model("llama", seed=0)
    want = _train(model, MuonClip(model, **kw), 3)
    torch.cuda.set_device(0)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = tiny_model("llama", seed=0)
        names = {p: n for n, p in model.named_parameters()}
        ranges = {n: [[(0, p.numel())]] for n, p in model.named_parameters()}
        opt = MuonClip(model, **kw, layout=FlatRangesLayout(ranges, names, 0))
        opt.layout.ns_on = torch.device("cuda", 0)
        opt.layout.buckets_in_flight = in_flight
        got = _train(model, opt, 3)
        assert opt.comm.device.type == "cuda" and not opt.comm.on_device(torch.zeros(1))
    finally:
        dist.destroy_process_group()
        torch.set_float32_matmul_precision(precision)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")
    assert all(v.device.type == "cpu" for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
