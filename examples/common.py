"""What every example shares: a tiny Llama built from a config (no download), learnable token
data, and a digest of the trained weights (to compare ranks and runs)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

VOCAB, SEQ = 64, 32


def tiny_llama(seed: int = 0):
    """A 2-layer GQA Llama (hidden 64) with eager attention, so QK-Clip sees every logit."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         attn_implementation="eager")
    return tf.AutoModelForCausalLM.from_config(cfg)


class Progressions(torch.utils.data.Dataset):
    """Arithmetic progressions mod VOCAB (random start, stride 1..4): learnable in a few steps."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 5, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def digest(named_tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes in name order (equal digests: bit-identical weights)."""
    h = hashlib.sha256()
    for name in sorted(named_tensors):
        h.update(name.encode())
        h.update(named_tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_result(path: str | None, rank: int, result: dict[str, Any]) -> None:
    """Each rank writes ``<path>.rank<r>.json`` (the test compares ranks)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(f"{path}.rank{rank}.json", "w") as f:
            json.dump(result, f, indent=1)


def shutdown() -> None:
    """End the job cleanly: a barrier, then destroy the process group (see
    :func:`dist_muonclip.launch_env.leave_process_group` for the exit hang it avoids)."""
    from dist_muonclip.launch_env import leave_process_group

    leave_process_group()

