"""``l3m reward experiment``: the structure of the paper's Fig. 3 (Sec. 6.3), offline, on the embedded default.

It fine-tunes the demo model on the demo task data under two learned reward constraints, "helpful" and
"harmless" (reward models trained by ``l3m reward train``, by default on the offline stand-in of
docs/reward_models.md): the initial model, SFT, and an L3M and an MM at each constraint point ``(b_helpful,
b_harmless)``. Constraint points are given as offsets from SFT's held-out mean rewards, since the rewards' scale
depends on the reward models. Every model is evaluated on a held-out split: mean rewards of sampled responses
under both reward models, constraint satisfaction, and task log-perplexity (mean ± std); the table, results JSON
and the two panels of Fig. 3 are written to ``output_dir``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

from l3m.constraints import Constraint
from l3m.errors import L3MConfigError
from l3m.experiments.demo import RUN_MEMORY_GB
from l3m.experiments.runner import (ParallelSettings, RunSettings, TargetSettings, format_table, mean_pm,
                                   train_and_evaluate)
from l3m.files import write_json
from l3m.solvers import renamed_solver_message

NAMES = ("helpful", "harmless")
CONSTRAINED_SOLVERS = ("l3m", "mm", "lagged_dual")


@dataclass
class ExperimentSettings(ParallelSettings, TargetSettings, RunSettings):
    """The experiment's budget; ``quick`` shrinks it to a smoke run (one point, a few steps and prompts)."""

    output_dir: str = field(default="outputs/hh", metadata={"help": "Where results.json, the table's runs and "
                                                                    "fig3_rewards.png go."})
    # training samples as long as the evaluated ones: a lower cap hides the tail the evaluation judges (docs/demo.md)
    max_completion_length: int = field(default=48, metadata={"help": "Token cap of sampled responses in training."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Token cap of sampled responses in evaluation."})
    helpful_rm: str = field(default="outputs/rm_helpful", metadata={"help": "The 'helpful' reward model (a folder "
                                                                           "saved by `l3m reward train`)."})
    harmless_rm: str = field(default="outputs/rm_harmless", metadata={"help": "The 'harmless' reward model."})
    model_name_or_path: str = field(default="demo", metadata={"help": "The policy; 'demo': the embedded model."})
    dataset_name: str = field(default="demo", metadata={"help": "The task data; 'demo': the embedded chatterbot data."})
    # SFT lowers both rewards (on the stand-in, by 0.7 and 1.5 nats per token): the initial model meets every point
    # below that gap, so all default points are feasible
    helpful_offsets: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.3], metadata={
        "help": "Constraint points: offsets of the 'helpful' bound from SFT's held-out mean reward, one per point."})
    harmless_offsets: list[float] = field(default_factory=lambda: [0.3, 0.1, 0.6], metadata={
        "help": "Offsets of the 'harmless' bound from SFT's held-out mean reward, one per point."})
    solvers: list[str] = field(default_factory=lambda: ["l3m", "mm"], metadata={
        "help": "Constrained solvers run at every point."})
    dual_lr: float = field(default=1.0, metadata={
        "help": "MM's multiplier step size; rewards are mean log-likelihoods, so violations are small numbers."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: the first point, 4 steps, 8 prompts, 8 tokens."})

    def __post_init__(self):
        # bad settings stop the command before anything is trained
        renamed = [renamed_solver_message(name) for name in self.solvers or []]
        if any(renamed):
            raise L3MConfigError(f"solvers: {next(message for message in renamed if message)}")
        if not self.solvers or any(name not in CONSTRAINED_SOLVERS for name in self.solvers):
            raise L3MConfigError(f"solvers: expected a list of {', '.join(CONSTRAINED_SOLVERS)}, got {self.solvers!r}")
        if not self.helpful_offsets or len(self.helpful_offsets) != len(self.harmless_offsets):
            raise L3MConfigError(f"harmless_offsets: one per constraint point, as helpful_offsets; got "
                                 f"{self.helpful_offsets!r} and {self.harmless_offsets!r}")
        self.target_options()  # a bad target stops here, before anything is trained
        self.check_num_proc()
        if self.quick:
            self.max_steps, self.test_size = 4, 8
            self.max_completion_length = self.eval_max_new_tokens = 8
            self.helpful_offsets, self.harmless_offsets = self.helpful_offsets[:1], self.harmless_offsets[:1]


def run_experiment(settings: ExperimentSettings) -> list[dict]:
    """Train and evaluate every model; returns one record per model and writes results, table and figure. The
    initial model and SFT train first (the constraint points are offsets from SFT's rewards), then every constrained
    run; within each phase the runs train side by side (``num_proc``)."""
    from l3m.config import ScriptArguments
    from l3m.experiments.parallel import Job, plan_processes, run_all
    from l3m.experiments.plots import RewardPairResult, plot_reward_pair_figure
    from l3m.loading import load_splits
    from l3m.training.coin import objective_steps_of

    started = time.time()
    # checked here, before anything is trained; the weights load when a run first scores (in a worker, its copy)
    rewards = _reward_models(settings)
    splits = load_splits(ScriptArguments(dataset_name=settings.dataset_name, test_size=settings.test_size,
                                         validation_size=settings.test_size), settings.seed)
    objective_steps = objective_steps_of(settings.training_args("SFT", settings.max_steps))
    num_runs = 2 + len(settings.helpful_offsets) * len(settings.solvers)
    gigabytes = RUN_MEMORY_GB + sum(_folder_gb(path) for path in (settings.helpful_rm, settings.harmless_rm))
    results_path = os.path.join(settings.output_dir, "results.json")
    records: list[dict] = []
    points: list[tuple[float, float]] = []

    def run_phase(runs: list[tuple]) -> None:
        """``runs``: ``(label, method, solver, steps, point)``; their records join ``records`` in this order."""
        jobs = [Job(run[0], train_model, (settings, *run, splits, rewards), run[3],
                    os.path.join(settings.run_dir(run[0]), "output.log")) for run in runs]
        phase: list[dict | None] = [None] * len(jobs)

        def done(index: int, record: dict) -> None:
            phase[index] = record
            print(hh_table([record]).splitlines()[-1], flush=True)
            # results.json is rewritten after every model, so a stopped experiment keeps the models it finished
            finished = records + [r for r in phase if r is not None]
            write_json(results_path, {"settings": asdict(settings), "points": points, "runs": finished,
                                      "complete": len(finished) == num_runs})

        run_all(jobs, *plan_processes(settings.num_proc, len(jobs), gb_per_process=gigabytes), noun="model",
                on_result=done)
        records.extend(phase)

    run_phase([("initial", "initial", "sft", 0, None), ("SFT", "SFT", "sft", objective_steps, None)])
    sft = records[1]["summary"]
    points += [(round(sft["helpful/mean"] + dh, 3), round(sft["harmless/mean"] + ds, 3))
               for dh, ds in zip(settings.helpful_offsets, settings.harmless_offsets)]
    run_phase([(f"{solver.upper()} ({point[0]:g}, {point[1]:g})", solver.upper(), solver, settings.max_steps, point)
               for point in points for solver in settings.solvers])

    figure = plot_reward_pair_figure([
        RewardPairResult(r["label"], r["method"], (r["summary"]["helpful/mean"], r["summary"]["harmless/mean"]),
                         r["summary"]["log_ppl_mean"], r["summary"]["log_ppl_std"],
                         None if r["constraint"] is None else tuple(r["constraint"]))
        for r in records], os.path.join(settings.output_dir, "fig3_rewards.png"))
    print("\n" + hh_table(records))
    print(f"\nResults: {results_path}\nFigure:  {figure}\nTotal time: {(time.time() - started) / 60:.1f} min")
    return records


def train_model(settings: ExperimentSettings, label: str, method: str, solver: str, steps: int, point, splits,
                rewards: dict, progress=None) -> dict:
    """Train one model of the experiment for ``steps`` steps (``point``: its constraint point, None for the
    unconstrained ones) and evaluate it under both ``rewards`` (:func:`_reward_models`, shared by the runs of one
    process, so their weights load once there); its record."""
    from l3m.config import ModelConfig

    def constraints(target: dict):
        # unconstrained models are still scored by both rewards (a bound every reward satisfies)
        return [Constraint(reward=rewards[name], min=-1e9 if point is None else point[i], name=name, **target)
                for i, name in enumerate(NAMES)]

    args = settings.training_args(label, steps, solver=solver, dual_lr=settings.dual_lr)
    result = train_and_evaluate(args, ModelConfig(model_name_or_path=settings.model_name_or_path), splits["train"],
                                splits["test"],
                                constraints=[] if point is None else constraints(settings.target_options()),
                                eval_constraints=constraints({}), train=steps > 0,
                                eval_max_new_tokens=settings.eval_max_new_tokens,
                                description=f"Evaluating {label}", callbacks=progress)
    summary = result["summary"]
    return {"label": label, "method": method, "solver": solver, "steps": steps, "constraint": point,
            "train_seconds": result["train_seconds"], "summary": summary,
            "satisfied": None if point is None else all(summary[f"{n}/satisfied"] for n in NAMES),
            "samples": result["samples"][:8]}


def _reward_models(settings: ExperimentSettings) -> dict:
    """The two reward models by name (checked from their configs; the weights load when first used)."""
    from l3m.rewards.models import ModelReward

    return {name: ModelReward(path, field=f"{name}_rm")
            for name, path in zip(NAMES, (settings.helpful_rm, settings.harmless_rm))}


def _folder_gb(path: str) -> float:
    """The size of a local folder's files in GB (a reward model's weights, which every run holds); 0 for a hub id."""
    if not os.path.isdir(path):
        return 0.0
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 1e9


def hh_table(records: list[dict]) -> str:
    """One row per model: constraint point, mean rewards ± standard error over the held-out prompts, whether each
    constraint's mean is met (helpful/harmless), task log-ppl, training time."""
    columns = [("model", 26, "<"), ("steps", 5, ">"), ("helpful mean ± s.e.", 20, ">"),
               ("harmless mean ± s.e.", 21, ">"), ("satisfied", 9, ">"), ("task log-ppl mean ± std", 24, ">"),
               ("train s", 8, ">")]
    rows = []
    for r in records:
        s = r["summary"]
        rewards = [mean_pm(s[f"{n}/mean"], s[f"{n}/std"] / math.sqrt(s["num_examples"]), 3) for n in NAMES]
        satisfied = "-" if r["satisfied"] is None else "/".join(
            "yes" if s[f"{n}/satisfied"] else "NO" for n in NAMES)
        rows.append([r["label"], str(r["steps"]), *rewards, satisfied, mean_pm(s["log_ppl_mean"], s["log_ppl_std"], 3),
                     f"{r['train_seconds']:.0f}"])
    return format_table(columns, rows)
