"""`l3m grpo-experiment`: GRPO under a length budget (no budget, fixed weights, barrier, dual ascent), smoke-run on
the tiny model; the measured run on the demo model is in docs/grpo_experiment.md."""

from __future__ import annotations

import json
import os

import pytest

from l3m.cli import main


def test_the_budget_experiment_runs_quick_on_the_tiny_model(assets, tmp_path, capsys):
    out = tmp_path / "budget"
    assert main(["grpo-experiment", "--quick", "--model_name_or_path", assets["model"], "--dataset_name",
                 assets["data"], "--output_dir", str(out), "--budget", "3", "--per_device_train_batch_size", "4",
                 "--num_generations", "2", "--learning_rate", "1e-3"]) == 0
    results = json.load(open(out / "results.json"))
    assert results["complete"] and not os.path.exists(out / "results.json.tmp")
    runs = {r["label"]: r for r in results["runs"]}
    assert list(runs) == ["initial", "GRPO (no budget)", "fixed w=0.01", "fixed w=0.04", "fixed w=0.1",
                          "l3m (barrier)", "mm (dual ascent)"]
    assert runs["initial"]["history"] == [] and runs["initial"]["kl"] == pytest.approx([0.0] * 4, abs=1e-5)
    for label, run in runs.items():
        assert run["summary"]["num_examples"] == 4 and len(run["objective"]) == len(run["lengths"]) == 4
        relevance, words = run["objective_rewards"]["relevance"], run["objective_rewards"]["length_words"]
        assert all(-1.0 <= r <= 1.0 for r in relevance)  # cosine similarities
        assert run["objective"] == pytest.approx([r + 0.05 * w for r, w in zip(relevance, words)])  # reward_weights
        if label != "initial":
            assert len(run["history"]) == 2 and all(k >= 0 for k in run["kl"])
    # the multipliers each arm used: 0, the fixed weights, and the barrier's 1/mu while the budget is violated
    assert runs["GRPO (no budget)"]["history"][0]["constraints/length/multiplier"] == 0
    assert runs["fixed w=0.1"]["history"][1]["constraints/length/multiplier"] == pytest.approx(0.1)
    barrier = runs["l3m (barrier)"]["history"][0]
    if barrier["constraints/length/value"] > 0:  # violated at the first step: lambda = 1/mu = 1
        assert barrier["constraints/length/multiplier"] == pytest.approx(1.0)
    assert (out / "grpo_budget.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "objective ± s.e." in printed and "relevance ± s.e." in printed
    assert "mm (dual ascent)" in printed and "Total time" in printed


@pytest.mark.parametrize("flags, message", [
    (["--budget", "0"], "budget: expected a positive number of tokens, got 0.0"),
    (["--fixed_weights", "0.1", "-1"], "fixed_weights: expected weights >= 0, got [0.1, -1.0]"),
    (["--reward_weights", "1"], "reward_weights: 1 weights for 2 objective rewards; give one per reward"),
])
def test_bad_budget_settings_are_one_line_before_anything_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "budget"
    assert main(["grpo-experiment", "--output_dir", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"l3m: error: {message}"
    assert not out.exists()
