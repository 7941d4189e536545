"""Tests for dist_muonclip.newton_schulz: parity with torch.optim.Muon, float64 oracles, schedules."""
from __future__ import annotations

import math
import sys

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_muon_ns
from torch.utils.flop_counter import FlopCounterMode

from dist_muonclip import newton_schulz as ns
from dist_muonclip.newton_schulz import (
    JORDAN_COEFFICIENTS,
    cans_interval,
    cans_lower_for_delta,
    cans_schedule,
    cubic_minimax,
    greedy_minimax_composition,
    ns_flops,
    ns_schedule,
    orthogonalize,
    polar_express_schedule,
    remez_odd,
    schedule_error,
    validate_ns_options,
)

# Published Polar Express table (arXiv 2505.16932, App. G / reference code), before their 1.01
# safety factor: l0 = 1e-3, cushion 0.02407327424182761.
PUBLISHED_POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
SCHEDULES = ["jordan", "polar_express", "cans"]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Matrices here are <= 128 x 192: one intra-op thread is as fast, and it avoids the spinning
    thread pool oversubscribing a loaded 2-core CI machine (measured 6 s vs up to 77 s). Both
    sides of every parity check run under the same setting; restored after this module."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _with_spectrum(m: int, n: int, sigmas: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 matrix U diag(sigmas) V^T (m x n, r = min(m, n) singular values) and its polar factor U V^T."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(sigmas.to(torch.float64)) @ v.T, u @ v.T


def _well_conditioned(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r = min(m, n)
    return _with_spectrum(m, n, torch.linspace(0.5, 1.0, r), seed)


def _ill_conditioned(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values logspaced over [1e-3, 1] (kappa = 1e3); after Frobenius normalization the
    smallest fall slightly below PE's/CANS's design floor 1e-3 (tests what happens at the edge)."""
    return _with_spectrum(m, n, torch.logspace(-3, 0, min(m, n), dtype=torch.float64), seed)


def _in_interval(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values logspaced over [3e-3, 1] (kappa = 333): sigma_min / ||G||_F >= 1e-3 for
    min(m, n) <= 64, i.e. inside the interval PE / CANS guarantee (checked by the tests)."""
    return _with_spectrum(m, n, torch.logspace(math.log10(3e-3), 0, min(m, n), dtype=torch.float64), seed)


def _max_sigma_dev(out: torch.Tensor) -> float:
    return float((torch.linalg.svdvals(out.double()) - 1.0).abs().max())


def _rel_polar_err(out: torch.Tensor, polar: torch.Tensor) -> float:
    return float((out.double() - polar).norm() / polar.norm())


# ------------------------------------------------------------------------------------------------
# Parity with torch.optim.Muon
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96), (33, 77), (77, 33), (1, 50), (50, 1), (7, 7)])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_jordan_bit_parity_with_torch_muon(shape, in_dtype):
    """Default options must reproduce torch.optim.Muon's NS exactly (bit-for-bit, no tolerance)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(in_dtype)
    x_before = x.clone()
    expected = torch_muon_ns(x.clone(), JORDAN_COEFFICIENTS, 5, 1e-7)
    got = orthogonalize(x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert torch.equal(got, expected)
    # regression: torch's helper normalizes a bf16 input in place; ours never touches the input
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_jordan_parity_other_steps_and_explicit_tuple(steps):
    """An explicit (a, b, c) tuple and other step counts follow torch's iteration exactly too."""
    x = torch.randn(48, 80, generator=torch.Generator().manual_seed(steps))
    coeffs = (3.0, -3.2, 1.2)
    assert torch.equal(orthogonalize(x, coefficients=coeffs, steps=steps), torch_muon_ns(x, coeffs, steps, 1e-7))


# ------------------------------------------------------------------------------------------------
# Batched == per-matrix loop
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 64, 96), (3, 96, 64), (4, 33, 33)])
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]])
def test_batched_matches_loop(shape, coefficients):
    """A batch is processed as independent matrices (own orientation and norm per matrix)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    batched = orthogonalize(x, coefficients=coefficients)
    loop = torch.stack([orthogonalize(xi, coefficients=coefficients) for xi in x])
    assert batched.shape == x.shape
    # bmm/baddbmm and mm/addmm may accumulate in different orders on other hardware; one bf16
    # rounding of an entry of size <= 1 is <= 2^-8, allow two roundings.
    torch.testing.assert_close(batched.float(), loop.float(), atol=2**-7, rtol=0)
    b64 = orthogonalize(x, coefficients=coefficients, dtype=torch.float64)
    l64 = torch.stack([orthogonalize(xi, coefficients=coefficients, dtype=torch.float64) for xi in x])
    # float64: only summation-order differences (~1e-16 per op, 5 iterations of O(1) growth)
    torch.testing.assert_close(b64, l64, atol=1e-12, rtol=0)


def test_cans_batch_uses_one_conservative_interval():
    """CANS on a bucket uses the largest Gelfand bound of the batch: equal to the loop run with that schedule."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 72, generator=g, dtype=torch.float64)
    x[1] = torch.randn(40, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 72, generator=g, dtype=torch.float64)
    x[1] += 1e-2 * torch.randn(40, 72, generator=g, dtype=torch.float64)  # ~rank 1: sigma_1 ~ ||X||_F
    xn = x / x.norm(dim=(-2, -1), keepdim=True)
    gram = xn @ xn.mT
    uppers = [cans_interval((gi @ gi)[None]) for gi in gram]
    assert cans_interval(gram @ gram) == pytest.approx(max(uppers), rel=1e-6)  # fp32 reduction
    schedule = cans_schedule(5, upper=max(uppers))
    batched = orthogonalize(x, coefficients="cans", dtype=torch.float64)
    loop = torch.stack([orthogonalize(xi, coefficients=schedule, dtype=torch.float64) for xi in x])
    # float64, same schedule; CANS's first step forms b A + c A^2 instead of addmm: rounding only
    torch.testing.assert_close(batched, loop, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# Float64 oracle: the singular values follow the composed scalar polynomial exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coefficients", SCHEDULES)
@pytest.mark.parametrize("shape", [(40, 72), (72, 40)])
def test_singular_values_follow_scalar_map(coefficients, shape):
    """In float64, sigma_i(out) = phi(sigma_i(G) / ||G||_F) with phi the composed schedule."""
    g, _ = _in_interval(*shape, seed=3)
    steps = 5
    out = orthogonalize(g, coefficients=coefficients, steps=steps, dtype=torch.float64)
    s = torch.linalg.svdvals(g) / g.norm()
    if coefficients == "cans":
        gram = (g / g.norm()) @ (g / g.norm()).T
        schedule = cans_schedule(steps, upper=cans_interval(gram @ gram))
    else:
        schedule = ns_schedule(coefficients, steps)
    phi = s.clone()
    for a, b, c in schedule:
        phi = a * phi + b * phi**3 + c * phi**5
    # float64 products of O(1) matrices, 5 iterations: errors ~1e-14; phi is positive here so the
    # singular values of the output are phi sorted.
    torch.testing.assert_close(torch.linalg.svdvals(out), phi.sort(descending=True).values, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------
# Accuracy against the exact polar factor U V^T (float64 SVD)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_jordan_band_not_one(dtype):
    """Jordan's quintic lands singular values in a band ~[0.68, 1.20] (5 steps), never converging to 1."""
    g, polar = _well_conditioned(64, 96)
    out = orthogonalize(g, dtype=dtype)
    sv = torch.linalg.svdvals(out.double())
    # band of the scalar map on [0.05, 1] is [0.6818, 1.2024] (schedule_error style evaluation);
    # bf16 rounding of the iterates moves singular values by < 2^-7 relative.
    assert sv.min() > 0.68 - 0.01 and sv.max() < 1.21 + 0.01
    # it stays away from 1: even 10 more steps leave a deviation > 0.25 (the band is a fixed cycle)
    assert _max_sigma_dev(orthogonalize(g, steps=15, dtype=torch.float64)) > 0.25
    # ||U S' V^T - U V^T||_F / ||U V^T||_F = RMS(s' - 1) over the band: measured 0.238
    assert 0.15 < _rel_polar_err(out, polar) < 0.3


@pytest.mark.parametrize("coefficients", ["polar_express", "cans"])
@pytest.mark.parametrize("conditioning", ["well", "ill"])
@pytest.mark.parametrize("steps", [5, 6, 8])
def test_optimal_schedules_reach_documented_accuracy(coefficients, conditioning, steps):
    """PE / CANS: max |sigma - 1| <= the worst case of their schedule on [1e-3, 1] (+ bf16 floor)."""
    make = _well_conditioned if conditioning == "well" else _in_interval
    g, polar = make(64, 96, seed=4)
    assert float(torch.linalg.svdvals(g).min() / g.norm()) >= 1e-3  # inside the designed interval
    bound = schedule_error(polar_express_schedule(steps), 1e-3)  # CANS's interval is never wider
    dev64 = _max_sigma_dev(orthogonalize(g, coefficients=coefficients, steps=steps, dtype=torch.float64))
    assert dev64 <= bound + 1e-9  # float64 products: the scalar worst case holds up to rounding
    out = orthogonalize(g, coefficients=coefficients, steps=steps)
    # bf16: each iteration re-rounds the iterate (2^-8 = 0.004 relative per entry), and the
    # polynomials near 1 contract rather than amplify it: measured |dev_bf16 - dev_fp64| <= 0.005
    # on these inputs; allow 3x that.
    assert _max_sigma_dev(out) <= bound + 0.015
    if steps == 8:  # converged: the exact polar factor, to float64 / bf16 accuracy
        assert dev64 < 1e-9
        # bf16 entries carry 2^-8 relative rounding. Well conditioned, that is the error; with
        # sigma_min ~ 1e-3 ||G|| the rounding of G and of every iterate (size ~2^-8 ||X||) rotates
        # the small singular directions (perturbation / gap), measured 0.05: bound 0.1.
        assert _rel_polar_err(out, polar) < (0.02 if conditioning == "well" else 0.1)


@pytest.mark.parametrize("steps", [4, 5, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_pe_and_cans_at_least_as_accurate_as_jordan_when_ill_conditioned(steps, dtype):
    """On an ill-conditioned input (kappa = 1e3), both metrics: PE <= Jordan, CANS <= Jordan (+ bf16 noise)."""
    g, polar = _ill_conditioned(96, 64, seed=5)
    res = {}
    for name in SCHEDULES:
        out = orthogonalize(g, coefficients=name, steps=steps, dtype=dtype)
        res[name] = (_max_sigma_dev(out), _rel_polar_err(out, polar))
    slack = 1e-9 if dtype == torch.float64 else 0.01  # bf16 rounding of the iterates
    for name in ("polar_express", "cans"):
        assert res[name][0] <= res["jordan"][0] + slack, res
        assert res[name][1] <= res["jordan"][1] + slack, res
    assert res["cans"][1] <= res["polar_express"][1] + slack, res


def test_cans_beats_polar_express_on_spread_spectrum():
    """Frobenius overestimates sigma_1 for a flat spectrum; the Gelfand bound fixes that (CANS's point)."""
    g, polar = _with_spectrum(64, 64, torch.logspace(-1, 0, 64), seed=6)
    pe = _rel_polar_err(orthogonalize(g, coefficients="polar_express", dtype=torch.float64), polar)
    cans = _rel_polar_err(orthogonalize(g, coefficients="cans", dtype=torch.float64), polar)
    # measured: PE 8.1e-2, CANS 3.8e-3; require a clear (10x) gain, far above float64 rounding
    assert cans < 0.1 * pe, (cans, pe)


# ------------------------------------------------------------------------------------------------
# Remez solver and coefficient tables
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interval", [(1e-3, 1.0), (0.024, 1.0), (0.1, 1.0), (0.5, 2.0), (0.9, 1.1), (0.3, 0.31)])
@pytest.mark.parametrize("degree", [3, 5])
def test_remez_equioscillates(interval, degree):
    """Chebyshev alternance: n+1 points (with both ends) where p - 1 = +-E alternately, and E = sup |p - 1|."""
    lo, hi = interval
    coeffs, err, pts = remez_odd(lo, hi, degree=degree)
    n = (degree + 1) // 2
    assert len(pts) == n + 1 and pts[0] == pytest.approx(lo, rel=1e-15) and pts[-1] == pytest.approx(hi, rel=1e-15)
    assert all(a < b for a, b in zip(pts[:-1], pts[1:], strict=True))
    p = lambda x: sum(c * x ** (2 * k + 1) for k, c in enumerate(coeffs))  # noqa: E731
    for j, x in enumerate(pts):
        # float64 solve of a well-scaled (n+1)-system: equal ripples to ~1e-12 relative
        assert p(x) - 1.0 == pytest.approx((-1.0) ** (j + 1) * err, rel=1e-9, abs=1e-14)
    xs = torch.linspace(lo, hi, 100001, dtype=torch.float64)
    sup = float((1.0 - sum(c * xs ** (2 * k + 1) for k, c in enumerate(coeffs))).abs().max())
    # the grid can only under-estimate the true sup; E must be the sup (not smaller), up to rounding
    assert sup <= err * (1 + 1e-9) + 1e-15
    assert sup >= err * (1 - 1e-6)  # the grid (spacing <= 1e-5) finds the ripples to 1e-6 relative


@pytest.mark.parametrize("interval", [(1e-3, 1.0), (0.2, 1.0), (0.7, 1.3)])
def test_remez_cubic_matches_closed_form(interval):
    """Remez degree 3 == CANS Proposition 2 (independent closed form), to float64 accuracy."""
    coeffs, err, _ = remez_odd(*interval, degree=3)
    closed, closed_err = cubic_minimax(*interval)
    assert coeffs == pytest.approx(closed, rel=1e-10)  # both exact; 1e-10 covers the 4x4-free solve
    assert err == pytest.approx(closed_err, rel=1e-10)


def test_greedy_composition_robust_for_any_start():
    """Regression: a start whose interval later lands just above the converged threshold
    (width ~6e-6, where Remez loses the alternation in float64) must not crash the greedy solve;
    every start converges to the fixed-point polynomial with non-increasing errors."""
    for lower in [10.0**e for e in range(-9, 0)] + [0.3, 0.5, 0.9, 0.99, 1 - 6e-6, 1 - 5.1e-6]:
        table, errors = greedy_minimax_composition(lower, cushion=ns.POLAR_EXPRESS_CUSHION)
        assert table[-1] == (1.875, -1.25, 0.375) and len(table) < 20, lower
        assert all(b <= a for a, b in zip(errors[:-1], errors[1:], strict=True))  # never grows
        assert errors[-1] < 1e-12
    # every schedule CANS can ever ask for (all 161 grid cells of the upper bound) can be built
    for idx in range(ns._CANS_MIN_INDEX, 1):
        sched = cans_schedule(5, upper=2.0 ** (idx / 16))
        assert len(sched) == 5 and all(math.isfinite(v) for abc in sched for v in abc)


def test_polar_express_table_matches_paper():
    """Our own greedy minimax construction reproduces the published Polar Express coefficients.

    Tolerance rel 1e-10: the minimax polynomial is unique, so two float64 solvers differ only by
    rounding amplified by the conditioning of the Remez system; measured 1e-15 for the first six
    polynomials and 5e-12 for the seventh (interval width 1e-4 around 1, where the alternation
    points nearly coincide and the system's condition number is ~1e5 larger).
    """
    raw, errors = greedy_minimax_composition(1e-3, cushion=ns.POLAR_EXPRESS_CUSHION)
    assert len(raw) == len(PUBLISHED_POLAR_EXPRESS)
    for ours, theirs in zip(raw, PUBLISHED_POLAR_EXPRESS, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-10, abs=0)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12


def test_polar_express_schedule_safety_and_normalization():
    """Schedule = published table with the 1.01 safety factor (not on the converged polynomial)
    and the paper's 1.01 normalization folded into the first polynomial."""
    sched = polar_express_schedule(10)
    s = 1.01
    a, b, c = PUBLISHED_POLAR_EXPRESS[0]
    assert sched[0] == pytest.approx((a / s**2, b / s**6, c / s**10), rel=1e-10)  # see the table test
    for got, (a, b, c) in zip(sched[1:7], PUBLISHED_POLAR_EXPRESS[1:7], strict=True):
        assert got == pytest.approx((a / s, b / s**3, c / s**5), rel=1e-10)
    assert sched[7:] == [(1.875, -1.25, 0.375)] * 3  # the converged polynomial repeats
    # equal result to the paper's normalization X / (1.01 ||X||_F): scalar map identity
    x = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
    y_ours, y_paper = x.clone(), x / s
    for k, (a, b, c) in enumerate(sched[:5]):
        y_ours = a * y_ours + b * y_ours**3 + c * y_ours**5
        pa, pb, pc = PUBLISHED_POLAR_EXPRESS[k]
        pa, pb, pc = pa / s, pb / s**3, pc / s**5
        y_paper = pa * y_paper + pb * y_paper**3 + pc * y_paper**5
    torch.testing.assert_close(y_ours, y_paper, atol=1e-12, rtol=0)  # float64 rounding only


def test_static_schedules_and_repeat_rule():
    assert ns_schedule("jordan", 3) == [JORDAN_COEFFICIENTS] * 3
    assert ns_schedule((1.0, 2.0, 3.0), 2) == [(1.0, 2.0, 3.0)] * 2
    assert ns_schedule([(1, 2, 3), (4, 5, 6)], 4) == [(1.0, 2.0, 3.0)] + [(4.0, 5.0, 6.0)] * 3
    assert ns_schedule("polar_express", 3) == polar_express_schedule(10)[:3]
    assert ns_schedule("Polar-Express", 12)[-1] == (1.875, -1.25, 0.375)
    assert ns_schedule("cans", 5) == cans_schedule(5, upper=1.0)


def test_cans_interval_is_an_upper_bound_and_cached():
    """Gelfand bound: sigma_1 <= ||A^2||_F^{1/4} <= ||X||_F = 1; schedules cached per quantized bound."""
    for seed in range(4):
        g, _ = _ill_conditioned(48, 80, seed=seed)
        x = g / g.norm()
        a = x @ x.T
        u = cans_interval(a @ a)
        s1 = float(torch.linalg.svdvals(x)[0])
        assert s1 * (1 - 1e-6) <= u <= 1.0 + 1e-6  # fp32 reduction of the norm: 1e-6 relative
        # quantization rounds up (conservative) by at most 2^(1/16)
        idx = ns._cans_index(u)
        assert u <= 2 ** (idx / 16) <= u * 2 ** (1 / 16) * (1 + 1e-12)
    ns._cans_table.cache_clear()
    first = cans_schedule(5, upper=0.70)
    assert cans_schedule(5, upper=0.69) == first  # same grid cell 2^(-8/16): no new solve
    assert ns._cans_table.cache_info().hits == 1 and ns._cans_table.cache_info().misses == 1


def test_cans_schedule_covers_its_interval():
    """CANS with upper bound u: maps [1e-3, u] (Frobenius-relative) into 1 +- its error after 6 steps."""
    for u in (1.0, 0.6, 0.3):
        sched = cans_schedule(6, upper=u)
        err = schedule_error(sched, 1e-3, u)
        assert err <= schedule_error(polar_express_schedule(6), 1e-3) + 1e-12  # never worse than PE
        assert err < 1e-2


@pytest.mark.parametrize("delta,steps", [(0.3, 5), (0.1, 5), (0.05, 6), (0.5, 3)])
def test_cans_lower_for_delta(delta, steps):
    """delta-orthogonalization: the widest [a, 1] that `steps` minimax quintics bring within 1 +- delta."""
    a = cans_lower_for_delta(delta, steps)
    _, errors = greedy_minimax_composition(a, cushion=ns.POLAR_EXPRESS_CUSHION, max_steps=steps)
    assert errors[-1] == pytest.approx(delta, rel=1e-9)  # bisection to float64 resolution of a
    _, wider = greedy_minimax_composition(a * 0.9, cushion=ns.POLAR_EXPRESS_CUSHION, max_steps=steps)
    assert wider[-1] > delta  # a is the smallest such lower end (10 % lower already fails)
    assert cans_lower_for_delta(delta / 2, steps) > a  # tighter accuracy -> narrower interval


def test_cans_lower_for_delta_errors():
    with pytest.raises(ValueError, match="delta must be in"):
        cans_lower_for_delta(1.5, 5)
    with pytest.raises(ValueError, match="cannot reach delta"):
        cans_lower_for_delta(1e-9, 1)


# ------------------------------------------------------------------------------------------------
# Edge cases, FLOPs, backends
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coefficients", SCHEDULES)
def test_zero_matrix_stays_zero(coefficients):
    """||X||_F is clamped at eps: a zero update stays exactly zero, no NaN (also CANS's u = 0)."""
    out = orthogonalize(torch.zeros(2, 16, 24), coefficients=coefficients)
    assert torch.equal(out, torch.zeros(2, 16, 24, dtype=torch.bfloat16))


def test_empty_and_output_dtype():
    assert orthogonalize(torch.zeros(0, 5, 7)).shape == (0, 5, 7)
    assert orthogonalize(torch.randn(5, 7), dtype="float32").dtype == torch.float32


@pytest.mark.parametrize("m,n,steps", [(2, 3, 1), (64, 96, 5), (96, 64, 5), (33, 33, 3)])
def test_ns_flops_matches_flop_counter(m, n, steps):
    """ns_flops counts exactly the matmul FLOPs torch's FlopCounterMode sees (2 per multiply-add)."""
    x = torch.randn(m, n)
    with FlopCounterMode(display=False) as counter:
        orthogonalize(x, steps=steps, dtype=torch.float32)
    assert ns_flops(m, n, steps) == counter.get_total_flops()
    r, c = min(m, n), max(m, n)
    assert ns_flops(m, n, steps) == steps * (4 * r * r * c + 2 * r**3)


def test_backend_auto_on_cpu_is_torch():
    x = torch.randn(2, 24, 40)
    assert torch.equal(orthogonalize(x, backend="auto"), orthogonalize(x, backend="torch"))


def test_backend_triton_missing_module_raises_clear_error(monkeypatch):
    """Without the kernel module (or triton) the explicit triton backend names the fix."""
    monkeypatch.setitem(sys.modules, "dist_muonclip.kernels.newton_schulz", None)
    with pytest.raises(ImportError, match="ns_backend='triton'.*pip install"):
        orthogonalize(torch.randn(8, 8), backend="triton")
    assert torch.equal(orthogonalize(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)), backend="auto"),
                       orthogonalize(torch.randn(8, 8, generator=torch.Generator().manual_seed(0))))


def test_triton_dispatch_passes_schedule_and_eps(monkeypatch):
    """The triton backend receives the raw x and the very schedule the torch backend applies
    (CANS: the data-dependent one with 1/u folded in), so both backends compute the same map."""
    import types

    calls = []

    def fake_kernel(x, schedule, *, eps):
        calls.append((x, list(schedule), eps))
        xn = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
        wide = xn.mT if x.size(-2) > x.size(-1) else xn
        out = ns._iterate(wide, schedule)
        return out.mT if x.size(-2) > x.size(-1) else out

    fake = types.ModuleType("dist_muonclip.kernels.newton_schulz")
    fake.newton_schulz_triton = fake_kernel
    monkeypatch.setitem(sys.modules, "dist_muonclip.kernels.newton_schulz", fake)
    x = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for name in SCHEDULES:
        got = orthogonalize(x, coefficients=name, backend="triton", eps=1e-5)
        want = orthogonalize(x, coefficients=name, backend="torch", eps=1e-5)
        assert calls[-1][0].dtype == torch.bfloat16 and got.dtype == torch.bfloat16
        # bf16 on both sides (the kernels are bf16-only): the stand-in normalizes in bf16 where the
        # torch path takes the norm in fp32, and CANS's torch path reuses A, A^2 of its estimate
        # (b A + c A^2 vs addmm); a few bf16 roundings (2^-8 each) of entries of size <= 1
        torch.testing.assert_close(got.float(), want.float(), atol=2**-5, rtol=0)
        assert calls[-1][2] == 1e-5 and len(calls[-1][1]) == 5
    assert calls[0][1] == ns_schedule("jordan", 5)


def test_fp32_ns_never_runs_the_bf16_triton_kernels(monkeypatch):
    """Regression: ns_backend="auto" on CUDA sent ns_dtype=float32 to the bf16-only Triton kernels,
    which returned bf16 (1.7e-2 off the fp32 result), so fp32 equivalence runs on a GPU were not
    fp32. "auto" now resolves to torch for float32/float64 and "triton" refuses them up front."""
    monkeypatch.setattr(ns, "_triton_available", lambda: True)
    assert ns.resolve_backend("auto", is_cuda=True, dtype=torch.bfloat16) == "triton"
    assert ns.resolve_backend("auto", is_cuda=True, dtype=torch.float32) == "torch"
    assert ns.resolve_backend("auto", is_cuda=True, dtype=torch.float64) == "torch"
    assert ns.resolve_backend("auto", is_cuda=False, dtype=torch.bfloat16) == "torch"
    assert ns.resolve_backend("torch", is_cuda=True, dtype=torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="ns_backend='triton' computes in bfloat16.*ns_dtype=torch.float32"):
        orthogonalize(torch.randn(8, 8), backend="triton", dtype="float32")
    from dist_muonclip import MuonClip

    with pytest.raises(ValueError, match="ns_backend='triton'.*ns_backend='torch'"):
        MuonClip([torch.nn.Parameter(torch.randn(8, 8))], lr=0.1, ns_backend="triton", ns_dtype="float32")


def test_validate_normalizes():
    assert validate_ns_options("Polar-Express", 5, "bf16", "AUTO") == ("polar_express", 5, torch.bfloat16, "auto")
    assert validate_ns_options((1, 2, 3), 1, "float32", "torch")[0] == ((1.0, 2.0, 3.0),)
    got = validate_ns_options([[1, 2, 3], (4, 5, 6)], 100, torch.bfloat16, "triton")
    assert got[0] == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert validate_ns_options("cans", 5, "fp32", "torch")[2] == torch.float32


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"coefficients": "newton"}, ValueError, "ns_coefficients='newton'.*jordan"),
        ({"coefficients": 3.4}, TypeError, "ns_coefficients must be"),
        ({"coefficients": ()}, ValueError, "empty"),
        ({"coefficients": (1.0, 2.0)}, ValueError, r"ns_coefficients\[0\] has 2 values.*exactly 3"),
        ({"coefficients": [(1.0, 2.0, 3.0), (1.0, 2.0, 3.0, 4.0)]}, ValueError, r"ns_coefficients\[1\] has 4"),
        ({"coefficients": (1.0, float("nan"), 3.0)}, TypeError, "finite real"),
        ({"coefficients": ("a", "b", "c")}, TypeError, r"ns_coefficients\[0\]"),
        ({"coefficients": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "ns_coefficients must be"),
        ({"steps": 0}, ValueError, "ns_steps=0.*1 <= ns_steps <= 100"),
        ({"steps": 101}, ValueError, "ns_steps=101"),
        ({"steps": 5.0}, TypeError, "ns_steps must be an int"),
        ({"steps": True}, TypeError, "ns_steps must be an int"),
        ({"dtype": torch.float16}, ValueError, "ns_dtype=torch.float16.*bfloat16"),
        ({"dtype": torch.int32}, ValueError, "ns_dtype=torch.int32"),
        ({"dtype": "half"}, ValueError, "ns_dtype='half'"),
        ({"dtype": 16}, TypeError, "ns_dtype must be"),
        ({"backend": "cuda"}, ValueError, "ns_backend='cuda'.*'torch', 'triton' or 'auto'"),
        ({"backend": None}, TypeError, "ns_backend must be"),
    ],
)
def test_validation_errors(kwargs, exc, match):
    opts = {"coefficients": "jordan", "steps": 5, "dtype": torch.bfloat16, "backend": "torch"} | kwargs
    with pytest.raises(exc, match=match):
        validate_ns_options(**opts)
    with pytest.raises(exc, match=match):  # orthogonalize validates the same way, before any work
        orthogonalize(torch.randn(4, 4), **opts)


@pytest.mark.parametrize(
    "x, kwargs, exc, match",
    [
        (torch.randn(4), {}, ValueError, r"\[m, n\] or \[B, m, n\]"),
        (torch.randn(2, 2, 2, 2), {}, ValueError, r"\[m, n\] or \[B, m, n\]"),
        (torch.ones(3, 3, dtype=torch.int64), {}, TypeError, "floating"),
        ([[1.0, 2.0]], {}, TypeError, "torch.Tensor"),
        (torch.randn(3, 3), {"eps": 0.0}, ValueError, "eps must be a positive"),
        (torch.randn(3, 3), {"coefficients": "cans", "cans_lower": 1.5}, ValueError, "cans_lower"),
    ],
)
def test_orthogonalize_input_errors(x, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        orthogonalize(x, **kwargs)


def test_ns_flops_validation():
    with pytest.raises(ValueError, match="m must be a non-negative int"):
        ns_flops(-1, 3, 5)
    with pytest.raises(ValueError, match="steps must be"):
        ns_flops(2, 3, 2.5)


def test_fixtures_conditioning():
    """Guards the fixtures the accuracy tests rely on."""
    g, polar = _in_interval(64, 96)
    s = torch.linalg.svdvals(g)
    assert float(s[0] / s[-1]) == pytest.approx(1 / 3e-3, rel=1e-9)  # float64 SVD of a known spectrum
    assert float(s[-1] / g.norm()) >= 1e-3
    g, _ = _ill_conditioned(96, 64)
    s = torch.linalg.svdvals(g)
    assert float(s[0] / s[-1]) == pytest.approx(1e3, rel=1e-9)
    torch.testing.assert_close(polar @ polar.T, torch.eye(64, dtype=torch.float64), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# CUDA (marker "gpu"; skipped without a device)
# ------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(256, 256), (384, 160), (160, 384), (129, 257), (1, 64)])
def test_cuda_jordan_bit_parity_with_torch_muon(shape):
    """Same ops on the same views as torch.optim.Muon: bit-identical on CUDA too."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).cuda()
    assert torch.equal(orthogonalize(x), torch_muon_ns(x, JORDAN_COEFFICIENTS, 5, 1e-7))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("coefficients", SCHEDULES)
def test_cuda_batched_and_float64_match_cpu(coefficients):
    """CUDA batched == CUDA loop (bf16) and CUDA float64 == CPU float64 (all schedules)."""
    x = torch.randn(4, 96, 160, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    xc = x.cuda()
    if coefficients != "cans":  # CANS shares one interval per batch, compared below in float64
        batched = orthogonalize(xc, coefficients=coefficients)
        loop = torch.stack([orthogonalize(xi, coefficients=coefficients) for xi in xc])
        # cuBLAS may pick different kernels (split-K, accumulation order) for bmm and mm: allow two
        # bf16 roundings (2^-8 each) of an entry of size <= 1
        torch.testing.assert_close(batched.float(), loop.float(), atol=2**-7, rtol=0)
    got = orthogonalize(xc, coefficients=coefficients, dtype=torch.float64).cpu()
    want = orthogonalize(x, coefficients=coefficients, dtype=torch.float64)
    # float64 on both sides: only summation-order differences (~1e-16 per op, O(1) growth)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("coefficients", ["polar_express", "cans"])
def test_cuda_bf16_converges(coefficients):
    """bf16 on CUDA reaches the same floor as on CPU: 8 steps -> max |sigma - 1| <= 0.02."""
    g, polar = _in_interval(64, 96, seed=9)
    out = orthogonalize(g.float().cuda(), coefficients=coefficients, steps=8).cpu()
    assert _max_sigma_dev(out) < 0.02  # measured ~5e-3 on CPU (bf16 rounding floor), 4x margin
    assert _rel_polar_err(out, polar) < 0.1  # small-sigma directions rotated by bf16 rounding (see above)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("coefficients, expected_syncs", [("jordan", 0), ("polar_express", 0), ("cans", 1)])
def test_cuda_host_syncs(coefficients, expected_syncs):
    """Static schedules never synchronize with the host; CANS synchronizes exactly once per call
    (reading the batch's Gelfand bound). Pins the "no data-dependent host logic" property.
    torch's sync debug mode is a prototype that may miss some syncs, so the zero counts are a
    lower bound; the CANS count of exactly one shows it does see the .item()-style copy."""
    import warnings

    x = torch.randn(3, 64, 96, device="cuda")
    orthogonalize(x, coefficients=coefficients)  # warm-up: lazy init, cached schedules
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            orthogonalize(x, coefficients=coefficients)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == expected_syncs, [str(w.message) for w in syncs]


@pytest.mark.gpu
@needs_cuda
def test_cuda_auto_float32_is_float32():
    """ns_backend="auto" on CUDA with ns_dtype=float32 computes in fp32 (regression: it used to run
    the bf16 Triton kernels and return bf16), matching the CPU fp32 result."""
    x = torch.randn(3, 96, 160, generator=torch.Generator().manual_seed(11))
    got = orthogonalize(x.cuda(), backend="auto", dtype=torch.float32)
    assert got.dtype == torch.float32
    # fp32 on both devices: summation order only (TF32 is off by default for matmul in torch)
    torch.testing.assert_close(got.cpu(), orthogonalize(x, dtype=torch.float32), atol=1e-5, rtol=0)
