"""Figures drawn from synthetic records (the experiments that fill them are too slow for the default suite)."""

from __future__ import annotations

import numpy as np
import pytest

from l3m.experiments.plots import RewardPairResult, feasibility_margin, plot_reward_pair_figure


def test_feasibility_margin_is_the_distance_inside_both_bounds():
    x, y = np.array([3.0, 0.0, 2.0]), np.array([5.0, 9.0, 4.5])
    np.testing.assert_allclose(feasibility_margin(x, y, (1.0, 4.0)), [1.0, -1.0, 0.5])


def test_reward_pair_figure_is_written(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    results = [RewardPairResult("initial", "initial", (-3.0, -2.5), 1.3, 0.4),
               RewardPairResult("SFT", "SFT", (-1.0, -2.8), 0.8, 0.3)]
    for point in [(-1.5, -2.0), (-2.0, -1.5), (-1.2, -1.2)]:
        results.append(RewardPairResult(f"L3M {point}", "L3M", (point[0] + 0.1, point[1] + 0.05), 0.81, 0.3, point))
        results.append(RewardPairResult(f"MM {point}", "MM", (point[0] + 0.4, point[1] + 0.3), 0.83, 0.3, point))
    path = plot_reward_pair_figure(results, str(tmp_path / "fig" / "fig3.png"))
    image = plt.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 800
    # the left panel is shaded (grey) somewhere and the plot is not blank
    assert image[..., :3].std() > 0.05
    assert not (tmp_path / "fig" / "fig3.png.tmp.png").exists()
