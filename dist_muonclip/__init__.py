"""dist_muonclip: MuonClip (Muon + AdamW + per-head QK-Clip) for PyTorch, distributed ZeRO-1 style."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

from .optimizer import MuonClip  # noqa: E402
from .param_split import format_split, split_parameters  # noqa: E402

__all__ += ["MuonClip", "split_parameters", "format_split"]
