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
from l3m.experiments.demo import slug
from l3m.errors import L3MConfigError

NAMES = ("helpful", "harmless")
CONSTRAINED_SOLVERS = ("l3m", "mm", "dual")


@dataclass
class ExperimentSettings:
    """The experiment's budget; ``quick`` shrinks it to a smoke run (one point, a few steps and prompts)."""

    output_dir: str = field(default="outputs/hh", metadata={"help": "Where results.json, the table's runs and "
                                                                    "fig3_rewards.png go."})
    helpful_rm: str = field(default="outputs/rm_helpful", metadata={"help": "The 'helpful' reward model (a folder "
                                                                           "saved by `l3m reward train`)."})
    harmless_rm: str = field(default="outputs/rm_harmless", metadata={"help": "The 'harmless' reward model."})
    model_name_or_path: str = field(default="demo", metadata={"help": "The policy; 'demo': the embedded model."})
    dataset_name: str = field(default="demo", metadata={"help": "The task data; 'demo': the embedded chatterbot data."})
    # SFT lowers both rewards (on the stand-in, by 0.7 and 1.5 nats per token): the initial model meets every point
    # below that gap, so all default points are feasible
    offsets: str = field(default="0.1,0.3;0.3,0.1;0.3,0.6", metadata={
        "help": "Constraint points as offsets 'helpful,harmless' from SFT's held-out mean rewards, ';'-separated."})
    solvers: str = field(default="l3m,mm", metadata={"help": "Constrained solvers run at every point."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps of every constrained run."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Prompts or task examples per step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Policy learning rate."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    num_generations: int = field(default=4, metadata={"help": "Sampled responses per prompt in constraint steps."})
    max_completion_length: int = field(default=32, metadata={"help": "Token cap of sampled responses in training."})
    max_length: int = field(default=128, metadata={"help": "Task examples longer than this are dropped."})
    ema_smoothing: float = field(default=0.5, metadata={"help": "EMA weight of the newest constraint estimate."})
    dual_lr: float = field(default=1.0, metadata={
        "help": "MM's multiplier step size; rewards are mean log-likelihoods, so violations are small numbers."})
    test_size: int = field(default=48, metadata={"help": "Held-out prompts every model is evaluated on."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Token cap of sampled responses in evaluation."})
    seed: int = field(default=0, metadata={"help": "Seed of splits, training and sampling."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: the first point, 4 steps, 8 prompts."})

    def __post_init__(self):
        self.solver_names()  # an unknown solver stops the command before anything is trained
        if self.quick:
            self.max_steps, self.test_size, self.eval_max_new_tokens = 4, 8, 8
            self.offsets = self.offsets.split(";")[0]

    def solver_names(self) -> list[str]:
        names = [name.strip() for name in self.solvers.split(",")]
        if not all(name in CONSTRAINED_SOLVERS for name in names):
            raise L3MConfigError(f"solvers: expected a comma-separated list of {', '.join(CONSTRAINED_SOLVERS)}, "
                                 f"got {self.solvers!r}")
        return names

    def points_offsets(self) -> list[tuple[float, float]]:
        try:
            points = [tuple(float(v) for v in p.split(",")) for p in self.offsets.split(";") if p.strip()]
        except ValueError as err:
            raise L3MConfigError(f"offsets: expected 'dh,ds;dh,ds;...', got {self.offsets!r}") from err
        if not points or any(len(p) != 2 for p in points):
            raise L3MConfigError(f"offsets: expected pairs 'dh,ds' separated by ';', got {self.offsets!r}")
        return points


def run_experiment(settings: ExperimentSettings) -> list[dict]:
    """Train and evaluate every model; returns one record per model and writes results, table and figure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l3m.assets import demo_data_path, demo_model_path
    from l3m.config import L3MConfig
    from l3m.data import load_task_splits, prepare_dataset
    from l3m.evaluation import evaluate_model
    from l3m.files import write_json
    from l3m.experiments.plots import RewardPairResult, plot_reward_pair_figure
    from l3m.rewards.models import ModelReward
    from l3m.training.trainer import L3MTrainer, objective_step_count

    started = time.time()
    offsets = settings.points_offsets()
    solvers = settings.solver_names()
    rewards = {name: ModelReward(path, field=f"{name}_rm")
               for name, path in zip(NAMES, (settings.helpful_rm, settings.harmless_rm))}
    model_path = demo_model_path() if settings.model_name_or_path == "demo" else settings.model_name_or_path
    data_path = demo_data_path() if settings.dataset_name == "demo" else settings.dataset_name
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = load_task_splits(data_path, test_size=settings.test_size, validation_size=settings.test_size,
                              seed=settings.seed)
    test = prepare_dataset(splits["test"], tokenizer, max_length=settings.max_length, seed=settings.seed, name="test")
    os.makedirs(settings.output_dir, exist_ok=True)
    objective_steps = objective_step_count(settings.seed, settings.max_steps)

    def constraints(point):
        # unconstrained models are still scored by both rewards (a bound every reward satisfies)
        return [Constraint(reward=rewards[name], min=-1e9 if point is None else point[i], name=name)
                for i, name in enumerate(NAMES)]

    def train_and_evaluate(label: str, method: str, solver: str, steps: int, point) -> dict:
        print(f"\n{label}: training {steps} steps", flush=True)
        run_dir = os.path.join(settings.output_dir, slug(label))
        torch.manual_seed(settings.seed)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        args = L3MConfig(output_dir=run_dir, max_steps=max(steps, 1), solver=solver,
                         per_device_train_batch_size=settings.per_device_train_batch_size,
                         learning_rate=settings.learning_rate, lr_scheduler_type=settings.lr_scheduler_type,
                         num_generations=settings.num_generations,
                         max_completion_length=settings.max_completion_length, max_length=settings.max_length,
                         ema_smoothing=settings.ema_smoothing, dual_lr=settings.dual_lr, warmup_steps=0,
                         logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, seed=settings.seed)
        trainer = L3MTrainer(model=model, args=args, train_dataset=splits["train"], processing_class=tokenizer,
                             constraints=constraints(point) if point is not None else [])
        run_started = time.time()
        if steps > 0:
            trainer.train()
        train_seconds = time.time() - run_started
        result = evaluate_model(trainer.model, tokenizer, test, constraints=constraints(point),
                                max_new_tokens=settings.eval_max_new_tokens, batch_size=settings.test_size,
                                seed=settings.seed, description=f"Evaluating {label}")
        summary = result["summary"]
        record = {"label": label, "method": method, "solver": solver, "steps": steps, "constraint": point,
                  "train_seconds": train_seconds, "summary": summary,
                  "satisfied": None if point is None else all(summary[f"{n}/satisfied"] for n in NAMES),
                  "samples": result["samples"][:8]}
        print(format_table([record]).splitlines()[-1], flush=True)
        return record

    results_path = os.path.join(settings.output_dir, "results.json")
    records, points = [], []

    def run(*spec) -> None:
        # results.json is rewritten after every model, so a stopped experiment keeps the models it finished
        records.append(train_and_evaluate(*spec))
        write_json(results_path, {"settings": asdict(settings), "points": points, "runs": records,
                                  "complete": len(records) == 2 + len(offsets) * len(solvers)})

    run("initial", "initial", "sft", 0, None)
    run("SFT", "SFT", "sft", objective_steps, None)
    sft = records[1]["summary"]
    points += [(round(sft["helpful/mean"] + dh, 3), round(sft["harmless/mean"] + ds, 3)) for dh, ds in offsets]
    for point in points:
        for solver in solvers:
            method = solver.upper()
            run(f"{method} ({point[0]:g}, {point[1]:g})", method, solver, settings.max_steps, point)

    figure = plot_reward_pair_figure([
        RewardPairResult(r["label"], r["method"], (r["summary"]["helpful/mean"], r["summary"]["harmless/mean"]),
                         r["summary"]["log_ppl_mean"], r["summary"]["log_ppl_std"],
                         None if r["constraint"] is None else tuple(r["constraint"]))
        for r in records], os.path.join(settings.output_dir, "fig3_rewards.png"))
    print("\n" + format_table(records))
    print(f"\nResults: {results_path}\nFigure:  {figure}\nTotal time: {(time.time() - started) / 60:.1f} min")
    return records


def format_table(records: list[dict]) -> str:
    """One row per model: constraint point, mean rewards ± standard error over the held-out prompts, whether each
    constraint's mean is met (helpful/harmless), task log-ppl, training time."""
    header = (f"{'model':<26} {'steps':>5} {'helpful mean ± s.e.':>20} {'harmless mean ± s.e.':>21} "
              f"{'satisfied':>9} {'task log-ppl mean ± std':>24} {'train s':>8}")
    lines = [header, "-" * len(header)]
    for r in records:
        s = r["summary"]
        rewards = [f"{s[f'{n}/mean']:.3f} ± {s[f'{n}/std'] / math.sqrt(s['num_examples']):.3f}" for n in NAMES]
        satisfied = "-" if r["satisfied"] is None else "/".join(
            "yes" if s[f"{n}/satisfied"] else "NO" for n in NAMES)
        lines.append(f"{r['label']:<26} {r['steps']:>5} {rewards[0]:>20} {rewards[1]:>21} {satisfied:>9} "
                     f"{s['log_ppl_mean']:>15.3f} ± {s['log_ppl_std']:<6.3f} {r['train_seconds']:>8.0f}")
    return "\n".join(lines)
