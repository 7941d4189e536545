"""The profiler's CUDA memory windows against known allocations (skipped without CUDA).

An optimizer whose ``step()`` creates ``STATE`` bytes of state on its first step and a
``TEMP``-byte temporary every step, and a "forward/backward" between steps that allocates and
frees ``ACT`` bytes: ``step_peak``, ``between_steps_peak``, ``temporaries``, ``step_start`` and
the size split must come out exactly (sizes are multiples of the allocator's 512-byte rounding).
"""
from __future__ import annotations

import pytest
import torch

from dist_muonclip.tools.profiler import StepProfiler

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MIB = 1 << 20
PARAM, STATE, TEMP, ACT = 4 * MIB, 6 * MIB, 10 * MIB, 24 * MIB


class KnownAllocs(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                if "buf" not in st:
                    st["buf"] = torch.zeros(STATE // 4, device=p.device)
                tmp = torch.empty(TEMP // 4, device=p.device).fill_(1.0)
                p.add_(tmp[: p.numel()].view_as(p), alpha=-1e-3)
                del tmp


def test_cuda_memory_windows_match_known_allocations():
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    p = torch.nn.Parameter(torch.zeros(PARAM // 4, device=dev))
    p.grad = torch.ones_like(p)
    opt = KnownAllocs([p])
    prof = StepProfiler(print_summary=False, wire=False)
    prof.attach(opt)
    ends = []
    for i in range(3):
        act = torch.empty(ACT // 4, device=dev).fill_(float(i))   # the "activations" of this step
        del act
        before = torch.cuda.memory_allocated(dev)
        opt.step()
        ends.append((before, torch.cuda.memory_allocated(dev)))
    prof.close()
    recs = prof.records
    assert len(recs) == 3
    for i, (rec, (before, end)) in enumerate(zip(recs, ends)):
        m = rec["memory"]
        assert m["peak_kind"] == "cuda_allocated"
        state = STATE if i == 0 else 0                       # created by the first step only
        assert m["step_start"] == before
        assert end == before + state                         # the temporary was freed
        assert m["step_peak"] == before + state + TEMP, (i, m)
        assert m["temporaries"] == TEMP, (i, m)
        assert m["params"] == PARAM and m["grads"] == PARAM and m["optimizer_state"] == STATE
        if i > 0:   # from the end of the previous step: the activations on top of what stayed
            assert m["between_steps_peak"] == ends[i - 1][1] + ACT, (i, m)
        assert m["peak"] == max(m["step_peak"], m["between_steps_peak"])
