"""Pure planning (no processes): ownership balance, determinism, ZeRO-1 state memory."""
from __future__ import annotations

import random

import pytest

from dist_muonclip.plan import MatrixItem, build_plan, flat_partition, split_stacked


def llama_items(num_layers=32, hidden=4096, kv=1024, ffn=14336):
    items = []
    for layer in range(num_layers):
        for name, (m, n) in {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
                             "o_proj": (hidden, hidden), "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
                             "down_proj": (hidden, ffn)}.items():
            items.append(MatrixItem(f"model.layers.{layer}.{name}.weight", 0, 1, m, n, "torch.float32"))
    return items


LLAMA_ADAMW = [("model.embed_tokens.weight", 128256 * 4096), ("lm_head.weight", 128256 * 4096)] + [
    (f"model.layers.{i}.{n}.weight", 4096) for i in range(32) for n in ("input_layernorm", "post_attention_layernorm")
] + [("model.norm.weight", 4096)]


@pytest.mark.parametrize("world", [2, 4, 8, 64])
def test_lpt_balances_ns_flops(world):
    plan = build_plan(llama_items(), world)
    mean = sum(plan.loads) / world
    assert max(plan.loads) <= 1.10 * mean
    assert set(plan.owners) == {i.name for i in llama_items()}


def test_state_memory_per_rank_is_one_wth_at_w8():
    """ZeRO-1: fp32 momentum of owned matrices + AdamW (exp_avg, exp_avg_sq) of an equal slice."""
    world, items = 8, llama_items()
    plan = build_plan(items, world)
    chunk, segments = flat_partition(LLAMA_ADAMW, world)
    single = 4 * sum(i.numel for i in items) + 2 * 4 * sum(n for _, n in LLAMA_ADAMW)
    per_rank = [4 * plan.owned_numel(r) + 2 * 4 * sum(s.stop - s.start for s in segments[r]) for r in range(world)]
    assert max(per_rank) <= 1.15 * single / world
    assert sum(per_rank) == single  # nothing replicated, nothing lost


def test_plan_is_deterministic_and_order_independent():
    items = llama_items(num_layers=4)
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    a, b = build_plan(items, 4), build_plan(shuffled, 4)
    assert a.owners == b.owners and a.digest() == b.digest()
    assert build_plan(items, 3).digest() != a.digest()


def test_more_ranks_than_matrices():
    items = [MatrixItem(f"w{i}", 0, 1, 8, 8, "torch.float32") for i in range(3)]
    plan = build_plan(items, 5)
    assert sorted(plan.owners.values()) == [0, 1, 2]   # LPT: equal loads go to the lowest free rank
    (bucket,) = plan.buckets
    assert bucket.counts(5) == [1, 1, 1, 0, 0]


def test_buckets_group_same_shapes_ordered_by_owner():
    plan = build_plan(llama_items(num_layers=2), 2)
    shapes = sorted((b.m, b.n) for b in plan.buckets)
    assert shapes == sorted({(i.m, i.n) for i in llama_items(num_layers=2)})
    for b in plan.buckets:
        assert list(b.owners) == sorted(b.owners)
        assert sum(b.counts(2)) == len(b.names)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_flat_partition_covers_every_element_once(world):
    sizes = [("a", 10), ("b", 1), ("c", 33), ("d", 0), ("e", 7)]
    chunk, segments = flat_partition(sizes, world)
    total = sum(n for _, n in sizes)
    assert chunk * world >= total > chunk * (world - 1) - 1
    covered = {name: [] for name, _ in sizes}
    for r, segs in enumerate(segments):
        assert sum(s.stop - s.start for s in segs) <= chunk
        for s in segs:
            covered[s.name].extend(range(s.start, s.stop))
    for name, n in sizes:
        assert sorted(covered[name]) == list(range(n))


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        build_plan([], 0)


def test_split_stacked_chunks_cover_every_expert_once():
    """min(E, W) contiguous chunks, sizes differing by at most one, names carrying the range."""
    item = MatrixItem("experts.down_proj", 0, 10, 64, 32, "torch.float32")
    dense = MatrixItem("o_proj.weight", 0, 1, 64, 64, "torch.float32")
    for world, sizes in [(1, [10]), (4, [3, 3, 2, 2]), (10, [1] * 10), (64, [1] * 10)]:
        out = [i for i in split_stacked([item, dense], world) if i.name != "o_proj.weight"]
        assert [i.num_matrices for i in out] == sizes
        if world == 1:
            assert out == [item]
            continue
        starts = [i.start for i in out]
        assert starts == [sum(sizes[:k]) for k in range(len(sizes))]
        assert [i.name for i in out] == [f"experts.down_proj[{a}:{a + k}]" for a, k in zip(starts, sizes)]
        assert all(i.parent == "experts.down_proj" and (i.m, i.n) == (64, 32) for i in out)
    assert split_stacked([dense], 8) == [dense]


def test_split_stacked_spreads_moe_layers_over_ranks():
    """DeepSeek-V3-like: 58 MoE layers x 2 stacked [256, m, n] parameters + dense matrices. With
    one owner per stacked parameter the busiest of 1024 ranks does 256 expert NS runs (14x the
    mean); with chunks LPT is within 1% of the mean."""
    items = []
    for layer in range(58):
        items.append(MatrixItem(f"l{layer}.gate_up", 0, 256, 4096, 7168, "bf16"))
        items.append(MatrixItem(f"l{layer}.down", 0, 256, 7168, 2048, "bf16"))
        items.append(MatrixItem(f"l{layer}.o_proj", 0, 1, 7168, 16384, "bf16"))
    for world in (64, 1024):
        whole = build_plan(items, world)
        split = build_plan(split_stacked(items, world), world)
        mean = sum(split.loads) / world
        assert sum(whole.loads) == sum(split.loads)            # same work, redistributed
        assert max(split.loads) <= 1.01 * mean
        if world == 1024:
            assert max(whole.loads) > 10 * mean


def test_bucket_by_size_follows_order_and_caps_like_ddp():
    """DDP's assignment (torch.distributed._compute_bucket_assignment_by_size): in order, one open
    bucket per key, closed once it reaches its cap (the first one at the smaller first cap); a
    tensor over the cap stands alone; buckets sorted by their first tensor."""
    import torch
    import torch.distributed as dist

    from dist_muonclip.plan import bucket_by_size

    f32, bf16 = "f32", "bf16"
    sizes = [(f32, 40), (f32, 30), (bf16, 10), (f32, 50), (f32, 20), (f32, 500), (bf16, 90), (f32, 10)]
    buckets = bucket_by_size(sizes, cap_bytes=100, first_cap_bytes=60)
    assert buckets == [[0, 1], [2, 6], [3, 4, 5], [7]]
    assert sorted(i for b in buckets for i in b) == list(range(len(sizes)))
    for b in buckets:
        assert len({sizes[i][0] for i in b}) == 1                    # keys never mix
        assert b == sorted(b)                                        # order kept inside a bucket
        assert sum(sizes[i][1] for i in b[:-1]) < 100                # only the last tensor crosses the cap
    # the same answer as DDP's own assignment, where torch exposes it (dtype keys, byte sizes)
    compute = getattr(dist, "_compute_bucket_assignment_by_size", None)
    if compute is not None:
        tensors = [torch.empty(n // 4, dtype=torch.float32) if k == f32 else torch.empty(n // 2, dtype=torch.bfloat16)
                   for k, n in [(f32, 400), (f32, 300), (bf16, 100), (f32, 500), (f32, 200), (f32, 5000),
                                (bf16, 900), (f32, 100)]]
        ours = bucket_by_size([(t.dtype, t.numel() * t.element_size()) for t in tensors], 1000, 600)
        theirs, _ = compute(tensors, [600, 1000])
        assert ours == [list(b) for b in theirs]
    with pytest.raises(ValueError, match="cap_bytes"):
        bucket_by_size(sizes, 0)
