"""ConstrainedGRPOTrainer on the tiny random Llama (CPU): the solver-weighted reward inside TRL's GRPOTrainer."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from fixtures.tiny import build_model, build_tokenizer, make_examples
from fixtures.trainers import Recorder, copy_weights, same_weights
from l3m import Constraint, L3MConfigError, L3MDataError
from l3m.rewards import length_words
from l3m.solvers import FixedSolver
from l3m.training.checkpoints import SOLVER_STATE_NAME
from l3m.training.grpo import ConstrainedGRPOTrainer, prompt_dataset
from l3m.training.grpo_config import ConstrainedGRPOConfig

# 2 prompts x 4 completions per step, at most 16 tokens: the random tiny model rambles (about 12 tokens, most
# completions hit the cap). beta=0: no reference model, as in most GRPO recipes.
GRPO_BASE = dict(use_cpu=True, report_to=[], disable_tqdm=True, seed=0, bf16=False, activation_checkpointing=False,
                 per_device_train_batch_size=8, num_generations=4, max_completion_length=16, beta=0.0,
                 learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                 scale_rewards="batch")


def first_word_is_w1(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """An objective that does not care about length: 1 when the answer starts with ``w1``. A callable objective gets
    TRL's inputs: with conversational prompts each completion is a list of messages."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(text.split()[:1] == ["w1"]) for text in texts]


def chat_prompts(n: int = 32) -> list[dict]:
    """``messages`` conversations cut to a prompt by the trainer (the trailing assistant turn is dropped)."""
    return make_examples(n, 8, 12, seed=0)


def text_prompts(n: int = 32) -> list[dict]:
    return [{"prompt": ex["prompt"]} for ex in make_examples(n, 8, 12, seed=0, fmt="prompt_completion")]


def make_grpo(tmp_path, constraints=(), reward="length_words", data=None, callbacks=(), **config):
    tokenizer = build_tokenizer()
    args = ConstrainedGRPOConfig(**{**GRPO_BASE, "output_dir": str(tmp_path / "run"), **config})
    return ConstrainedGRPOTrainer(build_model(tokenizer), reward_funcs=reward, args=args,
                                  train_dataset=Dataset.from_list(data or chat_prompts()), processing_class=tokenizer,
                                  constraints=list(constraints), callbacks=list(callbacks))


def logged(recorder: Recorder, key: str) -> list[float]:
    return [log[key] for log in recorder.logs if key in log]


def test_a_violated_length_budget_ends_satisfied_with_the_barrier(tmp_path):
    trainer = make_grpo(tmp_path, constraints=[Constraint("length_tokens", max=5, name="length")],
                        reward=first_word_is_w1, max_steps=20)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()

    values = logged(recorder, "constraints/length/value")  # C = E|y| - 5 of each step's samples
    assert len(values) == 20
    assert values[0] > 3, f"the first samples must violate the budget, got C = {values[0]}"
    assert trainer.solver.ema.item() <= 0, f"EMA of C still violated: {trainer.solver.ema.item()}"
    assert max(values[-3:]) <= 0, values
    assert logged(recorder, "constraints/length/satisfied_frac")[-1] > 0.9
    multipliers = logged(recorder, "constraints/length/multiplier")
    mus = logged(recorder, "barrier/mu")
    assert multipliers[0] == pytest.approx(1 / mus[0])  # violated: the barrier's cap 1/(k mu), k = 1
    assert logged(recorder, "constraints/length/ema") and logged(recorder, "rewards/constraint/length/mean")
    assert mus == sorted(mus, reverse=True) and mus[0] == 1.0


def test_a_confidence_raises_the_estimate_the_solver_sees_by_z_standard_errors(tmp_path):
    trainer = make_grpo(tmp_path, constraints=[Constraint("length_tokens", max=5, name="length", confidence=0.9,
                                                          margin=1)], max_steps=3)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    values, terms = logged(recorder, "constraints/length/value"), logged(recorder, "constraints/length/confidence_term")
    columns = logged(recorder, "rewards/constraint/length/mean")  # -(|y| - (5 - margin)), TRL's per-column mean
    assert len(values) == len(terms) == len(columns) == 3 and all(t > 0 for t in terms)
    for value, term, column in zip(values, terms, columns):
        assert value == pytest.approx(-column + term, abs=1e-4)
    targets = logged(recorder, "constraints/length/target")
    assert targets == pytest.approx([4 - t for t in terms], abs=1e-4)


@pytest.mark.parametrize("solver, bound", [("mm", 100.0), ("fixed", 2.0)], ids=["mm-slack", "fixed-zero"])
def test_a_constraint_that_never_binds_changes_nothing(tmp_path, solver, bound):
    """Dual ascent keeps lambda at exactly 0 while the constraint is slack (at most 16 tokens <= 100); a fixed weight
    0 ignores even a violated one: either way the run is plain GRPO, weight for weight."""
    steps, data = 4, text_prompts()
    tokenizer = build_tokenizer()
    plain = GRPOTrainer(build_model(tokenizer), reward_funcs=length_words, train_dataset=Dataset.from_list(data),
                        args=GRPOConfig(**{**GRPO_BASE, "output_dir": str(tmp_path / "plain"), "max_steps": steps}),
                        processing_class=tokenizer)
    plain.train()

    constrained = make_grpo(tmp_path, constraints=[Constraint("length_tokens", max=bound, name="length")],
                            data=data, solver=solver, dual_lr=1.0, max_steps=steps)
    recorder = Recorder()
    constrained.add_callback(recorder)
    constrained.train()
    assert logged(recorder, "constraints/length/multiplier") == [0.0] * steps
    values = logged(recorder, "constraints/length/value")
    assert all(v < 0 for v in values) if solver == "mm" else all(v > 0 for v in values)
    a, b = copy_weights(plain.model), copy_weights(constrained.model)
    assert not same_weights(a, copy_weights(build_model(tokenizer)))  # the runs trained
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


class StopAt(TrainerCallback):
    """An interruption: save a checkpoint at ``step`` and stop there."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


@pytest.mark.parametrize("solver", ["l3m", "mm"])
def test_resume_after_an_interruption_continues_the_solver_exactly(tmp_path, solver):
    constraint = [Constraint("length_tokens", min=2, max=5, name="length", confidence=0.9)]
    extra = dict(solver=solver, dual_lr=0.1, dual_ema_smoothing=0.5)  # mm's confidence term on its EMA too
    straight = make_grpo(tmp_path / "straight", constraints=constraint, max_steps=6, **extra)
    straight.train()

    first = make_grpo(tmp_path / "resumed", constraints=constraint, max_steps=6, callbacks=[StopAt(3)], **extra)
    first.train()
    assert first.state.global_step == 3
    checkpoint = os.path.join(tmp_path / "resumed" / "run", "checkpoint-3")
    with open(os.path.join(checkpoint, SOLVER_STATE_NAME)) as f:
        saved = json.load(f)
    assert saved["global_step"] == 3 and saved["solver"] == solver and saved["multipliers"]["ema"] is not None

    resumed = make_grpo(tmp_path / "resumed", constraints=constraint, max_steps=6, **extra)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.solver.state_dict() == straight.solver.state_dict()
    assert resumed.confidence.state_dict() == straight.confidence.state_dict() != first.confidence.state_dict()
    assert resumed.solver.state_dict() != first.solver.state_dict()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name  # bit-for-bit on CPU

    other = make_grpo(tmp_path / "resumed", constraints=[Constraint("length_words", max=5)], max_steps=6, **extra)
    with pytest.raises(L3MConfigError, match="^constraints: the checkpoint was trained with"):
        other.train(resume_from_checkpoint=checkpoint)


def nan_at_step_1(prompts, completions, completion_ids, trainer_state=None, **kwargs):
    bad = trainer_state is not None and trainer_state.global_step == 1
    return [math.nan if bad else float(len(ids)) for ids in completion_ids]


def test_a_nonfinite_constraint_reward_skips_the_step(tmp_path):
    trainer = make_grpo(tmp_path, constraints=[Constraint(nan_at_step_1, max=5, name="length")], max_steps=3)
    recorder = Recorder(trainer.model)
    trainer.add_callback(recorder)
    trainer.train()
    assert same_weights(recorder.weights[1], recorder.weights[2])  # step 1 (the second) skipped
    assert not same_weights(recorder.weights[0], recorder.weights[1])
    assert logged(recorder, "train/skipped_steps")[-1] == 1
    assert len(logged(recorder, "constraints/length/value")) == 2  # the skipped estimate is not folded in
    assert trainer.solver.state_dict()["ema"] is not None and math.isfinite(trainer.solver.ema.item())


def test_an_unreachable_constraint_is_reported(tmp_path, caplog):
    trainer = make_grpo(tmp_path, constraints=[Constraint("length_tokens", min=100, name="long")], max_steps=3,
                        infeasibility_patience=2)
    with caplog.at_level(logging.INFO, logger="l3m"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("Constraint long may be infeasible") for m in warnings), warnings
    assert any(m.startswith("Constraint long: POSSIBLY INFEASIBLE") for m in warnings), warnings


def test_a_satisfied_constraint_is_summarized_at_info(tmp_path, caplog):
    trainer = make_grpo(tmp_path, constraints=[Constraint("length_tokens", max=100, name="short")], max_steps=1)
    with caplog.at_level(logging.INFO, logger="l3m"):
        trainer.train()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("Constraint short:")]
    assert record.levelno == logging.INFO and "satisfied over the last " in record.getMessage()


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(L3MConfigError, match="^solver: must be one of l3m, mm, lagged_dual, fixed, got 'sft'"):
        ConstrainedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, solver="sft")
    with pytest.raises(L3MConfigError, match="^multi_objective_aggregation: must be 'sum_then_normalize'"):
        ConstrainedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(L3MConfigError, match=r"^constraints\[0\]: missing 'reward'"):
        ConstrainedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, constraints="[{max: 5}]")
    with pytest.raises(L3MConfigError, match="^reward: required"):
        make_grpo(tmp_path, reward=None)
    with pytest.raises(L3MConfigError, match="^reward: unknown reward 'lenght'"):
        make_grpo(tmp_path, reward="lenght")
    with pytest.raises(L3MConfigError, match="^reward_weights: 2 weights for 1 objective rewards"):
        make_grpo(tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(L3MDataError, match=r"^train_dataset: the train split has columns \['text'\]"):
        make_grpo(tmp_path, data=[{"text": "w1"}])
    with pytest.raises(L3MConfigError, match="^mu_init: expected a finite number, got nan$"):
        ConstrainedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, mu_init=float("nan"))


def test_prompt_datasets():
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    (prompt,) = prompt_dataset(Dataset.from_list(rows))["prompt"]
    assert [m["content"] for m in prompt] == ["a", "b", "c"]
    with pytest.raises(L3MDataError, match="no user turn"):
        prompt_dataset(Dataset.from_list([{"messages": [{"role": "assistant", "content": "b"}]}]))
    text = Dataset.from_list([{"prompt": "w1 w2"}])
    assert prompt_dataset(text) is text


def test_fixed_solver():
    solver = FixedSolver(0.5)
    assert solver.multipliers(0, 10, torch.tensor([3.0, -1.0])).tolist() == [0.5, 0.5]
    solver.update_(torch.tensor([3.0, -1.0]))
    solver.update_(torch.tensor([1.0, -1.0]))
    assert solver.multipliers(9, 10, torch.tensor([9.0, 9.0])).tolist() == [0.5, 0.5]  # never moves
    assert solver.estimate.tolist() == pytest.approx([2.8, -1.0])  # EMA 0.1, logged only
    restored = FixedSolver(0.5)
    restored.load_state_dict(solver.state_dict())
    assert restored.state_dict() == solver.state_dict()
    assert FixedSolver([1.0, 2.0]).multipliers(0, 1, torch.zeros(2)).tolist() == [1.0, 2.0]
    with pytest.raises(L3MConfigError, match="^multiplier_init: 2 fixed weights for 3"):
        FixedSolver([1.0, 2.0]).multipliers(0, 1, torch.zeros(3))
    with pytest.raises(L3MConfigError, match="^multiplier_init: solver fixed needs finite weights >= 0"):
        FixedSolver(-1.0)
    with pytest.raises(L3MConfigError, match="^multiplier_init: the checkpoint was trained with fixed weights"):
        FixedSolver(1.0).load_state_dict(solver.state_dict())


def test_l3m_grpo_command_trains_saves_and_resumes(assets, tmp_path, capsys):
    from l3m.cli import main

    out = tmp_path / "out"
    argv = ["grpo", "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
            "--reward", "length_words", "--constraints", "[{name: length, reward: length_tokens, max: 5}]",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
            "--max_completion_length", "8", "--bf16", "false", "--activation_checkpointing", "false",
            "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out), "--report_to", "none",
            "--use_cpu", "true", "--disable_tqdm", "true"]
    assert main(argv) == 0, capsys.readouterr().err
    with open(out / "checkpoint-2" / SOLVER_STATE_NAME) as f:
        assert json.load(f)["constraints"] == ["length"]
    assert (out / "model.safetensors").exists()
    assert main([*argv, "--max_steps", "3", "--resume_from_checkpoint", "true"]) == 0  # continues from step 2
    with open(out / "checkpoint-3" / SOLVER_STATE_NAME) as f:
        assert json.load(f)["global_step"] == 3

    capsys.readouterr()
    assert main([*argv, "--solver", "sft"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("l3m: error: solver: must be one of l3m, mm, lagged_dual, fixed") and err.count("\n") == 1
