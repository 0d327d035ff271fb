"""The relaxed log barrier of Eq. (9), its derivative, the implied multipliers (Sec. 5.2) and the decay of mu."""

from __future__ import annotations

import math

import pytest
import torch

from l3m.solvers.barrier import implied_multipliers, mu_at_step, relaxed_log_barrier, relaxed_log_barrier_grad

F64 = torch.float64


def t64(values):
    return torch.tensor(values, dtype=F64)


# ----------------------------------------------------------------------------------------------------------------
# relaxed_log_barrier: values at hand-computed points
# ----------------------------------------------------------------------------------------------------------------


def test_log_branch_values():
    # mu = 0.5, s = mu**2 = 0.25; z = -2 <= -0.25, so B = -mu*log(-z) = -0.5*log(2) = -0.34657359027997264
    # mu = 1, s = 1; z = -e <= -1, so B = -log(e) = -1
    # mu = 0.1, s = 0.01; z = -0.01 = -s sits on the boundary, which belongs to the log branch:
    #   B = -0.1*log(0.01) = 0.1*4.605170185988092 = 0.4605170185988092
    assert relaxed_log_barrier(t64([-2.0]), mu=0.5).item() == pytest.approx(-0.34657359027997264, rel=1e-12)
    assert relaxed_log_barrier(t64([-math.e]), mu=1.0).item() == pytest.approx(-1.0, rel=1e-12)
    assert relaxed_log_barrier(t64([-0.01]), mu=0.1).item() == pytest.approx(0.4605170185988092, rel=1e-9)


def test_linear_branch_values():
    # mu = 0.5, s = 0.25: B(z) = (mu/s)*z + mu - mu*log(s) = 2*z + 0.5 - 0.5*log(0.25) = 2*z + 0.5 + 0.6931471805599453
    #   z = 0  -> 1.1931471805599454
    #   z = 1  -> 3.1931471805599454
    #   z = -0.1 (> -0.25) -> -0.2 + 1.1931471805599454 = 0.9931471805599454
    got = relaxed_log_barrier(t64([0.0, 1.0, -0.1]), mu=0.5)
    torch.testing.assert_close(got, t64([1.1931471805599454, 3.1931471805599454, 0.9931471805599454]))


def test_explicit_s_overrides_mu_squared():
    # mu = 1, s = 0.5; z = -0.25 > -0.5 is on the linear branch: (1/0.5)*(-0.25) + 1 - log(0.5) = -0.5 + 1 + 0.693147...
    #   = 1.1931471805599454; with the default s = mu**2 = 1 the same z would give -0.25 + 1 - 0 = 0.75
    assert relaxed_log_barrier(t64([-0.25]), mu=1.0, s=0.5).item() == pytest.approx(1.1931471805599454, rel=1e-12)
    assert relaxed_log_barrier(t64([-0.25]), mu=1.0).item() == pytest.approx(0.75, rel=1e-12)
    # and the derivative: mu / max(-z, s) = 1 / max(0.25, 0.5) = 2 with s = 0.5; 1 / max(0.25, 1) = 1 by default
    assert relaxed_log_barrier_grad(t64([-0.25]), mu=1.0, s=0.5).item() == pytest.approx(2.0)
    assert relaxed_log_barrier_grad(t64([-0.25]), mu=1.0).item() == pytest.approx(1.0)


def test_shape_is_kept_and_values_finite_far_into_both_branches():
    z = t64([[-1e6, -1.0], [1e3, 0.0]])
    out = relaxed_log_barrier(z, mu=0.1)
    assert out.shape == z.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mu", [1.0, 0.5, 0.1, 0.01])
def test_barrier_is_increasing_and_convex(mu):
    z = torch.linspace(-3.0, 3.0, 601, dtype=F64)
    b = relaxed_log_barrier(z, mu=mu)
    first = b[1:] - b[:-1]
    second = first[1:] - first[:-1]
    assert (first > 0).all()
    assert (second > -1e-9).all()


# ----------------------------------------------------------------------------------------------------------------
# continuity of value and derivative at z = -s
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu, s", [(1.0, None), (0.5, None), (0.1, None), (0.03, None), (0.5, 0.1)])
def test_value_and_slope_are_continuous_at_minus_s(mu, s):
    s_val = mu**2 if s is None else s
    eps = 1e-9
    z = t64([-s_val - eps, -s_val, -s_val + eps])
    values = relaxed_log_barrier(z, mu=mu, s=s)
    # both branches meet at -mu*log(s)
    at_boundary = -mu * math.log(s_val)
    slope = mu / s_val
    for v in values.tolist():
        assert v == pytest.approx(at_boundary, abs=2 * slope * eps + 1e-12)
    # the linear branch just right of -s, evaluated through its own formula, continues the log branch
    linear_formula_at_boundary = (mu / s_val) * (-s_val) + mu - mu * math.log(s_val)
    assert linear_formula_at_boundary == pytest.approx(at_boundary, rel=1e-12, abs=1e-12)

    grads = relaxed_log_barrier_grad(z, mu=mu, s=s)
    rtol = 10 * eps / s_val  # the log branch's slope -mu/z moves by a relative eps/s over the step eps
    torch.testing.assert_close(grads, torch.full_like(grads, slope), rtol=rtol, atol=0)

    # the autograd slope of the value function is continuous too (left: -mu/z, right: mu/s)
    zz = z.clone().requires_grad_(True)
    relaxed_log_barrier(zz, mu=mu, s=s).sum().backward()
    torch.testing.assert_close(zz.grad, torch.full_like(grads, slope), rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# relaxed_log_barrier_grad equals the autograd gradient of relaxed_log_barrier
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu, s", [(1.0, None), (0.3, None), (0.05, None), (0.5, 0.2)])
def test_grad_matches_autograd_on_both_branches(mu, s):
    s_val = mu**2 if s is None else s
    log_side = [-10.0, -2.0, -1.3 * s_val, -s_val * 1.0001]
    linear_side = [-s_val * 0.9999, -0.5 * s_val, 0.0, 0.7, 25.0]
    z = t64(log_side + linear_side).requires_grad_(True)
    relaxed_log_barrier(z, mu=mu, s=s).sum().backward()
    expected = relaxed_log_barrier_grad(z.detach(), mu=mu, s=s)
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-12)
    # and the closed form mu / max(-z, s), branch by branch
    closed = [mu / max(-v, s_val) for v in log_side + linear_side]
    torch.testing.assert_close(expected, t64(closed), rtol=1e-12, atol=0)
    # on the linear branch the slope is the constant mu/s; on the log branch it is -mu/z
    n_log = len(log_side)
    torch.testing.assert_close(expected[n_log:], torch.full((len(linear_side),), mu / s_val, dtype=F64))
    torch.testing.assert_close(expected[:n_log], -mu / t64(log_side))


def test_grad_gradcheck():
    z = t64([-3.0, -0.7, -0.05, 0.2, 4.0]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: relaxed_log_barrier(x, mu=0.4), (z,))


# ----------------------------------------------------------------------------------------------------------------
# implied_multipliers
# ----------------------------------------------------------------------------------------------------------------


def test_implied_multipliers_active_violated_and_inactive():
    mu = 0.01  # mu**2 = 1e-4
    c = t64([2.0, 0.0, -1e-4, -0.5, -3.0])  # violated, active, on the boundary -mu**2, inactive, inactive
    k = 5
    got = implied_multipliers(c, mu)
    # C >= -mu**2: 1/(k*mu) = 1/(5*0.01) = 20
    # C = -0.5:   -mu/(k*C) = 0.01/(5*0.5) = 0.004
    # C = -3:     -mu/(k*C) = 0.01/(5*3) = 0.000666...
    expected = t64([20.0, 20.0, 20.0, 0.004, 0.01 / 15])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[:3], torch.full((3,), 1 / (k * mu), dtype=F64))
    torch.testing.assert_close(got[3:], -mu / (k * c[3:]))


def test_implied_multipliers_scale_with_number_of_constraints():
    mu = 0.1
    one = implied_multipliers(t64([1.0]), mu)
    four = implied_multipliers(t64([1.0, 1.0, 1.0, 1.0]), mu)
    assert one.item() == pytest.approx(10.0)  # 1/(1*0.1)
    torch.testing.assert_close(four, torch.full((4,), 2.5, dtype=F64))  # 1/(4*0.1)


def test_inactive_multiplier_vanishes_as_mu_decays():
    c = t64([-0.5, 1.0])  # one inactive, one violated constraint; k = 2
    mus = [0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6]
    inactive = [implied_multipliers(c, mu)[0].item() for mu in mus]
    violated = [implied_multipliers(c, mu)[1].item() for mu in mus]
    for mu, lam in zip(mus, inactive):
        assert lam == pytest.approx(mu / (2 * 0.5), rel=1e-12)  # -mu/(k*C) = mu
    assert all(a > b for a, b in zip(inactive, inactive[1:]))
    assert inactive[-1] < 1e-5
    # the violated one grows as 1/(k*mu): it is never switched off
    for mu, lam in zip(mus, violated):
        assert lam == pytest.approx(1 / (2 * mu), rel=1e-12)
    assert all(a < b for a, b in zip(violated, violated[1:]))


def test_implied_multipliers_are_positive_and_continuous_in_c():
    mu = 0.2
    c = torch.linspace(-2.0, 1.0, 301, dtype=F64)
    lam = implied_multipliers(c, mu)
    assert (lam > 0).all()
    # non-decreasing in C and capped at 1/(k*mu)
    assert (lam[1:] >= lam[:-1]).all()
    assert lam.max().item() == pytest.approx(1 / (c.numel() * mu))


# ----------------------------------------------------------------------------------------------------------------
# mu_at_step
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu_init, mu_final, total", [(1.0, 1e-6, 11), (2.0, 0.02, 5), (1.0, 0.5, 2)])
def test_mu_endpoints_and_geometric_decay(mu_init, mu_final, total):
    mus = [mu_at_step(t, total, mu_init, mu_final) for t in range(total)]
    assert mus[0] == pytest.approx(mu_init, rel=1e-12)
    assert mus[-1] == pytest.approx(mu_final, rel=1e-9)
    gamma = (mu_final / mu_init) ** (1 / (total - 1))
    ratios = [b / a for a, b in zip(mus, mus[1:])]
    for r in ratios:
        assert r == pytest.approx(gamma, rel=1e-9)
    assert all(isinstance(m, float) for m in mus)


def test_mu_hand_computed_and_defaults():
    # gamma = (1e-6 / 1)^(1/(5-1)) = 10^-1.5 = 0.0316227766...; mu_2 = gamma**2 = 1e-3
    assert mu_at_step(1, 5) == pytest.approx(10**-1.5, rel=1e-12)
    assert mu_at_step(2, 5) == pytest.approx(1e-3, rel=1e-12)
    assert mu_at_step(0, 5) == 1.0
    assert mu_at_step(4, 5) == pytest.approx(1e-6, rel=1e-12)


def test_mu_is_clamped_outside_the_schedule():
    assert mu_at_step(-3, 10, 1.0, 1e-4) == pytest.approx(1.0)
    assert mu_at_step(10, 10, 1.0, 1e-4) == pytest.approx(1e-4)
    assert mu_at_step(1000, 10, 1.0, 1e-4) == pytest.approx(1e-4)


@pytest.mark.parametrize("total", [0, 1])
def test_mu_with_a_single_step_is_mu_init(total):
    assert mu_at_step(0, total, 0.7, 1e-3) == 0.7
