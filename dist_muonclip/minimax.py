"""Minimax odd polynomials (float64, host side): the Remez exchange for one odd polynomial on an
interval and Polar Express's greedy composition of them (Amsel et al., arXiv 2505.16932, Alg. 1 and
App. D), from which :mod:`dist_muonclip.newton_schulz` builds the Polar Express and CANS schedules."""
from __future__ import annotations

import functools
import math
from typing import Sequence

__all__ = ["Triple", "remez_odd", "cubic_minimax", "greedy_minimax_composition", "greedy_schedule", "CONVERGED_RATIO",
           "MAX_STEPS"]

Triple = tuple[float, float, float]
# The minimax polynomial on [l, u] with l / u above this is, to float64 accuracy, the degree-5
# polynomial with p(u) = 1, p'(u) = p''(u) = 0 (the Remez system degenerates as l -> u); same
# threshold as the Polar Express reference (arXiv 2505.16932, App. D).
CONVERGED_RATIO = 1.0 - 5e-6
MAX_STEPS = 100


def _poly(coeffs: Sequence[float], x: float) -> float:
    """Odd polynomial sum_k coeffs[k] * x^(2k+1)."""
    return sum(c * x ** (2 * k + 1) for k, c in enumerate(coeffs))


def _critical_points(coeffs: Sequence[float], lo: float, hi: float) -> list[float]:
    """Positive roots of p'(x) strictly inside (lo, hi), sorted; p odd of degree 3 or 5.

    p'(x) = c1 + 3 c3 x^2 (+ 5 c5 x^4) is a polynomial in y = x^2 of degree 1 (2).
    """
    if len(coeffs) == 2:
        c1, c3 = coeffs
        ys = [-c1 / (3.0 * c3)] if c3 != 0.0 else []
    else:
        c1, c3, c5 = coeffs
        qa, qb, qc = 5.0 * c5, 3.0 * c3, c1
        if qa == 0.0:
            ys = [-qc / qb] if qb != 0.0 else []
        else:
            disc = qb * qb - 4.0 * qa * qc
            if disc < 0.0:
                ys = []
            else:
                # numerically stable quadratic roots
                q = -0.5 * (qb + math.copysign(math.sqrt(disc), qb))
                ys = [q / qa] + ([qc / q] if q != 0.0 else [])
    xs = sorted(math.sqrt(y) for y in ys if y > 0.0)
    return [x for x in xs if lo < x < hi]


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Small dense solve in float64 (Gaussian elimination with partial pivoting)."""
    n = len(rhs)
    a = [row[:] + [r] for row, r in zip(matrix, rhs, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[piv] = a[piv], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for k in range(col, n + 1):
                a[r][k] -= f * a[col][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][k] * out[k] for k in range(r + 1, n))) / a[r][r]
    return out


@functools.lru_cache(maxsize=4096)
def remez_odd(
    lower: float, upper: float, *, degree: int = 5, max_iter: int = 100
) -> tuple[tuple[float, ...], float, tuple[float, ...]]:
    """Best uniform approximation of f = 1 on [lower, upper] by an odd polynomial (Remez).

    Chebyshev's alternance theorem for odd polynomials (CANS, arXiv 2506.10935, Thm. 1): the
    minimizer p of max_{x in [l, u]} |1 - p(x)| over odd polynomials of degree 2n - 1 is unique and
    characterized by n + 1 points l = x_0 < ... < x_n = u (both ends always belong to it) with
    p(x_j) - 1 = (-1)^(j+1) E, E = the minimax error. The Remez exchange alternates solving that
    (n+1) x (n+1) linear system for (coefficients, E) and moving the interior points to the local
    extrema of p (roots of p'), until the points stop moving. Solved on t = x / u in [l / u, 1]
    (well scaled) in float64, then mapped back.

    Args:
        lower, upper: the interval, 0 < lower < upper.
        degree: 3 or 5.
    Returns:
        (coefficients (c1, c3[, c5]) of p(x) = c1 x + c3 x^3 (+ c5 x^5), E, alternation points).
    """
    if degree not in (3, 5):
        raise ValueError(f"remez_odd: degree must be 3 or 5, got {degree}")
    if not (0.0 < lower < upper) or not math.isfinite(upper):
        raise ValueError(f"remez_odd: need 0 < lower < upper < inf, got [{lower}, {upper}]")
    n = (degree + 1) // 2
    lo = lower / upper
    # Chebyshev-distributed initial reference on [lo, 1] (for n = 3 this is the Polar Express
    # initialization (3l+1)/4, (l+3)/4, exact as l -> u).
    pts = [lo + (1.0 - lo) * (1.0 - math.cos(math.pi * j / n)) / 2.0 for j in range(n + 1)]
    coeffs: list[float] = []
    for _ in range(max_iter):
        rows = [[t ** (2 * k + 1) for k in range(n)] + [(-1.0) ** j] for j, t in enumerate(pts)]
        sol = _solve(rows, [1.0] * (n + 1))
        coeffs = sol[:n]
        crit = _critical_points(coeffs, lo, 1.0)
        if len(crit) != n - 1:
            raise RuntimeError(
                f"remez_odd: lost the alternation on [{lower}, {upper}] (degree {degree}); "
                "the interval is too narrow for float64, use the converged polynomial"
            )
        new = [lo, *crit, 1.0]
        moved = max(abs(p - q) for p, q in zip(new, pts, strict=True))
        pts = new
        if moved <= 1e-15:
            break
    rows = [[t ** (2 * k + 1) for k in range(n)] + [(-1.0) ** j] for j, t in enumerate(pts)]
    coeffs = _solve(rows, [1.0] * (n + 1))[:n]
    err = max(abs(_poly(coeffs, t) - 1.0) for t in pts)
    scaled = tuple(c / upper ** (2 * k + 1) for k, c in enumerate(coeffs))
    return scaled, err, tuple(t * upper for t in pts)


def cubic_minimax(lower: float, upper: float) -> tuple[tuple[float, float], float]:
    """Closed form of the degree-3 minimax polynomial of 1 on [a, b] (CANS, arXiv 2506.10935, Prop. 2).

        p(x) = 2 / (2 s^{3/2} + a^2 b + a b^2) * ((a^2 + a b + b^2) x - x^3),  s = (a^2 + a b + b^2) / 3
        E    = (2 s^{3/2} - a^2 b - a b^2) / (2 s^{3/2} + a^2 b + a b^2)

    Used as an independent oracle for ``remez_odd(..., degree=3)``.
    """
    a, b = float(lower), float(upper)
    q = a * a + a * b + b * b
    s = q / 3.0
    den = 2.0 * s**1.5 + a * a * b + a * b * b
    return (2.0 * q / den, -2.0 / den), (2.0 * s**1.5 - a * a * b - a * b * b) / den


def _converged_quintic(upper: float) -> Triple:
    """Limit of the minimax quintic as l -> u: p(u) = 1, p'(u) = p''(u) = 0, i.e. (15, -10, 3) / 8."""
    return (15.0 / 8.0 / upper, -10.0 / 8.0 / upper**3, 3.0 / 8.0 / upper**5)


def greedy_schedule(lower: float, upper: float, cushion: float, max_steps: int) -> tuple[list[Triple], list[float], bool]:
    low, u = float(lower), float(upper)
    table: list[Triple] = []
    errors: list[float] = []
    while len(table) < max_steps:
        coeffs = None
        if low / u < CONVERGED_RATIO:
            try:
                coeffs, _, _ = remez_odd(max(low, cushion * u), u, degree=5)
            except RuntimeError:
                # width < ~1e-5: float64 cannot separate the alternation points any more, and the
                # minimax error is below 1e-15 anyway: same as the converged case
                coeffs = None
        if coeffs is None:
            # the interval is 1 +- O(1e-5): the fixed-point polynomial centred at 1 (error O(d^3))
            abc = _converged_quintic(1.0)
            table.append(abc)
            errors.append(max(abs(1.0 - _poly(abc, low)), abs(1.0 - _poly(abc, u))))
            return table, errors, True
        pl, pu = _poly(coeffs, low), _poly(coeffs, u)
        scale = 2.0 / (pl + pu)
        table.append((coeffs[0] * scale, coeffs[1] * scale, coeffs[2] * scale))
        low = scale * pl
        u = 2.0 - low
        errors.append(abs(1.0 - low))
    return table, errors, False


def greedy_minimax_composition(
    lower: float,
    upper: float = 1.0,
    *,
    cushion: float = 0.0,
    max_steps: int = MAX_STEPS,
) -> tuple[list[Triple], list[float]]:
    """Greedy composition of minimax odd quintics (Polar Express Alg. 1 / CANS Alg. 1), float64.

    At each step take the odd quintic p minimizing max_{[l, u]} |1 - p| (``remez_odd``); with a
    cushion c > 0 fit it on [max(l, c u), u] instead and rescale it by 2 / (p(l) + p(u)) so that
    1 - p(l) = p(u) - 1 (arXiv 2505.16932, Sec. 4.4). The image of [l, u] is [p(l), 2 - p(l)]
    (the maximum of the equioscillating p is attained at u), which becomes the next interval.
    Once l / u > 1 - 5e-6 the schedule ends with the converged polynomial (15, -10, 3) / 8
    (p(1) = 1, p'(1) = p''(1) = 0), which then repeats.

    Returns:
        (schedule, errors): ``errors[k]`` = max |1 - x| over the interval after step k + 1
        (exact arithmetic, no safety factor).
    """
    table, errors, _ = greedy_schedule(lower, upper, cushion, max_steps)
    return table, errors
