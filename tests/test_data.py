"""Tests of the byte corpus and the world-size-invariant batch sampler (dist_muonclip.data)."""
from __future__ import annotations

import gzip
import sys

import pytest
import torch

from dist_muonclip import data
from dist_muonclip.data import batch_for_step, eval_batches, load_corpus, split_corpus


def _arange_corpus(n: int = 5000, modulus: int = 251) -> dict[str, torch.Tensor]:
    """A corpus whose byte at position i is i % modulus: any window's content reveals its offset."""
    tokens = (torch.arange(n) % modulus).to(torch.uint8)
    return split_corpus(tokens, eval_fraction=0.2)


def test_shipped_corpus_is_small_text_and_split_90_10():
    assert data.DEFAULT_CORPUS_PATH.stat().st_size < 2 * 1024 * 1024  # repository budget
    tokens = load_corpus()
    assert tokens.dtype == torch.uint8 and tokens.ndim == 1
    assert len(tokens) > 2_000_000  # ~3.2 MB: 200 steps x 2048 tokens sees < 15% of it
    text = bytes(tokens[:100_000].tolist()).decode("utf-8")
    assert text.startswith("# ==== argparse.py ====")
    parts = split_corpus(tokens)
    assert len(parts["train"]) + len(parts["eval"]) == len(tokens)
    assert len(parts["eval"]) == len(tokens) - int(len(tokens) * 0.9)
    # The eval split is the tail: the two splits do not overlap.
    assert parts["eval"].data_ptr() == tokens.data_ptr() + len(parts["train"])


def test_batch_is_a_pure_function_of_seed_split_step():
    kw = dict(global_batch=8, seq_len=32)
    x1, y1 = batch_for_step(5, **kw)
    x2, y2 = batch_for_step(5, **kw)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(batch_for_step(6, **kw)[0], x1)
    assert not torch.equal(batch_for_step(5, seed=1, **kw)[0], x1)
    assert not torch.equal(batch_for_step(5, split="eval", **kw)[0], x1)
    assert x1.shape == (8, 32) and x1.dtype == torch.int64
    # targets are the next bytes of the same window
    assert torch.equal(x1[:, 1:], y1[:, :-1])


def test_windows_are_contiguous_spans_of_the_requested_split():
    corpus = _arange_corpus()
    x, y = batch_for_step(0, global_batch=16, seq_len=20, corpus=corpus)
    # each row is consecutive positions i, i+1, ... of the train split (values i % 251)
    diffs = (torch.cat([x, y[:, -1:]], dim=1).diff(dim=1)) % 251
    assert torch.all(diffs == 1)
    offsets = x[:, 0]
    assert torch.all(offsets + 21 <= len(corpus["train"]))
    xe, _ = batch_for_step(0, global_batch=16, seq_len=20, split="eval", corpus=corpus)
    # eval windows come from positions >= 4000 of the arange corpus: their first byte equals
    # (4000 + k) % 251 for some k < len(eval) - 20, i.e. they lie inside the eval split
    eval_values = set(corpus["eval"][: len(corpus["eval"]) - 20].tolist())
    assert set(xe[:, 0].tolist()) <= eval_values


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_slices_concatenate_to_the_single_process_batch(world_size):
    kw = dict(global_batch=8, seq_len=16, seed=3)
    for step in (0, 1, 17):
        full_x, full_y = batch_for_step(step, **kw)
        parts = [batch_for_step(step, rank=r, world_size=world_size, **kw) for r in range(world_size)]
        assert all(p[0].shape == (8 // world_size, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_eval_batches_are_the_first_eval_steps():
    batches = eval_batches(3, global_batch=4, seq_len=8, rank=1, world_size=2)
    assert len(batches) == 3
    for i, (x, _) in enumerate(batches):
        assert torch.equal(x, batch_for_step(i, split="eval", global_batch=4, seq_len=8, rank=1, world_size=2)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch=6, world_size=4, rank=0), "global_batch=6 must be divisible by world_size=4"),
        (dict(global_batch=4, world_size=2, rank=2), "rank=2"),
        (dict(global_batch=4, split="valid"), "split='valid'"),
        (dict(global_batch=0), "global_batch=0"),
        (dict(global_batch=4, seq_len=10**9), "seq_len=1000000000 is too long"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(kwargs, match):
    kw = dict(seq_len=8)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        batch_for_step(0, **kw)


def test_non_int_arguments_raise_type_error():
    with pytest.raises(TypeError, match="global_batch must be an int"):
        batch_for_step(0, global_batch=4.0, seq_len=8)


def test_corpus_rebuild_is_byte_reproducible(tmp_path):
    """Pins that build_stdlib_corpus is deterministic (gzip mtime 0) and, on the CPython version
    it was built with, reproduces the shipped file exactly."""
    a, b = tmp_path / "a.txt.gz", tmp_path / "b.txt.gz"
    n = data.build_stdlib_corpus(a)
    data.build_stdlib_corpus(b)
    assert a.read_bytes() == b.read_bytes()
    assert len(gzip.decompress(a.read_bytes())) == n
    if sys.version_info[:3] == (3, 11, 7):
        assert a.read_bytes() == data.DEFAULT_CORPUS_PATH.read_bytes()


def test_load_corpus_accepts_plain_text(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"hello world\n" * 10)
    tokens = load_corpus(path)
    assert bytes(tokens.tolist()) == b"hello world\n" * 10
    with pytest.raises(ValueError, match="is not a file"):
        load_corpus(tmp_path / "missing.txt")
