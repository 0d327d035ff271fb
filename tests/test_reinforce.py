"""The REINFORCE estimate of the constraint gradients (Eq. 11-12, App. B): advantages, surrogate loss, and what each
baseline estimates (exactly, by enumeration, for one-token and for variable-length responses)."""

from __future__ import annotations

import itertools

import pytest
import torch

from l3m.training.reinforce import constraint_advantages, reinforce_loss

F64 = torch.float64

# N = 3 responses, K = 2 constraints
VIOLATIONS = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]], dtype=F64)
MULTIPLIERS = torch.tensor([0.5, 2.0], dtype=F64)


def test_advantages_without_baseline():
    # a_j = sum_i lambda_i c_ij: [0.5*1 + 2*2, 0.5*3 + 2*(-1), 0.5*0 + 2*4] = [4.5, -0.5, 8.0]
    got = constraint_advantages(VIOLATIONS, MULTIPLIERS, "none")
    torch.testing.assert_close(got, torch.tensor([4.5, -0.5, 8.0], dtype=F64))
    # the default is the paper's plain estimator
    torch.testing.assert_close(constraint_advantages(VIOLATIONS, MULTIPLIERS), got)


def test_advantages_leave_one_out():
    # column 0: c = [1, 3, 0], sum 4, baseline_j = (4 - c_j)/2 = [1.5, 0.5, 2.0] -> c - b = [-0.5, 2.5, -2.0]
    # column 1: c = [2, -1, 4], sum 5, baseline_j = (5 - c_j)/2 = [1.5, 3.0, 0.5] -> c - b = [0.5, -4.0, 3.5]
    # a = 0.5*col0 + 2*col1 = [-0.25 + 1.0, 1.25 - 8.0, -1.0 + 7.0] = [0.75, -6.75, 6.0]
    got = constraint_advantages(VIOLATIONS, MULTIPLIERS, "leave_one_out")
    torch.testing.assert_close(got, torch.tensor([0.75, -6.75, 6.0], dtype=F64))


def test_leave_one_out_ignores_a_common_offset():
    shifted = VIOLATIONS + torch.tensor([100.0, -7.0], dtype=F64)
    torch.testing.assert_close(
        constraint_advantages(shifted, MULTIPLIERS, "leave_one_out"),
        constraint_advantages(VIOLATIONS, MULTIPLIERS, "leave_one_out"),
    )
    assert not torch.allclose(
        constraint_advantages(shifted, MULTIPLIERS, "none"), constraint_advantages(VIOLATIONS, MULTIPLIERS, "none")
    )


def test_leave_one_out_with_a_single_sample_uses_no_baseline():
    one = torch.tensor([[2.0, -1.0]], dtype=F64)
    # no other sample to average: a = 0.5*2 + 2*(-1) = -1
    torch.testing.assert_close(constraint_advantages(one, MULTIPLIERS, "leave_one_out"), torch.tensor([-1.0], dtype=F64))


def test_unknown_baseline_is_rejected():
    with pytest.raises(ValueError, match="baseline"):
        constraint_advantages(VIOLATIONS, MULTIPLIERS, "mean")


def test_multipliers_are_cast_to_the_violations_dtype():
    got = constraint_advantages(VIOLATIONS, MULTIPLIERS.float(), "none")
    assert got.dtype == F64
    torch.testing.assert_close(got, torch.tensor([4.5, -0.5, 8.0], dtype=F64))


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_reinforce_loss_gradient_is_advantages_over_n(baseline):
    advantages = constraint_advantages(VIOLATIONS, MULTIPLIERS, baseline).clone().requires_grad_(True)
    logps = torch.tensor([-1.2, -0.3, -2.5], dtype=F64, requires_grad=True)
    loss = reinforce_loss(advantages, logps)
    loss.backward()
    torch.testing.assert_close(logps.grad, advantages.detach() / 3)
    # the advantages are constants of the surrogate
    assert advantages.grad is None
    # value: mean of a_j * logp_j
    assert loss.item() == pytest.approx((advantages.detach() * logps.detach()).sum().item() / 3)


# ----------------------------------------------------------------------------------------------------------------
# Unbiasedness on a tiny categorical policy: pi = softmax(theta) over 3 actions, violation c(a) per action.
# The exact gradient of sum_a pi(a) * sum_i lambda_i c_i(a) is compared with the exact expectation of the estimator
# over all N-tuples of i.i.d. samples (enumerated, weighted by their probabilities).
# ----------------------------------------------------------------------------------------------------------------

THETA = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
ACTION_VIOLATIONS = torch.tensor([[3.0, -1.0], [1.0, 2.0], [-2.0, 0.5]], dtype=F64)  # (3 actions, K = 2)
LAMBDA = torch.tensor([0.7, 1.3], dtype=F64)


def exact_gradient(action_violations: torch.Tensor = ACTION_VIOLATIONS) -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    objective = (torch.softmax(theta, 0) * (action_violations @ LAMBDA)).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def estimator(actions: tuple[int, ...], advantages_fn, action_violations: torch.Tensor) -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    logps = torch.log_softmax(theta, 0)[list(actions)]
    advantages = advantages_fn(action_violations[list(actions)])
    (grad,) = torch.autograd.grad(reinforce_loss(advantages, logps), theta)
    return grad


def moments(n: int, advantages_fn, action_violations: torch.Tensor = ACTION_VIOLATIONS):
    """Exact mean and total variance (trace of the covariance) of the estimator with n samples."""
    probs = torch.softmax(THETA, 0)
    mean = torch.zeros(3, dtype=F64)
    second = torch.zeros((), dtype=F64)
    for actions in itertools.product(range(3), repeat=n):
        weight = torch.prod(probs[list(actions)])
        g = estimator(actions, advantages_fn, action_violations)
        mean += weight * g
        second += weight * (g @ g)
    return mean, second - mean @ mean


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_estimator_is_unbiased_for_one_token_responses(n, baseline):
    expected = exact_gradient()
    assert expected.abs().max() > 0.1  # a non-trivial target
    mean, _ = moments(n, lambda v: constraint_advantages(v, LAMBDA, baseline))
    torch.testing.assert_close(mean, expected, rtol=1e-10, atol=1e-12)


def test_a_baseline_that_depends_on_the_sample_would_be_biased():
    """Control for the test above: subtracting the mean *including* sample j shrinks the gradient by (N-1)/N."""
    n = 2
    mean, _ = moments(n, lambda v: (v - v.mean(0, keepdim=True)) @ LAMBDA)
    expected = exact_gradient()
    assert not torch.allclose(mean, expected, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(mean, expected * (n - 1) / n, rtol=1e-10, atol=1e-12)


def test_leave_one_out_lowers_the_variance_under_a_large_offset():
    shifted = ACTION_VIOLATIONS + 20.0  # all constraints strongly violated: a large common offset
    mean_none, var_none = moments(3, lambda v: constraint_advantages(v, LAMBDA, "none"), shifted)
    mean_loo, var_loo = moments(3, lambda v: constraint_advantages(v, LAMBDA, "leave_one_out"), shifted)
    # the offset does not change the gradient, and both stay unbiased ...
    torch.testing.assert_close(exact_gradient(shifted), exact_gradient(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean_none, exact_gradient(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean_loo, exact_gradient(), rtol=1e-10, atol=1e-10)
    # ... but only the leave-one-out baseline removes it from the variance
    assert var_loo < 0.1 * var_none


def test_leave_one_out_baseline_is_per_prompt_group():
    # two prompts, two responses each: a prompt-level offset (10 vs 100) must not reach the advantages
    violations = torch.tensor([[10.0], [12.0], [100.0], [106.0]])
    advantages = constraint_advantages(violations, torch.tensor([1.0]), "leave_one_out", group_size=2)
    # group 1: 10 - 12 = -2, 12 - 10 = 2; group 2: 100 - 106 = -6, 106 - 100 = 6
    assert advantages.tolist() == [-2.0, 2.0, -6.0, 6.0]
    # across the batch instead, the offset leaks in: 10 - (12 + 100 + 106) / 3 = -62.67
    batch = constraint_advantages(violations, torch.tensor([1.0]), "leave_one_out", group_size=1)
    assert batch[0].item() == pytest.approx(10 - 218 / 3)


# ----------------------------------------------------------------------------------------------------------------
# Responses of different lengths (Eq. 12's length normalization): a tiny autoregressive policy over {a, b, EOS}
# with position-wise logits, responses of 1 to 3 tokens (EOS counted, as the trainer's completion mask does; a
# response without EOS is cut at 3). Every response and every pair of responses is enumerated exactly.
# ----------------------------------------------------------------------------------------------------------------

EOS, MAX_TOKENS = 2, 3
POSITION_LOGITS = torch.tensor([[0.2, -0.4, 0.1], [0.5, 0.3, -0.2], [-0.1, 0.4, 0.6]], dtype=F64)


def _responses() -> list[tuple[int, ...]]:
    ended = [(*body, EOS) for n in range(MAX_TOKENS) for body in itertools.product((0, 1), repeat=n)]
    return ended + list(itertools.product((0, 1), repeat=MAX_TOKENS))


def _logp(response: tuple[int, ...], theta: torch.Tensor) -> torch.Tensor:
    return sum(torch.log_softmax(theta[t], 0)[token] for t, token in enumerate(response))


def _violation(response: tuple[int, ...]) -> float:
    return 4.0 - len(response) + (1.5 if response[0] == 0 else 0.0)  # shorter (and 'a'-first) responses violate


def _expected_estimate(n: int, baseline: str) -> torch.Tensor:
    """Exact expectation over n i.i.d. responses of the gradient of reinforce_loss with length-normalized logps."""
    theta = POSITION_LOGITS.clone().requires_grad_(True)
    responses = _responses()
    probs = torch.stack([_logp(r, POSITION_LOGITS).exp() for r in responses])
    assert probs.sum().item() == pytest.approx(1.0)
    mean = torch.zeros_like(POSITION_LOGITS)
    for tuple_ in itertools.product(range(len(responses)), repeat=n):
        drawn = [responses[i] for i in tuple_]
        lengths = torch.tensor([float(len(r)) for r in drawn], dtype=F64)
        logps = torch.stack([_logp(r, theta) for r in drawn]) / lengths
        advantages = constraint_advantages(torch.tensor([[_violation(r)] for r in drawn], dtype=F64),
                                           torch.ones(1, dtype=F64), baseline, group_size=n, lengths=lengths)
        (grad,) = torch.autograd.grad(reinforce_loss(advantages, logps), theta)
        mean += torch.prod(probs[list(tuple_)]) * grad
    return mean


def _exact(f) -> torch.Tensor:
    """``sum_y pi(y) f(y) grad log pi(y) / |y|`` and friends, by enumeration: the gradient of
    ``sum_y stopgrad(pi(y)) f(y) log pi(y) / |y|``."""
    theta = POSITION_LOGITS.clone().requires_grad_(True)
    total = sum(_logp(r, POSITION_LOGITS).exp() * f(r) * _logp(r, theta) / len(r) for r in _responses())
    (grad,) = torch.autograd.grad(total, theta)
    return grad


def test_with_responses_of_different_lengths_leave_one_out_changes_the_expected_direction():
    """The paper's estimator has expectation E[c g], g = grad log pi / |y|. E[g] = grad E[1/|y|] is not zero, so
    the leave-one-out baseline (independent of the sample) shifts the expectation by -E[c] grad E[1/|y|]; the
    per-token leave-one-out baseline keeps the paper's expectation."""
    paper = _exact(_violation)  # E[c g]
    mean_c = sum(_logp(r, POSITION_LOGITS).exp() * _violation(r) for r in _responses())
    inverse_length_gradient = _exact(lambda r: 1.0)  # E[g] = grad E[1/|y|]
    assert inverse_length_gradient.abs().max() > 0.05 and mean_c > 1.0
    torch.testing.assert_close(_expected_estimate(2, "none"), paper, rtol=1e-9, atol=1e-12)
    loo = _expected_estimate(2, "leave_one_out")
    torch.testing.assert_close(loo, paper - mean_c * inverse_length_gradient, rtol=1e-9, atol=1e-12)
    assert (loo - paper).abs().max() > 0.05  # not a rounding difference
    torch.testing.assert_close(_expected_estimate(2, "leave_one_out_per_token"), paper, rtol=1e-9, atol=1e-12)


def test_the_per_token_baseline_needs_lengths():
    with pytest.raises(ValueError, match="lengths"):
        constraint_advantages(torch.ones(2, 1), torch.ones(1), "leave_one_out_per_token")
