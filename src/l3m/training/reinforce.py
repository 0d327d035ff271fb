"""The REINFORCE estimate of the constraint gradients (Eq. 11-12, App. B of the L3M paper), as pure functions.

Shapes: N sampled responses, K one-sided constraints.
"""

from __future__ import annotations

import torch


def constraint_advantages(
    violations: torch.Tensor, multipliers: torch.Tensor, baseline: str = "none", group_size: int = 1
) -> torch.Tensor:
    r"""Per-response weights :math:`a_j = \sum_i \tilde\lambda_i (c_{ij} - \beta_{ij})` of the score function.

    With them, :math:`\frac1N \sum_j a_j \nabla \log\bar\pi_\theta(y_j|x_j)` is the Monte-Carlo estimate of
    :math:`\sum_i \tilde\lambda_i \partial_\theta C_i` (Eq. 11 with Eq. 12), where :math:`c_{ij} = b_i - r_i(y_j|x_j)`.

    Args:
        violations: ``(N, K)`` per-sample constraint values :math:`c_{ij}`, grouped by prompt: rows
            ``[g*G, (g+1)*G)`` are the ``G = group_size`` responses to prompt ``g``.
        multipliers: ``(K,)`` weights :math:`\tilde\lambda_i`.
        baseline: ``"none"`` (:math:`\beta = 0`, the paper's estimator) or ``"leave_one_out"``:
            :math:`\beta_{ij}` is the mean of :math:`c_{i\cdot}` over the *other* responses to the same prompt
            (over the other responses of the batch when ``group_size`` is 1). It does not depend on sample j, so the
            estimate stays unbiased while the variance from the reward's offset and from prompt to prompt drops.
        group_size: responses per prompt (``num_generations``).

    >>> constraint_advantages(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]), "leave_one_out").tolist()
    [-4.0, 4.0]
    >>> constraint_advantages(torch.tensor([[1.0], [3.0], [10.0], [10.0]]), torch.tensor([1.0]), "leave_one_out", 2)
    tensor([-2.,  2.,  0.,  0.])
    """
    if baseline not in ("none", "leave_one_out"):
        raise ValueError(f"unknown baseline {baseline!r}")
    if baseline == "leave_one_out":
        n, k = violations.shape
        groups = violations.view(-1, group_size, k) if group_size > 1 else violations.view(1, n, k)
        size = groups.shape[1]
        if size > 1:
            groups = groups - (groups.sum(dim=1, keepdim=True) - groups) / (size - 1)
            violations = groups.reshape(n, k)
    return violations @ multipliers.to(violations.dtype)


def reinforce_loss(advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    r"""Surrogate whose gradient is :math:`\frac1N \sum_j a_j \nabla \log\bar\pi_\theta(y_j|x_j)` (Eq. 12).

    ``logps`` are the length-normalized log-likelihoods (Sec. 5.4) ``(N,)``, differentiable; advantages are
    treated as constants.
    """
    return (advantages.detach() * logps).mean()
