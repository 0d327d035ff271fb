"""The REINFORCE estimate of the constraint gradients (Eq. 11-12, App. B of the L3M paper), as pure functions.

Shapes: N sampled responses, K one-sided constraints.
"""

from __future__ import annotations

import torch


def constraint_advantages(violations: torch.Tensor, multipliers: torch.Tensor, baseline: str = "none") -> torch.Tensor:
    r"""Per-response weights :math:`a_j = \sum_i \tilde\lambda_i (c_{ij} - \beta_{ij})` of the score function.

    With them, :math:`\frac1N \sum_j a_j \nabla \log\bar\pi_\theta(y_j|x_j)` is the Monte-Carlo estimate of
    :math:`\sum_i \tilde\lambda_i \partial_\theta C_i` (Eq. 11 with Eq. 12), where :math:`c_{ij} = b_i - r_i(y_j|x_j)`.

    Args:
        violations: ``(N, K)`` per-sample constraint values :math:`c_{ij}`.
        multipliers: ``(K,)`` weights :math:`\tilde\lambda_i`.
        baseline: ``"none"`` (:math:`\beta = 0`, the paper's estimator) or ``"leave_one_out"``
            (:math:`\beta_{ij}` = mean of the other samples' :math:`c_{i\cdot}`; independent of sample j, so the
            estimate stays unbiased while its variance drops).

    >>> constraint_advantages(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]), "leave_one_out").tolist()
    [-4.0, 4.0]
    """
    n = violations.shape[0]
    if baseline == "leave_one_out" and n > 1:
        violations = violations - (violations.sum(dim=0, keepdim=True) - violations) / (n - 1)
    elif baseline not in ("none", "leave_one_out"):
        raise ValueError(f"unknown baseline {baseline!r}")
    return violations @ multipliers.to(violations.dtype)


def reinforce_loss(advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    r"""Surrogate whose gradient is :math:`\frac1N \sum_j a_j \nabla \log\bar\pi_\theta(y_j|x_j)` (Eq. 12).

    ``logps`` are the length-normalized log-likelihoods (Sec. 5.4) ``(N,)``, differentiable; advantages are
    treated as constants.
    """
    return (advantages.detach() * logps).mean()
