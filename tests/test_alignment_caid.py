"""CAID's loop (l3m.alignment.caid.run_caid) on the tiny random Llama (CPU): a record per iterate whose multipliers
follow the dual step, files an interrupted run resumes from, the reference left untouched, and one-line errors."""

from __future__ import annotations

import json
import math
import os

import pytest
from datasets import Dataset

from fixtures.tiny import build_model, build_tokenizer, make_examples
from fixtures.trainers import copy_weights, same_weights
from l3m.alignment import caid
from l3m.alignment.config import CAIDConfig
from l3m.errors import L3MConfigError

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")

SHORT = {"name": "short", "reward": "length_tokens", "max": 4}  # the tiny model rambles: about 6 tokens


def config(tmp_path, **overrides) -> CAIDConfig:
    return CAIDConfig(**{**dict(
        output_dir=str(tmp_path / "caid"), use_cpu=True, report_to=[], disable_tqdm=True, bf16=False,
        activation_checkpointing=False, seed=0, save_strategy="no", logging_steps=1, reward="length_words",
        constraints=[SHORT], outer_iterations=2, num_generations=4, max_completion_length=6,
        generation_batch_size=4, per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3, beta=0.5,
        dual_lr=0.5, multiplier_max=20.0), **overrides})


def prompts(n: int = 6) -> Dataset:
    return Dataset.from_list(make_examples(n, 8, 12, seed=0))


def count_policy_steps(monkeypatch) -> list:
    calls = []
    step = caid.dpo_policy_step
    monkeypatch.setattr(caid, "dpo_policy_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    return calls


def test_every_iterate_is_recorded_and_the_multipliers_follow_the_dual_step(tmp_path, monkeypatch):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    before = copy_weights(model)
    args = config(tmp_path)
    records = caid.run_caid(model, tokenizer, prompts(), args)

    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert same_weights(before, copy_weights(model)), "pi_ref must not be trained"
    first = records[0]
    assert first["multipliers"] is None and first["kl"]["mean"] == 0.0
    assert first["one_shot"]["converged"] or first["one_shot"]["at_cap"]["short"]
    assert first["constraints"]["short"]["reward"]["mean"] > 4 and not first["constraints"]["short"]["met"]
    for previous, record in zip(records, records[1:]):
        lam = record["multipliers"]["short"]
        assert lam == previous["next_multipliers"]["short"]
        slack = record["constraints"]["short"]["slack"]["mean"]
        assert slack == pytest.approx(4 - record["constraints"]["short"]["reward"]["mean"])
        assert record["next_multipliers"]["short"] == pytest.approx(min(20.0, max(0.0, lam - 0.5 * slack)))
        assert record["constraints"]["short"]["met"] == (slack >= 0)
        assert record["kl"]["mean"] != 0.0 and math.isfinite(record["kl"]["mean"]), "pi_t must be sampled, not pi_ref"
    out = args.output_dir
    with open(os.path.join(out, "iterations.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == records
    assert os.path.exists(os.path.join(out, "iteration-2", "model", "config.json"))

    # resume: two more outer iterations asked for, one run, the finished ones kept as they were
    calls = count_policy_steps(monkeypatch)
    resumed = caid.run_caid(build_model(tokenizer), tokenizer, prompts(), config(tmp_path, outer_iterations=3))
    assert len(calls) == 1 and resumed[:3] == records and resumed[3]["iteration"] == 3
    assert resumed[3]["multipliers"] == records[2]["next_multipliers"]
    with pytest.raises(L3MConfigError, match=r"output_dir: .* holds a CAID run with beta=0.5, not 0.25"):
        caid.run_caid(build_model(tokenizer), tokenizer, prompts(), config(tmp_path, beta=0.25))


def test_a_confidence_target_tightens_the_one_shot_dual_and_every_dual_step(tmp_path):
    """With ``confidence`` the dual math aims at the bound moved in by z * s.e. of each pass: the one-shot lambda is
    the plain one-shot dual's at that target, every dual step follows the target's slack, and the records keep the
    slack against the bound itself with the target beside it. A run resumes only with the same target."""
    from statistics import NormalDist

    from l3m.alignment.dual import solve_one_shot_dual

    tokenizer = build_tokenizer()
    target = {**SHORT, "max": 7, "confidence": 0.6}  # 8 tokens at most: some responses end before the cap
    args = config(tmp_path, constraints=[target], max_completion_length=8)
    records = caid.run_caid(build_model(tokenizer), tokenizer, prompts(), args)
    z = NormalDist().inv_cdf(0.6)
    for record in records:
        c = record["constraints"]["short"]
        term = z * c["reward"]["se"]  # the length's s.e. over prompt means: the slack's, for a max bound
        assert c["confidence_term"] == pytest.approx(term) and term > 0
        assert c["target"] == pytest.approx(7 - term) and c["slack"]["mean"] == pytest.approx(7 - c["reward"]["mean"])
        if record["multipliers"] is not None:
            lam = record["multipliers"]["short"]
            assert record["next_multipliers"]["short"] == pytest.approx(
                min(20.0, max(0.0, lam - 0.5 * (c["slack"]["mean"] - term))))
    reference = caid.Samples.load(os.path.join(args.output_dir, "iteration-0", "samples.jsonl"))
    term = records[0]["constraints"]["short"]["confidence_term"]
    at_target = solve_one_shot_dual(reference.objective, reference.slack - term, [0.0], 0.5, lam_max=20.0)
    plain = solve_one_shot_dual(reference.objective, reference.slack, [0.0], 0.5, lam_max=20.0)
    assert records[0]["next_multipliers"]["short"] == pytest.approx(at_target.lam.item(), abs=1e-6)
    assert at_target.lam.item() > plain.lam.item() + 1e-3 and not at_target.at_cap[0]
    with pytest.raises(L3MConfigError, match=r"output_dir: .* holds a CAID run with constraints="):
        caid.run_caid(build_model(tokenizer), tokenizer, prompts(), config(tmp_path, constraints=[{**SHORT, "max": 7}],
                                                                          max_completion_length=8))


@pytest.mark.parametrize("pairs_from", ["reference", "latest"])
def test_each_policy_step_pairs_the_responses_pairs_from_names(tmp_path, monkeypatch, pairs_from):
    """'reference': every DPO step is on pi_ref's responses (also after a resume); 'latest': on the previous
    policy's."""
    tokenizer = build_tokenizer()
    paired = []
    dataset = caid.preference_dataset
    monkeypatch.setattr(caid, "preference_dataset",
                        lambda prompts, responses, *a: paired.append(responses) or dataset(prompts, responses, *a))
    args = config(tmp_path, pairs_from=pairs_from)
    caid.run_caid(build_model(tokenizer), tokenizer, prompts(), args)
    caid.run_caid(build_model(tokenizer), tokenizer, prompts(), config(tmp_path, pairs_from=pairs_from,
                                                                       outer_iterations=3))
    passes = [caid.Samples.load(os.path.join(args.output_dir, f"iteration-{t}", "samples.jsonl")).responses
              for t in range(3)]
    assert len(paired) == 3 and passes[1] != passes[0] != passes[2]
    assert paired == ([passes[0]] * 3 if pairs_from == "reference" else passes)


def test_with_lora_each_policy_step_is_a_fresh_adapter_and_the_base_model_is_given_back(tmp_path):
    from peft import LoraConfig

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    before = copy_weights(model)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    records = caid.run_caid(model, tokenizer, prompts(4), config(tmp_path, learning_rate=1e-2), peft_config=lora)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert records[2]["kl"]["mean"] != 0.0
    assert same_weights(before, copy_weights(model)) and not hasattr(model, "peft_config")
    assert os.path.exists(os.path.join(tmp_path, "caid", "iteration-2", "model", "adapter_config.json"))


@pytest.mark.parametrize("overrides, message", [
    (dict(beta=0.0), r"^beta: must be > 0"),
    (dict(beta=-1.0), r"^beta: must be > 0"),
    (dict(reward=None), r"^reward: required"),
    (dict(constraints=None), r"^constraints: required"),
    (dict(constraints=[{"reward": "helpfulness", "min": 0.5}]), r"^constraints\[helpfulness\]\.reward: unknown reward"),
    (dict(constraints="[{reward: length_tokens}]"), r"give at least one of 'min' or 'max'"),
    (dict(loss_type="ipo"), r"^loss_type: must be 'sigmoid'"),
    (dict(num_generations=1), r"^num_generations: must be >= 2"),
    (dict(pairs_from="policy"), r"^pairs_from: must be 'reference' or 'latest'"),
    (dict(constraints=[{**SHORT, "confidence": 1.5}]), r"^constraints\[short\]\.confidence: must be in \[0\.5, 1\)"),
])
def test_bad_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(L3MConfigError, match=message) as error:
        config(tmp_path, **overrides)
    assert "\n" not in str(error.value)


def test_an_unknown_objective_reward_is_named(tmp_path):
    tokenizer = build_tokenizer()
    with pytest.raises(L3MConfigError, match=r"^reward: unknown reward 'helpfulness'"):
        caid.run_caid(build_model(tokenizer), tokenizer, prompts(), config(tmp_path, reward="helpfulness"))


def test_l3m_align_runs_the_example_config(assets, tmp_path, capsys):
    """examples/configs/align_civility.yaml, shortened by flags to the tiny model, runs CAID end to end."""
    from l3m.cli import main

    out = tmp_path / "align"
    config = os.path.join(EXAMPLES, "align_civility.yaml")
    flags = ["--model_name_or_path", assets["model"], "--dataset_name", assets["data"], "--output_dir", str(out),
             "--lora_r", "4", "--outer_iterations", "1", "--num_generations", "2", "--max_completion_length", "6",
             "--max_train_samples", "4", "--max_steps", "1", "--beta", "0.5", "--disable_tqdm", "true"]
    assert main(["align", "--config", config, *flags]) == 0
    printed = capsys.readouterr().out.strip().splitlines()  # the DPO trainer's logs, then l3m's lines
    lines = [line for line in printed if line.startswith("iteration ")]
    assert lines[0].startswith("iteration 0 | pi_ref | objective ") and "harmless slack" in lines[0]
    assert lines[1].startswith("iteration 1 | lambda ") and printed[-1] == f"Wrote {out}/iterations.jsonl"
    with open(out / "iterations.jsonl", encoding="utf-8") as f:
        assert len(f.readlines()) == 2
    assert main(["align", "--config", config, *flags, "--beta", "0"]) == 2
    error = capsys.readouterr().err
    assert error == "l3m: error: beta: must be > 0 (the KL weight of the problem and of DPO), got 0.0\n"
