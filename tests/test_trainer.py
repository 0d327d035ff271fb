"""L3MTrainer end to end on a tiny random Llama (CPU, seconds per test)."""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import torch
from datasets import Dataset

from fixtures.tiny import make_examples
from fixtures.trainers import Recorder, make_trainer
from l3m import Constraint, L3MConfigError, L3MTrainer
from l3m.data import prepare_dataset
from l3m.evaluation import evaluate_model
from l3m.training.checkpoints import SOLVER_STATE_NAME
from l3m.training.coin import is_constraint_step

# The random tiny model rambles (about 9 tokens, a quarter of samples hit the 16-token cap); the task data's answers
# have 8-12 tokens. The constraint asks for 2-5 tokens: violated at the start, and away from where SFT goes.
LENGTH_RANGE = (2.0, 5.0)

_trainer = partial(make_trainer, num_examples=256, max_steps=60, per_device_train_batch_size=8,
                   lr_scheduler_type="constant", max_completion_length=16, logging_steps=5)


def _held_out_mean_length(trainer: L3MTrainer) -> float:
    tokenizer = trainer.processing_class
    test = prepare_dataset(Dataset.from_list(make_examples(64, 8, 12, seed=1)), tokenizer, 512, name="test")
    result = evaluate_model(trainer.model, tokenizer, test, constraints=[], max_new_tokens=16, batch_size=32,
                            progress=False)
    return result["summary"]["length_mean"]


def test_length_constraint_is_satisfied_where_sft_is_not(tmp_path):
    low, high = LENGTH_RANGE
    untrained = _trainer(tmp_path, constraints=[Constraint("length_tokens", min=low, max=high, name="length")])
    initial_length = _held_out_mean_length(untrained)
    assert not low <= initial_length <= high, f"the initial policy must violate the range, got {initial_length}"

    l3m = _trainer(tmp_path / "l3m", constraints=[Constraint("length_tokens", min=low, max=high, name="length")])
    l3m.train()
    ema_min, ema_max = l3m.solver.ema.tolist()  # C = low - E|y| and E|y| - high
    # an expectation constraint's solution lies on its bound: the EMA ends within half a token of it (0.37 tokens
    # above with the default baseline), from about 4 tokens above at the start (the held-out mean below is inside)
    assert ema_min <= 0.5 and ema_max <= 0.5, f"EMA of the constraint values still violated: {ema_min}, {ema_max}"
    l3m_length = _held_out_mean_length(l3m)
    assert low <= l3m_length <= high

    sft = _trainer(tmp_path / "sft", constraints=[])
    sft.train()
    sft_length = _held_out_mean_length(sft)
    # SFT moves towards its data's 8-12 tokens (6.9 with batch_order's order; 60 steps do not get it all the way)
    assert sft_length > high + 1, f"SFT should answer longer than the range, like its data, got {sft_length}"


# Chance and uniform constraints (Sec. 4.1): at first the random tiny model answers with at most 5 tokens a tenth of
# the time (held-out mean 14 tokens). Checked offline with seeds 0-3 at 60 steps: every run ends satisfied on the
# held-out prompts (chance: 75-78% of answers within 5 tokens; uniform: mean shortfall 0.2-0.5 tokens). The solver
# stops at the boundary, against SFT's pull towards the data's 8-12 tokens: at 100 steps some seeds end just outside.
KIND_RECORDS = {
    "chance": {"kind": "chance", "epsilon": 0.3, "indicator_temperature": 1.0},  # P[len <= 5] >= 0.7
    "uniform": {"kind": "uniform", "delta": 2.0},  # E[max(0, len - 5)] <= 2 tokens
}


@pytest.mark.parametrize("kind", ["chance", "uniform"])
def test_chance_and_uniform_constraints_violated_at_first_end_satisfied(tmp_path, kind):
    (constraint,) = [Constraint("length_tokens", max=LENGTH_RANGE[1], name="length", **KIND_RECORDS[kind])]
    trainer = _trainer(tmp_path, constraints=[constraint])
    tokenizer = trainer.processing_class
    test = prepare_dataset(Dataset.from_list(make_examples(64, 8, 12, seed=1)), tokenizer, 512, name="test")

    def held_out():
        return evaluate_model(trainer.model, tokenizer, test, constraints=[constraint], max_new_tokens=16,
                              batch_size=32, progress=False)["summary"]

    before = held_out()
    assert not before["length/satisfied"] and before["length/value"] > 0, before
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    after = held_out()
    assert after["length/satisfied"] and after["length/value"] <= 0, after
    if kind == "chance":  # measured as the kind defines it: the share of answers within the bound
        assert after["length/inside_frac"] >= 0.7 > before["length/inside_frac"]
        assert after["length/value"] == pytest.approx(0.7 - after["length/inside_frac"])
    values = [log["constraints/length/value"] for log in recorder.logs if "constraints/length/value" in log]
    assert values[0] > 0 and values[-1] < values[0]


def test_a_margin_keeps_the_held_out_mean_inside_the_bound(tmp_path):
    """max 6 ends near 6 (the barrier stops at the bound); with margin 2 training aims at 4, and the held-out mean
    is judged against 6 still."""
    lengths, targets = {}, []
    for margin in (0.0, 2.0):
        trainer = _trainer(tmp_path / str(margin), constraints=[Constraint("length_tokens", max=6, name="length",
                                                                           margin=margin)], logging_steps=1)
        recorder = Recorder()
        trainer.add_callback(recorder)
        trainer.train()
        lengths[margin] = _held_out_mean_length(trainer)
        targets += [log["constraints/length/target"] for log in recorder.logs if "constraints/length/target" in log]
    assert targets and set(targets) == {4.0}  # logged only with a target, in reward units
    assert lengths[2.0] <= 6 - 1 and lengths[2.0] < lengths[0.0] - 1, lengths


def test_no_constraints_is_plain_sft(tmp_path):
    trainer = _trainer(tmp_path, constraints=[], max_steps=6)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    steps = [log for log in recorder.logs if "step/constraint" in log]
    assert steps and all(log["step/constraint"] == 0.0 for log in steps)
    assert not any(key.startswith("constraints/") for log in recorder.logs for key in log)


def test_logged_metrics_cover_the_solver(tmp_path):
    trainer = _trainer(tmp_path, constraints=[Constraint("length_tokens", min=2, max=5, name="length")], max_steps=10,
                       logging_steps=10)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    logged = set().union(*recorder.logs)
    for key in ["objective/loss", "barrier/mu", "step/constraint", "completions/mean_length",
                "constraints/length/min/value", "constraints/length/min/ema", "constraints/length/min/multiplier",
                "constraints/length/min/satisfied_frac", "constraints/length/max/multiplier",
                "rewards/length/mean"]:
        assert key in logged, key


def test_coin_is_a_seeded_fair_coin():
    flips = [is_constraint_step(0, step, schedule="coin") for step in range(2000)]
    assert flips == [is_constraint_step(0, step, schedule="coin") for step in range(2000)]  # reproducible
    assert flips != [is_constraint_step(1, step, schedule="coin") for step in range(2000)]  # the seed matters
    assert 0.45 < sum(flips) / len(flips) < 0.55  # fair (binomial std 0.011)
    assert not any(is_constraint_step(0, step, objective_step_probability=1.0, schedule="coin") for step in range(100))


@pytest.mark.parametrize("objective_step_probability", [0.5, 0.3, 0.75, 0.0, 1.0])
def test_the_alternate_schedule_holds_every_windows_share_to_within_one(objective_step_probability):
    q = 1 - objective_step_probability
    phases = set()
    for seed in range(20):
        kinds = [is_constraint_step(seed, step, objective_step_probability) for step in range(200)]
        for n in (1, 2, 5, 21):
            for start in range(0, 200 - n):
                assert abs(sum(kinds[start:start + n]) - n * q) < 1 + 1e-9, (seed, n, start)
        phases.add(tuple(kinds[:4]))
    # the seed picks the phase: with a fair coin's share both orders occur (a coin's streak of 13 objective steps
    # in 21 is what this schedule rules out)
    if objective_step_probability == 0.5:
        assert len(phases) == 2
    with pytest.raises(ValueError, match="unknown step schedule 'dice'"):
        is_constraint_step(0, 0, schedule="dice")


def test_a_matched_sft_run_counts_the_objective_steps_of_the_configured_schedule(tmp_path):
    """SFT matched to an L3M run takes that run's objective steps under its own probability and schedule, not the
    defaults (at seed 1 and probability 0.3, the coin gives 3 of 20 steps to the objective, alternation 6)."""
    from l3m import L3MConfig
    from l3m.training.coin import objective_step_count, objective_steps_of

    for schedule in ("coin", "alternate"):
        args = L3MConfig(output_dir=str(tmp_path), max_steps=20, seed=1, objective_step_probability=0.3,
                         step_schedule=schedule, use_cpu=True, report_to=[])
        assert objective_steps_of(args) == objective_step_count(1, 20, 0.3, schedule)
    assert objective_step_count(1, 20, 0.3, "coin") != objective_step_count(1, 20, 0.3, "alternate")


def test_same_seed_gives_same_coins_and_weights(tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = _trainer(tmp_path / name, constraints=[Constraint("length_tokens", max=5)], max_steps=12)
        recorder = Recorder()
        trainer.add_callback(recorder)
        trainer.train()
        coins = [log["step/constraint"] for log in recorder.logs if "step/constraint" in log]
        runs.append((coins, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (coins_a, weights_a), (coins_b, weights_b) = runs
    assert coins_a == coins_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_continues_the_same_run(tmp_path):
    constraint = [Constraint("length_tokens", min=2, max=5, name="length", confidence=0.9)]
    straight = _trainer(tmp_path / "straight", constraints=constraint, max_steps=16)
    straight.train()

    first = _trainer(tmp_path / "resumed", constraints=constraint, max_steps=16, save_strategy="steps", save_steps=8)
    first.train()
    checkpoint = os.path.join(tmp_path / "resumed" / "run", "checkpoint-8")
    with open(os.path.join(checkpoint, SOLVER_STATE_NAME)) as f:
        saved = json.load(f)
    assert saved["global_step"] == 8 and saved["multipliers"]["ema"] is not None
    assert saved["confidence"]["variance"] is not None  # the running estimate's variance (l3m.confidence)

    resumed = _trainer(tmp_path / "resumed", constraints=constraint, max_steps=16, save_strategy="steps", save_steps=8)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.solver.ema.tolist() == straight.solver.ema.tolist()
    assert resumed.confidence.state_dict() == straight.confidence.state_dict()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # bit-for-bit on CPU


def test_heldout_size_adds_the_heldout_means_error_to_the_trainers_confidence_term(tmp_path):
    """One constraint step of 4 prompts x 4 responses, the same samples with and without heldout_size: the running
    variance V is the same (from the 4 prompts' means), and the term is z sqrt(V) without, z sqrt(V + S / 4) with."""
    terms = {}
    for name, extra in (("plain", {}), ("heldout", {"heldout_size": 4})):
        constraint = Constraint("length_tokens", max=5, name="length", confidence=0.9, **extra)
        trainer = make_trainer(tmp_path / name, constraints=[constraint], max_steps=2, per_device_train_batch_size=4,
                               num_generations=4, max_completion_length=16)
        trainer.train()
        state = trainer.confidence.state_dict()
        (variance,), (spread,), (term,) = state["variance"], state["spread"], state["term"]
        assert variance > 0 and spread > variance  # 16 responses' spread, 4 prompts' means' variance
        assert variance != pytest.approx(spread / 16, rel=0.05)  # from the prompts' means, not 16 independent draws
        held = extra.get("heldout_size")
        expected = constraint.z * (variance + (spread / held if held else 0.0)) ** 0.5
        assert term == pytest.approx(expected, rel=1e-5)
        terms[name] = (variance, term)
    assert terms["plain"][0] == terms["heldout"][0] and terms["heldout"][1] > terms["plain"][1]


def test_resume_refuses_a_checkpoint_of_other_constraints(tmp_path):
    first = _trainer(tmp_path, constraints=[Constraint("length_tokens", max=5)], max_steps=4, save_strategy="steps",
                     save_steps=4)
    first.train()
    other = _trainer(tmp_path, constraints=[Constraint("length_words", max=5)], max_steps=4)
    with pytest.raises(L3MConfigError, match="^constraints: the checkpoint was trained with"):
        other.train(resume_from_checkpoint=True)


# Baselines (solver "mm" / "lagged_dual"): same trainer, learned multipliers. With these settings and 60 steps, runs
# with seeds 0-3 all end with the held-out mean length <= 5 (seed 0: 2.8 for mm, 2.6 for lagged_dual, measured when it
# was named "dual"; the tightest, seed 1: 4.6 / 4.8)
# and the final estimate <= 0. Checked offline; MM oscillates around the boundary, so other seeds can end above it.
BASELINES = {"mm": dict(dual_lr=0.2), "lagged_dual": dict(dual_lr=0.2, dual_update_steps=4)}


@pytest.mark.parametrize("solver", ["mm", "lagged_dual"])
def test_baselines_satisfy_a_violated_length_constraint(tmp_path, solver):
    high = LENGTH_RANGE[1]
    trainer = _trainer(tmp_path, constraints=[Constraint("length_tokens", max=high, name="length")], solver=solver,
                       **BASELINES[solver])
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()

    values = [log["constraints/length/value"] for log in recorder.logs if "constraints/length/value" in log]
    assert values[0] > 2, f"the initial policy must violate the constraint, got C = {values[0]}"
    assert trainer.solver.lam.item() > 0  # learned: it rose from multiplier_init = 0 while violated
    final_length = _held_out_mean_length(trainer)
    assert final_length <= high, f"{solver}: held-out mean length {final_length} > {high}"
    assert trainer.solver.estimate.item() <= 0
    logged = set().union(*recorder.logs)
    assert {"constraints/length/multiplier", "constraints/length/ema", "constraints/length/satisfied_frac"} <= logged
    assert "barrier/mu" not in logged
    multipliers = [log["constraints/length/multiplier"] for log in recorder.logs
                   if "constraints/length/multiplier" in log]
    assert multipliers[0] < multipliers[-1]
    if solver == "lagged_dual":
        assert trainer.solver.iteration >= 3
        assert len(trainer.solver.history) == trainer.solver.iteration + 1
        iterations = [log["dual/iteration"] for log in recorder.logs if "dual/iteration" in log]
        assert iterations == sorted(iterations) and iterations[-1] == trainer.solver.iteration
        assert not any(key.startswith("dual/length") for log in recorder.logs for key in log)  # λ has one key


def test_mm_dual_lr_only_matters_below_the_gradient_clip(tmp_path):
    """λ scales with dual_lr (the projected update commutes with scaling), and a clipped constraint step does not
    see the scale: above the clip threshold two dual learning rates give the same run; far below it, another run."""
    constraint = [Constraint("length_tokens", min=2, max=5, name="length")]
    runs = {}
    for lr in (0.2, 20.0, 2e-4):  # built and trained in turn: the Trainer seeds the RNGs when it is built
        runs[lr] = _trainer(tmp_path / str(lr), constraints=constraint, max_steps=16, solver="mm", dual_lr=lr)
        runs[lr].train()
    torch.testing.assert_close(runs[20.0].solver.lam, 100 * runs[0.2].solver.lam)
    assert runs[0.2].solver.lam.max() > 0
    weights = {lr: torch.cat([p.detach().flatten() for p in t.model.parameters()]) for lr, t in runs.items()}
    assert (weights[0.2] - weights[20.0]).abs().max() < 1e-5
    assert (weights[0.2] - weights[2e-4]).abs().max() > 1e-3


def test_sft_solver_ignores_the_constraints(tmp_path):
    trainer = _trainer(tmp_path, constraints=[Constraint("length_tokens", max=5, name="length")], solver="sft",
                       max_steps=6)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.bounds == []
    steps = [log for log in recorder.logs if "step/constraint" in log]
    assert steps and all(log["step/constraint"] == 0.0 for log in steps)
    logged = set().union(*recorder.logs)
    assert "objective/loss" in logged
    assert not [key for key in logged if key.split("/")[0] in ("constraints", "rewards", "completions", "barrier")]


def test_resume_of_an_mm_run_restores_the_multipliers(tmp_path):
    constraint = [Constraint("length_tokens", max=5, name="length")]
    straight = _trainer(tmp_path / "straight", constraints=constraint, max_steps=16, solver="mm", dual_lr=0.2)
    straight.train()

    first = _trainer(tmp_path / "resumed", constraints=constraint, max_steps=16, save_strategy="steps", save_steps=8,
                     solver="mm", dual_lr=0.2)
    first.train()
    checkpoint = os.path.join(tmp_path / "resumed" / "run", "checkpoint-8")
    with open(os.path.join(checkpoint, SOLVER_STATE_NAME)) as f:
        saved = json.load(f)
    assert saved["solver"] == "mm" and saved["global_step"] == 8
    assert saved["multipliers"]["num_updates"] > 0 and saved["multipliers"]["multipliers"][0] > 0

    resumed = _trainer(tmp_path / "resumed", constraints=constraint, max_steps=16, save_strategy="steps",
                       save_steps=8, solver="mm", dual_lr=0.2)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.solver.state_dict() == straight.solver.state_dict()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # bit-for-bit on CPU

    other = _trainer(tmp_path / "resumed", constraints=constraint, max_steps=16)  # solver l3m
    with pytest.raises(L3MConfigError, match="^solver: the checkpoint was trained with solver 'mm', not 'l3m'"):
        other.train(resume_from_checkpoint=checkpoint)


def test_a_checkpoint_saved_under_the_old_name_dual_resumes_as_lagged_dual(tmp_path):
    """Checkpoints written before the rename record solver "dual" in l3m_state.json: they resume under
    "lagged_dual" (the same solver and state), and are refused by any other solver under the new name."""
    constraint = [Constraint("length_tokens", max=5, name="length")]
    settings = dict(constraints=constraint, max_steps=8, solver="lagged_dual", dual_lr=0.2, dual_update_steps=2)
    straight = _trainer(tmp_path / "straight", **settings)
    straight.train()

    first = _trainer(tmp_path / "resumed", save_strategy="steps", save_steps=4, **settings)
    first.train()
    checkpoint = os.path.join(tmp_path / "resumed" / "run", "checkpoint-4")
    path = os.path.join(checkpoint, SOLVER_STATE_NAME)
    with open(path) as f:
        saved = json.load(f)
    assert saved["solver"] == "lagged_dual" and saved["multipliers"]["history"]
    with open(path, "w") as f:
        json.dump({**saved, "solver": "dual"}, f)  # as the old code saved it

    resumed = _trainer(tmp_path / "resumed", save_strategy="steps", save_steps=4, **settings)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.solver.state_dict() == straight.solver.state_dict()

    other = _trainer(tmp_path / "resumed", constraints=constraint, max_steps=8, solver="mm")
    with pytest.raises(L3MConfigError,
                       match="^solver: the checkpoint was trained with solver 'lagged_dual', not 'mm'"):
        other.train(resume_from_checkpoint=checkpoint)


def test_the_per_token_baseline_gets_each_responses_normalizer(tmp_path, monkeypatch):
    """reinforce_baseline: leave_one_out_per_token needs |y|, the length that normalizes each response's
    log-likelihood (its completion-mask count, the end-of-turn token included)."""
    import l3m.training.trainer as trainer_module

    seen = []

    def recording(violations, multipliers, baseline, group_size, lengths):
        seen.append((baseline, lengths.clone()))
        return trainer_module_constraint_advantages(violations, multipliers, baseline, group_size, lengths)

    trainer_module_constraint_advantages = trainer_module.constraint_advantages
    monkeypatch.setattr(trainer_module, "constraint_advantages", recording)
    original_logps = trainer_module.completion_logps
    masks = []
    monkeypatch.setattr(trainer_module, "completion_logps",
                        lambda model, completions, **kwargs: masks.append(completions.completion_mask) or
                        original_logps(model, completions, **kwargs))
    trainer = make_trainer(tmp_path, [Constraint("length_tokens", min=2, max=5, name="length")], max_steps=2,
                           objective_step_probability=0.0, reinforce_baseline="leave_one_out_per_token")
    trainer.train()
    assert [b for b, _ in seen] == ["leave_one_out_per_token"] * 2
    for (_, lengths), mask in zip(seen, masks):
        assert torch.equal(lengths, mask.sum(dim=1))
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_the_constraint_step_scores_its_samples_at_the_sampling_temperature(tmp_path, monkeypatch, temperature):
    """The log-probs whose gradient the REINFORCE step takes are log_softmax(logits / T) at the sampled tokens, T the
    temperature the responses were sampled at (at T = 1: the values the trainer computed before it passed T on)."""
    import l3m.training.trainer as trainer_module
    from fixtures.scoring import brute_force_logps

    checked = []
    original_logps = trainer_module.completion_logps

    def checking(model, completions, **kwargs):
        logps = original_logps(model, completions, **kwargs)
        if temperature == 1.0:
            assert torch.equal(logps, original_logps(model, completions))  # bit for bit as before
        torch.testing.assert_close(logps.detach(), brute_force_logps(model, completions, temperature),
                                   rtol=1e-5, atol=1e-5)
        checked.append(len(logps))
        return logps

    monkeypatch.setattr(trainer_module, "completion_logps", checking)
    trainer = make_trainer(tmp_path, [Constraint("length_tokens", min=2, max=5, name="length")], max_steps=1,
                           objective_step_probability=0.0, temperature=temperature, max_completion_length=8)
    trainer.train()
    assert checked == [2 * trainer.args.per_device_train_batch_size]
