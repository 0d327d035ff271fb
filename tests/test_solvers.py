"""Solvers: the log barrier's EMA (Sec. 5.4) and multipliers, and the MM / lagged dual baselines."""

from __future__ import annotations

import json
import math

import pytest
import torch

from l3m.solvers.barrier import implied_multipliers, mu_at_step
from l3m.solvers import LaggedDualSolver, LogBarrierSolver, MinimaxSolver, Solver, build_solver


def test_ema_is_seeded_with_the_first_estimate():
    m = LogBarrierSolver(ema_smoothing=0.1)
    assert m.ema is None
    first = torch.tensor([2.0, -1.0])
    m.update_(first)
    torch.testing.assert_close(m.ema, torch.tensor([2.0, -1.0]))
    # a copy: changing the caller's tensor afterwards does not change the EMA
    first.add_(100.0)
    torch.testing.assert_close(m.ema, torch.tensor([2.0, -1.0]))


def test_ema_update_rule():
    m = LogBarrierSolver(ema_smoothing=0.1)
    m.update_(torch.tensor([2.0, -1.0]))
    m.update_(torch.tensor([-8.0, 4.0]))
    # 0.9*[2, -1] + 0.1*[-8, 4] = [1.8 - 0.8, -0.9 + 0.4] = [1.0, -0.5]
    torch.testing.assert_close(m.ema, torch.tensor([1.0, -0.5]))
    m.update_(torch.tensor([11.0, 0.5]))
    # 0.9*[1, -0.5] + 0.1*[11, 0.5] = [0.9 + 1.1, -0.45 + 0.05] = [2.0, -0.4]
    torch.testing.assert_close(m.ema, torch.tensor([2.0, -0.4]))


def test_ema_uses_the_configured_smoothing():
    m = LogBarrierSolver(ema_smoothing=0.5)
    m.update_(torch.tensor([4.0]))
    m.update_(torch.tensor([0.0]))
    # 0.5*4 + 0.5*0 = 2
    torch.testing.assert_close(m.ema, torch.tensor([2.0]))


def test_ema_is_detached_float_on_cpu():
    m = LogBarrierSolver()
    est = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    m.update_(est * 1)
    assert m.ema.dtype == torch.float32
    assert not m.ema.requires_grad
    assert m.ema.device.type == "cpu"


def test_first_multipliers_come_from_the_given_estimate():
    m = LogBarrierSolver(mu_init=1.0, mu_final=1e-6)
    estimate = torch.tensor([1.0, -0.5])
    lam = m.multipliers(step=5, total_steps=11, estimate=estimate)
    # mu_5 = (1e-6)^(5/10) = 1e-3, k = 2: C = 1 is violated -> 1/(2*1e-3) = 500; C = -0.5 -> 1e-3/(2*0.5) = 1e-3
    torch.testing.assert_close(lam, torch.tensor([500.0, 1e-3]), rtol=1e-5, atol=0)
    # asking for the multipliers does not fold the estimate into the EMA
    assert m.ema is None


def test_multipliers_blend_this_steps_estimate_into_the_ema():
    m = LogBarrierSolver(mu_init=1.0, mu_final=1e-6, ema_smoothing=0.1)
    m.update_(torch.tensor([2.0, -1.0]))
    m.update_(torch.tensor([-8.0, 4.0]))  # ema = [1.0, -0.5]
    this_step = torch.tensor([11.0, -5.5])
    lam = m.multipliers(step=5, total_steps=11, estimate=this_step)
    # blended: 0.9 * [1.0, -0.5] + 0.1 * [11.0, -5.5] = [2.0, -1.0]; mu_5 = 1e-3, k = 2:
    # C = 2 is violated -> 1/(2*1e-3) = 500; C = -1 -> 1e-3/(2*1) = 5e-4
    torch.testing.assert_close(lam, torch.tensor([500.0, 5e-4]), rtol=1e-5, atol=0)
    torch.testing.assert_close(m.ema, torch.tensor([1.0, -0.5]))  # asking does not advance the EMA


def test_a_newly_violated_constraint_is_acted_on_in_the_same_step():
    m = LogBarrierSolver(mu_init=1.0, mu_final=1e-6, ema_smoothing=0.5)
    m.update_(torch.tensor([-1.0]))  # satisfied so far
    lam = m.multipliers(step=5, total_steps=11, estimate=torch.tensor([3.0]))  # blended: 0.5*-1 + 0.5*3 = 1 > 0
    assert lam.item() == pytest.approx(1 / 1e-3)  # active: 1/(k mu) with k = 1


def test_training_loop_order():
    """In a loop 'multipliers, then update_', step t's multipliers use the EMA advanced by step t's estimate."""
    total = 6
    estimates = [torch.tensor([0.5, -2.0]), torch.tensor([-1.0, -1.0]), torch.tensor([0.2, 0.3]),
                 torch.tensor([-0.1, 1.0]), torch.tensor([3.0, -0.2]), torch.tensor([0.0, 0.0])]
    m = LogBarrierSolver(mu_init=1.0, mu_final=1e-3, ema_smoothing=0.1)
    ema = None
    for t, est in enumerate(estimates):
        ema = est.clone() if ema is None else 0.9 * ema + 0.1 * est
        mu = mu_at_step(t, total, 1.0, 1e-3)
        lam = m.multipliers(t, total, est)
        torch.testing.assert_close(lam, implied_multipliers(ema, mu))
        m.update_(est)
        torch.testing.assert_close(m.ema, ema)


def test_mu_follows_the_schedule():
    m = LogBarrierSolver(mu_init=2.0, mu_final=0.02)
    assert m.mu(0, 3) == pytest.approx(2.0)
    assert m.mu(1, 3) == pytest.approx(0.2)  # 2 * (0.01)^(1/2)
    assert m.mu(2, 3) == pytest.approx(0.02)


def test_state_dict_round_trip():
    m = LogBarrierSolver(mu_init=1.0, mu_final=1e-4, ema_smoothing=0.1)
    m.update_(torch.tensor([0.25, -3.0, 1.5]))
    m.update_(torch.tensor([-0.75, 1.0, 0.5]))
    state = m.state_dict()
    restored = LogBarrierSolver(mu_init=1.0, mu_final=1e-4, ema_smoothing=0.1)
    restored.load_state_dict(json.loads(json.dumps(state)))  # checkpoints hold plain JSON-able values
    torch.testing.assert_close(restored.ema, m.ema)
    assert restored.ema.dtype == torch.float32
    probe = torch.tensor([9.0, 9.0, 9.0])
    torch.testing.assert_close(restored.multipliers(3, 10, probe), m.multipliers(3, 10, probe))
    # both continue identically
    nxt = torch.tensor([2.0, 2.0, -2.0])
    m.update_(nxt)
    restored.update_(nxt)
    torch.testing.assert_close(restored.ema, m.ema)


def test_state_dict_round_trip_before_any_update():
    m = LogBarrierSolver()
    state = m.state_dict()
    assert state == {"ema": None}
    restored = LogBarrierSolver()
    restored.update_(torch.tensor([1.0]))  # a stale EMA is overwritten by the loaded (empty) state
    restored.load_state_dict(state)
    assert restored.ema is None
    estimate = torch.tensor([-0.3])
    torch.testing.assert_close(restored.multipliers(0, 5, estimate), implied_multipliers(estimate, 1.0))


# ---------------------------------------------------------------------------------------------- the shared interface


def test_every_strategy_implements_the_interface_and_the_factory_picks_it(tmp_path):
    from l3m.config import L3MConfig

    expected = {"l3m": LogBarrierSolver, "sft": LogBarrierSolver, "mm": MinimaxSolver,
                "lagged_dual": LaggedDualSolver}
    for solver, cls in expected.items():
        args = L3MConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], solver=solver, dual_lr=0.3,
                         multiplier_max=7.0, dual_update_steps=3)
        m = build_solver(args)
        assert type(m) is cls and isinstance(m, Solver), solver
        assert m.estimate is None
    mm = build_solver(L3MConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], solver="mm", dual_lr=0.3,
                                     multiplier_max=7.0, dual_warmup_steps=2, dual_ema_smoothing=0.5))
    assert (mm.dual_lr, mm.multiplier_max, mm.warmup_steps, mm.ema_smoothing) == (0.3, 7.0, 2, 0.5)
    dual = build_solver(L3MConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], solver="lagged_dual",
                                       dual_update_steps=3, dual_warm_start=True))
    assert (dual.update_steps, dual.warm_start) == (3, True)


def test_log_barrier_estimate_is_its_ema():
    m = LogBarrierSolver(ema_smoothing=0.5)
    m.update_(torch.tensor([4.0]))
    m.update_(torch.tensor([0.0]))
    assert m.estimate is m.ema
    torch.testing.assert_close(m.estimate, torch.tensor([2.0]))


def test_l3m_multiplier_of_an_inactive_constraint_vanishes_as_mu_decays():
    """Complementary slackness by design (Sec. 5.2): with C = -0.5 fixed, lambda~ = mu / (k * 0.5) -> 0."""
    total = 50
    m = LogBarrierSolver(mu_init=1.0, mu_final=1e-6, ema_smoothing=0.1)
    inactive = torch.tensor([-0.5, 2.0])  # the second constraint stays violated
    mus, lams = [], []
    for t in range(total):
        mus.append(m.mu(t, total))
        lams.append(m.multipliers(t, total, inactive))
        m.update_(inactive)
    slack = [lam[0].item() for lam in lams]
    # while mu^2 > 0.5 the relaxed barrier is on its linear branch: 1 / (k mu), as for an active constraint
    assert slack[0] == pytest.approx(1.0 / 2)
    # once mu^2 < 0.5 it is mu / (k * 0.5), strictly decreasing with mu, down to mu_final
    log_branch = [lam for mu, lam in zip(mus, slack) if mu**2 < 0.5]
    assert len(log_branch) > total - 3
    assert all(a > b for a, b in zip(log_branch, log_branch[1:]))
    assert slack[-1] == pytest.approx(1e-6 / (2 * 0.5), rel=1e-4)
    # the violated one grows as 1 / (k mu) instead
    assert lams[-1][1].item() == pytest.approx(1.0 / (2 * 1e-6), rel=1e-4)


# ------------------------------------------------------------------------------------------------ MM (dual ascent)


def test_mm_multiplier_rises_while_violated_then_decays_to_zero_and_stays():
    m = MinimaxSolver(dual_lr=0.5)
    lams = []
    for est in [2.0, 2.0, 2.0]:
        lams.append(m.multipliers(0, 10, torch.tensor([est])).item())
        m.update_(torch.tensor([est]))
    # returned before each update: 0, then 0 + 0.5*2, then 2
    assert lams == [0.0, 1.0, 2.0]
    assert m.lam.item() == pytest.approx(3.0)
    for expected in [2.5, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0]:  # slack C = -1: down by 0.5 per step, projected at 0
        m.update_(torch.tensor([-1.0]))
        assert m.lam.item() == pytest.approx(expected)
    assert m.lam.item() == 0.0  # exactly 0, never negative
    torch.testing.assert_close(m.multipliers(9, 10, torch.tensor([5.0])), torch.tensor([0.0]))


def test_mm_constraints_move_independently():
    m = MinimaxSolver(dual_lr=0.1, multiplier_init=1.0)
    torch.testing.assert_close(m.multipliers(0, 5, torch.tensor([3.0, -2.0])), torch.tensor([1.0, 1.0]))
    m.update_(torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(m.lam, torch.tensor([1.3, 0.8]))
    torch.testing.assert_close(m.multipliers(1, 5, torch.tensor([0.0, 0.0])), torch.tensor([1.3, 0.8]))


def test_mm_cap_is_respected():
    m = MinimaxSolver(dual_lr=1.0, multiplier_init=0.5, multiplier_max=2.0)
    for _ in range(10):
        m.update_(torch.tensor([3.0, 0.25]))
    torch.testing.assert_close(m.lam, torch.tensor([2.0, 2.0]))
    assert m.multipliers(0, 1, torch.tensor([9.0, 9.0])).max().item() == 2.0
    log_m = MinimaxSolver(dual_lr=1.0, multiplier_init=0.5, multiplier_max=2.0, log_parametrization=True)
    for _ in range(10):
        log_m.update_(torch.tensor([3.0]))
    assert log_m.lam.item() == pytest.approx(2.0)


def test_mm_warmup_delays_the_dual_updates():
    m = MinimaxSolver(dual_lr=0.5, warmup_steps=3)
    for _ in range(3):
        m.update_(torch.tensor([2.0]))
        assert m.lam.item() == 0.0
    m.update_(torch.tensor([2.0]))  # the 4th estimate is the first dual step
    assert m.lam.item() == pytest.approx(1.0)
    assert m.num_updates == 4


def test_mm_ema_smoothing_drives_the_step():
    m = MinimaxSolver(dual_lr=1.0, ema_smoothing=0.5)
    m.update_(torch.tensor([4.0]))  # ema = 4 (seeded), lam = 4
    m.update_(torch.tensor([-4.0]))  # ema = 0.5*4 + 0.5*(-4) = 0, lam stays 4
    torch.testing.assert_close(m.estimate, torch.tensor([0.0]))
    assert m.lam.item() == pytest.approx(4.0)
    raw = MinimaxSolver(dual_lr=1.0)  # smoothing 1.0: the raw step estimate
    raw.update_(torch.tensor([4.0]))
    raw.update_(torch.tensor([-4.0]))
    assert raw.lam.item() == pytest.approx(0.0)
    torch.testing.assert_close(raw.estimate, torch.tensor([-4.0]))


def test_mm_log_parametrization_stays_positive_and_follows_the_sign():
    m = MinimaxSolver(dual_lr=0.5, multiplier_init=1.0, log_parametrization=True)
    m.update_(torch.tensor([2.0]))
    # log(lambda) += lr * C = 0.5 * 2, i.e. lambda *= exp(1)
    assert m.lam.item() == pytest.approx(math.exp(1.0))
    assert m.log_lam.item() == pytest.approx(1.0)
    m.update_(torch.tensor([2.0]))
    assert m.lam.item() == pytest.approx(math.exp(2.0))
    previous = m.lam.item()
    for _ in range(3):
        m.update_(torch.tensor([1.0]))
        assert m.lam.item() > previous
        previous = m.lam.item()
    for _ in range(30):
        m.update_(torch.tensor([-1.0]))
        assert 0 < m.lam.item() < previous
        previous = m.lam.item()
    assert previous < 0.01  # decays towards 0 without reaching it
    for _ in range(1000):  # a long violation grows it steadily (linearly in log space), without overflow
        m.update_(torch.tensor([0.1]))
    assert m.log_lam.item() == pytest.approx(math.log(previous) + 1000 * 0.5 * 0.1, rel=1e-3)
    assert math.isfinite(m.lam.item())


def test_mm_log_parametrization_needs_a_positive_start():
    with pytest.raises(ValueError, match="^multiplier_init: must be > 0"):
        MinimaxSolver(multiplier_init=0.0, log_parametrization=True)


@pytest.mark.parametrize("log_parametrization", [False, True])
def test_mm_state_dict_round_trip(log_parametrization):
    kwargs = dict(dual_lr=0.2, multiplier_init=0.5, multiplier_max=10.0, warmup_steps=2, ema_smoothing=0.5,
                  log_parametrization=log_parametrization)
    m = MinimaxSolver(**kwargs)
    for est in ([1.0, -2.0], [3.0, 0.5], [0.5, -1.0]):
        m.update_(torch.tensor(est))
    state = json.loads(json.dumps(m.state_dict()))
    restored = MinimaxSolver(**kwargs)
    restored.load_state_dict(state)
    assert restored.num_updates == 3
    torch.testing.assert_close(restored.lam, m.lam)
    torch.testing.assert_close(restored.estimate, m.estimate)
    for est in ([2.0, 2.0], [-1.0, 4.0]):  # both continue identically (the warm-up count is restored too)
        m.update_(torch.tensor(est))
        restored.update_(torch.tensor(est))
        torch.testing.assert_close(restored.lam, m.lam)
    assert not torch.equal(m.lam, torch.tensor([0.5, 0.5]))


def test_mm_state_dict_before_any_update():
    m = MinimaxSolver(multiplier_init=0.25)
    restored = MinimaxSolver(multiplier_init=0.25)
    restored.update_(torch.tensor([5.0]))
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert restored.lam is None and restored.estimate is None and restored.num_updates == 0
    torch.testing.assert_close(restored.multipliers(0, 3, torch.tensor([1.0, 1.0])), torch.tensor([0.25, 0.25]))


# ---------------------------------------------------------------------------------------------------- lagged dual


def _run_outer_iterations(m, estimates):
    """Feed one estimate per constraint step; return the multipliers each step used."""
    used = []
    for est in estimates:
        used.append(m.multipliers(0, 100, torch.tensor(est)).tolist())
        m.update_(torch.tensor(est))
    return used


def test_lagged_dual_is_constant_within_an_outer_iteration_and_takes_the_projected_step():
    m = LaggedDualSolver(dual_lr=0.5, update_steps=3, multiplier_init=1.0)
    first = [[2.0, -1.0], [4.0, -3.0], [0.0, -2.0]]  # mean [2, -2]
    second = [[1.0, -4.0], [-1.0, -4.0], [3.0, -4.0]]  # mean [1, -4]
    used = _run_outer_iterations(m, first + second)
    assert used[:3] == [[1.0, 1.0]] * 3  # lambda_0 throughout iteration 0, whatever the estimates
    assert used[3:] == [[2.0, 0.0]] * 3  # lambda_1 = max(0, [1, 1] + 0.5 * [2, -2]) = [2, 0]
    # lambda_2 = max(0, [2, 0] + 0.5 * [1, -4]) = [2.5, 0]: projected at 0, not -2
    torch.testing.assert_close(m.lam, torch.tensor([2.5, 0.0]))
    assert m.iteration == 2
    assert m.history == [[1.0, 1.0], [2.0, 0.0], [2.5, 0.0]]
    torch.testing.assert_close(m.estimate, torch.tensor([1.0, -4.0]))  # the last completed iteration's mean


def test_lagged_dual_estimate_is_the_running_mean_of_the_iteration():
    m = LaggedDualSolver(dual_lr=0.5, update_steps=4)
    assert m.estimate is None
    _run_outer_iterations(m, [[2.0], [4.0]])
    torch.testing.assert_close(m.estimate, torch.tensor([3.0]))
    assert m.iteration == 0 and m.lam.item() == 0.0


def test_lagged_dual_cap():
    m = LaggedDualSolver(dual_lr=1.0, update_steps=1, multiplier_max=1.5)
    _run_outer_iterations(m, [[1.0], [1.0], [1.0]])
    assert m.history == [[0.0], [1.0], [1.5], [1.5]]


def test_lagged_dual_warm_start():
    m = LaggedDualSolver(dual_lr=0.5, update_steps=2, multiplier_init=3.0, warm_start=True)
    first = torch.tensor([4.0, -1.0])
    # lambda_0 = dual_lr * max(0, C) of the first estimate, already for the first step's weights
    torch.testing.assert_close(m.multipliers(0, 10, first), torch.tensor([2.0, 0.0]))
    used = _run_outer_iterations(m, [[4.0, -1.0], [2.0, -3.0], [0.0, 0.0]])
    assert used[:2] == [[2.0, 0.0]] * 2
    # the first estimate also counts towards the first iteration's mean [3, -2]: [2, 0] + 0.5 * [3, -2] -> [3.5, 0]
    assert used[2] == [3.5, 0.0]
    assert m.history == [[2.0, 0.0], [3.5, 0.0]]
    cold = LaggedDualSolver(dual_lr=0.5, update_steps=2, multiplier_init=3.0)
    torch.testing.assert_close(cold.multipliers(0, 10, first), torch.tensor([3.0, 3.0]))


def test_lagged_dual_state_dict_round_trip_mid_iteration():
    kwargs = dict(dual_lr=0.25, update_steps=3, multiplier_init=0.5)
    m = LaggedDualSolver(**kwargs)
    _run_outer_iterations(m, [[1.0, -1.0], [2.0, 0.0], [3.0, 1.0], [4.0, -4.0]])  # one dual step, one step into it
    state = json.loads(json.dumps(m.state_dict()))
    restored = LaggedDualSolver(**kwargs)
    _run_outer_iterations(restored, [[9.0, 9.0]] * 7)  # stale state (iteration 2), overwritten by the load
    restored.load_state_dict(state)
    assert restored.iteration == m.iteration == 1
    assert restored.steps_in_iteration == 1
    assert restored.history == m.history == [[0.5, 0.5], [1.0, 0.5]]
    torch.testing.assert_close(restored.lam, m.lam)
    torch.testing.assert_close(restored.estimate, m.estimate)
    rest = [[0.0, 2.0], [-1.0, 2.0], [5.0, 5.0]]  # finishes iteration 1 (mean [1, 0]), then starts iteration 2
    assert _run_outer_iterations(restored, rest) == _run_outer_iterations(m, rest)
    assert restored.history == m.history == [[0.5, 0.5], [1.0, 0.5], [1.25, 0.5]]
    torch.testing.assert_close(restored.estimate, m.estimate)


def test_lagged_dual_state_dict_before_any_update():
    m = LaggedDualSolver()
    restored = LaggedDualSolver()
    restored.update_(torch.tensor([1.0]))
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert restored.lam is None and restored.estimate is None and restored.history == []


def test_lagged_dual_with_one_step_per_iteration_is_mm_with_its_defaults():
    """update_steps = 1: one dual step after every constraint step, on that step's estimate: MM without its EMA,
    warm-up and log parametrization (its defaults). Larger update_steps only lag and average that step."""
    estimates = [[3.0, -1.0], [2.0, 0.5], [-4.0, 1.0], [-1.0, -2.0], [0.5, 0.5]]
    lagged = LaggedDualSolver(dual_lr=0.5, update_steps=1, multiplier_init=0.25, multiplier_max=2.0)
    mm = MinimaxSolver(dual_lr=0.5, multiplier_init=0.25, multiplier_max=2.0)
    assert _run_outer_iterations(lagged, estimates) == _run_outer_iterations(mm, estimates)
