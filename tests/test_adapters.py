"""LoRA adapters (peft) with gradient checkpointing through objective and constraint steps, on the tiny model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import l3m.training.trainer as trainer_module
from fixtures.tiny import build_model, build_tokenizer, make_examples
from l3m import Constraint, L3MConfig, L3MTrainer

peft = pytest.importorskip("peft")


def test_lora_with_gradient_checkpointing_trains_the_adapter_only(tmp_path, monkeypatch):
    generating_modes = []
    sample, forward = trainer_module.sample_completions, peft.PeftModelForCausalLM.forward

    def spy(model, *args, **kwargs):
        out = sample(model, *args, **kwargs)
        generating_modes.append(model.training)  # restored after generation
        return out

    def forward_spy(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # a decoding step (sampling runs under no_grad)
            generating_modes.append(("decode", self.training, kwargs.get("use_cache")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "sample_completions", spy)
    monkeypatch.setattr(peft.PeftModelForCausalLM, "forward", forward_spy)

    tokenizer = build_tokenizer()
    args = L3MConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                     lr_scheduler_type="constant", num_generations=2, max_completion_length=8, report_to=[],
                     use_cpu=True, disable_tqdm=True, activation_checkpointing=True, seed=0)
    trainer = L3MTrainer(model=build_model(tokenizer), args=args,
                         train_dataset=Dataset.from_list(make_examples(32, 8, 12)), processing_class=tokenizer,
                         constraints=[Constraint("length_tokens", max=3)],
                         peft_config=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    after = dict(trainer.model.named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not torch.equal(before[n], after[n]) for n in trainable), "every adapter weight must move"
    assert all(torch.equal(before[n], after[n]) for n in after if n not in trainable), "base weights stay frozen"
    # generation ran in eval mode (no checkpointing, KV cache on); training mode and checkpointing came back after
    decoding = [m for m in generating_modes if isinstance(m, tuple)]
    assert decoding and set(decoding) == {("decode", False, True)} and True in generating_modes
    assert trainer.model.base_model.model.is_activation_checkpointing


def test_the_log_prob_pass_runs_without_lora_dropout():
    """With lora_dropout=0.5 two log-prob passes over the same responses give the same values (with the dropout on
    they differ), with autograd on, gradient checkpointing kept, and training mode restored after."""
    from l3m.sampling import completion_logps, dropout_off, sample_completions

    tokenizer = build_tokenizer()
    model = peft.get_peft_model(build_model(tokenizer), peft.LoraConfig(
        r=4, lora_dropout=0.5, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))
    tokenizer.padding_side = "left"
    batch = tokenizer(["please say w1 w2", "count w7 w8 w9"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    completions = sample_completions(model, batch["input_ids"], batch["attention_mask"], [tokenizer.eos_token_id],
                                     tokenizer.pad_token_id, num_generations=2, max_new_tokens=6)
    model.train()
    first, second = completion_logps(model, completions), completion_logps(model, completions)
    assert first.requires_grad and torch.equal(first, second)
    with torch.no_grad():  # the same pass with the dropout on: the check above can fail
        model.train()
        noisy = [torch.nn.functional.log_softmax(model(input_ids=completions.sequences,
                                                       attention_mask=completions.attention_mask).logits, -1)
                 for _ in range(2)]
    assert not torch.equal(*noisy)
    assert all(m.training for m in model.modules())

    model.base_model.model.activation_checkpointing_enable()
    model.train()
    with dropout_off(model):
        dropouts = [m for n, m in model.named_modules() if "lora_dropout." in n]
        assert dropouts and not any(m.training for m in dropouts)
        layers = model.base_model.model.model.layers
        assert all(layer.training for layer in layers)  # their flag keeps checkpointing on
    assert all(m.training for m in model.modules())
    third = completion_logps(model, completions)
    torch.testing.assert_close(third, first, rtol=1e-5, atol=1e-6)  # the whole-sequence fallback of checkpointing
