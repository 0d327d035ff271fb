"""Solvers: where the multipliers that weight the constraint gradients come from (``L3MConfig.solver``).

- ``l3m`` (:class:`LogBarrierSolver`): the L3M log barrier derives them in closed form (Sec. 5.2); nothing is learned.
- ``mm`` (:class:`MinimaxSolver`): the minimax-Lagrangian baseline of Sec. 6.3; the multipliers of the Lagrangian
  (Eq. 8) are learned by projected dual ascent after every constraint step.
- ``lagged_dual`` (:class:`LaggedDualSolver`): lagged dual ascent: multipliers held fixed for ``dual_update_steps``
  constraint steps, then one projected dual step on their mean estimate. Formerly ``dual``; it is not CAID, the
  iterative dual alignment method of arXiv 2505.19387, which is ``l3m align`` (:mod:`l3m.alignment`).
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
from l3m.solvers.lagged_dual import LaggedDualSolver
from l3m.solvers.log_barrier import LogBarrierSolver
from l3m.solvers.minimax import MinimaxSolver

if TYPE_CHECKING:
    from l3m.config import L3MConfig

SOLVERS = ("l3m", "mm", "lagged_dual", "fixed", "sft")

# Solver names that were renamed: old name -> new name. A config naming the old one gets a one-line error
# (:func:`renamed_solver_message`); a checkpoint saved under the old name resumes under the new one.
RENAMED_SOLVERS = {"dual": "lagged_dual"}

__all__ = ["RENAMED_SOLVERS", "SOLVERS", "FixedSolver", "LaggedDualSolver", "LogBarrierSolver", "MinimaxSolver",
           "Solver", "build_solver", "renamed_solver_message"]


def renamed_solver_message(name: object) -> str | None:
    """What to say when a config names a renamed solver (after the field's name), or None for any other value."""
    if name != "dual":
        return None
    return ("'dual' was renamed 'lagged_dual' (the SFT-objective lagged dual ascent); for CAID, the iterative dual "
            "alignment method of arXiv 2505.19387, use `l3m align`")


def build_solver(args: L3MConfig) -> Solver:
    """The multiplier strategy of ``args.solver``: ``l3m``, ``mm``, ``lagged_dual`` or ``fixed``.

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
    if args.solver == "lagged_dual":
        return LaggedDualSolver(
            dual_lr=args.dual_lr,
            update_steps=args.dual_update_steps,
            multiplier_init=args.multiplier_init,
            multiplier_max=args.multiplier_max,
            warm_start=args.dual_warm_start,
        )
    if args.solver == "fixed":
        return FixedSolver(args.multiplier_init, args.ema_smoothing)
    raise L3MConfigError(f"solver: unknown solver {args.solver!r}; use one of {', '.join(SOLVERS)}")
