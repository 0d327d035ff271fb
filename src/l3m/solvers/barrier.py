"""The relaxed logarithmic barrier of the L3M paper (Sec. 4.3 and 5), as pure functions.

Sign convention (used everywhere in l3m): a constraint value ``C = b - r`` is *satisfied* when ``C <= 0``.
Shapes: K constraints.
"""

from __future__ import annotations

import math

import torch


def relaxed_log_barrier(z: torch.Tensor, mu: float, s: float | None = None) -> torch.Tensor:
    r"""The relaxed log barrier :math:`\mathcal{B}_{\mu,s}(z)` of Eq. (9).

    .. math::
        \mathcal{B}_{\mu,s}(z) = -\mu \log(-z) \text{ if } z \le -s, \quad
        \frac{\mu}{s} z + \mu - \mu \log s \text{ otherwise}

    The two branches meet with equal value and slope at ``z = -s``. The paper sets ``s = mu**2`` (the default).

    >>> relaxed_log_barrier(torch.tensor([-1.0, 0.0]), mu=1.0).tolist()  # -log(1) = 0; (1/1)*0 + 1 - log 1 = 1
    [-0.0, 1.0]
    """
    s = mu**2 if s is None else s
    z = torch.as_tensor(z)
    log_branch = -mu * torch.log(torch.clamp(-z, min=s))
    linear_branch = (mu / s) * z + mu - mu * math.log(s)
    return torch.where(z <= -s, log_branch, linear_branch)


def relaxed_log_barrier_grad(z: torch.Tensor, mu: float, s: float | None = None) -> torch.Tensor:
    r"""The derivative :math:`\partial_z \mathcal{B}_{\mu,s}(z) = \mu / \max(-z, s)` of Eq. (9).

    >>> relaxed_log_barrier_grad(torch.tensor([-2.0, 5.0]), mu=0.5).tolist()  # 0.5/2; 0.5/0.25
    [0.25, 2.0]
    """
    s = mu**2 if s is None else s
    return mu / torch.clamp(-torch.as_tensor(z), min=s)


def implied_multipliers(constraint_values: torch.Tensor, mu: float) -> torch.Tensor:
    r"""The L3M multipliers :math:`\tilde\lambda_i = \mu / (k \max(-C_i, \mu^2))` of Sec. 5.2.

    They weight the constraint gradients in Eq. (11), the gradient of the barrier objective Eq. (10)
    :math:`\mathcal{G}_\mu = L + \frac1k \sum_i \mathcal{B}_{\mu,\mu^2}(C_i)`. An active or violated constraint gets
    ``1/(k mu)``; an inactive one ``-mu/(k C_i)``, which vanishes as ``mu -> 0`` (complementary slackness).

    Args:
        constraint_values: ``(K,)`` estimates of :math:`C_i` (the EMA of Sec. 5.4 in training).
        mu: the barrier parameter.

    >>> implied_multipliers(torch.tensor([3.0, -0.5], dtype=torch.float64), mu=0.1).tolist()  # 1/(2*0.1); 0.1/(2*0.5)
    [5.0, 0.1]
    """
    k = constraint_values.numel()
    return relaxed_log_barrier_grad(constraint_values, mu) / k


def mu_at_step(step: int, total_steps: int, mu_init: float = 1.0, mu_final: float = 1e-6) -> float:
    r"""Exponential decay of the barrier parameter (Sec. 5.1, App. A): ``mu_init`` at step 0, ``mu_final`` at the last.

    :math:`\mu_t = \mu_0 \gamma^t` with :math:`\gamma = (\mu_\text{final}/\mu_0)^{1/(T-1)}`: one optimizer step per
    value of mu, ``T = total_steps``.

    >>> mu_at_step(0, 3), mu_at_step(1, 3), mu_at_step(2, 3)  # gamma = (1e-6)^(1/2) = 1e-3
    (1.0, 0.001, 1e-06)
    """
    if total_steps <= 1:
        return mu_init
    fraction = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return float(mu_init * (mu_final / mu_init) ** fraction)
