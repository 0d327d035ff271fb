"""Held-out evaluation on the tiny random Llama (CPU): the objective reward's mean and standard error against numpy,
the KL to a reference model against a brute-force computation, and ``l3m eval`` on a saved GRPO run."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset

from fixtures.tiny import WORDS, build_model, build_tokenizer, make_examples
from l3m import Constraint, L3MConfigError
from l3m import evaluation
from l3m.cli import main, parse_train_args
from l3m.config import EvalArguments
from l3m.data import prepare_dataset
from l3m.evaluation import evaluate_model, is_grpo_config
from l3m.rewards import length_chars, length_words
from l3m.sampling import eos_ids

# 12 held-out prompts in batches of 5 (the last one partial); at most 12 new tokens: the random tiny model stops
# (with its end-of-turn token) in about a quarter of its responses and hits the cap in the others.
EVAL = dict(max_new_tokens=12, batch_size=5, progress=False)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    test = prepare_dataset(Dataset.from_list(make_examples(12, 8, 12, seed=1)), tokenizer, 512, name="test")
    return build_model(tokenizer), tokenizer, test


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with Gaussian noise on every weight."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return other


def numpy_moments(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values))


def test_objective_and_constraint_means_and_standard_errors_match_numpy(tiny):
    model, tokenizer, test = tiny
    result = evaluate_model(model, tokenizer, test, constraints=[Constraint("length_tokens", max=5, name="length")],
                            objective=length_words, **EVAL)
    summary, texts = result["summary"], [s["response"] for s in result["samples"]]
    assert result["objective"] == length_words(None, texts, None)  # the reward of the sampled responses
    assert len(set(result["objective"])) > 1  # a standard error of something that varies
    mean, se = numpy_moments(result["objective"])
    assert summary["objective/mean"] == pytest.approx(mean, rel=1e-12)
    assert summary["objective/se"] == pytest.approx(se, rel=1e-12)
    assert summary["length/se"] == pytest.approx(numpy_moments(result["rewards"]["length"])[1], rel=1e-12)
    assert summary["length_se"] == pytest.approx(numpy_moments(result["lengths"])[1], rel=1e-12)
    assert "objective/length_words/mean" not in summary and "kl/mean" not in summary


def test_several_objective_rewards_are_reported_each_and_weighted(tiny):
    model, tokenizer, test = tiny
    result = evaluate_model(model, tokenizer, test, objective={"words": length_words, "chars": length_chars},
                            reward_weights=[1.0, -0.5], **EVAL)
    texts, summary = [s["response"] for s in result["samples"]], result["summary"]
    words, chars = length_words(None, texts, None), length_chars(None, texts, None)
    assert result["objective_rewards"] == {"words": words, "chars": chars}
    assert result["objective"] == pytest.approx([w - 0.5 * c for w, c in zip(words, chars)])
    assert summary["objective/mean"] == pytest.approx(numpy_moments(result["objective"])[0])
    assert (summary["objective/words/mean"], summary["objective/chars/se"]) == pytest.approx(
        (numpy_moments(words)[0], numpy_moments(chars)[1]))
    with pytest.raises(L3MConfigError, match="^reward_weights: 1 weights for 2 objective rewards"):
        evaluate_model(model, tokenizer, test, objective={"words": length_words, "chars": length_chars},
                       reward_weights=[1.0], **EVAL)


def test_task_log_ppl_by_length_groups_equals_the_whole_padded_batch_and_computes_less(tiny, monkeypatch):
    from l3m.data import CompletionCollator
    from l3m.sampling import response_nll

    model, tokenizer, test = tiny
    batch = CompletionCollator(tokenizer.pad_token_id)([test[i] for i in range(len(test))])
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.min() < lengths.max()  # rows of mixed lengths, so groups can cut padding
    with torch.no_grad():
        whole = response_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    computed = []
    monkeypatch.setattr(evaluation, "response_nll", lambda m, ids, *a: computed.append(ids.numel()) or
                        response_nll(m, ids, *a))
    with torch.no_grad():
        grouped = evaluation.task_log_ppl(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert grouped == pytest.approx(whole.tolist(), abs=1e-5)
    assert sum(computed) < batch["input_ids"].numel()


def test_the_kl_of_a_model_to_itself_is_zero(tiny):
    model, tokenizer, test = tiny
    plain = evaluate_model(model, tokenizer, test, **EVAL)
    for reference in (model, copy.deepcopy(model)):
        result = evaluate_model(model, tokenizer, test, reference_model=reference, **EVAL)
        assert result["samples"] == plain["samples"]  # the reference does not change what is sampled
        assert len(result["kl"]) == len(test) and max(abs(v) for v in result["kl"]) < 1e-6
        assert abs(result["summary"]["kl/mean"]) < 1e-6


def brute_force_kl(model, reference, prompt: list[int], generated: list[int], stop_ids: list[int]) -> float:
    """Sum over the response (up to and including its first stop token) of the exact KL between the two models'
    next-token distributions, from unpadded float64 forward passes and softmaxes written out."""
    stops = [i for i, token in enumerate(generated) if token in stop_ids]
    response = generated[: stops[0] + 1] if stops else generated
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        p_logits, q_logits = (m(input_ids=ids).logits[0].double() for m in (model, reference))
    total = 0.0
    for t in range(len(prompt) - 1, len(prompt) + len(response) - 1):  # the logits that predict response tokens
        p = torch.exp(p_logits[t] - p_logits[t].max())
        q = torch.exp(q_logits[t] - q_logits[t].max())
        p, q = p / p.sum(), q / q.sum()
        total += float((p * (p.log() - q.log())).sum())
    return total


def test_the_kl_to_a_perturbed_copy_matches_a_brute_force_computation(tiny, monkeypatch):
    model, tokenizer, test = tiny
    reference = perturbed(model)
    sampled = []

    def recording(*args, **kwargs):
        sampled.append(completions := sample_completions(*args, **kwargs))
        return completions

    sample_completions = evaluation.sample_completions
    monkeypatch.setattr(evaluation, "sample_completions", recording)
    result = evaluate_model(model, tokenizer, test, reference_model=reference, **EVAL)
    assert min(result["kl"]) > 0.1

    stop_ids = eos_ids(tokenizer, model)
    double_model, double_reference = copy.deepcopy(model).double(), copy.deepcopy(reference).double()
    expected, stopped = [], 0
    for completions in sampled:
        prompt_length = completions.prompt_mask.shape[1]
        for row, prompt_mask in zip(completions.sequences.tolist(), completions.prompt_mask.tolist()):
            prompt = [token for token, real in zip(row[:prompt_length], prompt_mask) if real]
            generated = row[prompt_length:]
            stopped += any(token in stop_ids for token in generated)
            expected.append(brute_force_kl(double_model, double_reference, prompt, generated, stop_ids))
    assert 0 < stopped < len(test)  # responses that end with the end-of-turn token and responses cut at the cap
    assert result["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    mean, se = numpy_moments(expected)
    assert (result["summary"]["kl/mean"], result["summary"]["kl/se"]) == pytest.approx((mean, se), rel=1e-4)


def test_the_kl_to_the_base_of_a_lora_model_disables_the_adapter(tiny):
    peft = pytest.importorskip("peft")
    base, tokenizer, test = tiny
    config = peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(base), config)  # random A and B: the adapter changes the model
    with_base = evaluate_model(lora, tokenizer, test, reference_model="base", **EVAL)
    with_copy = evaluate_model(lora, tokenizer, test, reference_model=base, **EVAL)
    assert min(with_base["kl"]) > 0
    assert with_base["kl"] == pytest.approx(with_copy["kl"], rel=1e-4, abs=1e-6)
    with pytest.raises(L3MConfigError, match="^reference_model: 'base' disables the model's LoRA adapter"):
        evaluate_model(base, tokenizer, test, reference_model="base", **EVAL)


def test_a_reference_with_another_vocabulary_is_refused(tiny):
    model, tokenizer, test = tiny
    other = build_model(build_tokenizer(words=WORDS + ["extra"]))
    with pytest.raises(L3MConfigError, match="^reference: it has 51 output tokens, the model 50"):
        evaluate_model(model, tokenizer, test, reference_model=other, **EVAL)


# ---- `l3m eval` on a saved GRPO run (a LoRA adapter), with --reference ----

@pytest.mark.parametrize("name, grpo", [("grpo_length.yaml", True), ("length_range.yaml", False)])
def test_l3m_eval_reads_grpo_and_train_configs(name, grpo):
    """A config that sets ``reward`` is read with ``l3m grpo``'s fields, and its objective resolves."""
    argv = ["--config", os.path.join(EXAMPLES, name), "--model", "outputs/x", "--reference", "base"]
    assert is_grpo_config(argv) == grpo
    _, training_args, _, eval_args = parse_train_args(argv, EvalArguments, grpo=grpo)
    assert eval_args.reference == "base"
    objective = evaluation.resolve_objective(training_args.reward) if grpo else None
    assert objective == ({"length_words": length_words} if grpo else None)


@pytest.fixture(scope="module")
def grpo_run(assets, tmp_path_factory):
    """``l3m grpo`` for 2 steps with a LoRA adapter on the tiny model; returns its config and output folder."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("grpo_eval")
    config = {"model_name_or_path": assets["model"], "dataset_name": assets["data"], "test_size": 8,
              "reward": "length_words", "constraints": [{"name": "length", "reward": "length_tokens", "max": 5}],
              "use_peft": True, "lora_r": 4, "learning_rate": 0.05, "max_steps": 2, "per_device_train_batch_size": 4,
              "num_generations": 2, "max_completion_length": 8, "bf16": False, "activation_checkpointing": False,
              "output_dir": str(root / "out"), "report_to": "none", "use_cpu": True, "disable_tqdm": True}
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["grpo", "--config", str(path)]) == 0
    return {"config": str(path), "output_dir": root / "out", "root": root}


def run_eval(grpo_run, capsys, *flags) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["eval", "--config", grpo_run["config"], "--model", str(grpo_run["output_dir"]), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_l3m_eval_of_a_grpo_run_reports_the_objective_and_the_kl(grpo_run, assets, capsys):
    output = grpo_run["root"] / "eval_base.json"
    code, out, err = run_eval(grpo_run, capsys, "--reference", "base", "--output", str(output))
    assert code == 0, err
    result = json.loads(output.read_text())
    summary = result["summary"]
    assert summary["num_examples"] == 8 and "length/se" in summary
    assert result["objective"] == length_words(None, [s["response"] for s in result["samples"]], None)
    assert summary["objective/se"] == pytest.approx(numpy_moments(result["objective"])[1])
    assert summary["kl/mean"] > 0 and len(result["kl"]) == 8
    printed, _ = json.JSONDecoder().raw_decode(out)
    assert printed == summary
    assert f"objective reward: {summary['objective/mean']:.4g} ± {summary['objective/se']:.2g}" in out
    assert f"KL to the reference: {summary['kl/mean']:.4g} ± " in out and f"Wrote {output}" in out

    # the model it was trained from, loaded as a second model: the same KL as the adapter disabled
    output = grpo_run["root"] / "eval_path.json"
    code, _, err = run_eval(grpo_run, capsys, "--reference", assets["model"], "--output", str(output))
    assert code == 0, err
    assert json.loads(output.read_text())["kl"] == pytest.approx(result["kl"], rel=1e-4, abs=1e-6)


def test_l3m_eval_refuses_a_bad_reference_in_one_line(grpo_run, assets, tmp_path, capsys):
    tokenizer = build_tokenizer(words=WORDS[::-1])  # the same words under other ids
    tokenizer.save_pretrained(tmp_path / "other")
    build_model(tokenizer).save_pretrained(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--reference", str(tmp_path / "missing")], f"reference: no such folder '{tmp_path / 'missing'}'"),
        (["--reference", str(tmp_path / "empty")], f"reference: cannot load '{tmp_path / 'empty'}'"),
        (["--reference", str(tmp_path / "other")], f"reference: '{tmp_path / 'other'}' has another tokenizer"),
        (["--reference", "base", "--model", assets["model"]], "reference: 'base' is a LoRA adapter's base model"),
    ]
    for flags, prefix in cases:
        code, _, err = run_eval(grpo_run, capsys, *flags, "--output", str(tmp_path / "x.json"))
        lines = [line for line in err.splitlines() if line.startswith("l3m:")]
        assert code == 2 and "Traceback" not in err, err
        assert len(lines) == 1 and lines[0].startswith(f"l3m: error: {prefix}"), err
    assert not (tmp_path / "x.json").exists()
