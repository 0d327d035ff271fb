"""The dual of constrained alignment (l3m.alignment.dual) on a toy problem solved exactly, no language model.

The toy: 3 prompts, each with 6 fixed responses; the "policy" of a prompt is a categorical distribution over them.
Each response has a reward r and two utilities g = (g1, g2); the reference policy pi_ref is given. The thresholds b
are built from a chosen multiplier lam_true: b = E_{pi_lam_true}[g] (both constraints active) or b_2 below it (the
second constraint slack, lam_true_2 = 0). Then lam_true satisfies the KKT conditions of the convex dual, so it *is*
lam* -- computed here with the test's own numpy, not with the code under test. A primal solver (scipy SLSQP over
the policies, no duality) confirms the optimum's objective and constraint values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from l3m.alignment import (dual_objective, dual_step, pseudo_preference_pairs, solve_one_shot_dual, tilted_mean,
                           tilted_weights)
from l3m.errors import L3MConfigError

BETA = 1.0
R = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5],
              [1.0, 2.0, 0.0, 1.5, 0.5, -1.0],
              [1.5, 0.0, 2.0, 1.0, -0.5, 0.5]])
G = np.stack([np.array([[-1.0, 0.0, 1.0, -0.5, 1.5, 0.5],  # g1: the high-reward responses score low
                        [0.5, -1.0, 1.0, 0.0, 1.5, -0.5],
                        [0.0, 1.0, -1.0, 1.5, 0.5, -0.5]]),
              np.array([[0.0, -1.0, 0.5, 1.0, -0.5, 1.5],  # g2
                        [-0.5, 0.0, -1.0, 1.0, 1.5, 0.5],
                        [1.0, -0.5, 0.0, -1.0, 1.5, 0.5]])], axis=-1)
REF = np.array([[0.30, 0.25, 0.15, 0.10, 0.10, 0.10],
                [0.20, 0.30, 0.10, 0.20, 0.10, 0.10],
                [0.25, 0.10, 0.30, 0.15, 0.10, 0.10]])
LOG_REF = np.log(REF)


def exact_policy(lam: np.ndarray) -> np.ndarray:
    """pi_lam(y|x) = pi_ref(y|x) exp((r + lam.g)/beta) / Z(x), in numpy (independent of l3m)."""
    logits = LOG_REF + (R + G @ lam) / BETA
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def expected(policy: np.ndarray, values: np.ndarray) -> np.ndarray:
    """E_x E_{y~policy}[values] for (M, N) or (M, N, K) values."""
    return np.einsum("mn,mn...->...", policy, values) / policy.shape[0]


def primal_objective(policy: np.ndarray) -> float:
    """E[r] - beta KL(policy || pi_ref)."""
    return expected(policy, R) - BETA * expected(policy, np.log(policy) - LOG_REF)


# Both constraints active at the optimum; or the second one slack (b_2 is 0.2 below what pi_lam* reaches).
PROBLEMS = {"both_active": (np.array([0.8, 0.5]), np.array([0.0, 0.0])),
            "second_slack": (np.array([0.8, 0.0]), np.array([0.0, 0.2]))}


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request):
    """``(lam_star, b)`` of one toy problem."""
    lam_star, slack = PROBLEMS[request.param]
    return lam_star, expected(exact_policy(lam_star), G) - slack


def test_the_toy_is_a_real_constrained_problem(problem):
    lam_star, b = problem
    reference = expected(REF, G)
    assert reference[0] < b[0] - 0.1, "the reference policy must violate constraint 1"
    if lam_star[1] > 0:
        assert reference[1] < b[1] - 0.1, "and constraint 2"
    best_without_constraints = exact_policy(np.zeros(2))
    assert (expected(best_without_constraints, G) < b - 0.05).any(), "the unconstrained optimum must violate them"


def test_the_primal_optimum_is_the_tilted_policy_at_lam_star(problem):
    """SLSQP on the primal (no duality): its optimum is pi_lam*, the active constraints hold with equality, and its
    value equals the dual's minimum D(lam*) (strong duality)."""
    lam_star, b = problem
    m, n = REF.shape

    def policy(theta):
        z = theta.reshape(m, n)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    result = minimize(lambda t: -primal_objective(policy(t)), LOG_REF.ravel(), method="SLSQP",
                      constraints=[{"type": "ineq", "fun": lambda t: expected(policy(t), G) - b}],
                      options={"ftol": 1e-14, "maxiter": 1000})
    assert result.success, result.message
    optimum = policy(result.x)
    np.testing.assert_allclose(optimum, exact_policy(lam_star), atol=1e-4)
    np.testing.assert_allclose(expected(optimum, G)[lam_star > 0], b[lam_star > 0], atol=1e-6)
    value, _ = dual_objective(lam_star, R, G, b, BETA, log_weights=LOG_REF)
    assert primal_objective(optimum) == pytest.approx(value, abs=1e-7)
    assert primal_objective(exact_policy(lam_star)) == pytest.approx(value, abs=1e-9)


def test_tilted_weights_with_enumerated_responses_are_the_tilted_policy():
    lam = np.array([0.3, 1.1])
    np.testing.assert_allclose(tilted_weights(lam, R, G, BETA, log_weights=LOG_REF).numpy(), exact_policy(lam),
                               rtol=1e-12)
    np.testing.assert_allclose(tilted_mean(exact_policy(lam), G).numpy(), expected(exact_policy(lam), G), rtol=1e-12)


@pytest.mark.parametrize("lam", [[0.0, 0.0], [0.3, 1.1], [2.0, 0.1]])
def test_the_dual_gradient_is_the_derivative_of_the_dual(lam):
    b = expected(exact_policy(np.array([0.8, 0.5])), G)
    lam = np.array(lam)
    _, grad = dual_objective(lam, R, G, b, BETA, log_weights=LOG_REF)
    h = 1e-6
    numeric = [(dual_objective(lam + h * e, R, G, b, BETA, LOG_REF)[0]
                - dual_objective(lam - h * e, R, G, b, BETA, LOG_REF)[0]) / (2 * h) for e in np.eye(2)]
    np.testing.assert_allclose(grad.numpy(), numeric, atol=1e-7)
    np.testing.assert_allclose(grad.numpy(), expected(exact_policy(lam), G) - b, atol=1e-12)


def test_the_one_shot_dual_on_enumerated_responses_finds_lam_star(problem):
    lam_star, b = problem
    solution = solve_one_shot_dual(R, G, b, BETA, log_weights=LOG_REF)
    assert solution.converged and solution.kkt_residual < 1e-8, solution
    np.testing.assert_allclose(solution.lam.numpy(), lam_star, atol=1e-6)
    assert not any(solution.at_cap)


def sample_responses(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` responses per prompt drawn from pi_ref: their (M, num) rewards and (M, num, K) utilities."""
    idx = torch.multinomial(torch.tensor(REF), num, replacement=True,
                            generator=torch.Generator().manual_seed(seed)).numpy()
    return np.take_along_axis(R, idx, axis=1), np.take_along_axis(G, idx[..., None], axis=1)


def test_the_one_shot_dual_on_reference_samples_comes_close_to_lam_star(problem):
    """Uniformly weighted samples of pi_ref: the error is Monte-Carlo error, about 0.01 with 20000 per prompt."""
    lam_star, b = problem
    r, g = sample_responses(20000, seed=0)
    solution = solve_one_shot_dual(r, g, b, BETA)
    assert solution.converged, solution
    np.testing.assert_allclose(solution.lam.numpy(), lam_star, atol=0.04)


@pytest.mark.parametrize("start", ["zero", "sampled_warm_start"])
def test_iterating_exact_policy_steps_and_dual_steps_reaches_lam_star(problem, start):
    """CAID with an exact policy step (pi <- pi_lam) and exact expectations: lam_{t+1} = max(0, lam_t - eta
    (E_{pi_lam_t}[g] - b)) converges to lam*, and the last policy meets the active constraints with equality."""
    lam_star, b = problem
    lam = torch.zeros(2) if start == "zero" else solve_one_shot_dual(*sample_responses(200, seed=1), b, BETA).lam
    for _ in range(40):
        policy = tilted_weights(lam, R, G, BETA, log_weights=LOG_REF)  # the exact policy step
        lam = dual_step(lam, tilted_mean(policy, G), b, lr=1.0)
    np.testing.assert_allclose(lam.numpy(), lam_star, atol=1e-3)
    final = exact_policy(lam.numpy())
    assert (expected(final, G) >= b - 1e-3).all()
    np.testing.assert_allclose(expected(final, G)[lam_star > 0], b[lam_star > 0], atol=1e-3)
    assert primal_objective(final) == pytest.approx(primal_objective(exact_policy(lam_star)), abs=1e-3)


def test_the_dual_step_raises_the_multiplier_of_a_violated_constraint_only():
    lam = dual_step(torch.tensor([1.0, 1.0, 0.1]), g_mean=[0.0, 2.0, 2.0], b=[1.0, 1.0, 1.0], lr=0.5)
    assert lam.tolist() == [1.5, 0.5, 0.0]
    assert dual_step([1.0], [0.0], [1.0], lr=10.0, lam_max=5.0).tolist() == [5.0]


def test_a_constraint_no_response_meets_runs_to_the_cap():
    b = np.array([5.0, 0.0])  # g1 <= 1.5 everywhere
    solution = solve_one_shot_dual(R, G, b, BETA, log_weights=LOG_REF, lam_max=50.0)
    assert solution.at_cap == [True, False]
    assert solution.gradient[0] < 0


def test_beta_must_be_positive():
    with pytest.raises(L3MConfigError, match="beta: must be"):
        dual_objective([0.0, 0.0], R, G, [0.0, 0.0], beta=0.0)
    with pytest.raises(L3MConfigError, match="beta: must be"):
        pseudo_preference_pairs(torch.zeros(1, 2), beta=-1.0)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_pseudo_preferences_follow_bradley_terry(beta):
    """Many prompts with two responses each, four score gaps: the rate at which the first response is chosen is
    sigma((s1 - s2) / beta) within 4 binomial standard errors."""
    gaps = torch.tensor([-1.0, 0.3, 1.0, 2.0])
    per_gap = 20000
    scores = torch.stack([gaps.repeat_interleave(per_gap), torch.zeros(4 * per_gap)], dim=1) + 3.0
    chosen, rejected = pseudo_preference_pairs(scores, beta, torch.Generator().manual_seed(0))
    assert chosen.shape == rejected.shape == (4 * per_gap, 1)
    assert ((chosen + rejected) == 1).all()
    rate = (chosen[:, 0] == 0).double().reshape(4, per_gap).mean(dim=1)
    p = torch.sigmoid(gaps.double() / beta)
    tolerance = 4 * torch.sqrt(p * (1 - p) / per_gap)
    assert ((rate - p).abs() < tolerance).all(), (rate.tolist(), p.tolist())


def test_pseudo_preference_pairs_are_disjoint_and_deterministic_pairs_pick_the_higher_score():
    scores = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0, 9.0]] * 50)  # 7 responses: 3 pairs, one left out
    chosen, rejected = pseudo_preference_pairs(scores, 1.0, torch.Generator().manual_seed(1), deterministic=True)
    assert chosen.shape == (50, 3)
    used = torch.cat([chosen, rejected], dim=1)
    assert all(len(set(row)) == 6 for row in used.tolist())
    assert (scores.gather(1, chosen) > scores.gather(1, rejected)).all()
    with pytest.raises(L3MConfigError, match="at least 2 responses"):
        pseudo_preference_pairs(torch.zeros(3, 1), 1.0)


def test_the_training_slack_moves_each_bound_in_by_its_margin_and_z_standard_errors():
    """A satisfaction target on a CAID constraint: slack against ``b + margin + z * s.e.`` (s.e. over prompt
    means), the same responses' slack against ``b`` untouched; a constant shift, so the tilt is unchanged."""
    from statistics import NormalDist

    from l3m.alignment.samples import Samples
    from l3m.constraints import Constraint, violations

    rewards = torch.tensor([[0.1, 0.5, 0.3], [0.0, 0.2, 0.1], [0.9, 0.4, 0.8], [0.3, 0.3, 0.6]], dtype=torch.float64)
    plain = Constraint(reward="civility", min=0.5, name="safe")
    target = Constraint(reward="civility", min=0.5, name="safe", margin=0.05, confidence=0.9)

    def samples(constraint):
        slack = -violations(constraint.bounds(), {"safe": rewards.reshape(-1)}).double().reshape(4, 3, 1)
        return Samples([["y"] * 3] * 4, rewards * 0, {"safe": rewards}, slack, rewards * 0, rewards < 0)

    same, terms = samples(plain).training_slack(plain.bounds())
    assert torch.equal(same, samples(plain).slack) and terms.tolist() == [0.0]
    moved, terms = samples(target).training_slack(target.bounds())
    z_se = NormalDist().inv_cdf(0.9) * rewards.mean(dim=1).std().item() / 2  # 4 prompts
    assert terms.tolist() == pytest.approx([z_se])
    assert moved.squeeze(-1) == pytest.approx(rewards - 0.5 - 0.05 - z_se)
    assert samples(target).slack.squeeze(-1) == pytest.approx(rewards - 0.5)  # records judge b itself
    lam = torch.tensor([0.7])
    assert torch.allclose(tilted_weights(lam, rewards, moved, 0.1), tilted_weights(lam, rewards, same, 0.1))
