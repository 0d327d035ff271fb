r"""CAID, the iterative dual loop (Zhang et al. 2025, arXiv 2505.19387), as one library call: :func:`run_caid`.

1. **Warm start** (one-shot dual, E4 of :mod:`l3m.alignment.dual`): sample ``num_generations`` responses to every
   training prompt from :math:`\pi_\mathrm{ref}`, score :math:`r` and each constraint's slack :math:`g_i - b_i`,
   minimize the sample estimate of :math:`D` over :math:`0 \le \lambda \le` ``multiplier_max`` (L-BFGS-B):
   :math:`\lambda_0`.
2. **Outer iteration** *t* = 1..K (``outer_iterations``):

   - policy step (E1, E6): pseudo-preference pairs from the samples of :math:`\pi_\mathrm{ref}` (``pairs_from``
     ``reference``; ``latest``: the previous policy's), labelled by Bradley-Terry on
     :math:`s = r + \lambda_{t-1}^\top (g - b)` (the constant :math:`\lambda^\top b` cancels in a pair), DPO from
     :math:`\pi_\mathrm{ref}` with reference :math:`\pi_\mathrm{ref}` (:func:`l3m.alignment.policy.dpo_policy_step`):
     :math:`\pi_t \approx \pi_{\lambda_{t-1}}`;
   - fresh samples of :math:`\pi_t` on the training prompts, scored; their log-ratio to :math:`\pi_\mathrm{ref}`
     estimates the KL;
   - one projected dual step (E5): :math:`\lambda_t = \max(0, \lambda_{t-1} - \eta(\hat{\mathbb{E}}_{\pi_t}[g] - b))`.

**Satisfaction target.** A constraint with a ``margin`` or a ``confidence`` (l3m's constraint fields, as in training)
puts room between the training estimate and its bound: the one-shot dual and every dual step take the slack against
:math:`b_i` moved inward by the margin and by :math:`z \cdot` s.e. of that pass's estimate
(:meth:`l3m.alignment.samples.Samples.training_slack`). Held-out prompts score lower than the training prompts that
set :math:`\lambda` (docs/alignment.md); the target is how a run asks for room. The pairs are unchanged by it (a
constant shift of :math:`g` cancels within a prompt); records report the slack against :math:`b_i` itself, and the
target and confidence term beside it.

Every policy step starts from :math:`\pi_\mathrm{ref}` (a copy, or a fresh LoRA adapter on it): its target
:math:`\pi_{\lambda}` depends on :math:`\lambda` only, and TRL's reference is :math:`\pi_\mathrm{ref}` only for a fresh
adapter (:mod:`l3m.alignment.policy`).

Every iterate is recorded (``iterations.jsonl`` in ``output_dir``): iteration 0 is :math:`\pi_\mathrm{ref}` with the
one-shot solution; iteration *t* is :math:`\pi_t`, the :math:`\lambda` it was trained for, the objective, the KL and
each constraint's reward and slack (mean and standard error over prompts), whether it is met, the next
:math:`\lambda`, and the seconds its policy step and sampling pass took. ``caid_state.json`` (written last, atomically) marks the last finished iteration; a run in an
``output_dir`` that holds one resumes after it, from the saved samples (each policy is saved under
``iteration-<t>/model``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from l3m.alignment.config import CAIDConfig
from l3m.alignment.dual import (DualSolution, dual_step, pseudo_preference_pairs, solve_one_shot_dual, tilted_mean,
                                tilted_weights)
from l3m.alignment.policy import dpo_policy_step, preference_dataset, sequence_logps
from l3m.alignment.samples import Samples, mean_and_se, render_prompts, sample_and_score
from l3m.errors import L3MConfigError
from l3m.files import atomic_path, write_json, write_jsonl
from l3m.rewards import resolve_reward
from l3m.rewards.models import place_reward_models

logger = logging.getLogger(__name__)

STATE_NAME = "caid_state.json"
RECORDS_NAME = "iterations.jsonl"
SAMPLES_NAME = "samples.jsonl"


def run_caid(model, tokenizer, train_dataset, args: CAIDConfig, peft_config=None,
             reference_samples: Samples | None = None) -> list[dict]:
    r"""Run CAID on the prompts of ``train_dataset`` (a ``prompt`` or ``messages`` column) from ``model``
    (:math:`\pi_\mathrm{ref}`, left untrained) and return the record of every iterate (module docstring).

    With ``peft_config`` every policy step trains a fresh LoRA adapter on ``model`` (the reference is ``model`` with
    the adapter disabled); without, a copy of ``model`` (then two models are in memory). Resumes from
    ``args.output_dir`` when it holds a run with the same problem (reward, constraints, beta, prompts, samples).

    ``reference_samples``: a pass of ``model`` over these prompts, scored by the same objective and constraint rewards
    (:func:`l3m.alignment.samples.sample_and_score`, ``num_generations`` per prompt), to warm-start from instead of
    sampling: runs that differ only in their thresholds can share it (its slack is retaken against ``args``'
    bounds). Each record's ``seconds`` times its policy step and its sampling pass (0 for a shared pass).
    """
    prompts = render_prompts(train_dataset, tokenizer)
    objective = resolve_reward(args.reward, field="reward")
    constraints = args.parsed_constraints
    bounds = [bound for c in constraints for bound in c.bounds()]
    names = [bound.name for bound in bounds]
    zeros = torch.zeros(len(bounds), dtype=torch.float64)
    place_reward_models([objective, *(c.reward_func for c in constraints)], next(model.parameters()).device)
    sample = dict(tokenizer=tokenizer, prompts=prompts, objective=objective, constraints=constraints, bounds=bounds,
                  settings=args)
    state = _load_state(args.output_dir, _settings(args, bounds, len(prompts.ids)))
    if state is None:
        started = time.time()
        if reference_samples is None:
            torch.manual_seed(args.seed)
            samples = sample_and_score(model, **sample, description="Sampling pi_ref")
        else:
            _check_reference_samples(reference_samples, len(prompts.ids), args.num_generations)
            samples = reference_samples.with_bounds(bounds)
        seconds = {"policy_step": 0.0, "sampling": time.time() - started}
        slack, terms = samples.training_slack(bounds)
        solution = solve_one_shot_dual(samples.objective, slack, zeros, args.beta, lam_max=args.multiplier_max)
        _warn_about(solution, names)
        record = {**_record(0, None, samples, bounds, terms, args.beta, solution.lam),
                  "one_shot": _one_shot_record(solution, samples, names, args.beta), "seconds": seconds}
        state = {"settings": _settings(args, bounds, len(prompts.ids)), "completed": 0, "records": [record]}
        _save(args.output_dir, 0, samples, state)
    else:
        samples = Samples.load(_path(args.output_dir, state["completed"], SAMPLES_NAME))
    reference = samples if state["completed"] == 0 else Samples.load(_path(args.output_dir, 0, SAMPLES_NAME))
    lam = torch.tensor(list(state["records"][-1]["next_multipliers"].values()), dtype=torch.float64)
    iterations = range(state["completed"] + 1, args.outer_iterations + 1)
    for t in tqdm(iterations, desc="CAID outer iterations", disable=args.disable_tqdm):
        started = time.time()
        paired = reference if args.pairs_from == "reference" else samples
        chosen, rejected = pseudo_preference_pairs(paired.objective + paired.slack @ lam, args.beta,
                                                   torch.Generator().manual_seed(args.seed * 1_000_003 + t),
                                                   deterministic=args.deterministic_pairs)
        dataset = preference_dataset(prompts.raw, paired.responses, chosen, rejected)
        step_args = args.policy_step_config(_path(args.output_dir, t, "dpo"))
        policy = dpo_policy_step(model, tokenizer, dataset, step_args, peft_config=copy.deepcopy(peft_config))
        reference_logps = _reference_logps(policy if peft_config is not None else None, model)
        seconds = {"policy_step": time.time() - started}
        started = time.time()
        torch.manual_seed(args.seed + t)
        samples = sample_and_score(policy, **sample, description=f"Sampling pi_{t}",
                                   log_ratio=lambda c: sequence_logps(policy, c) - reference_logps(c))
        slack, terms = samples.training_slack(bounds)
        next_lam = dual_step(lam, slack.mean(dim=(0, 1)), zeros, args.dual_lr, args.multiplier_max)
        record = {**_record(t, lam, samples, bounds, terms, args.beta, next_lam),
                  "seconds": {**seconds, "sampling": time.time() - started}}
        state = {**state, "completed": t, "records": [*state["records"], record]}
        with atomic_path(_path(args.output_dir, t, "model"), directory=True) as staging:
            policy.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        _save(args.output_dir, t, samples, state)
        logger.info("CAID iteration %d: %s", t, _summary(state["records"][-1]))
        if peft_config is not None:
            model = policy.unload()  # the base model again, without LoRA layers
        lam = next_lam
    return state["records"]


def _check_reference_samples(samples: Samples, num_prompts: int, num_generations: int) -> None:
    if tuple(samples.objective.shape) != (num_prompts, num_generations):
        raise L3MConfigError(f"reference_samples: {tuple(samples.objective.shape)} responses (prompts x per prompt); "
                             f"this run has {num_prompts} prompts and num_generations={num_generations}")
    if samples.log_ratio.abs().max().item() != 0:
        raise L3MConfigError("reference_samples: not samples of pi_ref (their log-ratio to pi_ref is not 0)")


def _reference_logps(peft_policy, reference):
    """Sequence log-probs under pi_ref: the LoRA policy with its adapter disabled, or the reference model."""
    def logps(completions):
        if peft_policy is None:
            return sequence_logps(reference, completions)
        with peft_policy.disable_adapter():
            return sequence_logps(peft_policy, completions)

    return logps


def _path(output_dir: str, iteration: int, name: str) -> str:
    return os.path.join(output_dir, f"iteration-{iteration}", name)


def _settings(args: CAIDConfig, bounds, num_prompts: int) -> dict:
    """What defines the problem and its samples: a run resumes only with the same values."""
    reward = args.reward if isinstance(args.reward, (str, dict)) else getattr(args.reward, "__name__", "callable")
    targets = [[b.name, b.constraint.kind, b.sign, b.threshold]
               + ([b.constraint.margin, b.constraint.confidence] if b.constraint.has_target else []) for b in bounds]
    return {"reward": reward, "constraints": targets,
            "beta": args.beta, "num_prompts": num_prompts, "num_generations": args.num_generations,
            "max_completion_length": args.max_completion_length, "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed}


def _load_state(output_dir: str, settings: dict) -> dict | None:
    path = os.path.join(output_dir, STATE_NAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    saved = json.loads(json.dumps(settings))  # as JSON stores them (tuples become lists)
    for key, value in saved.items():
        old = state["settings"].get(key)
        if old != value:
            raise L3MConfigError(f"output_dir: {output_dir} holds a CAID run with {key}={old!r}, not {value!r}; "
                                 "resume with the same settings or choose another output_dir")
    return state


def _save(output_dir: str, iteration: int, samples: Samples, state: dict) -> None:
    """The iteration's samples, every record so far, then the state that marks the iteration finished."""
    samples.save(_path(output_dir, iteration, SAMPLES_NAME))
    write_jsonl(os.path.join(output_dir, RECORDS_NAME), state["records"])
    write_json(os.path.join(output_dir, STATE_NAME), state)


def _record(t: int, lam: torch.Tensor | None, samples: Samples, bounds, terms: torch.Tensor, beta: float,
            next_lam: torch.Tensor) -> dict:
    """The iterate's record; ``terms`` are the confidence terms of its pass (:meth:`Samples.training_slack`)."""
    names = [bound.name for bound in bounds]
    objective, kl = mean_and_se(samples.objective), mean_and_se(samples.log_ratio)
    constraints = {}
    for i, bound in enumerate(bounds):
        slack = mean_and_se(samples.slack[..., i])
        constraints[bound.name] = {"reward": mean_and_se(samples.rewards[bound.constraint.name]), "slack": slack,
                                   "met": slack["mean"] >= 0}
        if bound.constraint.has_target:
            constraints[bound.name].update(target=bound.target(terms[i].item()), confidence_term=terms[i].item())
    return {"iteration": t, "policy": "reference" if t == 0 else f"iteration-{t}/model",
            "multipliers": None if lam is None else dict(zip(names, lam.tolist())),
            "objective": objective, "kl": kl, "kl_regularized_objective": objective["mean"] - beta * kl["mean"],
            "constraints": constraints, "truncated_frac": samples.truncated.double().mean().item(),
            "next_multipliers": dict(zip(names, next_lam.tolist()))}


def _one_shot_record(solution: DualSolution, samples: Samples, names: list[str], beta: float) -> dict:
    """The one-shot solution and what the reweighted samples of pi_ref predict pi_lambda0 achieves."""
    weights = tilted_weights(solution.lam, samples.objective, samples.slack, beta)
    kl = torch.xlogy(weights, weights * weights.shape[1]).sum(dim=1).mean().item()  # KL(pi_lambda0 || pi_ref)
    return {"converged": solution.converged, "kkt_residual": solution.kkt_residual,
            "iterations": solution.iterations, "at_cap": dict(zip(names, solution.at_cap)),
            "predicted_objective": tilted_mean(weights, samples.objective).item(), "predicted_kl": kl,
            "predicted_slack": dict(zip(names, tilted_mean(weights, samples.slack).tolist()))}


def _warn_about(solution: DualSolution, names: list[str]) -> None:
    capped = [name for name, cap in zip(names, solution.at_cap) if cap]
    if capped:
        logger.warning("One-shot dual: the multipliers of %s reached multiplier_max; the samples of pi_ref cannot "
                       "meet those constraints' targets (raise num_generations, check the thresholds, or lower a "
                       "margin or confidence)", ", ".join(capped))
    elif not solution.converged:
        logger.warning("One-shot dual: L-BFGS-B stopped with KKT residual %.2e (%s)", solution.kkt_residual,
                       solution.message)


def _summary(record: dict) -> str:
    parts = [f"objective {record['objective']['mean']:.4g}", f"KL {record['kl']['mean']:.4g}"]
    for name, c in record["constraints"].items():
        parts.append(f"{name} slack {c['slack']['mean']:+.4g} ({'met' if c['met'] else 'violated'}), "
                     f"lambda -> {record['next_multipliers'][name]:.4g}")
    return "; ".join(parts)
