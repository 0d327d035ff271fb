"""LogBarrierMultipliers: the EMA of the constraint values (Sec. 5.4) and the multipliers derived from it."""

from __future__ import annotations

import json

import pytest
import torch

from l3m.barrier import implied_multipliers, mu_at_step
from l3m.multipliers import LogBarrierMultipliers


def test_ema_is_seeded_with_the_first_estimate():
    m = LogBarrierMultipliers(ema_smoothing=0.1)
    assert m.ema is None
    first = torch.tensor([2.0, -1.0])
    m.update_(first)
    torch.testing.assert_close(m.ema, torch.tensor([2.0, -1.0]))
    # a copy: changing the caller's tensor afterwards does not change the EMA
    first.add_(100.0)
    torch.testing.assert_close(m.ema, torch.tensor([2.0, -1.0]))


def test_ema_update_rule():
    m = LogBarrierMultipliers(ema_smoothing=0.1)
    m.update_(torch.tensor([2.0, -1.0]))
    m.update_(torch.tensor([-8.0, 4.0]))
    # 0.9*[2, -1] + 0.1*[-8, 4] = [1.8 - 0.8, -0.9 + 0.4] = [1.0, -0.5]
    torch.testing.assert_close(m.ema, torch.tensor([1.0, -0.5]))
    m.update_(torch.tensor([11.0, 0.5]))
    # 0.9*[1, -0.5] + 0.1*[11, 0.5] = [0.9 + 1.1, -0.45 + 0.05] = [2.0, -0.4]
    torch.testing.assert_close(m.ema, torch.tensor([2.0, -0.4]))


def test_ema_uses_the_configured_smoothing():
    m = LogBarrierMultipliers(ema_smoothing=0.5)
    m.update_(torch.tensor([4.0]))
    m.update_(torch.tensor([0.0]))
    # 0.5*4 + 0.5*0 = 2
    torch.testing.assert_close(m.ema, torch.tensor([2.0]))


def test_ema_is_detached_float_on_cpu():
    m = LogBarrierMultipliers()
    est = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    m.update_(est * 1)
    assert m.ema.dtype == torch.float32
    assert not m.ema.requires_grad
    assert m.ema.device.type == "cpu"


def test_first_multipliers_come_from_the_given_estimate():
    m = LogBarrierMultipliers(mu_init=1.0, mu_final=1e-6)
    estimate = torch.tensor([1.0, -0.5])
    lam = m.multipliers(step=5, total_steps=11, estimate=estimate)
    # mu_5 = (1e-6)^(5/10) = 1e-3, k = 2: C = 1 is violated -> 1/(2*1e-3) = 500; C = -0.5 -> 1e-3/(2*0.5) = 1e-3
    torch.testing.assert_close(lam, torch.tensor([500.0, 1e-3]), rtol=1e-5, atol=0)
    # asking for the multipliers does not fold the estimate into the EMA
    assert m.ema is None


def test_multipliers_come_from_the_ema_before_the_update():
    m = LogBarrierMultipliers(mu_init=1.0, mu_final=1e-6, ema_smoothing=0.1)
    m.update_(torch.tensor([2.0, -1.0]))
    m.update_(torch.tensor([-8.0, 4.0]))  # ema = [1.0, -0.5]
    this_step = torch.tensor([-50.0, 50.0])  # very different, must not be used
    lam = m.multipliers(step=5, total_steps=11, estimate=this_step)
    torch.testing.assert_close(lam, torch.tensor([500.0, 1e-3]), rtol=1e-5, atol=0)
    torch.testing.assert_close(lam, implied_multipliers(torch.tensor([1.0, -0.5]), 1e-3))
    assert not torch.allclose(lam, implied_multipliers(this_step, 1e-3))


def test_training_loop_order():
    """In a loop 'multipliers, then update_', step t's multipliers use the EMA of the estimates of steps < t."""
    total = 6
    estimates = [torch.tensor([0.5, -2.0]), torch.tensor([-1.0, -1.0]), torch.tensor([0.2, 0.3]),
                 torch.tensor([-0.1, 1.0]), torch.tensor([3.0, -0.2]), torch.tensor([0.0, 0.0])]
    m = LogBarrierMultipliers(mu_init=1.0, mu_final=1e-3, ema_smoothing=0.1)
    ema = None
    for t, est in enumerate(estimates):
        expected_c = est if ema is None else ema
        mu = mu_at_step(t, total, 1.0, 1e-3)
        lam = m.multipliers(t, total, est)
        torch.testing.assert_close(lam, implied_multipliers(expected_c, mu))
        m.update_(est)
        ema = est.clone() if ema is None else 0.9 * ema + 0.1 * est
        torch.testing.assert_close(m.ema, ema)


def test_mu_follows_the_schedule():
    m = LogBarrierMultipliers(mu_init=2.0, mu_final=0.02)
    assert m.mu(0, 3) == pytest.approx(2.0)
    assert m.mu(1, 3) == pytest.approx(0.2)  # 2 * (0.01)^(1/2)
    assert m.mu(2, 3) == pytest.approx(0.02)


def test_state_dict_round_trip():
    m = LogBarrierMultipliers(mu_init=1.0, mu_final=1e-4, ema_smoothing=0.1)
    m.update_(torch.tensor([0.25, -3.0, 1.5]))
    m.update_(torch.tensor([-0.75, 1.0, 0.5]))
    state = m.state_dict()
    restored = LogBarrierMultipliers(mu_init=1.0, mu_final=1e-4, ema_smoothing=0.1)
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
    m = LogBarrierMultipliers()
    state = m.state_dict()
    assert state == {"ema": None}
    restored = LogBarrierMultipliers()
    restored.update_(torch.tensor([1.0]))  # a stale EMA is overwritten by the loaded (empty) state
    restored.load_state_dict(state)
    assert restored.ema is None
    estimate = torch.tensor([-0.3])
    torch.testing.assert_close(restored.multipliers(0, 5, estimate), implied_multipliers(estimate, 1.0))
