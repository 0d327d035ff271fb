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
    sample, generate = trainer_module.sample_completions, peft.PeftModelForCausalLM.generate

    def spy(model, *args, **kwargs):
        out = sample(model, *args, **kwargs)
        generating_modes.append(model.training)  # restored after generation
        return out

    def generate_spy(self, *args, **kwargs):
        generating_modes.append(("generate", self.training))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "sample_completions", spy)
    monkeypatch.setattr(peft.PeftModelForCausalLM, "generate", generate_spy)

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
    assert ("generate", False) in generating_modes and True in generating_modes
    assert ("generate", True) not in generating_modes
    assert trainer.model.base_model.model.is_activation_checkpointing
