"""Tiny Hugging Face causal LMs built from configs (no downloads) shared by the tests."""
from __future__ import annotations

import torch


def tiny_config(kind: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=128, attn_implementation="eager")
    if kind == "llama":
        cfg = tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
    elif kind == "mistral":
        cfg = tf.MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
    elif kind == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1,
            topk_group=1, **common)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(kind: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
