"""The REINFORCE estimate of the constraint gradients (Eq. 11-12, App. B of the L3M paper), as pure functions.

Shapes: N sampled responses, K one-sided constraints.
"""

from __future__ import annotations

import torch


BASELINES = ("none", "leave_one_out", "leave_one_out_per_token")


def constraint_advantages(
    violations: torch.Tensor, multipliers: torch.Tensor, baseline: str = "none", group_size: int = 1,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-response weights :math:`a_j = \sum_i \tilde\lambda_i (c_{ij} - \beta_{ij})` of the score function.

    With them, :func:`reinforce_loss` estimates :math:`\frac1N \sum_j a_j \nabla \log\bar\pi_\theta(y_j|x_j)` (Eq. 11
    with Eq. 12), where :math:`c_{ij} = b_i - r_i(y_j|x_j)` and :math:`\log\bar\pi = \log\pi / |y|` is the
    length-normalized log-likelihood (Sec. 5.4).

    What each baseline estimates. With :math:`g(y) = \nabla\log\pi(y) / |y|`, the paper's estimator (``"none"``)
    has expectation :math:`E[c\,g]`. A baseline that does not depend on sample *j* still shifts it, because
    :math:`E[g] = \nabla E[1/|y|] \ne 0` when responses differ in length (the score identity with the
    :math:`\theta`-free function :math:`1/|y|`): ``"leave_one_out"`` has expectation
    :math:`E[c\,g] - E[c]\,\nabla E[1/|y|]`, a term that pushes response lengths — exactly the quantity a length
    constraint is about. It equals the paper's expectation only when every response has the same length.
    ``"leave_one_out_per_token"`` subtracts :math:`\beta_{ij} = |y_j| \cdot \text{mean}_{k \ne j}(c_{ik}/|y_k|)`,
    the leave-one-out baseline of the per-token value :math:`c/|y|`: then
    :math:`E[\beta\,g] = E[\text{mean}_{k \ne j}(c/|y|)]\,E[\nabla\log\pi] = 0`, so it keeps the paper's
    expectation while removing a common offset of :math:`c/|y|` from the variance.

    Args:
        violations: ``(N, K)`` per-sample constraint values :math:`c_{ij}`, grouped by prompt: rows
            ``[g*G, (g+1)*G)`` are the ``G = group_size`` responses to prompt ``g``.
        multipliers: ``(K,)`` weights :math:`\tilde\lambda_i`.
        baseline: one of :data:`BASELINES`; the leave-one-out means run over the *other* responses to the same
            prompt (over the other responses of the batch when ``group_size`` is 1).
        group_size: responses per prompt (``num_generations``).
        lengths: ``(N,)`` the normalizers :math:`|y_j|` of the log-likelihoods; ``leave_one_out_per_token`` needs
            them.

    >>> constraint_advantages(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]), "leave_one_out").tolist()
    [-4.0, 4.0]
    >>> constraint_advantages(torch.tensor([[1.0], [3.0], [10.0], [10.0]]), torch.tensor([1.0]), "leave_one_out", 2)
    tensor([-2.,  2.,  0.,  0.])
    >>> constraint_advantages(torch.tensor([[2.0], [6.0]]), torch.tensor([1.0]), "leave_one_out_per_token",
    ...                       lengths=torch.tensor([1.0, 2.0])).tolist()  # 1 * (2/1 - 6/2); 2 * (6/2 - 2/1)
    [-1.0, 2.0]
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    if baseline == "leave_one_out_per_token":
        if lengths is None:
            raise ValueError("the leave_one_out_per_token baseline needs the responses' lengths")
        scale = lengths.to(violations.dtype).unsqueeze(1)
        return (scale * _leave_one_out(violations / scale, group_size)) @ multipliers.to(violations.dtype)
    if baseline == "leave_one_out":
        violations = _leave_one_out(violations, group_size)
    return violations @ multipliers.to(violations.dtype)


def _leave_one_out(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N, K)`` values minus the mean of the other rows of their group (of the batch when ``group_size`` is 1)."""
    n, k = values.shape
    groups = values.view(-1, group_size, k) if group_size > 1 else values.view(1, n, k)
    size = groups.shape[1]
    if size == 1:
        return values
    return (groups - (groups.sum(dim=1, keepdim=True) - groups) / (size - 1)).reshape(n, k)


def reinforce_loss(advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    r"""Surrogate whose gradient is :math:`\frac1N \sum_j a_j \nabla \log\bar\pi_\theta(y_j|x_j)` (Eq. 12).

    ``logps`` are the length-normalized log-likelihoods (Sec. 5.4) ``(N,)``, differentiable; advantages are
    treated as constants.
    """
    return (advantages.detach() * logps).mean()
