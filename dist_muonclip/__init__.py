"""dist_muonclip: MuonClip (Muon + AdamW + per-head QK-Clip) for PyTorch, distributed ZeRO-1 style."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

from .comm import CommAccountant, ddp_accounting_hook  # noqa: E402
from .newton_schulz import ns_flops, ns_schedule, orthogonalize, validate_ns_options  # noqa: E402
from .optimizer import MuonClip  # noqa: E402
from .param_split import format_split, split_parameters  # noqa: E402
from .plan import build_plan  # noqa: E402
from .qk_clip import QKClipConfig, QKClipper  # noqa: E402
from .tracker import MaxLogitTracker  # noqa: E402
from .tools.metrics import MetricsLogger  # noqa: E402
from .tools.profiler import StepProfiler, profile_optimizer  # noqa: E402

__all__ += ["MuonClip", "split_parameters", "format_split", "orthogonalize", "ns_schedule", "validate_ns_options",
            "ns_flops", "CommAccountant", "ddp_accounting_hook", "build_plan", "QKClipConfig", "QKClipper",
            "MaxLogitTracker", "MetricsLogger", "StepProfiler", "profile_optimizer"]
