r"""The dual of KL-regularized constrained alignment (CAID, Zhang et al. 2025, arXiv 2505.19387), as pure functions.

The problem, over policies :math:`\pi` (issue 14):

.. math::
    \max_\pi\ \mathbb{E}_x \mathbb{E}_{y\sim\pi}[r(x,y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\mathrm{ref})
    \quad\text{s.t.}\quad \mathbb{E}_x \mathbb{E}_{y\sim\pi}[g_i(x,y)] \ge b_i,\ i = 1..K.      \tag{P}

- (E1) For :math:`\lambda \ge 0` the Lagrangian's maximizer is the tilted reference policy
  :math:`\pi_\lambda(y|x) \propto \pi_\mathrm{ref}(y|x)\exp((r + \lambda^\top g)/\beta)`.
- (E2) The dual function :math:`D(\lambda) = \beta\,\mathbb{E}_x \log \mathbb{E}_{y\sim\pi_\mathrm{ref}}
  [\exp((r + \lambda^\top g)/\beta)] - \lambda^\top b` is convex,
- (E3) with gradient :math:`\nabla D(\lambda) = \mathbb{E}_x \mathbb{E}_{y\sim\pi_\lambda}[g] - b`.
- (E4) The one-shot dual ("CAN"): :math:`\lambda^* = \arg\min_{\lambda \ge 0} D(\lambda)`; :math:`\pi_{\lambda^*}`
  solves (P) in distribution space, and then a constraint with :math:`\lambda^*_i > 0` is active,
  :math:`\mathbb{E}_{\pi_{\lambda^*}}[g_i] = b_i`.
- (E5) The iterative dual step (CAID): :math:`\lambda \leftarrow \max(0, \lambda - \eta(\hat{\mathbb{E}}_\pi[g] - b))`,
  projected gradient descent on :math:`D` with the expectation measured on the current policy's samples.
- (E6) Pseudo-preferences: of two responses, :math:`y_1` is preferred with probability
  :math:`\sigma((s_1 - s_2)/\beta)`, :math:`s = r + \lambda^\top g` (Bradley-Terry); DPO with the same
  :math:`\beta` and reference :math:`\pi_\mathrm{ref}` has :math:`\pi_\lambda` as its population optimum.

Sample estimates: each prompt's responses :math:`y_1..y_N` stand for :math:`\pi_\mathrm{ref}` with weights
:math:`w_j` (``log_weights``: uniform :math:`1/N` for samples drawn from :math:`\pi_\mathrm{ref}`, the default;
:math:`\pi_\mathrm{ref}(y_j|x)` for an enumerated response set, which makes every expectation exact). The inner
expectation of (E2) becomes :math:`\sum_j w_j \exp(\cdot)`, and :math:`\mathbb{E}_{\pi_\lambda}` the self-normalized
mean with weights :math:`\mathrm{softmax}_j((r_j + \lambda^\top g_j)/\beta + \log w_j)` (:func:`tilted_weights`).

Shapes: M prompts, N responses per prompt, K constraints; ``r (M, N)``, ``g (M, N, K)``, ``b (K,)``,
``lam (K,)``, ``log_weights (M, N)``. All math is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from l3m.errors import L3MConfigError


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _check_beta(beta: float) -> None:
    if not beta > 0 or not math.isfinite(beta):
        raise L3MConfigError(f"beta: must be a finite number > 0 (the KL weight), got {beta!r}")


def tilted_logits(lam, r, g, beta: float, log_weights=None) -> torch.Tensor:
    r"""``(M, N)`` unnormalized log-probabilities of :math:`\pi_\lambda` on each prompt's responses (E1):
    :math:`(r + \lambda^\top g)/\beta + \log w` (``log_weights`` default: :math:`-\log N`, samples of
    :math:`\pi_\mathrm{ref}`)."""
    _check_beta(beta)
    r, g, lam = _f64(r), _f64(g), _f64(lam)
    if r.dim() != 2 or g.shape != (*r.shape, lam.numel()):
        raise ValueError(f"expected r (M, N), g (M, N, K) and lam (K,); got {tuple(r.shape)}, {tuple(g.shape)}, "
                         f"{tuple(lam.shape)}")
    logits = (r + g @ lam) / beta
    return logits + (_f64(log_weights) if log_weights is not None else -math.log(r.shape[1]))


def tilted_weights(lam, r, g, beta: float, log_weights=None) -> torch.Tensor:
    r"""``(M, N)`` self-normalized weights of :math:`\pi_\lambda` on each prompt's responses (E1): the softmax over
    responses of :func:`tilted_logits`. With enumerated responses and ``log_weights = log pi_ref`` this *is*
    :math:`\pi_\lambda`."""
    return torch.softmax(tilted_logits(lam, r, g, beta, log_weights), dim=1)


def dual_objective(lam, r, g, b, beta: float, log_weights=None) -> tuple[float, torch.Tensor]:
    r"""The dual function and its gradient at ``lam``, estimated on the responses (E2, E3).

    Returns ``(D, grad)``: :math:`D(\lambda) = \beta\,\mathrm{mean}_x \log\sum_j w_j \exp((r_j + \lambda^\top g_j)
    /\beta) - \lambda^\top b` and :math:`\nabla D = \mathrm{mean}_x \sum_j \pi_\lambda(y_j|x)\,g_j - b`, shape
    ``(K,)``.
    """
    lam, b = _f64(lam), _f64(b)
    logits = tilted_logits(lam, r, g, beta, log_weights)
    value = beta * torch.logsumexp(logits, dim=1).mean() - lam @ b
    grad = tilted_mean(torch.softmax(logits, dim=1), _f64(g)) - b
    return value.item(), grad


def tilted_mean(weights: torch.Tensor, values) -> torch.Tensor:
    r""":math:`\mathrm{mean}_x \sum_j w_{xj}\,v_{xj}`: the mean of ``(M, N)`` or ``(M, N, K)`` ``values`` under
    ``(M, N)`` per-prompt ``weights`` (e.g. :func:`tilted_weights`), averaged over prompts."""
    values = _f64(values)
    weights = _f64(weights)
    return (weights.reshape(*weights.shape, *[1] * (values.dim() - 2)) * values).sum(dim=1).mean(dim=0)


@dataclass
class DualSolution:
    r"""The one-shot dual's result (:func:`solve_one_shot_dual`).

    ``lam`` (K,) the minimizer over :math:`0 \le \lambda \le` ``lam_max``; ``value`` :math:`D(\lambda)`;
    ``gradient`` (K,) :math:`\mathbb{E}_{\pi_\lambda}[g] - b` predicted by the reweighted responses (:math:`\approx 0`
    for an active constraint, :math:`\ge 0` for one with :math:`\lambda_i = 0`); ``kkt_residual``
    :math:`\|\lambda - \max(0, \min(\lambda_\max, \lambda - \nabla D))\|_\infty`, 0 exactly at the constrained
    minimizer; ``converged`` whether it is at most ``tol``; ``at_cap`` (K,) booleans, :math:`\lambda_i` =
    ``lam_max``: the responses cannot meet constraint *i* (the dual decreases without bound in that direction);
    ``iterations`` and ``message`` from L-BFGS-B.
    """

    lam: torch.Tensor
    value: float
    gradient: torch.Tensor
    kkt_residual: float
    converged: bool
    at_cap: list[bool]
    iterations: int
    message: str


def solve_one_shot_dual(r, g, b, beta: float, log_weights=None, lam_init=None, lam_max: float | None = None,
                        tol: float = 1e-9, max_iter: int = 1000) -> DualSolution:
    r"""Minimize the estimated dual :math:`D` over :math:`0 \le \lambda \le` ``lam_max`` with L-BFGS-B (E4).

    :math:`D` is convex and smooth, so L-BFGS-B with the bounds :math:`\lambda \ge 0` (scipy) converges to the
    minimizer; ``tol`` bounds the projected gradient (:attr:`DualSolution.kkt_residual`, in units of :math:`g`).
    When the responses cannot meet a constraint, :math:`D` is unbounded below and :math:`\lambda` runs to
    ``lam_max`` (:attr:`DualSolution.at_cap`); with ``lam_max=None`` it then runs off, so give a cap.
    """
    r, g, b = _f64(r), _f64(g), _f64(b)
    k = b.numel()
    x0 = np.zeros(k) if lam_init is None else np.clip(_f64(lam_init).numpy(), 0.0, lam_max)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = dual_objective(torch.from_numpy(x), r, g, b, beta, log_weights)
        return value, grad.numpy()

    result = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, lam_max)] * k,
                      options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-15, "maxcor": 20})
    lam = torch.from_numpy(np.asarray(result.x, dtype=np.float64))
    value, grad = dual_objective(lam, r, g, b, beta, log_weights)
    projected = (lam - grad).clamp(min=0.0)
    if lam_max is not None:
        projected = projected.clamp(max=lam_max)
    residual = (lam - projected).abs().max().item() if k else 0.0
    at_cap = [lam_max is not None and x >= lam_max for x in lam.tolist()]
    return DualSolution(lam, value, grad, residual, residual <= tol, at_cap, int(result.nit), str(result.message))


def dual_step(lam, g_mean, b, lr: float, lam_max: float | None = None) -> torch.Tensor:
    r"""One projected dual-descent step (E5): :math:`\lambda \leftarrow \min(\max(0, \lambda - \eta
    (\hat{\mathbb{E}}[g] - b)), \lambda_\max)` with ``lr`` :math:`= \eta`. A violated constraint
    (:math:`\hat{\mathbb{E}}[g] < b`) raises its multiplier, a slack one lowers it towards 0."""
    lam = (_f64(lam) - lr * (_f64(g_mean) - _f64(b))).clamp(min=0.0)
    return lam if lam_max is None else lam.clamp(max=lam_max)


def pseudo_preference_pairs(scores, beta: float, generator: torch.Generator | None = None,
                            deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Pseudo-preference pairs labelled by Bradley-Terry on the scores :math:`s = r + \lambda^\top g` (E6).

    Each prompt's N responses are shuffled and paired off (``N // 2`` disjoint pairs; with N = 2, one pair). In a
    pair :math:`(y_1, y_2)`, :math:`y_1` is chosen with probability :math:`\sigma((s_1 - s_2)/\beta)`, or, with
    ``deterministic``, whenever :math:`s_1 \ge s_2` (the argmax; its DPO fit is then no longer :math:`\pi_\lambda`
    but pushes towards the best response). Returns ``(chosen, rejected)``, each ``(M, N // 2)`` indices into the
    responses of each prompt. ``generator`` makes the pairing and the labels reproducible.
    """
    _check_beta(beta)
    scores = _f64(scores)
    m, n = scores.shape
    if n < 2:
        raise L3MConfigError(f"num_generations: pairs need at least 2 responses per prompt, got {n}")
    order = torch.rand(m, n, generator=generator, dtype=torch.float64).argsort(dim=1)
    first, second = order[:, 0: n - n % 2: 2], order[:, 1: n - n % 2: 2]
    gap = scores.gather(1, first) - scores.gather(1, second)
    if deterministic:
        first_wins = gap >= 0
    else:
        first_wins = torch.rand(gap.shape, generator=generator, dtype=torch.float64) < torch.sigmoid(gap / beta)
    return torch.where(first_wins, first, second), torch.where(first_wins, second, first)
