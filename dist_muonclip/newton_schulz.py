"""Newton-Schulz orthogonalization: every coefficient schedule, the torch backend, dispatch.

Muon (Jordan et al., 2024; torch.optim.Muon) replaces an update matrix G = U S V^T by an
approximation of its polar factor U V^T, computed with an odd matrix polynomial iteration that
uses only matrix products. On the *wide* orientation X in R^{m x n}, m <= n, one iteration is

    A = X X^T,    B = b A + c A^2,    X <- a X + B X,                                    (NS)

which maps every singular value s of X to p(s) = a s + b s^3 + c s^5 and keeps the singular
vectors. Starting from X = G / max(||G||_F, eps) (so every s lies in [0, 1]), k iterations map s to
the composition p_k(...p_1(s)); a schedule is the list [(a_1, b_1, c_1), ..., (a_k, b_k, c_k)].

Schedules (``coefficients=``):

* ``"jordan"`` (Keller Jordan's quintic (3.4445, -4.7750, 2.0315), repeated; torch.optim.Muon's
  default). Tuned for a steep slope at 0, it does **not** converge to 1: the iteration settles
  into a cycle, and after 5 steps every singular value s >= 0.05 ||G||_F lands in [0.68, 1.21]
  (max |s' - 1| = 0.32 however many steps follow), i.e. the output is U S' V^T with S' != I;
  Jordan's post argues this does not hurt training. Smaller singular values are inflated by
  p'(0)^5 ~ 480 but not to the band (s = 1e-3 ||G||_F ends at 0.47).
* ``"polar_express"`` (Amsel, Persson, Musco, Gower, "The Polar Express", arXiv 2505.16932):
  per-iteration odd quintics, each the minimax (best uniform) approximation of 1 on the current
  singular-value interval [l, u], starting from [1e-3, 1] (greedy composition, their Thm 4.1 shows
  it is optimal among compositions), with the paper's finite-precision modifications for bf16:
  the "cushion" (fit on [max(l, 0.02407 u), u], then rescale so the error is centred around 1),
  the safety factor 1.01 (p(x / 1.01) for every polynomial but the converged one) and the 1.01
  normalization (folded into the first polynomial, so the input normalization stays Muon's).
  Converges to 1: for singular values in [1e-3, 1] * ||G||_F the worst-case error max |s' - 1|
  is 0.16 / 6.5e-3 / 1.1e-5 / 3e-15 after 5 / 6 / 7 / 8 steps in exact arithmetic
  (``schedule_error``); in bf16 the iterate's rounding leaves a floor of ~5e-3.
* ``"cans"`` (Grishina, Smirnov, Rakhuba, "Accelerating Newton-Schulz Iteration for
  Orthogonalization via Chebyshev-type Polynomials", arXiv 2506.10935): Chebyshev-optimal
  (equioscillating, computed by a Remez solver) odd polynomials composed over an *estimated*
  spectral interval (their Algorithm 1: fit on [a_k, b_k], then [a_{k+1}, b_{k+1}] = [1 - E_k,
  1 + E_k]). The interval is estimated per call, see ``cans_interval`` below: the upper end is the
  Gelfand bound sigma_1 <= ||(X X^T)^2||_F^{1/4}, computed from the products the first iteration
  needs anyway, and the lower end is the relative floor ``cans_lower`` (1e-3, as Polar Express)
  carried through the same rescaling; one float crosses to the host per call to pick the cached
  schedule. Converges to 1; at equal steps its worst-case error is never above Polar Express's
  (its interval is never wider) and much lower on inputs whose Frobenius norm overestimates
  sigma_1 (spread-out spectra). The paper's delta-orthogonalization (choose the widest interval
  that ``steps`` iterations bring within 1 +- delta) is available as ``cans_lower_for_delta``.
* an explicit ``(a, b, c)`` (repeated every iteration) or a list of per-iteration triples.

For a schedule shorter than ``steps`` the last (converged) polynomial repeats.

Numerics: operands are cast to ``dtype`` (bf16 by default; fp32/fp64 allowed) and every product
runs in that dtype (fp32 accumulation for bf16, as torch.optim.Muon). With ``"jordan"``, 5 steps,
bf16 and a single 2-D matrix the result is bit-for-bit torch.optim._muon._zeropower_via_newtonschulz.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
import torch

__all__ = [
    "JORDAN_COEFFICIENTS",
    "POLAR_EXPRESS_LOWER",
    "POLAR_EXPRESS_CUSHION",
    "POLAR_EXPRESS_SAFETY",
    "CANS_LOWER",
    "Coefficients",
    "orthogonalize",
    "ns_schedule",
    "validate_ns_options",
    "dtype_name",
    "as_dtype",
    "ns_flops",
    "remez_odd",
    "cubic_minimax",
    "greedy_minimax_composition",
    "polar_express_schedule",
    "cans_schedule",
    "cans_interval",
    "cans_lower_for_delta",
    "schedule_error",
]

Triple = tuple[float, float, float]
Coefficients = str | Sequence[float] | Sequence[Sequence[float]]

#: Keller Jordan's quintic, https://kellerjordan.github.io/posts/muon/ (torch.optim.Muon defaults).
JORDAN_COEFFICIENTS: Triple = (3.4445, -4.7750, 2.0315)
#: Polar Express: initial lower bound l on sigma_min / ||G||_F (arXiv 2505.16932, Sec. 4.4, App. G).
POLAR_EXPRESS_LOWER = 1e-3
#: Polar Express "cushion": fit on [max(l, cushion * u), u] so no singular value is mapped near 0
#: in bf16 (arXiv 2505.16932, Sec. 4.4).
POLAR_EXPRESS_CUSHION = 0.02407327424182761
#: Polar Express safety factor: every polynomial but the converged one is evaluated at x / 1.01
#: so singular values pushed slightly above the interval by rounding are not amplified.
POLAR_EXPRESS_SAFETY = 1.01
#: CANS default lower end of the spectral interval relative to ||G||_F (same floor as Polar Express).
CANS_LOWER = 1e-3

_NAMES = ("jordan", "polar_express", "cans")
_BACKENDS = ("torch", "triton", "auto")
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
_MAX_STEPS = 100
# CANS interval quantization: the Gelfand upper bound is rounded *up* to 2^(k / 16), so at most
# 161 schedules per (lower, steps) (u in [2^-10, 1]) are ever solved, and rounding costs at most
# 4.4 % of the lower end of the interval.
_CANS_GRID_PER_OCTAVE = 16
_CANS_MIN_INDEX = -10 * _CANS_GRID_PER_OCTAVE
_CANS_MAX_LOWER = 0.5


from .minimax import cubic_minimax, greedy_minimax_composition, greedy_schedule, remez_odd  # noqa: E402,F401


def _with_safety(table: list[Triple], safety: float, converged: bool) -> list[Triple]:
    """p(x) -> p(x / safety) on every polynomial except the last one when it is the converged one."""
    keep = len(table) - 1 if converged else len(table)
    out = [(a / safety, b / safety**3, c / safety**5) for a, b, c in table[:keep]]
    return out + table[keep:]


def _fold_scale(abc: Triple, scale: float) -> Triple:
    """Coefficients of x -> p(x / scale): folds an input rescaling into the first polynomial."""
    a, b, c = abc
    return (a / scale, b / scale**3, c / scale**5)


@functools.cache
def _polar_express_table() -> tuple[Triple, ...]:
    raw, _, converged = greedy_schedule(POLAR_EXPRESS_LOWER, 1.0, POLAR_EXPRESS_CUSHION, _MAX_STEPS)
    assert converged, "Polar Express table did not converge"
    safe = _with_safety(raw, POLAR_EXPRESS_SAFETY, converged=True)
    # The reference normalizes by 1.01 * ||G||_F; Muon's normalization is ||G||_F, so fold 1/1.01
    # into the first polynomial: identical result, one normalization convention for all schedules.
    safe[0] = _fold_scale(safe[0], POLAR_EXPRESS_SAFETY)
    return tuple(safe)


def polar_express_schedule(steps: int) -> list[Triple]:
    """Polar Express schedule for ``steps`` iterations (arXiv 2505.16932), after Muon's normalization.

    The table is built once (float64, ~2 ms) by ``greedy_minimax_composition(1e-3, cushion=0.02407)``
    (8 polynomials, the last one converged), then every polynomial but the converged one gets the
    safety factor 1.01 and the first one additionally the paper's 1.01 normalization.
    """
    table = _polar_express_table()
    return [table[min(k, len(table) - 1)] for k in range(steps)]


@functools.lru_cache(maxsize=1024)
def _cans_table(lower: float, index: int, steps: int) -> tuple[Triple, ...]:
    scale = 2.0 ** (index / _CANS_GRID_PER_OCTAVE)
    low = min(lower / scale, _CANS_MAX_LOWER)
    raw, _, converged = greedy_schedule(low, 1.0, POLAR_EXPRESS_CUSHION, steps)
    safe = _with_safety(raw, POLAR_EXPRESS_SAFETY, converged=converged)
    safe[0] = _fold_scale(safe[0], scale)
    return tuple(safe[min(k, len(safe) - 1)] for k in range(steps))


def _cans_index(upper: float) -> int:
    """Grid index of the quantized (rounded up) spectral upper bound."""
    if not math.isfinite(upper) or upper >= 1.0:
        return 0
    if upper <= 0.0:
        return _CANS_MIN_INDEX
    idx = math.ceil(math.log2(upper) * _CANS_GRID_PER_OCTAVE)
    return max(_CANS_MIN_INDEX, min(0, idx))


def cans_schedule(steps: int, *, upper: float = 1.0, lower: float = CANS_LOWER) -> list[Triple]:
    """CANS schedule (arXiv 2506.10935, Alg. 1) for Frobenius-normalized inputs with sigma_1 <= upper.

    The spectral interval is [lower / u, 1] after rescaling by u = ``upper`` rounded up to the grid
    2^(k/16) (conservative: a larger u only widens the interval); the rescaling 1/u is folded into
    the first polynomial, so the schedule applies directly to X = G / ||G||_F like every other.
    Polynomials are the greedy minimax composition with the Polar Express bf16 modifications
    (cushion 0.02407, safety 1.01). Cached per (lower, grid index, steps): the host-side solve
    (0.3-1.5 ms for 5 steps on one CPU core, measured) is paid once per distinct interval; a
    cache hit costs ~2 us, so not every optimizer step pays it.

    ``upper=1`` (no estimate) is the data-free schedule returned by ``ns_schedule("cans", ...)``.
    """
    if not (0.0 < lower < 1.0):
        raise ValueError(f"cans lower bound must be in (0, 1), got {lower}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= _MAX_STEPS:
        raise ValueError(f"cans_schedule: steps must be an int in [1, {_MAX_STEPS}], got {steps!r}")
    return list(_cans_table(float(lower), _cans_index(float(upper)), int(steps)))


@functools.lru_cache(maxsize=256)
def cans_lower_for_delta(delta: float, steps: int) -> float:
    """Smallest lower end a such that ``steps`` greedy minimax quintics map [a, 1] into 1 +- delta.

    The delta-orthogonalization of CANS (arXiv 2506.10935, Sec. 3.3 / Alg. 2) for an unknown
    sigma_min: rather than assuming a floor, fix the accuracy delta a Muon step needs and take the
    widest interval that the step budget can still bring within delta; singular values below a are
    inflated monotonically (by the slope of the composition at 0) but not into the band. Pass the
    result as ``orthogonalize(..., coefficients="cans", cans_lower=a)``. Bisection in log a on the
    exact (float64, no safety factor) error of the composition, which decreases as a grows.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError(f"cans_lower_for_delta: delta must be in (0, 1), got {delta!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= _MAX_STEPS:
        raise ValueError(f"cans_lower_for_delta: steps must be an int in [1, {_MAX_STEPS}], got {steps!r}")

    def err(a: float) -> float:
        _, errors, _ = greedy_schedule(a, 1.0, POLAR_EXPRESS_CUSHION, steps)
        return errors[-1]

    lo, hi = math.log(1e-12), math.log(_CANS_MAX_LOWER)
    if err(math.exp(lo)) <= delta:
        return math.exp(lo)
    if err(math.exp(hi)) > delta:
        raise ValueError(
            f"cans_lower_for_delta: {steps} steps cannot reach delta={delta} even on "
            f"[{_CANS_MAX_LOWER}, 1]; use more steps or a larger delta"
        )
    for _ in range(60):  # log-interval width 26 -> 26 / 2^60: far below float64 resolution of a
        mid = 0.5 * (lo + hi)
        if err(math.exp(mid)) <= delta:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def schedule_error(schedule: Sequence[Sequence[float]], lower: float, upper: float = 1.0,
                   *, num_points: int = 20001) -> float:
    """max_{x in [lower, upper]} |1 - phi(x)| of the composed scalar map phi, in float64.

    Evaluated on a log-spaced grid plus the end points (a numerical sup, used for documentation
    and tests: the exact singular-value map of the matrix iteration).
    """
    xs = torch.logspace(math.log10(lower), math.log10(upper), num_points, dtype=torch.float64)
    y = xs.clone()
    for a, b, c in schedule:
        y = a * y + b * y**3 + c * y**5
    return float((1.0 - y).abs().max())


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
def _is_real_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _normalize_coefficients(coefficients: object) -> str | tuple[Triple, ...]:
    if isinstance(coefficients, str):
        name = coefficients.strip().lower().replace("-", "_").replace(" ", "_")
        if name not in _NAMES:
            raise ValueError(
                f"ns_coefficients={coefficients!r} is not a known schedule; use one of "
                f"{', '.join(repr(n) for n in _NAMES)}, an (a, b, c) tuple or a list of them"
            )
        return name
    if isinstance(coefficients, torch.Tensor) or not isinstance(coefficients, Sequence):
        raise TypeError(
            f"ns_coefficients must be a schedule name, an (a, b, c) tuple of floats or a list of "
            f"such tuples, got {type(coefficients).__name__}"
        )
    if len(coefficients) == 0:
        raise ValueError("ns_coefficients is empty; give an (a, b, c) tuple or a non-empty list of them")
    if all(not isinstance(v, (Sequence, torch.Tensor)) for v in coefficients):
        triples: list[object] = [coefficients]
    else:
        triples = list(coefficients)
    out: list[Triple] = []
    for i, t in enumerate(triples):
        if isinstance(t, (str, torch.Tensor)) or not isinstance(t, Sequence):
            raise TypeError(f"ns_coefficients[{i}] must be an (a, b, c) tuple of floats, got {t!r}")
        if len(t) != 3:
            raise ValueError(
                f"ns_coefficients[{i}] has {len(t)} values; each iteration needs exactly 3 "
                f"(a, b, c) for p(x) = a x + b x^3 + c x^5 (use c = 0 for a cubic)"
            )
        if not all(_is_real_number(v) for v in t):
            raise TypeError(f"ns_coefficients[{i}] = {tuple(t)!r} must hold 3 finite real numbers")
        out.append((float(t[0]), float(t[1]), float(t[2])))
    return tuple(out)


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (param groups keep the name: a plain value)."""
    return str(dtype).removeprefix("torch.")


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A param group's ``ns_dtype`` (a name, or a dtype in checkpoints of older versions) as a torch dtype."""
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))


def validate_ns_options(
    coefficients: Coefficients = "jordan",
    steps: int = 5,
    dtype: torch.dtype | str = torch.bfloat16,
    backend: str = "torch",
) -> tuple[str | tuple[Triple, ...], int, torch.dtype, str]:
    """Check and normalize the Newton-Schulz options before any state is created.

    Returns ``(coefficients, steps, dtype, backend)`` with the schedule name lower-cased (or the
    explicit coefficients as a tuple of float triples), ``dtype`` a torch dtype and ``backend`` one
    of "torch", "triton", "auto". Raises ValueError/TypeError naming the option and the fix.
    """
    coeffs = _normalize_coefficients(coefficients)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"ns_steps must be an int in [1, {_MAX_STEPS}], got {steps!r}")
    steps = int(steps)
    if not 1 <= steps <= _MAX_STEPS:
        raise ValueError(f"ns_steps={steps} is out of range; use 1 <= ns_steps <= {_MAX_STEPS} (5 is typical)")
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(
                f"ns_dtype={dtype!r} is not supported; use 'bfloat16' (default), 'float32' or 'float64'"
            )
        dtype = _DTYPES[key]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"ns_dtype must be a torch dtype or a string such as 'bfloat16', got {dtype!r}")
    if dtype not in (torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"ns_dtype={dtype} is not supported; use torch.bfloat16 (default), torch.float32 or "
            "torch.float64 (float16 and integer types are not)"
        )
    if not isinstance(backend, str):
        raise TypeError(f"ns_backend must be one of {_BACKENDS}, got {backend!r}")
    name = backend.strip().lower()
    if name not in _BACKENDS:
        raise ValueError(f"ns_backend={backend!r} is unknown; use 'torch', 'triton' or 'auto'")
    if name == "triton" and dtype != torch.bfloat16:
        # The kernels multiply bf16 operands (fp32 accumulation) and return bf16: running them for
        # an fp32/fp64 request would silently give bf16 accuracy (~1e-2 instead of ~1e-6).
        raise ValueError(
            f"ns_backend='triton' computes in bfloat16 and cannot honour ns_dtype={dtype}; use "
            "ns_backend='torch' (or 'auto', which runs torch for float32/float64) or ns_dtype='bfloat16'"
        )
    return coeffs, steps, dtype, name


def resolve_backend(backend: str, *, is_cuda: bool, dtype: torch.dtype) -> str:
    """The backend that runs: "auto" is Triton for bf16 on CUDA when the kernels import, else torch.

    float32/float64 NS always runs on torch (the Triton kernels are bf16-only), so an equivalence
    run with ``ns_dtype=float32`` gets fp32 products on a GPU too.
    """
    if backend != "auto":
        return backend
    return "triton" if (is_cuda and dtype == torch.bfloat16 and _triton_available()) else "torch"


def ns_schedule(coefficients: Coefficients, steps: int, *, cans_lower: float = CANS_LOWER) -> list[Triple]:
    """Per-iteration (a, b, c) list for ``steps`` iterations of a static schedule.

    For inputs normalized as torch.optim.Muon does (X = G / max(||G||_F, eps)); this is what the
    Triton kernel applies. ``"cans"`` gives its data-free schedule (interval [cans_lower, 1]); the
    data-dependent one is chosen inside ``orthogonalize``.
    """
    coeffs, steps, _, _ = validate_ns_options(coefficients, steps)
    if coeffs == "jordan":
        return [JORDAN_COEFFICIENTS] * steps
    if coeffs == "polar_express":
        return polar_express_schedule(steps)
    if coeffs == "cans":
        return cans_schedule(steps, lower=cans_lower)
    assert isinstance(coeffs, tuple)
    return [coeffs[min(k, len(coeffs) - 1)] for k in range(steps)]


def ns_flops(m: int, n: int, steps: int) -> int:
    """FLOPs of one Newton-Schulz run on an m x n matrix (used for owner bin packing).

    Convention: on the wide orientation (r = min(m, n), c = max(m, n)), each iteration does three
    dense products counted at 2 FLOPs per multiply-add and without exploiting symmetry:
    X X^T (2 r^2 c), A A (2 r^3), B X (2 r^2 c). Normalization and the elementwise axpys
    (O(r c)) are not counted. CANS on the torch backend adds nothing (its estimate reuses the first
    iteration's products); on the Triton backend its estimate costs one extra 2 r^2 c + 2 r^3.
    """
    for name, v in (("m", m), ("n", n), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"ns_flops: {name} must be a non-negative int, got {v!r}")
    r, c = min(m, n), max(m, n)
    return steps * (4 * r * r * c + 2 * r**3)


# --------------------------------------------------------------------------------------------
# Iteration (torch backend)
# --------------------------------------------------------------------------------------------
def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """X / max(||X||_F, eps) per matrix, in x's dtype (torch.optim.Muon's normalization)."""
    if x.ndim == 2:
        return x.div(x.norm().clamp(min=eps))
    return x.div(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))


def _iterate(
    x: torch.Tensor, schedule: Sequence[Triple], *, first: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Apply (NS) for every (a, b, c) in schedule to wide x ([m, n] or [B, m, n], m <= n).

    The 2-D path is operation-for-operation torch.optim._muon._zeropower_via_newtonschulz
    (addmm with the same operand views), hence bit-identical; the 3-D path is the batched analogue
    (bmm / baddbmm). ``first`` = (A, A^2) of the first iteration when already computed (CANS).
    """
    for k, (a, b, c) in enumerate(schedule):
        alpha = 1.0
        if k == 0 and first is not None:
            gram, gram2 = first
            if c != 0.0:  # B = c (A^2 + (b / c) A): one elementwise pass, c goes into the product
                upd, alpha = torch.add(gram2, gram, alpha=b / c), c
            else:
                upd = gram * b
        elif x.ndim == 2:
            gram = x @ x.T
            upd = gram * b if c == 0.0 else torch.addmm(gram, gram, gram, beta=b, alpha=c)
        else:
            gram = torch.bmm(x, x.mT)
            # a cubic step (c = 0): torch 2.13 CPU bf16 baddbmm mishandles alpha=0 for n >= 16
            upd = gram * b if c == 0.0 else torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        if x.ndim == 2:
            x = torch.addmm(x, upd, x, beta=a, alpha=alpha)
        else:
            x = torch.baddbmm(x, upd, x, beta=a, alpha=alpha)
    return x


def cans_interval(gram2: torch.Tensor) -> float:
    """Gelfand upper bound on sigma_1 for a batch, as one host float (the CANS host sync).

    For X with sigma_1 >= sigma_2 >= ..., ||(X X^T)^2||_F^{1/4} = (sum_i sigma_i^8)^{1/8} is an
    upper bound on sigma_1 (Gelfand / Schatten-8 norm; CANS, arXiv 2506.10935, uses Gelfand's
    formula this way) that is never worse than the Frobenius bound and within rank^{1/8} of sigma_1.
    ``gram2`` = A^2 = (X X^T)^2 ([m, m] or [B, m, m]) is the product the first quintic iteration
    needs anyway, so the estimate costs one reduction plus the max over the batch (one conservative
    interval serves the whole bucket) and a single device-to-host copy of one scalar.
    """
    if gram2.numel() == 0:
        return 1.0
    # fp32 accumulation without materializing an fp32 copy of A^2; max before the 4th root
    acc = torch.float64 if gram2.dtype == torch.float64 else torch.float32
    sq = torch.linalg.vector_norm(gram2, dim=(-2, -1), dtype=acc)
    return float(sq.max()) ** 0.25


@functools.cache
def _triton_available() -> bool:
    """Whether triton and the kernel module import (checked once per process for backend="auto")."""
    try:
        import triton  # noqa: F401

        from .kernels import newton_schulz as _k  # noqa: F401
    except Exception:
        return False
    return True


def _run_triton(x: torch.Tensor, schedule: list[Triple], eps: float, dtype: torch.dtype) -> torch.Tensor:
    try:
        from .kernels.newton_schulz import newton_schulz_triton
    except ImportError as exc:  # module or triton missing
        raise ImportError(
            "ns_backend='triton' needs triton and dist_muonclip.kernels.newton_schulz "
            f"({exc}); install the extra with `pip install dist_muonclip[triton]` on a CUDA machine, "
            "or use ns_backend='torch' / 'auto'"
        ) from exc
    return newton_schulz_triton(x.to(dtype), schedule, eps=eps)


def orthogonalize(
    x: torch.Tensor,
    *,
    coefficients: Coefficients = "jordan",
    steps: int = 5,
    dtype: torch.dtype | str = torch.bfloat16,
    eps: float = 1e-7,
    backend: str = "torch",
    cans_lower: float = CANS_LOWER,
) -> torch.Tensor:
    """Approximate polar factor U V^T of x = U S V^T by Newton-Schulz iteration (Muon's NS step).

    Args:
        x: [m, n] or [B, m, n], any floating dtype (not modified).
        coefficients: "jordan" | "polar_express" | "cans" | (a, b, c) | [(a, b, c), ...]
            (see the module docstring for what each converges to).
        steps: number of iterations, 1..100.
        dtype: operand dtype of the products: torch.bfloat16 (default, as torch.optim.Muon),
            torch.float32 or torch.float64 (or their names).
        eps: the Frobenius norm is clamped at eps before dividing (a zero matrix stays zero).
        backend: "torch"; "triton" (dist_muonclip.kernels.newton_schulz, CUDA, bf16 only); "auto" =
            triton when x is on CUDA, dtype is bf16 and the kernel imports, else torch.
        cans_lower: CANS only: lower end of the assumed singular-value interval relative to
            ||X||_F (singular values below it are still inflated monotonically, just not to 1).
    Returns:
        Same shape as x, in ``dtype``. Each matrix is processed on its wide orientation (transposed
        when m > n) and normalized by its own Frobenius norm; for a transposed input the result is
        a transposed view, as in torch.optim.Muon.

    CANS needs one host sync per call: the Gelfand upper bound of the batch (one float) is copied
    to the host to pick the cached schedule (``cans_interval``), which drains the queued GPU work
    and stops the CPU from running ahead of the GPU once per bucket. Measured on one H100 (torch
    backend, bf16, 5 steps, torch 2.11): ``cans_interval`` alone takes 46 us on an idle GPU;
    per call CANS costs +0.13-0.19 ms over Polar Express on launch-bound buckets (256^2 to
    32 x 512^2: 0.82 vs 0.65 ms), +3 % on 8 x 1024 x 4096, +2 % on 4 x 4096^2 (14.2 vs 13.9 ms)
    and +1 % on 8192^2. The Remez solve is paid only for a quantized interval not seen before.
    """
    coeffs, steps, dtype, backend = validate_ns_options(coefficients, steps, dtype, backend)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"orthogonalize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise ValueError(f"orthogonalize: x must be [m, n] or [B, m, n], got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"orthogonalize: x must be a floating tensor, got {x.dtype}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"orthogonalize: eps must be a positive float, got {eps!r}")
    if coeffs == "cans" and not (_is_real_number(cans_lower) and 0.0 < cans_lower < 1.0):
        raise ValueError(f"orthogonalize: cans_lower must be in (0, 1), got {cans_lower!r}")
    backend = resolve_backend(backend, is_cuda=x.is_cuda, dtype=dtype)

    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=dtype, device=x.device)
    transposed = x.size(-2) > x.size(-1)
    w = x.to(dtype)
    if transposed:
        w = w.mT if w.ndim == 3 else w.T

    first = None
    if coeffs == "cans":
        wn = _normalize(w, eps)
        gram = wn @ wn.mT
        gram2 = gram @ gram
        schedule = cans_schedule(steps, upper=cans_interval(gram2), lower=float(cans_lower))
        if backend == "torch":
            w, first = wn, (gram, gram2)
    else:
        schedule = ns_schedule(coeffs, steps)

    if backend == "triton":
        out = _run_triton(x, schedule, float(eps), dtype)
        return out
    if first is None:
        w = _normalize(w, eps)
    w = _iterate(w, schedule, first=first)
    if transposed:
        w = w.mT if w.ndim == 3 else w.T
    return w
