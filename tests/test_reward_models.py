"""Learned rewards: preference data, Bradley-Terry training, saved reward models as constraint rewards (App. A.1)."""

from __future__ import annotations

import glob
import json
import os
import random

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForSequenceClassification

from fixtures.tiny import WORDS, build_model, build_tokenizer, make_examples
from l3m import Constraint, L3MConfig, L3MConfigError, L3MTrainer
from l3m.constraints import compute_rewards, parse_constraints
from l3m.data import load_task_splits
from l3m.errors import L3MDataError
from l3m.experiments.hh import ExperimentSettings
from l3m.rewards.preference import PairCollator, parse_hh_transcript, prepare_preference_dataset
from l3m.rewards.training import RewardConfig, RewardModelTrainer, save_reward_model
from l3m.rewards.models import REWARD_INFO_NAME, ModelReward

GOOD, BAD = WORDS[:10], WORDS[30:40]  # the toy preference: answers in w0-w9 beat answers in w30-w39


def _toy_pairs(n: int, seed: int, fmt: str = "conversational") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = "please say " + " ".join(rng.choice(WORDS[10:30]) for _ in range(rng.randint(1, 3)))
        chosen = " ".join(rng.choice(GOOD) for _ in range(rng.randint(2, 5)))
        rejected = " ".join(rng.choice(BAD) for _ in range(rng.randint(2, 5)))
        if fmt == "hh":
            rows.append({"chosen": f"\n\nHuman: {question}\n\nAssistant: {chosen}",
                         "rejected": f"\n\nHuman: {question}\n\nAssistant: {rejected}"})
        else:
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def _reward_config(tmp_path, **overrides) -> RewardConfig:
    values = dict(output_dir=str(tmp_path / "rm"), num_train_epochs=2, per_device_train_batch_size=16,
                  per_device_eval_batch_size=32, learning_rate=3e-3, warmup_steps=0, logging_steps=2,
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    values.update(overrides)
    return RewardConfig(**values)


def _save_causal_lm(path, seed: int = 0) -> str:
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# preference data
# ----------------------------------------------------------------------------------------------------------------


def test_hh_transcripts_split_into_prompt_and_responses(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: please say w1\n\nAssistant: w2 w3\n\nHuman: count w4\n\nAssistant: w5",
         "rejected": "\n\nHuman: please say w1\n\nAssistant: w2 w3\n\nHuman: count w4\n\nAssistant: w39 w38"},
        {"chosen": "\n\nHuman: please say w7\n\nAssistant: w8",
         "rejected": "\n\nHuman: please say w6\n\nAssistant: w9"},  # the dialogues differ: dropped
    ] + _toy_pairs(10, seed=0, fmt="hh")
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_task_splits(str(path), validation_size=2, test_size=2, seed=0)  # the hub path takes the same route
    tokenizer = build_tokenizer()
    whole = prepare_preference_dataset(Dataset.from_list(rows), tokenizer, max_length=512)
    assert len(whole) == len(rows) - 1
    first = whole[0]
    assert first["chosen"] == "w5" and first["rejected"] == "w39 w38"
    # the prompt is the dialogue up to the last assistant turn, rendered with the chat template
    assert first["prompt"] == ("<|im_start|> user: please say w1 <|im_end|> <|im_start|> assistant: w2 w3 <|im_end|> "
                               "<|im_start|> user: count w4 <|im_end|> <|im_start|> assistant: ")
    assert first["chosen_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(first["rejected_ids"], skip_special_tokens=True) == "w39 w38"
    assert sum(len(s) for s in splits.values()) == len(rows)
    assert len(prepare_preference_dataset(splits["test"], tokenizer, 512, "test")) >= 1


def test_parse_hh_transcript_and_bad_preference_data():
    assert parse_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nHuman: c") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    tokenizer = build_tokenizer()
    with pytest.raises(L3MDataError, match="needs 'chosen' and 'rejected'"):
        prepare_preference_dataset(Dataset.from_list([{"prompt": "q", "completion": "a"}]), tokenizer, 512)
    with pytest.raises(L3MDataError, match="does not start with"):
        prepare_preference_dataset(Dataset.from_list([{"chosen": "hi", "rejected": "ho"}]), tokenizer, 512)
    with pytest.raises(L3MDataError, match="max_length"):
        prepare_preference_dataset(Dataset.from_list(_toy_pairs(4, seed=0)), tokenizer, max_length=3)


def test_implicit_prompt_conversations_split_like_hh_transcripts():
    tokenizer = build_tokenizer()
    user = {"role": "user", "content": "please say w1"}
    implicit = prepare_preference_dataset(Dataset.from_list([{
        "chosen": [user, {"role": "assistant", "content": "w2"}],
        "rejected": [user, {"role": "assistant", "content": "w33"}]}]), tokenizer, 512)
    hh = prepare_preference_dataset(Dataset.from_list([{
        "chosen": "\n\nHuman: please say w1\n\nAssistant: w2",
        "rejected": "\n\nHuman: please say w1\n\nAssistant: w33"}]), tokenizer, 512)
    assert implicit[0] == hh[0]
    assert implicit[0]["prompt"] == "<|im_start|> user: please say w1 <|im_end|> <|im_start|> assistant: "


def test_standard_string_pairs_are_used_as_they_are():
    tokenizer = build_tokenizer()
    data = prepare_preference_dataset(Dataset.from_list([{"prompt": "please say w1", "chosen": "w2",
                                                          "rejected": "w33"}]), tokenizer, 512)
    assert data[0]["prompt"] == "please say w1"
    batch = PairCollator(tokenizer.pad_token_id)([data[0]])
    assert batch["input_ids"].shape[0] == 2  # chosen then rejected
    assert (batch["labels"][0] != -100).sum() == 2  # "w2" + EOS


# ----------------------------------------------------------------------------------------------------------------
# Bradley-Terry training
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_lm_reward(tmp_path_factory):
    """A tiny LM reward trained on the toy preference; returns (trainer, saved folder, accuracy before)."""
    tmp_path = tmp_path_factory.mktemp("lm_reward")
    tokenizer = build_tokenizer()
    trainer = RewardModelTrainer(model=build_model(tokenizer), args=_reward_config(tmp_path),
                                 train_dataset=Dataset.from_list(_toy_pairs(160, seed=0)),
                                 eval_dataset=Dataset.from_list(_toy_pairs(48, seed=1)), processing_class=tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    folder = str(tmp_path / "saved")
    save_reward_model(trainer, folder, {"eval_accuracy": after["eval_accuracy"]})
    return trainer, folder, before, after


def test_bradley_terry_loss_decreases_and_accuracy_beats_chance(trained_lm_reward):
    trainer, _, before, after = trained_lm_reward
    assert before["eval_accuracy"] < 0.8, "the untrained reward must not already separate the toy preference"
    assert after["eval_accuracy"] >= 0.95
    assert after["eval_loss"] < before["eval_loss"] - 0.2
    train_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert train_losses[-1] < train_losses[0]
    # held-out evaluation every 10% of an epoch: 160 pairs / 16 = 10 steps per epoch, so one evaluation per step
    evaluations = [log["step"] for log in trainer.state.log_history if "eval_accuracy" in log]
    assert trainer.args.eval_steps == 1 and len(evaluations) >= 20
    assert trainer.state.best_metric == max(log["eval_accuracy"] for log in trainer.state.log_history
                                            if "eval_accuracy" in log and log["step"] > 0)


def test_saved_lm_reward_scores_like_the_trainer(trained_lm_reward):
    trainer, folder, _, _ = trained_lm_reward
    info = json.load(open(os.path.join(folder, REWARD_INFO_NAME)))
    assert info["type"] == "lm" and info["normalization"] == "length"
    pairs = trainer.eval_dataset.select(range(12))
    in_loop = trainer.predict(pairs).predictions  # (12, 2) chosen, rejected
    (constraint,) = parse_constraints([{"name": "helpful", "reward": {"path": folder}, "min": -3}])
    reward = constraint.reward_func
    assert isinstance(reward, ModelReward) and reward.type == "lm"
    prompts = list(pairs["prompt"]) * 2
    responses = list(pairs["chosen"]) + list(pairs["rejected"])
    scored = compute_rewards([constraint], prompts, responses, [[0]] * len(prompts))["helpful"]
    torch.testing.assert_close(scored, torch.tensor(in_loop.T.reshape(-1), dtype=torch.float32), atol=1e-5,
                               rtol=1e-5)
    # and it is the mean token log-likelihood of the response, EOS included
    tokenizer = trainer.processing_class
    ids = tokenizer(pairs[0]["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(pairs[0]["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = reward.model(torch.tensor([ids + response])).logits[0, len(ids) - 1:-1]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(response)), torch.tensor(response)].mean()
    assert scored[0].item() == pytest.approx(expected.item(), abs=1e-5)
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())


def test_seqcls_reward_trains_and_loads(tmp_path):
    tokenizer = build_tokenizer()
    causal = build_model(tokenizer)
    config = causal.config
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    trainer = RewardModelTrainer(model=model, args=_reward_config(tmp_path, reward_type="seqcls", num_train_epochs=3),
                                 train_dataset=Dataset.from_list(_toy_pairs(160, seed=0)),
                                 eval_dataset=Dataset.from_list(_toy_pairs(48, seed=1)), processing_class=tokenizer)
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    assert accuracy >= 0.9
    folder = str(tmp_path / "saved")
    save_reward_model(trainer, folder)
    reward = ModelReward(folder)  # the type comes from l3m_reward.json
    assert reward.type == "seqcls"
    pairs = trainer.eval_dataset
    chosen = reward(list(pairs["prompt"]), list(pairs["chosen"]))
    rejected = reward(list(pairs["prompt"]), list(pairs["rejected"]))
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(chosen) == pytest.approx(accuracy, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# reward references: models, callables, errors
# ----------------------------------------------------------------------------------------------------------------


def test_a_reward_model_constrains_an_l3m_run(tmp_path):
    folder = _save_causal_lm(tmp_path / "rm", seed=3)
    tokenizer = build_tokenizer()
    args = L3MConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                     num_generations=2, max_completion_length=6, objective_step_probability=0.0, report_to=[],
                     use_cpu=True, disable_tqdm=True, logging_steps=1,
                     constraints=[{"name": "rm", "reward": {"type": "lm", "path": folder, "batch_size": 3},
                                   "min": -1.0}])
    trainer = L3MTrainer(model=build_model(tokenizer), args=args,
                         train_dataset=Dataset.from_list(make_examples(16, 2, 4)), processing_class=tokenizer)
    reward = trainer.constraints[0].reward_func
    trainer.train()
    assert reward.model is not None and reward.device == trainer.accelerator.device
    logged = [log for log in trainer.state.log_history if "rewards/rm/mean" in log]
    assert logged and all(log["rewards/rm/mean"] < 0 for log in logged)  # a mean log-likelihood
    # the reward model was not trained: its weights equal the saved ones
    saved = ModelReward(folder)
    saved.load()
    for (name, p), q in zip(reward.model.named_parameters(), saved.model.parameters()):
        assert torch.equal(p, q), name


def test_a_callable_reward_from_yaml_gets_trl_arguments(tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "CALLS = []\n"
        "def polite(prompts, completions, completion_ids, **kwargs):\n"
        "    CALLS.append(sorted(kwargs))\n"
        "    return [float('w1' in c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = L3MConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                     num_generations=2, max_completion_length=4, objective_step_probability=0.0, report_to=[],
                     use_cpu=True, disable_tqdm=True, constraints="[{reward: 'my_rewards:polite', min: 0.5}]")
    tokenizer = build_tokenizer()
    trainer = L3MTrainer(model=build_model(tokenizer), args=args,
                         train_dataset=Dataset.from_list(make_examples(8, 2, 4)), processing_class=tokenizer)
    trainer.train()
    import my_rewards

    assert my_rewards.CALLS == [["trainer_state"]]
    assert trainer.constraints[0].name == "my_rewards:polite"


@pytest.mark.parametrize("spec, message", [
    ({"type": "lm", "path": "/nonexistent/rm"}, r"constraints\[rm\]\.reward\.path: no such folder '/nonexistent/rm'"),
    ({"type": "ppo", "path": "."}, r"\.type: must be one of lm, seqcls, got 'ppo'"),
    ({"model": "x"}, r"unknown key\(s\) \['model'\]"),
    ({"type": "lm"}, r"needs a 'path'"),
    ({"path": "x", "batch_size": 0}, r"batch_size: must be an integer >= 1"),
])
def test_bad_reward_model_references_fail_early(spec, message):
    with pytest.raises(L3MConfigError, match=message):
        Constraint(reward=spec, min=0, name="rm")


def test_reward_model_heads_are_checked(tmp_path):
    causal = _save_causal_lm(tmp_path / "causal")
    with pytest.raises(L3MConfigError, match=r"has no ForSequenceClassification head .*use type: lm"):
        Constraint(reward={"type": "seqcls", "path": causal}, min=0, name="rm")
    assert Constraint(reward={"path": causal}, min=0).reward_func.type == "lm"  # inferred from the architecture
    assert Constraint(reward={"path": causal}, min=0).name == "causal"

    tokenizer = build_tokenizer()
    config = build_model(tokenizer).config
    config.num_labels = 3
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "three")
    with pytest.raises(L3MConfigError, match="has 3 output logits; .* exactly one"):
        Constraint(reward={"type": "seqcls", "path": str(tmp_path / "three")}, min=0, name="rm")
    with pytest.raises(L3MConfigError, match="has no ForCausalLM head"):
        Constraint(reward={"type": "lm", "path": str(tmp_path / "three")}, min=0, name="rm")
    with pytest.raises(L3MConfigError, match="is not a model folder"):
        Constraint(reward={"type": "lm", "path": str(tmp_path)}, min=0, name="rm")


def test_a_reward_model_with_another_tokenizer_scores_text(tmp_path):
    """The policy's responses are decoded and re-encoded: a reward model whose tokenizer numbers the words in the
    opposite order (its embedding rows permuted to match) gives the same rewards for the same texts."""
    folder = _save_causal_lm(tmp_path / "rm")
    original = ModelReward(folder)
    original.load()
    other_tokenizer = build_tokenizer(words=WORDS[::-1])
    old_vocab, new_vocab = original.tokenizer.get_vocab(), other_tokenizer.get_vocab()
    permuted = build_model(other_tokenizer)
    order = torch.tensor([old_vocab[token] for token, _ in sorted(new_vocab.items(), key=lambda kv: kv[1])])
    state = original.model.state_dict()
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][order]
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    permuted.load_state_dict(state)
    permuted.save_pretrained(tmp_path / "other")
    other_tokenizer.save_pretrained(tmp_path / "other")
    other = ModelReward(str(tmp_path / "other"))

    policy_tokenizer = build_tokenizer()
    prompts = [policy_tokenizer.apply_chat_template([{"role": "user", "content": "please say w3 w17"}], tokenize=False,
                                                    add_generation_prompt=True)] * 3
    responses = ["w4 w5", "w39 w0 w12", "count"]
    policy_ids = [policy_tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    assert policy_ids[0] != other_tokenizer("w4 w5", add_special_tokens=False)["input_ids"]
    expected = original(prompts, responses, policy_ids)
    assert other(prompts, responses, policy_ids) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 4) for v in expected)) == 3


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------


def test_l3m_reward_train_from_yaml_on_hh_transcripts(tmp_path, capsys):
    import yaml

    from l3m.cli import main

    model_dir = _save_causal_lm(tmp_path / "base")
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _toy_pairs(200, seed=0, fmt="hh")))
    output_dir = tmp_path / "rm"
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump(dict(
        model_name_or_path=model_dir, dataset_name=str(data), validation_size=24, test_size=32, reward_type="lm",
        num_train_epochs=1, per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=0, use_cpu=True,
        report_to="none", disable_tqdm=True, output_dir=str(output_dir))))
    assert main(["reward", "train", "--config", str(config)]) == 0
    info = json.load(open(output_dir / REWARD_INFO_NAME))
    metrics = info["metrics"]
    assert metrics["num_pairs"] == {"train": 144, "validation": 24, "test": 32}
    assert metrics["test_accuracy"] > 0.9 > metrics["test_accuracy_before"]
    assert metrics["test_loss"] < metrics["test_loss_before"]
    assert "reward: {path: " in capsys.readouterr().out
    (constraint,) = parse_constraints([{"reward": {"path": str(output_dir)}, "min": 0}])
    assert constraint.reward_func.type == "lm" and constraint.name == "rm"

    assert main(["reward", "train", "--config", str(config), "--reward_type", "ppo"]) == 2
    assert "l3m: error: reward_type: must be one of lm, seqcls, got 'ppo'" in capsys.readouterr().err
    assert main(["reward", "train", "--config", str(config), "--dataset_name", str(tmp_path / "rm.yaml")]) == 2
    assert "dataset_name: expected .json, .jsonl or .parquet files" in capsys.readouterr().err


def test_l3m_train_with_a_missing_reward_model_fails_in_one_line(tmp_path, capsys):
    from l3m.cli import main

    assert main(["train", "--output_dir", str(tmp_path / "out"), "--constraints",
                 "[{name: helpful, reward: {type: lm, path: /nonexistent/rm}, min: 0}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "l3m: error: constraints[helpful].reward.path: no such folder '/nonexistent/rm'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "examples", "configs", "reward", "*.yaml"))), ids=os.path.basename)
def test_example_reward_configs_parse(path):
    from l3m.config import ModelConfig
    from l3m.parsing import L3MParser
    from l3m.rewards.training import RewardScriptArguments

    script_args, args, model_args = L3MParser((RewardScriptArguments, RewardConfig, ModelConfig)).parse(
        ["--config", path])
    assert model_args.model_name_or_path == "demo" and script_args.dataset_name.startswith("standin-")
    assert args.reward_type == "lm" and args.load_best_model_at_end and args.output_dir.startswith("outputs/rm_")
    with open(path, encoding="utf-8") as f:
        assert f.readline().startswith("# Launch:")


def test_the_fig3_experiment_runs_quick_on_tiny_models(tmp_path, capsys, monkeypatch):
    """With the default satisfaction target (confidence 0.975 and the held-out mean's error): constrained runs train
    against it, every evaluation judges the bounds."""
    import l3m.experiments.hh as hh
    from l3m.cli import main

    calls = []

    def spy(*args, constraints=None, eval_constraints=None, **kwargs):
        calls.append(([(c.confidence, c.heldout_size) for c in constraints or []],
                      [(c.confidence, c.heldout_size) for c in eval_constraints]))
        return train_and_evaluate(*args, constraints=constraints, eval_constraints=eval_constraints, **kwargs)

    train_and_evaluate = hh.train_and_evaluate
    monkeypatch.setattr(hh, "train_and_evaluate", spy)

    model_dir = _save_causal_lm(tmp_path / "policy")
    helpful, harmless = _save_causal_lm(tmp_path / "rm_helpful", seed=1), _save_causal_lm(tmp_path / "rm_harmless",
                                                                                              seed=2)
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_examples(64, 2, 5, seed=0)))
    out = tmp_path / "hh"
    assert main(["reward", "experiment", "--quick", "--model_name_or_path", model_dir, "--dataset_name", str(data),
                 "--helpful_rm", helpful, "--harmless_rm", harmless, "--output_dir", str(out),
                 "--max_completion_length", "6", "--learning_rate", "1e-3", "--num_proc", "1"]) == 0
    judged, target = [(None, None)] * 2, [(0.975, 8)] * 2  # --quick evaluates on 8 held-out prompts
    assert calls == [([], judged), ([], judged), (target, judged), (target, judged)]
    results = json.load(open(out / "results.json"))
    assert results["complete"] and not os.path.exists(out / "results.json.tmp")
    assert [r["label"].split(" ")[0] for r in results["runs"]] == ["initial", "SFT", "L3M", "MM"]
    (point,) = results["points"]
    sft = results["runs"][1]["summary"]
    quick = ExperimentSettings(quick=True)
    offset = (*quick.helpful_offsets, *quick.harmless_offsets)
    assert point == pytest.approx([sft["helpful/mean"] + offset[0], sft["harmless/mean"] + offset[1]], abs=1e-3)
    for run in results["runs"]:
        assert run["summary"]["num_examples"] == 8 and run["summary"]["helpful/mean"] < 0
        assert (run["satisfied"] is None) == (run["constraint"] is None)
    assert (out / "fig3_rewards.png").stat().st_size > 10_000
    assert "task log-ppl mean ± std" in capsys.readouterr().out


def test_the_fig3_experiment_side_by_side_matches_one_after_another(tmp_path, capsys):
    """num_proc 2: the initial model and SFT side by side, then the constrained runs; the same records, to the bit, as
    one run after another at the workers' thread count, in the same order."""
    from l3m.cli import main
    from l3m.experiments.parallel import plan_processes

    model_dir = _save_causal_lm(tmp_path / "policy")
    helpful, harmless = _save_causal_lm(tmp_path / "rm_helpful", seed=1), _save_causal_lm(tmp_path / "rm_harmless",
                                                                                              seed=2)
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_examples(64, 2, 5, seed=0)))
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(plan_processes(2, 2)[1])  # the workers' thread count (both phases run two models)
    try:
        for num_proc in (2, 1):
            out = tmp_path / f"hh{num_proc}"
            assert main(["reward", "experiment", "--quick", "--model_name_or_path", model_dir, "--dataset_name",
                         str(data), "--helpful_rm", helpful, "--harmless_rm", harmless, "--output_dir", str(out),
                         "--max_completion_length", "6", "--learning_rate", "1e-3", "--num_proc", str(num_proc)]) == 0
            assert ("2 models, 2 at a time" in capsys.readouterr().out) == (num_proc == 2)
            with open(out / "results.json", encoding="utf-8") as f:
                results = json.load(f)
            assert results["complete"]
            runs[num_proc] = [{k: v for k, v in r.items() if k != "train_seconds"} for r in results["runs"]]
    finally:
        torch.set_num_threads(threads)
    assert [r["label"].split(" ")[0] for r in runs[2]] == ["initial", "SFT", "L3M", "MM"]
    assert (tmp_path / "hh2" / "sft" / "output.log").is_file()
    assert runs[2] == runs[1]


@pytest.mark.parametrize("flags, message", [
    (["--solvers", "l3m", "ppo"], "solvers: expected a list of l3m, mm, lagged_dual, got ['l3m', 'ppo']"),
    (["--helpful_offsets", "0.1", "0.2"], "harmless_offsets: one per constraint point, as helpful_offsets; got "
                                          "[0.1, 0.2] and [0.3, 0.1, 0.6]"),
    (["--harmless_offsets", "0.1", "high"], "harmless_offsets (--harmless-offsets): invalid float value: 'high'"),
    (["--helpful_rm", "no/such/../folder"], "helpful_rm.path: no such folder 'no/such/../folder'"),
    (["--confidence", "1.5"], "confidence: expected a probability in [0.5, 1) (e.g. 0.975) or none, got 1.5"),
])
def test_the_fig3_experiment_rejects_bad_settings_before_writing_anything(tmp_path, capsys, flags, message):
    from l3m.cli import main

    out = tmp_path / "hh"
    assert main(["reward", "experiment", "--output_dir", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"l3m: error: {message}"
    assert not out.exists()


@pytest.mark.slow
def test_the_fig3_experiment_quick_on_the_demo_model(tmp_path):
    """`l3m reward experiment --quick` on the embedded default; the demo model itself serves as both (untrained) LM
    reward models, so the run needs no trained reward model."""
    from l3m.assets import demo_model_path
    from l3m.cli import main

    model = demo_model_path()
    assert main(["reward", "experiment", "--quick", "--helpful_rm", model, "--harmless_rm", model,
                 "--output_dir", str(tmp_path / "hh")]) == 0
    results = json.load(open(tmp_path / "hh" / "results.json"))
    assert len(results["runs"]) == 4 and (tmp_path / "hh" / "fig3_rewards.png").exists()
    # one reward model scored twice: the two mean rewards are equal for every model
    for run in results["runs"]:
        assert run["summary"]["helpful/mean"] == pytest.approx(run["summary"]["harmless/mean"], abs=1e-4)
