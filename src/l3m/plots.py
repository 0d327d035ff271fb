"""Figures in the style of the L3M paper (needs matplotlib: ``pip install 'l3m[plots]'``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from l3m.errors import L3MConfigError


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise L3MConfigError("plots: install matplotlib (pip install 'l3m[plots]') to write figures") from err

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

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = path + ".tmp.png"
    fig.savefig(staging, dpi=120)
    plt.close(fig)
    os.replace(staging, path)
    return path
