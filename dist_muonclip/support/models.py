"""Small Hugging Face causal LMs built from JSON presets (no download), for training and tests.

Presets live in ``configs/models/<name>.json`` at the repository root: a ``model_type`` plus the
keyword arguments of the matching ``transformers`` config class (keys starting with ``_`` are
comments). Available: ``llama-gqa`` (default), ``mistral``, ``qwen2``, ``qwen3`` (QK-norm),
``deepseek-v3`` (MLA + small MoE). All use the byte vocabulary (256) of :mod:`dist_muonclip.data`.

This module is an integration (it imports ``transformers``); the optimizer core never imports it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PRESETS_DIR",
    "DEFAULT_PRESET",
    "available_presets",
    "load_model_config",
    "build_model",
    "parse_override",
]

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"   # the repository's configs/
DEFAULT_PRESET = "llama-gqa"


def available_presets(presets_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the JSON presets in ``presets_dir`` (default: ``configs/models``), sorted."""
    root = Path(presets_dir) if presets_dir is not None else PRESETS_DIR
    return sorted(p.stem for p in root.glob("*.json")) if root.is_dir() else []


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a ``KEY=VALUE`` override; VALUE is JSON when it parses (``4``, ``true``, ``null``), else a string."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like KEY=VALUE, e.g. hidden_size=64")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty KEY; use KEY=VALUE, e.g. hidden_size=64")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def load_model_config(
    preset: str | None = None,
    *,
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model config dict of a preset name or a JSON file, with ``overrides`` applied.

    Exactly one of ``preset`` / ``path`` may be given (neither: :data:`DEFAULT_PRESET`).
    Comment keys (leading ``_``) are dropped. The result always has ``model_type``.
    """
    if preset is not None and path is not None:
        raise ValueError("pass either preset (--model) or path (--model-config), not both")
    if path is None:
        name = preset or DEFAULT_PRESET
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown model preset {name!r}; available: {available_presets()} "
                             f"(looked in {PRESETS_DIR}); or pass a JSON file with --model-config")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model config path={str(path)!r} is not a file")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"model config {str(path)!r} must be a JSON object with a 'model_type' key "
                         "(e.g. \"llama\", \"qwen3\", \"deepseek_v3\")")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(overrides or {})
    return cfg


def build_model(
    config: dict[str, Any],
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vocab_size: int = 256,
) -> torch.nn.Module:
    """Build a randomly initialised ``AutoModelForCausalLM`` from a config dict (fp32, train mode).

    Initialisation is made deterministic by seeding torch's global RNG with ``seed`` first (the
    global RNG state is restored afterwards, so building a model does not shift later draws).
    ``vocab_size``: the tokenizer's vocabulary; the config's must be at least that large.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ValueError("config needs a 'model_type' (e.g. 'llama')")
    if int(cfg.get("vocab_size", 0)) < vocab_size:
        raise ValueError(f"config vocab_size={cfg.get('vocab_size')} is smaller than the tokenizer's "
                         f"{vocab_size}; set vocab_size >= {vocab_size}")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"transformers cannot build a config for model_type={model_type!r}: {exc}") from exc
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    finally:
        torch.random.set_rng_state(state)
    return model.float().train()
