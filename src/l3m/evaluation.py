"""Held-out evaluation: task log-perplexity, the constraint rewards of sampled responses (Fig. 2/3 in numbers), and
for reward objectives the objective reward and the KL to a reference model.

- Task log-perplexity: the length-normalized NLL of each reference response (the objective of Eq. 1/3), reported
  as mean and standard deviation over examples, as in the paper's figures.
- Constraints: one response sampled per prompt (top-p, as in training), scored by every constraint's reward.
  Each one-sided bound's constraint value ``C`` is estimated as its kind defines it (:meth:`l3m.Bound.values`:
  expectation ``E[b - r]``, chance ``(1 - epsilon) - P[r >= b]``, uniform ``E[max(0, b - r)] - delta``), and the
  constraint is satisfied when every estimate is ``<= 0`` (for an expectation constraint: the mean reward lies inside
  ``[min, max]``). The fraction of single responses inside the range is reported beside it.
- Objective (GRPO, :class:`l3m.ConstrainedGRPOConfig`'s ``reward``): the same responses scored by the objective's
  reward functions, their ``reward_weights``-weighted sum reported as mean and standard error.
- KL to a reference (:func:`sequence_kl`): ``KL(pi || pi_ref)`` in nats per response, along the same responses.

Standard errors are ``std / sqrt(n)`` over the ``n`` held-out prompts (``std`` with ``n - 1``; 0 for one prompt).

Shapes: B examples per batch, L completion tokens, V vocabulary entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from l3m.constraints import Constraint, compute_rewards, score_responses
from l3m.data import CompletionCollator
from l3m.errors import L3MConfigError
from l3m.rewards import RewardFunc, resolve_reward
from l3m.rewards.models import place_reward_models
from l3m.sampling import (Completions, eos_ids, length_groups, position_ids_from, response_nll,
                          sample_completions)

BASE = "base"  # the reference that is the model itself with its LoRA adapter disabled
_REFERENCES = "give a model folder or hub id, 'demo', or 'base' (a LoRA adapter's base model)"


def task_log_ppl(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each row's task log-perplexity, :func:`l3m.sampling.response_nll` of its response tokens, with the rows run in
    groups of similar length (:func:`l3m.sampling.length_groups`), each cut to its own longest row: a batch of mixed
    lengths (right padded) does not compute its padding."""
    lengths = attention_mask.sum(dim=1)
    rows = torch.arange(len(lengths), device=lengths.device)
    nll = torch.empty(len(lengths), dtype=torch.float32, device=lengths.device)
    for group in length_groups(lengths, rows, torch.zeros_like(lengths)):
        width = int(lengths[group].max())
        nll[group] = response_nll(model, input_ids[group, :width], attention_mask[group, :width],
                                  labels[group, :width]).float()
    return nll.tolist()


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
    objective: RewardFunc | Mapping[str, RewardFunc] | None = None,
    reward_weights: Sequence[float] | None = None,
    reference_model=None,
) -> dict:
    """Evaluate ``model`` on a tokenized split (see :func:`l3m.data.prepare_dataset`), or on prompts without answers
    (:func:`l3m.data.prepare_prompts`: no task log-ppl, its summary keys None).

    Args:
        objective: the reward to maximize, called like a constraint's reward (``prompts=``, ``completions=``,
            ``completion_ids=``): one function, or ``{name: function}`` for several, whose ``reward_weights``-weighted
            sum (default weights 1, as in GRPO) is the objective.
        reward_weights: one weight per objective reward, in the mapping's order.
        reference_model: a model with the policy's vocabulary (e.g. the initial model), or ``"base"``: ``model``'s
            own base model with its LoRA adapter disabled (a peft model; no second copy). Adds the KL to it
            (:func:`sequence_kl`).

    Returns ``{"summary": {...}, "log_ppl": [...], "lengths": [...], "rewards": {name: [...]}, "samples": [...]}``,
    plus ``"objective": [...]`` (the weighted sum) and ``"objective_rewards": {name: [...]}`` with an objective, and
    ``"kl": [...]`` (nats per response) with a reference. Summary keys: ``num_examples``, ``log_ppl_mean``/``_std``,
    ``length_mean``/``_std``/``_se``, ``truncated_frac``; per constraint ``<name>/mean``/``std``/``se``,
    ``<bound>/value``, ``<name>/satisfied``, ``<name>/inside_frac``; ``objective/mean``/``std``/``se`` (and
    ``objective/<name>/mean``/``std``/``se`` per reward when there are several); ``kl/mean``/``std``/``se``.
    """
    objective, weights = weighted_objective(objective, reward_weights)
    if reference_model == BASE and not hasattr(model, "disable_adapter"):
        raise L3MConfigError("reference_model: 'base' disables the model's LoRA adapter, but the model has none; "
                             "pass the reference model itself")
    models = [model] + ([reference_model] if reference_model not in (None, BASE) else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(model.parameters()).device
    place_reward_models([c.reward_func for c in constraints] + list(objective.values()), device)
    collate = CompletionCollator(tokenizer.pad_token_id)
    stop_ids = eos_ids(tokenizer, model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same responses for the same model, whatever ran before
    answered = all(len(ids) > 0 for ids in dataset["completion_ids"])  # task data; else prompts alone
    log_ppl, lengths, samples, kl = [], [], [], []
    rewards: dict[str, list[float]] = {c.name: [] for c in constraints}
    objective_rewards: dict[str, list[float]] = {name: [] for name in objective}
    try:
        batches = range(0, len(dataset), batch_size)
        for start in tqdm(batches, desc=description, disable=not progress):
            examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(examples).items()}
            if answered:
                log_ppl += task_log_ppl(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            completions = sample_completions(
                model, batch["prompt_input_ids"], batch["prompt_attention_mask"], stop_ids=stop_ids,
                pad_token_id=tokenizer.pad_token_id, num_generations=1, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p,
            )
            texts = tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
            lengths += [len(ids) for ids in completions.completion_ids]
            inputs = (batch["prompts"], texts, completions.completion_ids)  # l3m's reward inputs
            for name, values in compute_rewards(constraints, *inputs).items():
                rewards[name] += values.tolist()
            for name, func in objective.items():
                where = f"reward[{name}]" if len(objective) > 1 else "reward"
                objective_rewards[name] += score_responses(func, where, *inputs).tolist()
            if reference_model is not None:
                kl += sequence_kl(model, reference_model, completions).tolist()
            samples += [{"prompt": p, "response": t} for p, t in zip(batch["prompts"], texts)]
    finally:
        torch.random.set_rng_state(generator_state)
        for m, mode in zip(models, modes):
            m.train(mode)
    summary = {"num_examples": len(lengths), "log_ppl_mean": _mean(log_ppl) if answered else None,
               "log_ppl_std": _std(log_ppl) if answered else None,
               "length_mean": _mean(lengths), "length_std": _std(lengths), "length_se": _se(lengths),
               "truncated_frac": _mean([float(n >= max_new_tokens) for n in lengths])}
    for c in constraints:
        values = rewards[c.name]
        summary.update(_moments(c.name, values))
        scored = torch.tensor(values, dtype=torch.float64)
        for bound in c.bounds():
            summary[f"{bound.name}/value"] = bound.values(scored).mean().item() if values else math.nan
        summary[f"{c.name}/satisfied"] = bool(values) and c.is_met_by(scored)
        summary[f"{c.name}/inside_frac"] = _mean([float(c.is_satisfied_by(v)) for v in values])
    result = {"log_ppl": log_ppl, "lengths": lengths, "rewards": rewards, "samples": samples}
    if objective:
        total = [sum(w * r for w, r in zip(weights, per_sample)) for per_sample in zip(*objective_rewards.values())]
        summary.update(_moments("objective", total))
        if len(objective) > 1:
            for name, values in objective_rewards.items():
                summary.update(_moments(f"objective/{name}", values))
        result.update(objective=total, objective_rewards=objective_rewards)
    if reference_model is not None:
        summary.update(_moments("kl", kl))
        result["kl"] = kl
    return {"summary": summary, **result}


def weighted_objective(objective: RewardFunc | Mapping[str, RewardFunc] | None,
                       reward_weights: Sequence[float] | None) -> tuple[dict[str, RewardFunc], list[float]]:
    """``({name: function}, weights)`` of an objective given as one function (named by its ``__name__``) or a
    mapping; weights default to 1 and must be one per reward."""
    if objective is None:
        objective = {}
    elif not isinstance(objective, Mapping):
        objective = {getattr(objective, "__name__", "reward"): objective}
    weights = [1.0] * len(objective) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(objective):
        raise L3MConfigError(f"reward_weights: {len(weights)} weights for {len(objective)} objective rewards; give "
                             "one weight per reward")
    return dict(objective), weights


def resolve_objective(spec) -> dict[str, RewardFunc] | None:
    """The objective of a GRPO config (``reward``: one l3m reward spec or a list of them) as ``{name: function}``,
    named as TRL names reward columns (the function's ``__name__``; a folder's name for a reward model)."""
    if spec is None:
        return None
    specs = spec if isinstance(spec, list) else [spec]
    funcs: dict[str, RewardFunc] = {}
    for i, item in enumerate(specs):
        func = resolve_reward(item, field=f"reward[{i}]" if len(specs) > 1 else "reward")
        name = getattr(func, "__name__", type(func).__name__)
        funcs[name if name not in funcs else f"{name}_{i}"] = func
    return funcs


def sequence_kl(model, reference_model, completions: Completions) -> torch.Tensor:
    r"""``(N,)`` KL of ``model`` to ``reference_model`` along each sampled response, in nats.

    For a response ``y`` to ``x``, the sum over its tokens (the end-of-turn token included when it was generated) of
    the exact KL between the two models' next-token distributions at temperature 1 (full softmax over the
    vocabulary): :math:`\sum_t \mathrm{KL}(\pi(\cdot|x, y_{<t}) \,\|\, \pi_{ref}(\cdot|x, y_{<t}))`, from one forward
    pass of each model over prompt + response. By the chain rule of the KL its mean over responses sampled from
    ``pi`` estimates the sequence-level :math:`\mathrm{KL}(\pi(\cdot|x) \| \pi_{ref}(\cdot|x))` of the temperature-1
    models (of their responses cut at the sampler's ``max_new_tokens``), with less variance than
    :math:`\log \pi(y|x) - \log \pi_{ref}(y|x)`. The prefixes ``y_{<t}`` come from the sampler: with ``top_p < 1``
    (or another temperature) the sum runs along the truncated sampler's paths, so it is the temperature-1 models' KL
    accumulated along those paths, not the sampler's own KL. ``reference_model="base"`` is ``model`` with its LoRA
    adapter disabled.
    """
    log_p = _next_token_log_probs(model, completions)
    if reference_model == BASE:
        with model.disable_adapter():
            log_q = _next_token_log_probs(model, completions)
    else:
        log_q = _next_token_log_probs(reference_model, completions).to(log_p.device)
    if log_q.shape[-1] != log_p.shape[-1]:
        raise L3MConfigError(f"reference: it has {log_q.shape[-1]} output tokens, the model {log_p.shape[-1]}; the KL "
                             "compares next-token distributions id by id, so give a reference with the model's "
                             "tokenizer (e.g. the model it was trained from)")
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)  # sum_v p_v (log p_v - log q_v)
    return (per_token * completions.completion_mask.to(per_token)).sum(dim=1)


def _next_token_log_probs(model, completions: Completions) -> torch.Tensor:
    """``(N, L, V)`` log-softmax (float32) of ``model``'s next-token distribution before each completion token."""
    device = next(model.parameters()).device
    mask = completions.attention_mask.to(device)
    num_logits = completions.completion_mask.shape[1]
    logits = model(input_ids=completions.sequences.to(device), attention_mask=mask,
                   position_ids=position_ids_from(mask), use_cache=False, logits_to_keep=num_logits + 1).logits
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _se(values: Sequence[float]) -> float:
    return _std(values) / math.sqrt(len(values)) if values else float("nan")


def _moments(name: str, values: Sequence[float]) -> dict[str, float]:
    return {f"{name}/mean": _mean(values), f"{name}/std": _std(values), f"{name}/se": _se(values)}


def is_grpo_config(argv: list[str]) -> bool:
    """Whether ``l3m eval``'s arguments configure a GRPO run (``l3m grpo``'s fields): the config file or a flag sets
    ``reward``, the objective."""
    from l3m.parsing import load_yaml_config

    path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    return "--reward" in argv or (path is not None and "reward" in load_yaml_config(path))


def format_summary(summary: dict) -> str:
    """A few lines for people: the objective and the KL, then the length and each constraint's reward (mean ± s.e.)."""
    lines = [f"{summary['num_examples']} held-out prompts, one response each (mean ± standard error):"]
    objective = [key.removesuffix("/mean") for key in summary if key.startswith("objective/") and key.endswith("/mean")]
    for name in objective:
        label = "objective reward" + name.removeprefix("objective").replace("/", " ")  # the sum, then each reward
        lines.append(f"  {label}: {summary[name + '/mean']:.4g} ± {summary[name + '/se']:.2g}")
    if "kl/mean" in summary:
        lines.append(f"  KL to the reference: {summary['kl/mean']:.4g} ± {summary['kl/se']:.2g} nats per response")
    lines.append(f"  response length: {summary['length_mean']:.4g} ± {summary['length_se']:.2g} tokens")
    for name in (key.removesuffix("/satisfied") for key in summary if key.endswith("/satisfied")):
        lines.append(f"  constraint {name}: {summary[name + '/mean']:.4g} ± {summary[name + '/se']:.2g} "
                     f"({'satisfied' if summary[name + '/satisfied'] else 'violated'})")
    return "\n".join(lines)


def evaluate_saved_model(script_args, training_args, model_args, eval_args) -> tuple[dict, str]:
    """What ``l3m eval`` does: evaluate the model saved in ``eval_args.model`` (full weights or a LoRA adapter) on
    the test split of ``script_args``' data (or on ``eval_args.prompts``, without log-ppl), under ``training_args``' constraints and sampling settings; with a GRPO
    config (:class:`l3m.ConstrainedGRPOConfig`) also its objective ``reward`` (weighted by ``reward_weights``); with
    ``eval_args.reference`` the KL to that model. The result is written to ``eval_args.output`` (default:
    ``eval_results.json`` in the model's folder). Returns ``(result, path)``."""
    import os

    from l3m.data import load_prompt_split, prepare_dataset, prepare_prompts
    from l3m.files import write_json
    from l3m.loading import load_model_and_tokenizer, load_splits, resolve_dataset_name

    grpo = hasattr(training_args, "reward")
    objective, weights = weighted_objective(resolve_objective(training_args.reward) if grpo else None,
                                            training_args.reward_weights if grpo else None)
    if grpo:
        model_args.trust_remote_code = training_args.trust_remote_code  # GRPOConfig's field, read by the loader
    reference = eval_args.reference
    if reference == BASE and not os.path.exists(os.path.join(eval_args.model, "adapter_config.json")):
        raise L3MConfigError(f"reference: 'base' is a LoRA adapter's base model, but {eval_args.model} holds full "
                             "weights (no adapter_config.json); give the path of the model it was trained from")
    if reference and (os.path.isabs(reference) or reference.startswith(".")) and not os.path.exists(reference):
        raise L3MConfigError(f"reference: no such folder {reference!r}; {_REFERENCES}")
    max_length = getattr(training_args, "max_length", math.inf)  # GRPO configs have none: nothing is dropped
    if eval_args.prompts:
        prompts = load_prompt_split(resolve_dataset_name(eval_args.prompts), None, eval_args.prompts_split, "prompts")
    else:
        test = load_splits(script_args, training_args.seed)["test"]
    model, tokenizer = load_model_and_tokenizer(model_args, path=eval_args.model)
    if reference not in (None, BASE):
        reference = load_reference(model_args, reference, tokenizer)
    if eval_args.prompts:
        test = prepare_prompts(prompts, tokenizer, max_length, training_args.seed, eval_args.prompts_split, "prompts")
    else:
        test = prepare_dataset(test, tokenizer, max_length, training_args.seed, "test")
    result = evaluate_model(model, tokenizer, test, constraints=training_args.parsed_constraints,
                            max_new_tokens=training_args.max_completion_length,
                            temperature=training_args.temperature, top_p=training_args.top_p,
                            batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed,
                            objective=objective, reward_weights=weights, reference_model=reference)
    path = eval_args.output or os.path.join(eval_args.model, "eval_results.json")
    return result, write_json(path, result)


def load_reference(model_args, name: str, tokenizer):
    """The reference model ``name`` (a folder, a hub id or ``demo``) loaded as the policy is, checked to share the
    policy's tokenizer; every failure is an :class:`L3MConfigError` naming ``reference``."""
    from l3m.loading import load_model_and_tokenizer

    try:
        model, reference_tokenizer = load_model_and_tokenizer(model_args, path=name)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = reason.partition(": ")[2] if isinstance(err, L3MConfigError) else f"cannot load {name!r} ({reason})"
        raise L3MConfigError(f"reference: {reason}; {_REFERENCES}") from err
    ours, theirs = tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    if ours != theirs:
        differ = sum(theirs.get(token) != i for token, i in ours.items())
        raise L3MConfigError(f"reference: {name!r} has another tokenizer than the model ({len(theirs)} vs {len(ours)} "
                             f"tokens, {differ} of the model's with another id or none); the KL compares next-token "
                             "distributions id by id, so give a model with the same tokenizer")
    return model
