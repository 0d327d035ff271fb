"""The confidence term on the solver's running estimate (l3m.confidence, issue 15): z standard errors of the EMA."""

from __future__ import annotations

import math

import pytest
import torch

from l3m.confidence import (RunningConfidence, StepStatistics, confidence_terms, pooled_statistics, step_statistics,
                            training_estimate)
from l3m.constraints import Constraint, violations
from l3m.errors import L3MConfigError
from l3m.solvers import LogBarrierSolver

MAX_8 = Constraint("length_tokens", max=8, confidence=0.975, name="length")


def _steps(count: int, n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """``count`` steps of ``n`` per-sample terms ``(n, 1)`` with a spread that changes from step to step."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, generator=generator) * (1 + step % 3) - 2 for step in range(count)]


def test_with_smoothing_one_the_term_is_the_steps_own_z_standard_errors():
    bounds = MAX_8.bounds()
    confidence = RunningConfidence(bounds, smoothing=1.0)
    for values in _steps(4):
        estimate, term = confidence.update_(step_statistics(values))
        expected, expected_term = training_estimate(bounds, values)
        torch.testing.assert_close(estimate, expected)
        torch.testing.assert_close(term, expected_term)
        assert term.item() == pytest.approx(MAX_8.z * values.std().item() / 4)


@pytest.mark.parametrize("smoothing", [0.1, 0.5])
def test_the_solvers_ema_holds_the_mean_of_its_steps_plus_z_standard_errors_of_that_ema(smoothing):
    """Fed the estimates RunningConfidence gives, the barrier's EMA is EMA(means) + z sqrt(V), V the EMA's variance
    ``sum_k w_k^2 s.e._k^2`` computed here from its weights (the first step's weight is its seed's)."""
    bounds, solver = MAX_8.bounds(), LogBarrierSolver(ema_smoothing=smoothing)
    confidence = RunningConfidence(bounds, solver.estimate_smoothing)
    means, variances = [], []
    for values in _steps(12):
        step = step_statistics(values)
        means.append(step.mean.item())
        variances.append(step.variance.item())
        estimate, term = confidence.update_(step)
        solver.update_(estimate)
        t = len(means)
        weights = [(1 - smoothing) ** (t - 1)] + [smoothing * (1 - smoothing) ** (t - 1 - k) for k in range(1, t)]
        ema_of_means = sum(w * m for w, m in zip(weights, means))
        standard_error = math.sqrt(sum(w * w * v for w, v in zip(weights, variances)))
        assert term.item() == pytest.approx(MAX_8.z * standard_error, rel=1e-5)
        assert solver.ema.item() == pytest.approx(ema_of_means + MAX_8.z * standard_error, rel=1e-5, abs=1e-5)


def test_the_running_variance_is_the_variance_of_the_ema_over_repeated_runs():
    """20,000 runs of 12 steps of 16 samples with sigma 3: the EMA's spread across runs is what V says, and with a
    steady spread its s.e. is sqrt(a / (2 - a)) of a step's (0.577 at a = 0.5)."""
    smoothing, runs, steps, n, sigma = 0.5, 20_000, 12, 16, 3.0
    samples = torch.randn(steps, n, runs, generator=torch.Generator().manual_seed(0)) * sigma
    ema = samples[0].mean(dim=0)
    for step in range(1, steps):
        ema = (1 - smoothing) * ema + smoothing * samples[step].mean(dim=0)
    confidence = RunningConfidence(MAX_8.bounds(), smoothing)
    for step in range(steps):
        confidence.update_(StepStatistics(torch.zeros(1), torch.tensor([sigma ** 2 / n]), torch.tensor([sigma ** 2])))
    predicted = confidence.variance.sqrt().item()
    assert ema.std().item() == pytest.approx(predicted, rel=0.03)
    assert predicted == pytest.approx(math.sqrt(smoothing / (2 - smoothing)) * sigma / math.sqrt(n), rel=1e-3)


def test_estimate_changes_nothing_and_a_restored_state_continues_the_same_terms():
    bounds = MAX_8.bounds()
    first, steps = RunningConfidence(bounds, 0.5), _steps(6)
    for values in steps[:3]:
        first.update_(step_statistics(values))
    before = first.state_dict()
    first.estimate(step_statistics(steps[3]))
    assert first.state_dict() == before
    restored = RunningConfidence(bounds, 0.5)
    restored.load_state_dict(before)
    for values in steps[3:]:
        a, b = first.update_(step_statistics(values)), restored.update_(step_statistics(values))
        assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_on_a_range_the_running_term_stops_at_the_middle_and_the_ema_holds_the_capped_term():
    c = Constraint("length_tokens", min=13, max=30, confidence=0.975, name="length")
    bounds, solver = c.bounds(), LogBarrierSolver(ema_smoothing=0.5)
    confidence = RunningConfidence(bounds, 0.5)
    spread = {"length": torch.tensor([5.0, 64.0] * 8)}  # s.e. 7.6: z * s.e. far beyond the room of 8.5
    calm = {"length": torch.full((16,), 21.0)}
    means, terms = [], []
    for rewards in (spread, spread, calm):
        step = step_statistics(violations(bounds, rewards, target=True))
        estimate, term = confidence.update_(step)
        solver.update_(estimate)
        means.append(step.mean)
        terms.append(term.tolist())
        ema_of_means = sum(w * m for w, m in zip([0.5 ** (len(means) - 1)] + [0.5 ** (len(means) - k)
                                                                           for k in range(1, len(means))], means))
        torch.testing.assert_close(solver.ema, ema_of_means + term)  # the capped term, not z * s.e.
    spread_se = torch.tensor([5.0, 64.0] * 8).std().item() / 4
    assert terms[:2] == [[8.5, 8.5]] * 2  # both targets at the middle, 21.5
    # the calm step has V = (1/4)(1/4 + 1/4) s.e.^2 behind it: below the cap again
    assert terms[2] == pytest.approx([c.z * spread_se / math.sqrt(8)] * 2, rel=1e-5)
    assert confidence_terms(bounds, torch.zeros(2), torch.zeros(2)).tolist() == [0.0, 0.0]


def test_with_several_responses_per_prompt_the_standard_error_is_that_of_the_prompts_means():
    """4 prompts x 4 responses, each prompt with its own level (sd 3) and responses around it (sd 1): over 20,000
    simulated steps the step mean's variance is what the prompt-mean formula estimates on average, while taking the 16
    responses as independent estimates about a third of it."""
    prompts, group, steps = 4, 4, 20_000
    generator = torch.Generator().manual_seed(0)
    levels = torch.randn(steps, prompts, 1, generator=generator) * 3
    values = (levels + torch.randn(steps, prompts, group, generator=generator)).view(steps, prompts * group, 1)
    grouped = torch.stack([step_statistics(v, group_size=group).variance for v in values])
    independent = torch.stack([step_statistics(v).variance for v in values])
    actual = values.mean(dim=1).var().item()  # (9 + 1/4) / 4 = 2.31
    assert grouped.mean().item() == pytest.approx(actual, rel=0.03)
    assert independent.mean().item() < 0.4 * actual
    one_prompt = values[0, :group]  # one group: no spread of prompt means to take, the responses' own
    torch.testing.assert_close(step_statistics(one_prompt, group_size=group).variance, one_prompt.var(dim=0) / group)
    with pytest.raises(ValueError, match="not groups of 4"):
        step_statistics(values[0, :6], group_size=4)


def test_a_heldout_size_adds_the_heldout_means_own_error_and_is_checked():
    """z * sqrt(V + S / n): with n = 48 held-out prompts and a steady per-response variance S, the term's square
    over z^2 is the running variance plus S / 48; without heldout_size it is the running variance alone."""
    values = _steps(6)
    plain = RunningConfidence(MAX_8.bounds(), 0.5)
    held = Constraint("length_tokens", max=8, confidence=0.975, heldout_size=48, name="length")
    heldout = RunningConfidence(held.bounds(), 0.5)
    for step_values in values:
        (_, plain_term), (_, held_term) = (c.update_(step_statistics(step_values)) for c in (plain, heldout))
    torch.testing.assert_close(plain.spread, heldout.spread)
    assert (held_term.item() / held.z) ** 2 == pytest.approx(
        (plain_term.item() / MAX_8.z) ** 2 + heldout.spread.item() / 48, rel=1e-5)
    with pytest.raises(L3MConfigError, match=r"^constraints\[length\]\.heldout_size: only applies with a confidence"):
        Constraint("length_tokens", max=8, heldout_size=48, name="length")
    with pytest.raises(L3MConfigError, match=r"^constraints\[length\]\.heldout_size: expected a number of prompts"):
        Constraint("length_tokens", max=8, confidence=0.9, heldout_size=0.5, name="length")


def test_pooled_micro_batches_give_the_mean_of_their_means_and_the_variance_of_that_mean():
    first, second = (step_statistics(values, group_size=4) for values in _steps(2))
    pooled = pooled_statistics([first, second])
    torch.testing.assert_close(pooled.mean, (first.mean + second.mean) / 2)
    torch.testing.assert_close(pooled.variance, (first.variance + second.variance) / 4)  # Var((a + b) / 2)
    torch.testing.assert_close(pooled.spread, (first.spread + second.spread) / 2)
