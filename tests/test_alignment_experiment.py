"""`l3m align-experiment` (l3m.experiments.alignment): CAID, CAN and GRPO's barrier and dual ascent under civility
thresholds, smoke-run on the tiny model; the full run on the demo model is described in docs/alignment.md."""

from __future__ import annotations

import json
import os

import pytest

from l3m.cli import main
from l3m.rewards import resolve_reward


def word_variety(responses: list[str]) -> list[float]:
    """A stand-in for VADER on the tiny model's word salad (whose compound sentiment is 0 for every response): the
    number of distinct words, scaled into [-1, 1], so that responses differ and the thresholds can be met."""
    return [min(1.0, len(set(text.split())) / 4 - 1) for text in responses]


def test_the_alignment_experiment_runs_quick_on_the_tiny_model(assets, tmp_path, capsys, monkeypatch):
    import l3m.rewards.standin

    monkeypatch.setattr(l3m.rewards.standin, "civility_scores", word_variety)
    out = tmp_path / "align"
    assert main(["align-experiment", "--quick", "--model_name_or_path", assets["model"], "--dataset_name",
                 assets["data"], "--output_dir", str(out), "--threshold_offsets", "0.05", "0.2", "--learning_rate",
                 "1e-3", "--dual_lr", "2", "--beta", "0.5"]) == 0
    results = json.load(open(out / "results.json"))
    assert results["complete"] and results["train_prompts"] == 4 and results["grpo_steps"] == 2
    civility = results["reference_pass"]["civility"]["mean"]
    thresholds = results["thresholds"]
    assert thresholds == pytest.approx([civility + 0.05, civility + 0.2])
    runs = results["runs"]
    assert [(r["label"], r["threshold"]) for r in runs] == [("initial", None)] + [
        (label, b) for b in thresholds for label in ("CAN (one-shot)", "CAID (K=2)", "l3m (barrier)",
                                                     "mm (dual ascent)")]
    for run in runs:
        assert len(run["objective"]) == len(run["constraint"]) == len(run["kl"]) == 4
        assert all(-1.0 <= v <= 1.0 for v in run["objective"] + run["constraint"])
        assert all(k >= -1e-5 for k in run["kl"]) and run["train_seconds"] >= 0
    assert runs[0]["kl"] == pytest.approx([0.0] * 4, abs=1e-5)
    assert {r["responses"] for r in runs[1:]} == {4 * 2, 4 * 2 * 3, 2 * 8}  # CAN, CAID (K+1 passes), GRPO 2 x 8

    # every CAID iterate: lambda_t is the projected dual step from lambda_{t-1} on pi_t's civility
    for index, caid in enumerate(results["caid"], start=1):
        b, records = caid["threshold"], caid["records"]
        assert [r["iteration"] for r in records] == [0, 1, 2]
        assert records[0]["constraints"]["harmless"]["reward"]["mean"] == pytest.approx(civility)  # the shared pass
        for previous, record in zip(records, records[1:]):
            lam = record["multipliers"]["harmless"]
            assert lam == previous["next_multipliers"]["harmless"]
            harmless = record["constraints"]["harmless"]
            assert harmless["slack"]["mean"] == pytest.approx(harmless["reward"]["mean"] - b)
            # the default satisfaction target (confidence 0.9): the step aims at b + z * s.e.
            assert harmless["target"] == pytest.approx(b + harmless["confidence_term"])
            assert record["next_multipliers"]["harmless"] == pytest.approx(
                min(100.0, max(0.0, lam - 2.0 * (harmless["slack"]["mean"] - harmless["confidence_term"]))))
            assert set(record["seconds"]) == {"policy_step", "sampling"}
        can, caid_run = [r for r in runs if r["threshold"] == b][:2]
        assert can["multiplier"] == records[0]["next_multipliers"]["harmless"]
        assert caid_run["multiplier"] == records[1]["next_multipliers"]["harmless"]
        with open(out / f"caid_b{index}" / "iteration-0" / "samples.jsonl", encoding="utf-8") as f:
            caid["responses"] = [json.loads(line)["responses"] for line in f]
    assert results["caid"][0]["responses"] == results["caid"][1]["responses"]  # one pass of pi_ref for both
    for run in runs[3:5]:  # the GRPO arms: every step logged, their multiplier from the solver
        assert len(run["history"]) == 2 and run["multiplier"] is not None

    table = (out / "table.txt").read_text()
    assert table.count("initial") == 2 and table.count("CAID (K=2)") == 2
    assert (out / "alignment.png").stat().st_size > 10_000 and not os.path.exists(out / "results.json.tmp")
    printed = capsys.readouterr().out
    assert "iteration 0 | pi_ref" in printed and "iteration 2 | lambda" in printed and "Total time" in printed


def test_methods_runs_only_the_methods_asked_for_with_their_satisfaction_target(assets, tmp_path, monkeypatch):
    import l3m.rewards.standin

    monkeypatch.setattr(l3m.rewards.standin, "civility_scores", word_variety)
    out = tmp_path / "align"
    assert main(["align-experiment", "--quick", "--model_name_or_path", assets["model"], "--dataset_name",
                 assets["data"], "--output_dir", str(out), "--threshold_offsets", "0.1", "--methods", "mm"]) == 0
    results = json.load(open(out / "results.json"))
    assert results["complete"] and results["caid"] == []
    assert [r["label"] for r in results["runs"]] == ["initial", "mm (dual ascent)"]
    assert all("constraints/harmless/confidence_term" in step for step in results["runs"][1]["history"])  # default
    assert sorted(os.listdir(out)) == ["alignment.png", "mm__dual_ascent_b1", "results.json", "table.txt"]


def test_the_satisfaction_target_is_on_by_default_and_none_turns_it_off():
    from l3m.experiments.alignment import AlignmentSettings, civility_constraint
    from l3m.parsing import L3MParser

    (default,) = L3MParser((AlignmentSettings,)).parse([])
    (off,) = L3MParser((AlignmentSettings,)).parse(["--confidence", "none"])
    assert civility_constraint(default, 0.3) == {"name": "harmless", "reward": "civility", "min": 0.3,
                                                 "confidence": 0.9}
    assert off.confidence is None and civility_constraint(off, 0.3)["confidence"] is None


@pytest.mark.parametrize("config, flags, message", [
    ("threshold_offsets: []\n", [], "threshold_offsets: expected at least one offset > 0 above the initial model's "
                                    "mean civility, got []"),
    ("", ["--threshold_offsets", "0.1", "0"], "threshold_offsets: expected at least one offset > 0 above the initial "
                                              "model's mean civility, got [0.1, 0.0]"),
    ("", ["--outer_iterations", "0"], "outer_iterations: expected K >= 1 (CAN is K = 1), got 0"),
    ("", ["--dpo_epochs", "0"], "dpo_epochs: expected an integer >= 1, got 0"),
    ("", ["--methods", "caid,mm"], "methods: expected a list of caid, l3m, mm, got ['caid,mm']"),
    ("", ["--pairs_from", "policy"], "pairs_from: expected 'reference' or 'latest', got 'policy'"),
    ("", ["--confidence", "1"], "confidence: expected a probability in [0.5, 1) (e.g. 0.9) or none, got 1.0"),
    ("", ["--num_generations", "3"], "per_device_train_batch_size: GRPO's 8 completions per step must be whole "
                                     "groups of num_generations=3"),
])
def test_bad_settings_are_one_line_before_anything_is_written(tmp_path, capsys, config, flags, message):
    out = tmp_path / "align"
    if config:
        (tmp_path / "settings.yaml").write_text(config)
        flags = ["--config", str(tmp_path / "settings.yaml"), *flags]
    assert main(["align-experiment", "--output_dir", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"l3m: error: {message}"
    assert not out.exists()


def test_civility_is_a_built_in_reward():
    civility = resolve_reward("civility")
    kind, rude = civility(prompts=["q", "q"], completions=["Thank you, that is a wonderful idea!", "That is awful."],
                          completion_ids=[[1], [2]])
    assert -1.0 <= rude < 0 < kind <= 1.0
