"""The policy step at fixed multipliers (l3m.alignment.policy) on the tiny random Llama (CPU): DPO on
pseudo-preference pairs raises the log-probability margin of the chosen responses over the rejected ones, relative to
the reference, and the reference DPO compares against stays pi_ref (full fine-tuning and LoRA)."""

from __future__ import annotations

import pytest
import torch
from trl import DPOConfig

from fixtures.tiny import build_model, build_tokenizer, make_examples
from fixtures.trainers import copy_weights, same_weights
from l3m.alignment import pseudo_preference_pairs
from l3m.alignment.policy import dpo_policy_step, preference_dataset, sequence_logps
from l3m.data import left_pad
from l3m.errors import L3MConfigError
from l3m.rewards import length_tokens
from l3m.sampling import eos_ids, sample_completions

BETA = 0.5
LAM = 2.0


def dpo_args(tmp_path, **overrides) -> DPOConfig:
    return DPOConfig(**{**dict(output_dir=str(tmp_path / "dpo"), use_cpu=True, report_to=[], disable_tqdm=True,
                               bf16=False, activation_checkpointing=False, per_device_train_batch_size=8, max_steps=8,
                               learning_rate=1e-3, lr_scheduler_type="constant", beta=BETA, save_strategy="no",
                               logging_steps=1, seed=0), **overrides})


def scored_pairs(model, tokenizer, num_prompts: int = 8, n: int = 4):
    """Sample ``n`` responses to each of ``num_prompts`` chat prompts, score s = r + LAM * g (r: fewer tokens,
    g: mentions w1) and label one pair per two responses. Returns ``(dataset, completions, chosen, rejected)``
    with chosen/rejected as flat indices into the completions."""
    prompts = [example["messages"][:1] for example in make_examples(num_prompts, 8, 12, seed=0)]
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids, mask = left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], tokenizer.pad_token_id)
    torch.manual_seed(0)
    completions = sample_completions(model, ids, mask, eos_ids(tokenizer, model), tokenizer.pad_token_id,
                                     num_generations=n, max_new_tokens=6, top_p=1.0)
    responses = tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
    r = -torch.tensor(length_tokens(texts, responses, completions.completion_ids)).reshape(num_prompts, n)
    g = torch.tensor([float("w1" in text.split()) for text in responses]).reshape(num_prompts, n)
    chosen, rejected = pseudo_preference_pairs(r + LAM * g, BETA, torch.Generator().manual_seed(0))
    grouped = [responses[i * n:(i + 1) * n] for i in range(num_prompts)]
    offsets = (torch.arange(num_prompts) * n).unsqueeze(1)
    return preference_dataset(prompts, grouped, chosen, rejected), completions, chosen + offsets, rejected + offsets


def margins(logps: torch.Tensor, ref_logps: torch.Tensor, chosen, rejected) -> torch.Tensor:
    """DPO's implicit reward margin per pair: beta (log pi/pi_ref (chosen) - log pi/pi_ref (rejected))."""
    ratio = logps - ref_logps
    return BETA * (ratio[chosen.flatten()] - ratio[rejected.flatten()])


def test_the_preference_dataset_is_in_trls_conversational_format():
    chat = preference_dataset([[{"role": "user", "content": "q"}]], [["a", "b", "c"]], torch.tensor([[1]]),
                              torch.tensor([[0]]))
    assert chat[0] == {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "b"}],
                       "rejected": [{"role": "assistant", "content": "a"}]}
    text = preference_dataset(["p", "q"], [["a", "b"], ["c", "d"]], torch.tensor([[1], [0]]), torch.tensor([[0], [1]]))
    assert text[:] == {"prompt": ["p", "q"], "chosen": ["b", "c"], "rejected": ["a", "d"]}


def test_a_dpo_step_at_fixed_multipliers_raises_the_margin_of_the_chosen_responses(tmp_path):
    tokenizer = build_tokenizer()
    reference = build_model(tokenizer)
    dataset, completions, chosen, rejected = scored_pairs(reference, tokenizer)
    ref_logps = sequence_logps(reference, completions)
    weights = copy_weights(reference)
    policy = dpo_policy_step(reference, tokenizer, dataset, dpo_args(tmp_path))
    after = margins(sequence_logps(policy, completions), ref_logps, chosen, rejected)
    assert after.mean() > 0.5 and (after > 0).float().mean() > 0.8, after.tolist()
    assert same_weights(weights, copy_weights(reference)) and "forward" not in vars(reference)  # untouched
    assert torch.equal(sequence_logps(reference, completions), ref_logps)

    # a second step from the same reference (what CAID's next iteration does) trains a policy of its own
    again = dpo_policy_step(reference, tokenizer, dataset, dpo_args(tmp_path, max_steps=1))
    assert not torch.equal(sequence_logps(again, completions), ref_logps)


def test_with_lora_the_reference_is_the_base_model_with_the_adapter_disabled(tmp_path):
    from peft import LoraConfig, PeftModel

    tokenizer = build_tokenizer()
    base = build_model(tokenizer)
    dataset, completions, chosen, rejected = scored_pairs(base, tokenizer)
    ref_logps = sequence_logps(base, completions)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    policy = dpo_policy_step(base, tokenizer, dataset, dpo_args(tmp_path, learning_rate=1e-2), peft_config=lora)
    assert isinstance(policy, PeftModel)
    assert "ref" not in policy.peft_config  # TRL made no reference adapter: it disables the trained one instead
    with policy.disable_adapter():
        assert torch.allclose(sequence_logps(policy, completions), ref_logps, atol=1e-5)
    after = margins(sequence_logps(policy, completions), ref_logps, chosen, rejected)
    assert after.mean() > 0.5 and (after > 0).float().mean() > 0.8, after.tolist()
    with pytest.raises(L3MConfigError, match="PeftModel makes TRL's DPO reference a copy"):
        dpo_policy_step(policy, tokenizer, dataset, dpo_args(tmp_path))


def test_the_policy_step_refuses_other_losses(tmp_path):
    tokenizer = build_tokenizer()
    with pytest.raises(L3MConfigError, match="loss_type: must be 'sigmoid'"):
        dpo_policy_step(build_model(tokenizer), tokenizer, None, dpo_args(tmp_path, loss_type=["ipo"]))
