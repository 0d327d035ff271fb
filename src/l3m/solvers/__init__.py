"""Solvers: where the multipliers that weight the constraint gradients come from (``L3MConfig.solver``).

- ``l3m`` (:class:`LogBarrierSolver`): the L3M log barrier derives them in closed form (Sec. 5.2); nothing is learned.
- ``mm`` (:class:`MinimaxSolver`): the minimax-Lagrangian baseline of Sec. 6.3; the multipliers of the Lagrangian
  (Eq. 8) are learned by projected dual ascent after every constraint step.
- ``dual`` (:class:`IterativeDualSolver`): multipliers held fixed for an outer iteration of policy steps, then one
  dual step (after Zhang et al. 2025, on the SFT objective).
- ``fixed`` (:class:`FixedSolver`): hand-set weights (``multiplier_init``), never updated: the hand-weighted penalty
  baseline.
- ``sft``: the constraints are ignored (plain SFT); no solver is consulted.

Every solver implements :class:`Solver` (:mod:`l3m.solvers.base`); :func:`build_solver` picks one from the config.
The log barrier's pure functions (Eq. 9-11) are in :mod:`l3m.solvers.barrier`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l3m.errors import L3MConfigError
from l3m.solvers.base import Solver
from l3m.solvers.fixed import FixedSolver
from l3m.solvers.iterative_dual import IterativeDualSolver
from l3m.solvers.log_barrier import LogBarrierSolver
from l3m.solvers.minimax import MinimaxSolver

if TYPE_CHECKING:
    from l3m.config import L3MConfig

SOLVERS = ("l3m", "mm", "dual", "fixed", "sft")

__all__ = ["SOLVERS", "FixedSolver", "IterativeDualSolver", "LogBarrierSolver", "MinimaxSolver", "Solver",
           "build_solver"]


def build_solver(args: L3MConfig) -> Solver:
    """The multiplier strategy of ``args.solver``: ``l3m``, ``mm``, ``dual`` or ``fixed``.

    ``sft`` gets the log barrier too, as a run without constraints does: the trainer ignores the constraints then,
    so the strategy is never consulted.
    """
    if args.solver in ("l3m", "sft"):
        return LogBarrierSolver(args.mu_init, args.mu_final, args.ema_smoothing)
    if args.solver == "mm":
        return MinimaxSolver(
            dual_lr=args.dual_lr,
            multiplier_init=args.multiplier_init,
            multiplier_max=args.multiplier_max,
            warmup_steps=args.dual_warmup_steps,
            log_parametrization=args.dual_log_parametrization,
            ema_smoothing=args.dual_ema_smoothing,
        )
    if args.solver == "dual":
        return IterativeDualSolver(
            dual_lr=args.dual_lr,
            update_steps=args.dual_update_steps,
            multiplier_init=args.multiplier_init,
            multiplier_max=args.multiplier_max,
            warm_start=args.dual_warm_start,
        )
    if args.solver == "fixed":
        return FixedSolver(args.multiplier_init, args.ema_smoothing)
    raise L3MConfigError(f"solver: unknown solver {args.solver!r}; use one of {', '.join(SOLVERS)}")
