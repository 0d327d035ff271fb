"""``l3m demo``: the paper's Fig. 2 experiment, small and offline, on the embedded default.

It fine-tunes SmolLM2-135M-Instruct on the chatterbot-corpus dialogues three ways under one step budget: plain SFT,
an L3M whose responses must be shorter than SFT's, and one whose responses must be longer. Then it evaluates all
three on a held-out test split and prints response length (mean ± std, fraction inside the range) and task
log-perplexity (mean ± std), and writes the Fig. 2 style PNG.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from l3m.constraints import Constraint
from l3m.errors import L3MConfigError
from l3m.experiments.plots import LengthResult, plot_length_figure
from l3m.experiments.runner import (ParallelSettings, RunSettings, TargetSettings, format_table, mean_pm,
                                   train_and_evaluate)
from l3m.files import write_json


@dataclass
class DemoRun:
    """One model the demo trains: a name and an optional length range in tokens."""

    name: str
    length_min: float | None = None
    length_max: float | None = None
    max_steps: int | None = None  # optimizer steps; defaults to the settings' value; 0 evaluates the initial model
    match_objective_steps: bool = False  # train for as many steps as an L3M run takes objective steps

    def constraints(self, **options) -> list[Constraint]:
        """The run's length constraint; ``options`` are the training's :class:`Constraint` fields
        (:meth:`DemoSettings.constraint_options`: satisfaction target and kind; evaluation judges the mean, with none);
        none for an unconstrained run."""
        if self.length_min is None and self.length_max is None:
            return []
        return [Constraint(reward="length_tokens", min=self.length_min, max=self.length_max, name="length",
                           **options)]


# a run's peak RSS was 3.4-4.6 GB, 4.2-4.5 GB with freed memory kept (float32, 2026-12-03; results.json's
# peak_memory_mb): the default num_proc starts no more runs at once than the available memory holds at this much each
RUN_MEMORY_GB = 5.0

DEMO_RUNS = (
    DemoRun("initial", max_steps=0),
    # An L3M spends about half its steps on constraints (Sec. 5.4): this SFT takes as many objective steps, on the
    # same batches in the same order (l3m.training.batch_order).
    DemoRun("SFT", match_objective_steps=True),
    DemoRun("L3M [2, 8]", 2, 8),
    DemoRun("L3M [13, 30]", 13, 30),
)


@dataclass
class DemoSettings(ParallelSettings, TargetSettings, RunSettings):
    """The demo's budget. Chatterbot answers are short (median 11 tokens), so SFT answers short; the ranges sit
    on either side of that."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the runs, results and figure go."})
    # the evaluation's cap: capped at 32, training never saw the long tail that evaluation counts (at seed 1, three
    # answers of 46-64 tokens among 46 put 1.4 tokens on a held-out mean), and a max bound met in training was missed
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Token cap of sampled responses in training; default eval_max_new_tokens, so that training sees "
                "the lengths evaluation counts."})
    mu_final: float = field(default=1e-6, metadata={"help": "Final log-barrier parameter (App. A)."})
    margin: float | None = field(default=None, metadata={
        "help": "Room in tokens kept inside each length bound in training (docs/solver.md); 'none' for none."})
    kind: str = field(default="expectation", metadata={
        "help": "Kind of every L3M's length constraint in training: expectation (the mean inside the range), "
                "chance (at least 1 - epsilon of the responses inside it; pair with --confidence none) or uniform "
                "(responses' mean distance outside each bound at most delta tokens). The table judges the held-out "
                "mean."})
    epsilon: float | None = field(default=None, metadata={
        "help": "With --kind chance: the allowed fraction of responses outside each bound, e.g. 0.1."})
    delta: float | None = field(default=None, metadata={
        "help": "With --kind uniform: the allowed mean distance outside each bound, in tokens (default 0: every "
                "sampled response inside)."})
    shift_categories: list[str] = field(default_factory=list, metadata={
        "help": "A shift test: chatterbot categories (e.g. trivia literature science history) kept out of training "
                "and of the test split; every model is also evaluated on up to test_size of their conversations."})
    shift_prompts: bool = field(default=False, metadata={
        "help": "With shift_categories: the L3Ms' constraint steps sample the prompts of the training split and of "
                "the held-out categories' conversations that are not evaluated (prompts a user has without answers: "
                "L3MTrainer's constraint_dataset); their objective steps and SFT still never see those categories."})

    def __post_init__(self):
        if self.max_completion_length is None:
            self.max_completion_length = self.eval_max_new_tokens
        if self.shift_prompts and not self.shift_categories:
            raise L3MConfigError("shift_prompts: needs shift_categories (the categories whose prompts to sample)")
        self.check_num_proc()
        for run in DEMO_RUNS:  # a bad constraint option fails here, not after the first runs have trained
            run.constraints(**self.constraint_options())

    def constraint_options(self) -> dict:
        """The :class:`Constraint` fields every L3M's length constraint is trained with."""
        return {**{key: getattr(self, key) for key in ("margin", "kind", "epsilon", "delta")},
                **self.target_options()}


def shift_splits(splits: dict, categories: list[str], size: int, seed: int) -> tuple[dict, object | None, object]:
    """``(splits, shift, rest)``: with ``categories``, every split without their conversations, a shift set of up to
    ``size`` of them (shuffled with ``seed``) and the rest of them; without, the splits as they are and None twice."""
    from datasets import concatenate_datasets

    if not categories:
        return splits, None, None
    known = sorted(set().union(*(split.unique("category") for split in splits.values()
                                 if "category" in split.column_names)))
    unknown = sorted(set(categories) - set(known))
    if unknown:
        raise L3MConfigError(f"shift_categories: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"the demo data has {known}")
    held = set(categories)
    kept = {name: split.filter(lambda e: e["category"] not in held) for name, split in splits.items()}
    shift = concatenate_datasets([split.filter(lambda e: e["category"] in held) for split in splits.values()])
    shift = shift.shuffle(seed=seed)
    evaluated = min(size, len(shift))
    rest = shift.select(range(evaluated, len(shift))) if evaluated < len(shift) else shift.select([])
    return kept, shift.select(range(evaluated)), rest


def run_demo(settings: DemoSettings, runs: tuple[DemoRun, ...] = DEMO_RUNS) -> list[dict]:
    """Train and evaluate every run; returns one result record per run and writes them as JSON."""
    from l3m.config import ScriptArguments
    from l3m.experiments.parallel import Job, plan_processes, run_all
    from l3m.loading import load_splits
    from l3m.training.coin import objective_steps_of

    started = time.time()
    splits = load_splits(ScriptArguments(dataset_name="demo", test_size=settings.test_size,
                                         validation_size=settings.test_size), settings.seed)
    splits, shift, rest = shift_splits(splits, settings.shift_categories, settings.test_size, settings.seed)
    if shift is not None:
        print(f"Shift test: {', '.join(settings.shift_categories)} held out of training; {len(shift)} of their "
              f"conversations evaluated beside {len(splits['test'])} in-distribution ones", flush=True)
    prompts = None
    if settings.shift_prompts:
        from datasets import concatenate_datasets

        prompts = concatenate_datasets([splits["train"], rest])
        print(f"Constraint steps sample the prompts of the training split and of the other {len(rest)} held-out "
              "conversations (their answers unused)", flush=True)
    jobs = []
    for run in runs:
        steps = settings.max_steps if run.max_steps is None else run.max_steps
        if run.match_objective_steps:
            steps = objective_steps_of(settings.training_args(run.name, settings.max_steps))
        jobs.append(Job(run.name, train_run, (settings, run, steps, splits, shift, prompts), steps,
                        os.path.join(settings.run_dir(run.name), "output.log")))
    records = run_all(jobs, *plan_processes(settings.num_proc, len(jobs), gb_per_process=RUN_MEMORY_GB))

    results_path = write_json(os.path.join(settings.output_dir, "results.json"),
                              {"settings": asdict(settings), "runs": records})
    figure = plot_length_figure([
        LengthResult(r["run"]["name"], r["lengths"], r["summary"]["log_ppl_mean"], r["summary"]["log_ppl_std"],
                     (r["run"]["length_min"], r["run"]["length_max"]))
        for r in records
    ], os.path.join(settings.output_dir, "fig2_lengths.png"))
    print("\n" + demo_table(records))
    print(f"\nResults: {results_path}\nFigure:  {figure}\nTotal time: {(time.time() - started) / 60:.1f} min")
    return records


def train_run(settings: DemoSettings, run: DemoRun, steps: int, splits: dict, shift, prompts=None,
              progress=None) -> dict:
    """Train and evaluate one of the demo's runs for ``steps`` optimizer steps; its result record. ``prompts``: the
    constrained runs' constraint prompts (default: the training split's); ``progress``: trainer callbacks."""
    from l3m.config import ModelConfig

    args = settings.training_args(run.name, steps, mu_final=settings.mu_final)
    result = train_and_evaluate(args, ModelConfig(model_name_or_path="demo"), splits["train"], splits["test"],
                                constraints=run.constraints(**settings.constraint_options()),
                                eval_constraints=run.constraints() or _length_probe(),
                                eval_max_new_tokens=settings.eval_max_new_tokens, train=steps > 0, save=True,
                                description=f"Evaluating {run.name}", shift_dataset=shift, callbacks=progress,
                                constraint_dataset=prompts if run.constraints() else None)
    return {"run": asdict(run), "steps": steps, **result}


def _length_probe() -> list[Constraint]:
    """An unconstrained model is still scored for length (a range that every length satisfies)."""
    return [Constraint(reward="length_tokens", min=0, name="length")]


def demo_table(records: list[dict]) -> str:
    """The demo's table: one row per model, as in Fig. 2 of the paper; with a shift test, its length and whether
    the mean is in range on the held-out categories too."""
    columns = [("model", 16, "<"), ("steps", 5, ">"), ("range", 10, ">"), ("length mean ± std", 18, ">"),
               ("mean in range", 14, ">"), ("samples in range", 17, ">"), ("task log-ppl mean ± std", 24, ">"),
               ("train s", 8, ">")]
    shifted = any("shift" in r for r in records)
    if shifted:
        columns += [("shift length mean ± std", 24, ">"), ("shift in range", 14, ">")]
    rows = []
    for r in records:
        s, run = r["summary"], r["run"]
        constrained = run["length_min"] is not None or run["length_max"] is not None
        span = f"[{_fmt(run['length_min'])}, {_fmt(run['length_max'])}]" if constrained else "-"
        in_range = ("yes" if s["length/satisfied"] else "NO") if constrained else "-"
        inside = f"{100 * s['length/inside_frac']:.0f}%" if constrained else "-"
        rows.append([run["name"], str(r["steps"]), span, mean_pm(s["length_mean"], s["length_std"], 1), in_range,
                     inside, mean_pm(s["log_ppl_mean"], s["log_ppl_std"], 3), f"{r['train_seconds']:.0f}"])
        if shifted:
            shift = r["shift"]["summary"]
            rows[-1] += [mean_pm(shift["length_mean"], shift["length_std"], 1),
                         ("yes" if shift["length/satisfied"] else "NO") if constrained else "-"]
    return format_table(columns, rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
