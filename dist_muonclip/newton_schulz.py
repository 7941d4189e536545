"""Newton-Schulz orthogonalization (placeholder: Jordan quintic, torch backend).

The full module (Polar Express, CANS, Triton dispatch) replaces this file.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["orthogonalize", "validate_ns_options", "ns_flops", "ns_schedule"]

JORDAN = (3.4445, -4.7750, 2.0315)
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
           "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


def ns_schedule(coefficients, steps: int) -> list[tuple[float, float, float]]:
    if coefficients == "jordan":
        return [JORDAN] * steps
    if isinstance(coefficients, tuple) and len(coefficients) == 3:
        return [tuple(float(c) for c in coefficients)] * steps
    raise ValueError(f"ns_coefficients={coefficients!r} is not supported")


def validate_ns_options(coefficients, steps, dtype, backend):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"ns_dtype={dtype!r} is not a known dtype; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"ns_dtype must be a floating torch.dtype or its name, got {dtype!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 100:
        raise ValueError(f"ns_steps must be an int in [1, 100], got {steps!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"ns_backend={backend!r} is unknown; use 'auto', 'torch' or 'triton'")
    ns_schedule(coefficients, steps)
    return coefficients, steps, dtype, backend


def ns_flops(m: int, n: int, steps: int) -> int:
    m, n = min(m, n), max(m, n)
    return steps * (4 * m * m * n + 2 * m * m * m)


def orthogonalize(x: Tensor, *, coefficients="jordan", steps: int = 5, dtype=torch.bfloat16,
                  eps: float = 1e-7, backend: str = "torch") -> Tensor:
    schedule = ns_schedule(coefficients, steps)
    X = x.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps) if X.ndim == 3 else X / X.norm().clamp(min=eps)
    for a, b, c in schedule:
        A = X @ X.mT
        if X.ndim == 2:
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
        else:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if tall else X
