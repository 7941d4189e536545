"""DeepSpeed's own engine checkpoints (engine.save_checkpoint -> engine.load_checkpoint into a
fresh engine, same world size) for every ZeRO stage x precision: the resumed run continues bit for
bit. Scenarios share one process spawn per world size (each spawn costs ~10 s of start-up)."""
from __future__ import annotations

import pytest
import torch  # noqa: F401  (torch before deepspeed: deepspeed's import needs it initialised)

pytest.importorskip("deepspeed")

from tests import _ds_workers as D  # noqa: E402
from tests.dist_utils import run_distributed, values  # noqa: E402

# (stage, bf16): bf16=True is DeepSpeed's bf16 path of each stage (stage 0: FP16_UnfusedOptimizer
# with full fp32 masters; stages 1/2: the ZeRO optimizer); "fp32_accum" at stage 1 is BF16_Optimizer.
ALL = [(0, False), (0, True), (1, False), (1, True), (1, "fp32_accum"), (2, False), (2, True)]
REPRESENTATIVE_W4 = (0, True)     # the pair that failed (merge_sharded shape error) on 2 and 4 ranks


def _check(results, scenarios):
    outs = values(results)
    for rank, out in enumerate(outs):
        for sc in scenarios:
            r = out[sc]
            where = f"rank {rank}, ZeRO-{sc[0]} bf16={sc[1]}"
            # bit-identical: same world size, same reduction order, state restored exactly
            assert r["load_masters"] == [] and r["load_params"] == [], (where, r)
            assert r["resume_masters"] == [] and r["resume_params"] == [], (where, r)
            assert r["lrs"] == r["ref_lrs"] and r["steps"] == r["ref_steps"], (where, r)


def test_engine_checkpoint_every_stage_and_precision_w2(tmp_path):
    """Regression (issue 14): ZeRO-0 + bf16 on 2 ranks raised ``RuntimeError: shape '[64, 64]' is
    invalid for input of size 8192`` in ``merge_sharded`` on ``engine.load_checkpoint``: DeepSpeed
    writes only rank 0's optimizer file at ZeRO-0 and every rank loads it, but the state saved was
    rank 0's shard. Now every stage x precision resumes bit-identically at W=2."""
    _check(run_distributed(D.ds_engine_checkpoint_worker, 2, ALL, str(tmp_path / "ckpt"), tmp_path=tmp_path / "run",
                           timeout=600), ALL)


def test_engine_checkpoint_zero0_bf16_w4(tmp_path):
    """The W=4 representative of the matrix: the pair that failed."""
    _check(run_distributed(D.ds_engine_checkpoint_worker, 4, [REPRESENTATIVE_W4], str(tmp_path / "ckpt"),
                           tmp_path=tmp_path / "run", timeout=600), [REPRESENTATIVE_W4])


@pytest.mark.slow
@pytest.mark.full
def test_engine_checkpoint_every_stage_and_precision_w4(tmp_path):
    rest = [sc for sc in ALL if sc != REPRESENTATIVE_W4]
    _check(run_distributed(D.ds_engine_checkpoint_worker, 4, rest, str(tmp_path / "ckpt"), tmp_path=tmp_path / "run",
                           timeout=900), rest)
