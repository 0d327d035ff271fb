"""Figures in the style of the L3M paper (needs matplotlib: ``pip install 'l3m[plots]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from l3m.errors import L3MConfigError
from l3m.files import atomic_path


@dataclass
class LengthResult:
    """One model's evaluation for Fig. 2: its response lengths, task log-ppl, and length range (if constrained)."""

    label: str
    lengths: Sequence[float]
    log_ppl_mean: float
    log_ppl_std: float
    length_range: tuple[float | None, float | None] | None = None


def plot_length_figure(results: Sequence[LengthResult], path: str, reward_label: str = "response length (tokens)",
                       title: str = "Length-constrained L3Ms (cf. Fig. 2 of the L3M paper)") -> str:
    """Fig. 2: left, mean length against task log-ppl (mean ± std); right, length box plots with constraint lines.

    The boxes are notched at the median, white circles mark the means, and black dashed lines the ranges imposed
    on each model. The PNG is written atomically to ``path``. Any other reward can take the place of the length
    (``LengthResult.lengths`` then holds its values; ``reward_label`` names it on the axes), which makes the left
    panel the Fig. 3 (right) view: task log-ppl per model against the constraint's level.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        mean_length = sum(r.lengths) / max(len(r.lengths), 1)
        left.errorbar(mean_length, r.log_ppl_mean, yerr=r.log_ppl_std, fmt="o", capsize=4,
                      color=colors[i % len(colors)], label=r.label)
    left.set_xlabel(f"mean {reward_label}")
    left.set_ylabel("task log-perplexity (mean ± std)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    right.boxplot([list(r.lengths) for r in results], notch=True, showmeans=True, widths=0.6,
                  meanprops={"marker": "o", "markerfacecolor": "white", "markeredgecolor": "black"},
                  flierprops={"marker": ".", "markersize": 4, "markerfacecolor": "grey", "markeredgecolor": "grey"})
    right.set_xticks(range(1, len(results) + 1), [r.label for r in results], fontsize=8)
    for i, r in enumerate(results, start=1):
        for bound in r.length_range or ():
            if bound is not None:
                right.hlines(bound, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
    right.set_ylabel(reward_label)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise L3MConfigError("plots: install matplotlib (pip install 'l3m[plots]') to write figures") from err
    return plt


def _save(fig, plt, path: str) -> str:
    """Write ``fig`` as a PNG atomically to ``path`` and close it."""
    with atomic_path(path) as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)
    return path


@dataclass
class RewardPairResult:
    """One model's evaluation for Fig. 3: mean rewards under two constraints, task log-ppl, its constraint point.

    ``method`` groups models in the right panel (e.g. ``"L3M"``, ``"MM"``); ``constraint`` is ``(b_x, b_y)``, the
    minimum mean rewards imposed on it, or None for an unconstrained model (initial, SFT).
    """

    label: str
    method: str
    rewards: tuple[float, float]
    log_ppl_mean: float
    log_ppl_std: float
    constraint: tuple[float, float] | None = None


def feasibility_margin(x, y, point: tuple[float, float]):
    """How far ``(x, y)`` lies inside the feasible region ``x >= b_x, y >= b_y`` of ``point`` (< 0: outside).

    >>> float(feasibility_margin(3.0, 5.0, (1.0, 4.0)))
    1.0
    """
    import numpy as np

    return np.minimum(np.asarray(x) - point[0], np.asarray(y) - point[1])


def plot_reward_pair_figure(results: Sequence[RewardPairResult], path: str, axis_labels: tuple[str, str] = (
        "helpful reward (mean)", "harmless reward (mean)"), shaded: tuple[float, float] | None = None) -> str:
    """Fig. 3: left, the two mean rewards of every model, its constraint point (black), a dotted line between them,
    and the feasible region of ``shaded`` (default: the first constraint point) shaded darker with the distance from
    its boundary; right, task log-ppl (mean ± std) per method at each constraint point, with the unconstrained models
    as horizontal lines. The PNG is written atomically to ``path``."""
    plt = _pyplot()
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r.method for r in results))
    color_of = {m: colors[i % len(colors)] for i, m in enumerate(methods)}
    points = list(dict.fromkeys(r.constraint for r in results if r.constraint is not None))

    xs = [r.rewards[0] for r in results] + [p[0] for p in points]
    ys = [r.rewards[1] for r in results] + [p[1] for p in points]
    pad_x, pad_y = 0.15 * (max(xs) - min(xs) or 1.0), 0.15 * (max(ys) - min(ys) or 1.0)
    x_lim, y_lim = (min(xs) - pad_x, max(xs) + pad_x), (min(ys) - pad_y, max(ys) + pad_y)
    shaded = shaded or (points[0] if points else None)
    if shaded is not None:
        grid_x, grid_y = np.meshgrid(np.linspace(*x_lim, 200), np.linspace(*y_lim, 200))
        margin = feasibility_margin(grid_x, grid_y, shaded)
        left.imshow(np.ma.masked_less(margin, 0), origin="lower", extent=(*x_lim, *y_lim), aspect="auto",
                    cmap="Greys", alpha=0.35, vmin=-0.3 * margin.max(), vmax=margin.max())
    for r in results:
        if r.constraint is not None:
            left.plot([r.rewards[0], r.constraint[0]], [r.rewards[1], r.constraint[1]], ":", color="grey", lw=1)
    if points:
        left.scatter([p[0] for p in points], [p[1] for p in points], marker="x", color="black", s=50,
                     label="constraint", zorder=3)
    for method in methods:
        group = [r for r in results if r.method == method]
        left.scatter([r.rewards[0] for r in group], [r.rewards[1] for r in group], color=color_of[method],
                     label=method, zorder=4, edgecolors="black", linewidths=0.5)
    left.set_xlim(*x_lim)
    left.set_ylim(*y_lim)
    left.set_xlabel(axis_labels[0])
    left.set_ylabel(axis_labels[1])
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    constrained = [m for m in methods if any(r.method == m and r.constraint is not None for r in results)]
    width = 0.8 / max(len(constrained), 1)
    for j, method in enumerate(constrained):
        for i, point in enumerate(points):
            for r in results:
                if r.method == method and r.constraint == point:
                    right.errorbar(i + (j - (len(constrained) - 1) / 2) * width, r.log_ppl_mean, yerr=r.log_ppl_std,
                                   fmt="o", capsize=4, color=color_of[method], label=method if i == 0 else None)
    for r in results:
        if r.constraint is None:
            right.axhline(r.log_ppl_mean, color=color_of[r.method], ls="--", lw=1,
                          label=f"{r.label} ({r.log_ppl_mean:.3f})")
    right.set_xticks(range(len(points)), [f"({p[0]:g}, {p[1]:g})" for p in points], fontsize=8)
    right.set_xlabel("constraint point")
    right.set_ylabel("task log-perplexity (mean ± std)")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle("Two learned reward constraints (cf. Fig. 3 of the L3M paper)")
    fig.tight_layout()
    return _save(fig, plt, path)


@dataclass
class BudgetPoint:
    """One arm of the GRPO length-budget experiment: mean length and mean objective reward, each ``(mean, s.e.)``."""

    label: str
    length: tuple[float, float]
    objective: tuple[float, float]


def plot_budget_figure(points: Sequence[BudgetPoint], budget: float, path: str,
                       objective_label: str = "objective reward") -> str:
    """Objective reward against response length per arm (mean ± s.e. both ways), the budget as a vertical line:
    arms left of the line meet it, and higher is better among them. Written atomically to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(points):
        ax.errorbar(p.length[0], p.objective[0], xerr=p.length[1], yerr=p.objective[1], fmt="o", capsize=4,
                    color=colors[i % len(colors)], label=p.label)
    ax.axvline(budget, color="black", linestyle="dashed", label=f"budget ({budget:g} tokens)")
    ax.set_xlabel("held-out response length (tokens, mean ± s.e.)")
    ax.set_ylabel(f"held-out {objective_label}, mean ± s.e.")
    ax.set_title("GRPO under a length budget")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


@dataclass
class AlignmentPoint:
    """One model of the constrained-alignment experiment on held-out prompts: the constraint's and the objective's
    mean reward, each ``(mean, s.e.)``; ``threshold`` is the b it was trained for (None: the initial model)."""

    method: str
    threshold: float | None
    constraint: tuple[float, float]
    objective: tuple[float, float]


def plot_alignment_figure(points: Sequence[AlignmentPoint], thresholds: Sequence[float],
                          multipliers: dict[float, Sequence[float]], path: str,
                          axis_labels: tuple[str, str] = ("harmless: civility (VADER compound)",
                                                          "helpful: relevance (MiniLM cosine)")) -> str:
    """Left: the objective against the constraint per model (mean ± s.e. both ways; colour: method, marker:
    threshold), each threshold a dashed vertical line (models right of their line meet it). Right: CAID's multiplier
    over its outer iterations per threshold (``multipliers[b][t]``: lambda_t, t = 0 the one-shot dual). Written
    atomically to ``path``."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.6), gridspec_kw={"width_ratios": [1.5, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    methods = list(dict.fromkeys(p.method for p in points))
    marker_of = {b: markers[i % len(markers)] for i, b in enumerate(thresholds)}
    labelled = set()
    for p in points:
        color = colors[methods.index(p.method) % len(colors)]
        left.errorbar(p.constraint[0], p.objective[0], xerr=p.constraint[1], yerr=p.objective[1], capsize=3,
                      fmt=marker_of.get(p.threshold, "o"), color=color, markeredgecolor="black", markeredgewidth=0.5,
                      label=None if p.method in labelled else p.method)
        labelled.add(p.method)
    for b in thresholds:
        left.axvline(b, color="black", linestyle="dashed", lw=1)
        left.annotate(f"b={b:.2f} ({marker_of[b]})", (b, 1), xycoords=("data", "axes fraction"), rotation=90,
                      va="top", ha="right", fontsize=8)
    left.set_xlabel(f"held-out {axis_labels[0]}, mean ± s.e.")
    left.set_ylabel(f"held-out {axis_labels[1]}, mean ± s.e.")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for b, lams in multipliers.items():
        right.plot(range(len(lams)), lams, marker=marker_of.get(b, "o"), label=f"b={b:.2f}")
    right.set_xlabel("outer iteration t (0: one-shot dual)")
    right.set_ylabel("CAID multiplier λ_t")
    right.set_xticks(range(max((len(v) for v in multipliers.values()), default=1)))
    if multipliers:  # none when CAID was not run (align-experiment --methods)
        right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("Constrained alignment on the helpful/harmless stand-in")
    fig.tight_layout()
    return _save(fig, plt, path)
