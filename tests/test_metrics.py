"""Metrics: one host sync per logged step; TensorBoard event files and an offline W&B run are
written and read back; update RMS / grad norm against float64 references."""
from __future__ import annotations

import glob
import json
import struct
import time

import pytest
import torch

from dist_muonclip.metrics import (
    DictSink,
    MetricsLogger,
    grad_norm,
    to_host,
    update_rms,
)
from dist_muonclip.qk_clip import QKClipper
from tests.test_tracker import build_model, make_batch


def _metrics(step: int) -> dict:
    return {
        "qk_clip/max_logit": torch.tensor(10.0 + step),
        "qk_clip/max_logit_per_layer": torch.tensor([1.0, 2.0 + step]),  # 1-D -> name/0, name/1
        "muon/update_rms": torch.tensor(0.2),
        "lr": 0.01,
    }


class SyncCounter:
    """Counts device->host reads (tolist/item/cpu/numpy/__float__) on tensors."""

    NAMES = ("tolist", "item", "cpu", "numpy", "__float__")

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.calls += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


def test_one_sync_per_logged_step_none_on_skipped(monkeypatch):
    logger = MetricsLogger(wandb_run=None, every=2, keep_history=True)
    counter = SyncCounter(monkeypatch)
    for step in range(4):
        before = counter.calls
        out = logger.log(step, _metrics(step))
        assert counter.calls - before == (1 if step % 2 == 0 else 0)
        assert (out is None) == (step % 2 == 1)
    assert [s for s, _ in logger.history] == [0, 2]
    assert logger.history[1][1] == {"qk_clip/max_logit": 12.0, "qk_clip/max_logit_per_layer/0": 1.0,
                                    "qk_clip/max_logit_per_layer/1": 4.0,
                                    "muon/update_rms": pytest.approx(0.2), "lr": 0.01}


def test_update_rms_and_grad_norm_match_float64():
    torch.manual_seed(0)
    ups = [torch.randn(7, 5), torch.randn(3, 11), torch.randn(0, 4)]
    ref_rms = (sum(u.double().pow(2).sum() for u in ups) / sum(u.numel() for u in ups)).sqrt()
    # fp32 sums of ~70 squares: relative error ~1e-7; 1e-6 leaves margin
    torch.testing.assert_close(update_rms(ups).double(), ref_rms, rtol=1e-6, atol=0)
    grads = [torch.randn(4, 4), None, torch.randn(9)]
    ref_norm = torch.cat([g.double().reshape(-1) for g in grads if g is not None]).norm()
    torch.testing.assert_close(grad_norm(grads).double(), ref_norm, rtol=1e-6, atol=0)
    assert update_rms([]).item() == 0.0 and grad_norm([None]).item() == 0.0


def test_tensorboard_event_files_written_and_read_back(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = MetricsLogger(str(tmp_path), wandb_run=None)
    for step in range(3):
        logger.log(step, _metrics(step))
    logger.close()
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = acc.Scalars("qk_clip/max_logit")
    assert [e.step for e in scalars] == [0, 1, 2]
    assert [e.value for e in scalars] == [10.0, 11.0, 12.0]
    assert [e.value for e in acc.Scalars("qk_clip/max_logit_per_layer/1")] == [2.0, 3.0, 4.0]


def _wandb_history_when_closed(run_dir: str, timeout: float = 30.0) -> list[dict]:
    """wandb-core may still be writing the transaction log when ``run.finish()`` returns (seen:
    an empty file 1 time in 6): poll until its exit record is there."""
    deadline = time.monotonic() + timeout
    while True:
        hist, closed = _wandb_history(run_dir)
        if closed or time.monotonic() > deadline:
            return hist
        time.sleep(0.1)


def _wandb_history(run_dir: str) -> tuple[list[dict], bool]:
    """Read the history records of an offline run's ``run-*.wandb`` file (LevelDB-log framing:
    7-byte file header, 32 KiB blocks, records = crc32 | length u16 | type u8 | payload;
    types FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4; payload = wandb Record protobuf)."""
    from wandb.proto import wandb_internal_pb2

    paths = glob.glob(f"{run_dir}/run-*.wandb")
    if not paths:
        return [], False
    path = paths[0]
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 7:
        return [], False
    assert data[:4] == b":W&B"
    out, closed, pos, block, buf = [], False, 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if typ == 0 and n == 0:
            pos += (block - pos % block) % block
            continue
        buf += data[pos:pos + n]
        pos += n
        if typ in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            kind = rec.WhichOneof("record_type")
            closed |= kind == "exit"
            if kind == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return out, closed


def _offline_wandb_run(tmp_path, monkeypatch):
    """A W&B run in offline mode writing under ``tmp_path`` (skips the test without wandb)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb.init(project="dist_muonclip_test", dir=str(tmp_path), mode="offline")


def test_wandb_offline_run_written_and_read_back(tmp_path, monkeypatch):
    run = _offline_wandb_run(tmp_path, monkeypatch)
    try:
        logger = MetricsLogger(wandb_run="auto")  # picks up the active run
        assert any(type(s).__name__ == "WandbSink" for s in logger.sinks)
        for step in range(3):
            logger.log(step, _metrics(step))
        run_dir = run.dir.rsplit("/files", 1)[0]
    finally:
        run.finish()
    hist = _wandb_history_when_closed(run_dir)
    assert [h["_step"] for h in hist] == [0, 1, 2]
    assert [h["qk_clip/max_logit"] for h in hist] == [10.0, 11.0, 12.0]
    assert [h["qk_clip/max_logit_per_layer/1"] for h in hist] == [2.0, 3.0, 4.0]
    assert all(h["lr"] == 0.01 for h in hist)
    assert MetricsLogger(wandb_run="auto").sinks == []  # no active run after finish


def test_qk_clip_metrics_logged_match_the_clip():
    model = build_model("llama").train()
    ids, pad = make_batch()
    clipper = QKClipper(model, {"tau": 0.07})  # init logits ~0.05-0.09: some heads above
    model(input_ids=ids, attention_mask=pad)
    s = clipper.apply_()
    sink = DictSink()
    logger = MetricsLogger(wandb_run=None, sinks=[sink])
    values = logger.log(5, clipper.metrics())
    clipped = int((s > 0.07).sum())
    assert 0 < clipped < 8
    assert values["qk_clip/num_heads_clipped"] == clipped
    assert values["qk_clip/frac_heads_clipped"] == clipped / 8
    assert values["qk_clip/max_logit/layer_00"] == s[0].max().item()
    assert values["qk_clip/min_eta"] == pytest.approx(0.07 / s.max().item(), rel=1e-6)
    assert sink.history == [(5, values)]
    assert to_host({}) == {}
    with pytest.raises(TypeError, match="metric 'x'"):
        to_host({"x": "a"})
