r"""The policy step at fixed multipliers: fit :math:`\pi` to :math:`\pi_\lambda` by DPO on pseudo-preference pairs.

:math:`\pi_\lambda \propto \pi_\mathrm{ref}\exp(s/\beta)` with :math:`s = r + \lambda^\top g` (E1 of
:mod:`l3m.alignment.dual`). Pairs labelled by Bradley-Terry on :math:`s/\beta`
(:func:`l3m.alignment.dual.pseudo_preference_pairs`, E6) make DPO's loss (sigmoid, the same :math:`\beta`, reference
:math:`\pi_\mathrm{ref}`) the logistic loss of a preference model whose population optimum is
:math:`\beta\log(\pi/\pi_\mathrm{ref}) = s + c(x)`, i.e. :math:`\pi = \pi_\lambda`, whatever policy drew the pairs.

The reference must be :math:`\pi_\mathrm{ref}`. How TRL's ``DPOTrainer`` (1.16) picks it, read from its code and
checked in tests/test_alignment_policy.py:

- a base model and a ``peft_config``: TRL wraps a fresh (zero) adapter and computes the reference log-probs with the
  adapter disabled, i.e. with the base model (no ``ref`` adapter is created);
- a ``PeftModel`` whose adapter was already trained: TRL copies that adapter as the reference (``ref`` adapter), so
  the reference would be the previous policy, not :math:`\pi_\mathrm{ref}`; :func:`dpo_policy_step` refuses it;
- full fine-tuning with ``ref_model=None``: TRL loads the reference from the model's ``name_or_path``, which is
  :math:`\pi_\mathrm{ref}` only if nothing trained the weights since; with ``precompute_ref_log_probs`` it computes
  the reference log-probs from the model itself before training, which is :math:`\pi_\mathrm{ref}` when the step
  starts from it, as :func:`dpo_policy_step` does. A ``ref_model`` is not handed to TRL: ``DPOTrainer`` replaces its
  models' ``forward`` in place by one that closes over the original, so a later ``copy.deepcopy`` of a model TRL
  touched runs the original's weights, not the copy's.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from datasets import Dataset

from l3m.errors import L3MConfigError
from l3m.sampling import Completions, token_logps


def preference_dataset(prompts: Sequence, responses: Sequence[Sequence[str]], chosen: torch.Tensor,
                       rejected: torch.Tensor) -> Dataset:
    """The pairs in TRL's preference format: one row ``{prompt, chosen, rejected}`` per pair.

    ``prompts[i]`` is prompt *i* as the data gives it: a conversation (a list of messages; the responses then become
    assistant turns, and TRL applies the chat template) or a text. ``responses[i][j]`` is the text of response *j*
    to it; ``chosen`` / ``rejected`` are ``(M, P)`` indices into them (:func:`l3m.alignment.pseudo_preference_pairs`).
    """
    rows = []
    for i, prompt in enumerate(prompts):
        conversational = isinstance(prompt, list)
        for c, r in zip(chosen[i].tolist(), rejected[i].tolist()):
            pair = (responses[i][c], responses[i][r])
            if conversational:
                pair = tuple([{"role": "assistant", "content": text}] for text in pair)
            rows.append({"prompt": prompt, "chosen": pair[0], "rejected": pair[1]})
    return Dataset.from_list(rows)


def dpo_policy_step(reference, tokenizer, dataset: Dataset, args, peft_config=None, callbacks=None):
    r"""Fit a policy to :math:`\pi_\lambda`, starting from :math:`\pi_\mathrm{ref}` = ``reference``, by DPO on the
    pseudo-preference ``dataset`` with TRL's ``DPOTrainer``; returns the trained policy.

    ``args`` is a ``trl.DPOConfig`` (``beta`` the problem's :math:`\beta`; ``loss_type`` must be ``sigmoid``, the loss
    whose optimum is :math:`\pi_\lambda`). ``reference`` is never trained:

    - with ``peft_config`` a fresh LoRA adapter is trained on it (the result is the ``PeftModel``; its ``unload()``
      gives ``reference`` back), and TRL's reference is ``reference`` with the adapter disabled;
    - without, a copy of ``reference`` is trained, and TRL computes the reference log-probs from the copy before its
      first step (``precompute_ref_log_probs``), so ``reference`` is never handed to TRL (whose ``DPOTrainer``
      patches its models' ``forward`` in place) and two models are in memory, not three.
    """
    from peft import PeftModel
    from trl import DPOTrainer

    if list(args.loss_type) != ["sigmoid"]:
        raise L3MConfigError(f"loss_type: must be 'sigmoid' (the DPO loss whose optimum is pi_lambda), got "
                             f"{args.loss_type}")
    if isinstance(reference, PeftModel):
        raise L3MConfigError("model: a PeftModel makes TRL's DPO reference a copy of its adapter, not pi_ref; pass "
                             "the base model and peft_config")
    if peft_config is None:
        reference = copy.deepcopy(reference)
        args = dataclasses.replace(args, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=reference, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model)


@torch.no_grad()
def sequence_logps(model, completions: Completions, batch_size: int = 16) -> torch.Tensor:
    r"""``(N,)`` log-probabilities :math:`\log\pi(y|x)` of sampled responses under ``model``: the sum over each
    completion's tokens, its end-of-turn token included (what DPO and the KL compare)."""
    was_training = model.training
    model.eval()
    try:
        out = []
        width = completions.completion_mask.shape[1]
        for start in range(0, completions.sequences.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            logps = token_logps(model, completions.sequences[rows], completions.attention_mask[rows], width)
            out.append((logps * completions.completion_mask[rows]).sum(dim=1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
