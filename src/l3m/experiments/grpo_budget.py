"""``l3m grpo-experiment``: GRPO under a length budget, with no penalty weight to tune (docs/grpo_experiment.md).

Offline, on the embedded default: GRPO (:class:`l3m.training.grpo.ConstrainedGRPOTrainer`) fine-tunes the demo
model on chatterbot prompts to maximize a length-biased relevance reward, ``relevance + 0.05 * words``
(:func:`l3m.rewards.relevance`, the stand-in's MiniLM embedding, plus a bias toward longer answers such as learned
reward models have; relevance alone is maximized by short answers that echo the question, so a budget would not
bind), subject to a length budget, mean response length ``<= budget`` tokens. Every arm has the same step budget,
seed and prompts:

- ``GRPO (no budget)``: the budget's weight fixed at 0, which trains exactly as ``trl.GRPOTrainer`` does
  (``tests/test_grpo.py``), so it shows where the lengths go when nothing holds them;
- ``fixed w``: the hand-weighted length penalty at each of ``fixed_weights`` (today's practice);
- ``l3m``: the log barrier (its weight from an EMA of the budget's value, μ decaying);
- ``mm``: dual ascent on the weight (the primal-dual / PPO-Lagrangian baseline).

Each model is evaluated on held-out prompts (one response each, sampled as in training): the objective, its
relevance part and the length (mean ± standard error), the KL to the initial model, whether the mean meets the
budget, the share of responses inside it, and the task log-perplexity of the corpus's answers. ``results.json`` is
rewritten after each arm; the figure plots the objective against the length with the budget as a line.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

from l3m.constraints import Constraint
from l3m.errors import L3MConfigError
from l3m.experiments.runner import RunSettings, format_table, mean_pm, mean_se
from l3m.files import write_json


@dataclass
class BudgetSettings(RunSettings):
    """The experiment's budget; ``quick`` shrinks it to a smoke run (2 steps, 4 held-out prompts, 8 tokens)."""

    output_dir: str = field(default="outputs/grpo_budget", metadata={"help": "Where the runs, results.json and "
                                                                             "the figure go."})
    model_name_or_path: str = field(default="demo", metadata={"help": "The policy; 'demo': the embedded model."})
    dataset_name: str = field(default="demo", metadata={"help": "Prompts: the first user turn of each `messages` "
                                                                "conversation; 'demo': the chatterbot corpus."})
    system_prompt: str = field(default="Keep answers short.", metadata={
        "help": "A system turn before every prompt ('' for none). The demo model's answers otherwise run past any "
                "CPU-sized token cap, and truncated samples all have the same length (no signal for the budget)."})
    reward: list[str] = field(default_factory=lambda: ["relevance", "length_words"], metadata={
        "help": "The objective r_0: l3m reward specs whose weighted sum (reward_weights) GRPO maximizes."})
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.05], metadata={
        "help": "One weight per objective reward: relevance in [-1, 1] plus 0.05 per word, a length bias."})
    budget: float = field(default=24.0, metadata={"help": "The length budget: mean response length <= this many "
                                                          "tokens."})
    max_steps: int = field(default=16, metadata={"help": "GRPO steps of every arm (16 fit the run in 45 minutes on "
                                                         "2 cores)."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "Completions per step (TRL's meaning): prompts per step x num_generations."})
    max_completion_length: int = field(default=48, metadata={"help": "Token cap of sampled responses."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate (all weights are trained)."})
    fixed_weights: list[float] = field(default_factory=lambda: [0.01, 0.04, 0.1], metadata={
        "help": "Weights of the fixed length penalty per token over the budget, one arm each, from too weak to too "
                "strong: the objective pays about 0.05 x 0.75 words per token for length."})
    dual_lr: float = field(default=0.002, metadata={"help": "Dual ascent's step size: lambda <- max(0, lambda + "
                                                            "dual_lr * C), C in tokens over the budget."})
    test_size: int = field(default=32, metadata={"help": "Held-out prompts every model is evaluated on."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Token cap of sampled responses in evaluation "
                                                                   "(as in training)."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: 2 steps, 4 held-out prompts, 8 tokens."})

    def __post_init__(self):
        if len(self.reward_weights) != len(self.reward):
            raise L3MConfigError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward)} "
                                 "objective rewards; give one per reward")
        if not math.isfinite(self.budget) or self.budget <= 0:
            raise L3MConfigError(f"budget: expected a positive number of tokens, got {self.budget!r}")
        if any(not math.isfinite(w) or w < 0 for w in self.fixed_weights):
            raise L3MConfigError(f"fixed_weights: expected weights >= 0, got {self.fixed_weights!r}")
        if self.quick:
            self.max_steps, self.test_size = 2, 4
            self.max_completion_length = self.eval_max_new_tokens = 8

    def arms(self) -> list[tuple[str, str | None, float]]:
        """``(label, solver, weight)`` of every arm, in the order they run; solver None: the initial model, not
        trained."""
        fixed = [(f"fixed w={w:g}", "fixed", w) for w in self.fixed_weights]
        return [("initial", None, 0.0), ("GRPO (no budget)", "fixed", 0.0), *fixed, ("l3m (barrier)", "l3m", 0.0),
                ("mm (dual ascent)", "mm", 0.0)]


def prompt_splits(settings: BudgetSettings):
    """Train prompts (``prompt``: the system turn and first user turn; ``question``: the user's text, read by
    :func:`l3m.rewards.relevance`) and the held-out split as task data (the same conversations with the system
    turn, for :func:`l3m.evaluation.evaluate_model`)."""
    from l3m.config import ScriptArguments
    from l3m.loading import load_splits

    splits = load_splits(ScriptArguments(dataset_name=settings.dataset_name, test_size=settings.test_size,
                                         validation_size=settings.test_size), settings.seed)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []

    def as_prompt(example):
        user = example["messages"][0]
        return {"prompt": [*system, user], "question": user["content"]}

    train = splits["train"].map(as_prompt, remove_columns=splits["train"].column_names, desc="Prompts")
    test = splits["test"].map(lambda example: {"messages": [*system, *example["messages"][:2]]})
    return train, test


def run_arm(settings: BudgetSettings, label: str, solver: str | None, weight: float, train_dataset, test_dataset,
            reference) -> dict:
    """Train one arm from the initial model (``solver`` None: evaluate the initial model) and evaluate it, its KL to
    ``reference`` (the initial model) included; returns its record."""
    import torch

    from l3m.config import ModelConfig
    from l3m.data import prepare_dataset, render_example
    from l3m.evaluation import evaluate_model
    from l3m.loading import load_model_and_tokenizer
    from l3m.rewards import resolve_reward
    from l3m.training.grpo import ConstrainedGRPOTrainer

    torch.manual_seed(settings.seed)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(model_name_or_path=settings.model_name_or_path))
    history, started = [], time.time()
    if solver is not None:  # the initial model is only evaluated
        budget = {"name": "length", "reward": "length_tokens", "max": settings.budget}
        args = settings.grpo_args(settings.run_dir(label), settings.max_steps,
                                  reward=settings.reward, reward_weights=settings.reward_weights, constraints=[budget],
                                  solver=solver, multiplier_init=weight, dual_lr=settings.dual_lr)
        trainer = ConstrainedGRPOTrainer(model=model, args=args, train_dataset=train_dataset,
                                         processing_class=tokenizer)
        trainer.train()
        model = trainer.model
        logged = ("constraints/", "rewards/", "completions/mean_length", "barrier/", "step_time")
        history = [{"step": entry["step"], **{k: v for k, v in entry.items() if k.startswith(logged)}}
                   for entry in trainer.state.log_history if "loss" in entry]
    train_seconds = time.time() - started

    rewards = {spec: resolve_reward(spec, field="reward") for spec in settings.reward}
    test = prepare_dataset(test_dataset, tokenizer, settings.max_length, settings.seed, "test")
    questions = {render_example(example, tokenizer, random.Random(0))[0]: example["messages"][-2]["content"]
                 for example in test_dataset}  # the held-out prompt as the sampler sees it -> the user's question

    def with_question(reward):  # the held-out prompts' `question`, as GRPO passes the train prompts' column
        def scored(prompts, completions, completion_ids, **kwargs):
            return reward(prompts=prompts, completions=completions, completion_ids=completion_ids,
                          question=[questions[p] for p in prompts])
        return scored

    started = time.time()
    result = evaluate_model(model, tokenizer, test,
                            constraints=[Constraint(reward="length_tokens", max=settings.budget, name="length")],
                            objective={name: with_question(f) for name, f in rewards.items()},
                            reward_weights=settings.reward_weights, reference_model=reference,
                            max_new_tokens=settings.eval_max_new_tokens, temperature=1.0, top_p=1.0,
                            batch_size=settings.test_size, seed=settings.seed, description=f"Evaluating {label}")
    return {"label": label, "solver": solver, "weight": weight, "train_seconds": train_seconds,
            "eval_seconds": time.time() - started, "summary": result["summary"], "lengths": result["lengths"],
            "objective": result["objective"], "objective_rewards": result["objective_rewards"], "kl": result["kl"],
            "history": history,
            "final_multiplier": history[-1].get("constraints/length/multiplier") if history else None,
            "samples": result["samples"][:6]}


def run_budget_experiment(settings: BudgetSettings) -> list[dict]:
    """Run every arm (:meth:`BudgetSettings.arms`); writes ``results.json`` after each and the figure at the end."""
    from l3m.config import ModelConfig
    from l3m.experiments.plots import BudgetPoint, plot_budget_figure
    from l3m.loading import load_model_and_tokenizer

    started = time.time()
    train, test = prompt_splits(settings)
    reference = load_model_and_tokenizer(ModelConfig(model_name_or_path=settings.model_name_or_path))[0].eval()
    results_path = os.path.join(settings.output_dir, "results.json")
    records = []
    arms = settings.arms()
    for index, (label, solver, weight) in enumerate(arms, start=1):
        print(f"\n[{index}/{len(arms)}] {label}: {0 if solver is None else settings.max_steps} GRPO steps", flush=True)
        records.append(run_arm(settings, label, solver, weight, train, test, reference))
        print(budget_table(records[-1:]).splitlines()[-1], flush=True)
        write_json(results_path, {"settings": asdict(settings), "runs": records, "complete": index == len(arms)})
    figure = plot_budget_figure([BudgetPoint(r["label"], mean_se(r["lengths"]), mean_se(r["objective"]))
                                 for r in records], settings.budget,
                                os.path.join(settings.output_dir, "grpo_budget.png"))
    print("\n" + budget_table(records))
    print(f"\nResults: {results_path}\nFigure:  {figure}\nTotal time: {(time.time() - started) / 60:.1f} min")
    return records


def _median_step(history: list[dict]) -> str:
    """The median of TRL's logged ``step_time`` (seconds per GRPO step), less sensitive than the total to a
    passing load on the machine."""
    times = sorted(entry["step_time"] for entry in history if "step_time" in entry)
    return f"{times[len(times) // 2]:.1f}" if times else "-"


def budget_table(records: list[dict]) -> str:
    """One row per arm: the objective, its relevance part and the length (mean ± s.e. over held-out prompts), budget
    met, responses inside the budget, KL to the initial model (nats per response), the last multiplier, task log-ppl,
    training time (total and median step)."""
    columns = [("arm", 18, "<"), ("objective ± s.e.", 16, ">"), ("relevance ± s.e.", 16, ">"),
               ("length ± s.e.", 13, ">"), ("budget met", 10, ">"),
               ("inside", 6, ">"), ("KL ± s.e.", 11, ">"), ("last λ", 8, ">"), ("task log-ppl", 12, ">"),
               ("train s", 7, ">"), ("median step s", 13, ">")]
    rows = []
    for r in records:
        s = r["summary"]
        relevance = r["objective_rewards"].get("relevance")
        rows.append([r["label"], mean_pm(*mean_se(r["objective"]), 3),
                     mean_pm(*mean_se(relevance), 3) if relevance else "-", mean_pm(*mean_se(r["lengths"]), 1),
                     "yes" if s["length/satisfied"] else "NO", f"{100 * s['length/inside_frac']:.0f}%",
                     mean_pm(*mean_se(r["kl"]), 2),
                     "-" if r["final_multiplier"] is None else f"{r['final_multiplier']:.3g}",
                     f"{s['log_ppl_mean']:.3f}", f"{r['train_seconds']:.0f}", _median_step(r["history"])])
    return format_table(columns, rows)
