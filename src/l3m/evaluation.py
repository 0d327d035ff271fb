"""Held-out evaluation: task log-perplexity and the constraint rewards of sampled responses (Fig. 2/3 in numbers).

- Task log-perplexity: the length-normalized NLL of each reference response (the objective of Eq. 1/3), reported
  as mean and standard deviation over examples, as in the paper's figures.
- Constraints: one response sampled per prompt (top-p, as in training), scored by every constraint's reward.
  Each one-sided bound's constraint value ``C`` is estimated as its kind defines it (:meth:`l3m.Bound.values`:
  expectation ``E[b - r]``, chance ``(1 - epsilon) - P[r >= b]``, uniform ``E[max(0, b - r)] - delta``), and the
  constraint is satisfied when every estimate is ``<= 0`` (for an expectation constraint: the mean reward lies inside
  ``[min, max]``). The fraction of single responses inside the range is reported beside it.

Shapes: B examples per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from l3m.constraints import Constraint, compute_rewards
from l3m.data import CompletionCollator
from l3m.rewards.models import place_reward_models
from l3m.sampling import eos_ids, response_nll, sample_completions


@torch.no_grad()
def evaluate_model(
    model,
    tokenizer,
    dataset,
    constraints: Sequence[Constraint] = (),
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.9,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    description: str = "Evaluating",
) -> dict:
    """Evaluate ``model`` on a tokenized split (see :func:`l3m.data.prepare_dataset`).

    Returns ``{"summary": {...}, "log_ppl": [...], "lengths": [...], "rewards": {name: [...]}, "samples": [...]}``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    place_reward_models([c.reward_func for c in constraints], device)
    collate = CompletionCollator(tokenizer.pad_token_id)
    stop_ids = eos_ids(tokenizer, model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same responses for the same model, whatever ran before
    log_ppl, lengths, samples = [], [], []
    rewards: dict[str, list[float]] = {c.name: [] for c in constraints}
    try:
        batches = range(0, len(dataset), batch_size)
        for start in tqdm(batches, desc=description, disable=not progress):
            examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(examples).items()}
            log_ppl += response_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).tolist()
            completions = sample_completions(
                model, batch["prompt_input_ids"], batch["prompt_attention_mask"], stop_ids=stop_ids,
                pad_token_id=tokenizer.pad_token_id, num_generations=1, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p,
            )
            texts = tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
            lengths += [len(ids) for ids in completions.completion_ids]
            for name, values in compute_rewards(constraints, batch["prompts"], texts,
                                                completions.completion_ids).items():
                rewards[name] += values.tolist()
            samples += [{"prompt": p, "response": t} for p, t in zip(batch["prompts"], texts)]
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    summary = {"num_examples": len(log_ppl), "log_ppl_mean": _mean(log_ppl), "log_ppl_std": _std(log_ppl),
               "length_mean": _mean(lengths), "length_std": _std(lengths),
               "truncated_frac": _mean([float(n >= max_new_tokens) for n in lengths])}
    for c in constraints:
        values = rewards[c.name]
        summary[f"{c.name}/mean"] = _mean(values)
        summary[f"{c.name}/std"] = _std(values)
        scored = torch.tensor(values, dtype=torch.float64)
        for bound in c.bounds():
            summary[f"{bound.name}/value"] = bound.values(scored).mean().item() if values else math.nan
        summary[f"{c.name}/satisfied"] = bool(values) and c.is_met_by(scored)
        summary[f"{c.name}/inside_frac"] = _mean([float(c.is_satisfied_by(v)) for v in values])
    return {"summary": summary, "log_ppl": log_ppl, "lengths": lengths, "rewards": rewards, "samples": samples}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def evaluate_saved_model(script_args, training_args, model_args, eval_args) -> tuple[dict, str]:
    """What ``l3m eval`` does: evaluate the model saved in ``eval_args.model`` (full weights or a LoRA adapter) on
    the test split of ``script_args``' data, under ``training_args``' constraints and sampling settings; the result
    is written to ``eval_args.output`` (default: ``eval_results.json`` in the model's folder). Returns
    ``(result, path)``."""
    import os

    from l3m.data import prepare_dataset
    from l3m.files import write_json
    from l3m.loading import load_model_and_tokenizer, load_splits

    splits = load_splits(script_args, training_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args, path=eval_args.model)
    test = prepare_dataset(splits["test"], tokenizer, training_args.max_length, training_args.seed, "test")
    result = evaluate_model(model, tokenizer, test, constraints=training_args.parsed_constraints,
                            max_new_tokens=training_args.max_completion_length,
                            temperature=training_args.temperature, top_p=training_args.top_p,
                            batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed)
    path = eval_args.output or os.path.join(eval_args.model, "eval_results.json")
    return result, write_json(path, result)
