"""dist_muonclip: MuonClip (Muon + AdamW + per-head QK-Clip) for PyTorch, distributed ZeRO-1 style."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
