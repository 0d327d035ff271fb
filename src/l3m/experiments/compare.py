"""``l3m compare``: several methods trained on the same data, model, constraints and step budget, side by side.

The L3M paper's comparison (Sec. 6.3, Fig. 3) in one command: every entry of ``methods`` in the YAML is one run of
the shared trainer with its own ``solver`` (``sft``, ``l3m``, ``mm``, ``lagged_dual``) and field overrides; a
``sweep`` expands an entry over values of any field (MM's ``dual_lr``, to which it is sensitive). Each run is evaluated
on the same held-out prompts (:func:`l3m.evaluation.evaluate_model`), and one table lists the constraint rewards and
whether each constraint is satisfied (as its kind defines it), the task log-perplexity, the training wall time and
the peak memory. A run that fails is reported in the table with its error, and the others go on. On CPU the methods
train side by side, each in its own process with the cores shared out (``num_proc``, as in ``l3m demo``:
:mod:`l3m.experiments.parallel`).

The YAML holds the fields of ``l3m train`` (shared by all methods) plus::

    methods:
      - {name: SFT, solver: sft, match_objective_steps: true}
      - {name: L3M, solver: l3m}
      - {name: MM, solver: mm, sweep: {dual_lr: [0.05, 0.5]}}
    eval_max_new_tokens: 64   # optional; defaults to max_completion_length

With ``constraint_dataset_name``, every constrained method's constraint steps sample those prompts (SFT has none);
every method is evaluated on the test split either way.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import yaml

from l3m.errors import L3MConfigError
from l3m.experiments.demo import RUN_MEMORY_GB
from l3m.experiments.runner import format_table, mean_pm, slug, train_and_evaluate

METHOD_KEYS = {"name", "sweep", "match_objective_steps"}
SHARED_ONLY = {"constraints", "dataset_name", "dataset_config", "dataset_train_split", "dataset_validation_split",
               "dataset_test_split", "validation_size", "test_size", "max_train_samples", "constraint_dataset_name",
               "constraint_dataset_config", "constraint_dataset_split"}


@dataclass
class CompareArguments:
    """What ``l3m compare`` adds to the fields of ``l3m train``: the methods, and the evaluation's token cap."""

    methods: list[dict] | str | None = field(
        default=None,
        metadata={"help": "The methods to compare, e.g. [{name: L3M, solver: l3m}, {name: MM, solver: mm, sweep: "
                          "{dual_lr: [0.05, 0.5]}}]: a name, field overrides, optionally a sweep and "
                          "match_objective_steps. On the command line: a YAML string."},
    )
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Token cap of the held-out responses; defaults to max_completion_length."}
    )
    num_proc: int | None = field(
        default=None,
        metadata={"help": "Methods trained at once, each in its own process with the cores shared out (1: one after "
                          "another with every core). Default: on CPU one per core, at most one per method and no "
                          "more than the available memory holds (estimated from the model's size); on a GPU, 1."},
    )

    def __post_init__(self):
        if isinstance(self.methods, str):
            try:
                self.methods = yaml.safe_load(self.methods)
            except yaml.YAMLError as err:
                raise L3MConfigError(f"methods: not valid YAML ({err})") from err
        if self.num_proc is not None and self.num_proc < 1:
            raise L3MConfigError(f"num_proc: expected at least 1 (1 trains one method after another), got "
                                 f"{self.num_proc}")


def compare_parser():
    """The parser of ``l3m compare``: the fields of ``l3m train`` plus :class:`CompareArguments`."""
    from l3m.config import L3MConfig, ModelConfig, TrainScriptArguments
    from l3m.parsing import L3MParser

    return L3MParser((TrainScriptArguments, L3MConfig, ModelConfig, CompareArguments), prog="l3m compare",
                     description="Train every method of the config's `methods` on the same data, model, constraints "
                                 "and step budget, evaluate each on the test split, print one table.")


@dataclass
class Method:
    """One run of a comparison: a unique name and the fields it sets on top of the shared ones."""

    name: str
    overrides: dict
    match_objective_steps: bool = False


def expand_methods(entries, fields: set[str]) -> list[Method]:
    """Check the ``methods`` list of a compare config and expand its sweeps; ``fields`` are the settable fields.

    ``sweep: {field: [v1, v2], ...}`` turns one entry into one method per combination of values, named
    ``"<name> (field=v1, ...)"``.
    """
    if not isinstance(entries, list) or not entries:
        raise L3MConfigError("methods: expected a non-empty list of methods, e.g. [{name: L3M, solver: l3m}, "
                             "{name: SFT, solver: sft}]")
    methods = []
    for i, entry in enumerate(entries):
        where = f"methods[{i}]"
        if not isinstance(entry, dict):
            raise L3MConfigError(f"{where}: expected a mapping like {{name: MM, solver: mm, dual_lr: 0.1}}")
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise L3MConfigError(f"{where}.name: required (a label for the table)")
        where = f"methods[{entry['name']}]"
        unknown = sorted(set(entry) - fields - METHOD_KEYS)
        if unknown:
            raise L3MConfigError(f"{where}: unknown field(s) {unknown}; a method takes name, sweep, "
                                 "match_objective_steps and the fields of `l3m train --help`")
        overrides = {k: v for k, v in entry.items() if k not in METHOD_KEYS}
        sweep = entry.get("sweep") or {}
        if not isinstance(sweep, dict):
            raise L3MConfigError(f"{where}.sweep: expected a mapping of field names to lists of values, e.g. "
                                 "{dual_lr: [0.05, 0.5]}")
        shared_only = sorted(SHARED_ONLY & (set(overrides) | set(sweep)))
        if shared_only:
            raise L3MConfigError(f"{where}: {shared_only} must be the same for every method; set them at the top "
                                 "level of the config")
        for key, values in sweep.items():
            if key not in fields:
                raise L3MConfigError(f"{where}.sweep: unknown field {key!r}; see `l3m train --help`")
            if not isinstance(values, list) or not values:
                raise L3MConfigError(f"{where}.sweep.{key}: expected a non-empty list of values, got {values!r}")
        match = entry.get("match_objective_steps", False)
        if not isinstance(match, bool):
            raise L3MConfigError(f"{where}.match_objective_steps: expected true or false, got {match!r}")
        for combination in itertools.product(*sweep.values()):
            setting = dict(zip(sweep, combination))
            label = ", ".join(f"{k}={v}" for k, v in setting.items())
            name = f"{entry['name']} ({label})" if label else entry["name"]
            methods.append(Method(name, {**overrides, **setting}, match))
    names = [m.name for m in methods]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise L3MConfigError(f"methods: duplicated name(s) {duplicated}; give each method its own 'name'")
    return methods


def plan_comparison(argv: list[str]):
    """Parse and validate a compare config (``--config`` plus ``--field value`` flags for the shared fields) and
    build every method's configuration before anything is trained. Returns ``(plans, shared_args, compare_args)``:
    ``plans`` are ``(method, training_args, model_args)``; ``shared_args`` the shared ``(script_args,
    training_args, model_args)``: the data and the constraints are the same for every method; ``compare_args`` has
    ``eval_max_new_tokens`` resolved. A method's fields are laid over the shared ones as flags after the user's, so
    they win."""
    from l3m.parsing import as_flags
    from l3m.training.coin import objective_steps_of

    parser = compare_parser()
    if "--config" not in argv and not {"-h", "--help"} & set(argv):
        raise L3MConfigError("--config: required (a compare YAML, e.g. examples/configs/compare.yaml)")
    *shared, compare_args = parser.parse(argv)
    settable = {f.name for dtype in parser.dataclass_types[:3] for f in dataclasses.fields(dtype) if f.init}
    methods = expand_methods(compare_args.methods, settable)
    if not shared[1].parsed_constraints:
        raise L3MConfigError("constraints: a comparison needs at least one constraint (the methods differ in how "
                             "they enforce it)")
    compare_args.eval_max_new_tokens = compare_args.eval_max_new_tokens or shared[1].max_completion_length
    if compare_args.eval_max_new_tokens < 1:
        raise L3MConfigError(f"eval_max_new_tokens: must be >= 1, got {compare_args.eval_max_new_tokens}")
    plans = []
    for method in methods:
        flags = argv + as_flags({"output_dir": os.path.join(shared[1].output_dir, slug(method.name)),
                                 **method.overrides})
        try:
            _, training_args, model_args, _ = compare_parser().parse(flags)
            if method.match_objective_steps:
                steps = objective_steps_of(training_args)
                _, training_args, model_args, _ = compare_parser().parse(flags + ["--max_steps", str(steps)])
        except L3MConfigError as err:
            raise L3MConfigError(f"methods[{method.name}]: {err}") from err
        plans.append((method, training_args, model_args))
    return plans, tuple(shared), compare_args


def run_comparison(argv: list[str]) -> dict:
    """Train and evaluate every method of the compare config; print the table, write ``results.json`` (after every
    method) and one figure per constraint into the shared ``output_dir``. Returns the results."""
    from tqdm.auto import tqdm

    from l3m.experiments.parallel import Job, run_all
    from l3m.files import write_json
    from l3m.loading import load_constraint_prompts, load_splits

    plans, (script_args, training_args, model_args), compare_args = plan_comparison(argv)
    constraints = training_args.parsed_constraints
    eval_tokens = compare_args.eval_max_new_tokens
    prompts = load_constraint_prompts(script_args)  # the same constraint prompts for every constrained method
    splits = load_splits(script_args, training_args.seed)  # the same splits for every method
    train = splits["train"]
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    print(f"Comparing {len(plans)} methods on {len(train)} training and {len(splits['test'])} held-out examples; "
          f"constraints: {describe_constraints(constraints)}", flush=True)
    if prompts is not None:
        print(f"Constraint steps sample the {len(prompts)} prompts of {script_args.constraint_dataset_name} "
              "(constraint_dataset_name); evaluation is on the test split", flush=True)
    started = time.time()
    jobs = [Job(method.name, run_method, (method, run_args, run_model_args, train, splits["test"],
                                          prompts if run_args.solver != "sft" else None, eval_tokens),
                run_args.max_steps, os.path.join(run_args.output_dir, "output.log"))
            for method, run_args, run_model_args in plans]
    processes, threads = _plan_processes(compare_args.num_proc, plans)
    records: list[dict | None] = [None] * len(plans)

    def done(index: int, record: dict) -> None:  # results.json holds every finished method, in the config's order
        records[index] = record
        write_json(os.path.join(output_dir, "results.json"), _results(argv, eval_tokens, [r for r in records if r]))
        outcome = (f"FAILED: {record['error']}" if "error" in record else
                   f"trained in {record['train_seconds']:.0f} s; {describe_result(constraints, record['summary'])}; "
                   f"task log-ppl {record['summary']['log_ppl_mean']:.3f}")
        tqdm.write(f"[{index + 1}/{len(jobs)}] {record['name']}: {outcome}")

    run_all(jobs, processes, threads, noun="method", on_result=done)

    figures = plot_comparison(records, constraints, output_dir)
    print("\n" + compare_table(records, constraints))
    print(f"\nResults: {os.path.join(output_dir, 'results.json')}")
    for figure in figures:
        print(f"Figure:  {figure}")
    print(f"Total time: {(time.time() - started) / 60:.1f} min")
    return _results(argv, eval_tokens, records)


def run_method(method: Method, run_args, model_args, train, test, constraint_prompts, eval_tokens: int,
               progress=None) -> dict:
    """Train and evaluate one method; its record for ``results.json``, with ``error`` (one line) if it failed."""
    record = {"name": method.name, "solver": run_args.solver, "overrides": method.overrides,
              "steps": run_args.max_steps}
    try:
        record.update(train_and_evaluate(run_args, model_args, train, test, eval_max_new_tokens=eval_tokens,
                                         description=f"Evaluating {method.name}", callbacks=progress,
                                         constraint_dataset=constraint_prompts))
    except Exception as err:  # noqa: BLE001 - a failed method is reported in the table, the others still run
        record["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        traceback.print_exc(file=sys.stderr)  # the console, or the method's output.log when it runs in a worker
    return record


def _plan_processes(num_proc: int | None, plans) -> tuple[int, int]:
    """``(processes, threads)``: by default one method at a time on a GPU; otherwise
    :func:`l3m.experiments.parallel.plan_processes` with the memory of the largest model's run."""
    import torch

    from l3m.experiments.parallel import plan_processes

    on_gpu = any(not args.use_cpu and torch.cuda.is_available() for _, args, _ in plans)
    if num_proc is None and on_gpu:
        return 1, torch.get_num_threads()
    models = {(m.model_name_or_path, m.model_revision, m.trust_remote_code) for _, _, m in plans}
    gigabytes = max(run_memory_gb(*model) for model in models)
    return plan_processes(num_proc, len(plans), gb_per_process=gigabytes)


DEMO_MODEL_PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct, its output layer tied to the embedding
# the peak RSS planned for a demo run, per parameter: the default num_proc plans a method's memory at this many bytes
# per parameter of its model
RUN_BYTES_PER_PARAMETER = RUN_MEMORY_GB * 1e9 / DEMO_MODEL_PARAMETERS


def run_memory_gb(model_name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> float:
    """A method's planned peak memory (GB): :data:`RUN_BYTES_PER_PARAMETER` times its model's parameters, counted
    without loading the weights; the demo's when the model's config cannot be read (the run will say why)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from l3m.loading import resolve_model_name

    try:
        config = AutoConfig.from_pretrained(resolve_model_name(model_name_or_path), revision=revision,
                                            trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # a tied output layer is the embedding's weight, not a parameter of its own
        parameters = sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a bad model is reported by its run, in the table
        return RUN_MEMORY_GB
    return parameters * RUN_BYTES_PER_PARAMETER / 1e9


def _results(argv: list[str], eval_tokens: int, records: list[dict]) -> dict:
    return {"argv": argv, "eval_max_new_tokens": eval_tokens, "methods": records}


def describe_constraints(constraints) -> str:
    """``length (expectation) in [2, 8]; ...`` for the run's constraints."""
    parts = []
    for c in constraints:
        options = (f", epsilon={c.epsilon:g}" if c.kind == "chance" else f", delta={c.delta:g}" if c.kind == "uniform"
                   else "")
        span = "[" + ", ".join("-" if v is None else f"{v:g}" for v in (c.min, c.max)) + "]"
        parts.append(f"{c.name} ({c.kind}{options}) in {span}")
    return "; ".join(parts)


def describe_result(constraints, summary: dict) -> str:
    return ", ".join(f"{c.name} {summary[f'{c.name}/mean']:.2f} "
                     f"({'satisfied' if summary[f'{c.name}/satisfied'] else 'NOT satisfied'})" for c in constraints)


def compare_table(records: list[dict], constraints) -> str:
    """One row per method: per constraint the mean ± std reward, whether it is satisfied (as its kind defines it)
    and the share of held-out responses inside its range; task log-ppl mean ± std; training time; peak memory."""
    columns = [("method", max([28, *(len(r["name"]) for r in records)]), "<"),
               ("solver", max([6, *(len(r["solver"]) for r in records)]), "<"), ("steps", 5, ">")]
    for c in constraints:
        columns += [(f"{c.name} mean ± std", 18, ">"), (f"{c.name} ok", max(len(c.name) + 3, 5), ">"),
                    (f"{c.name} in range", max(len(c.name) + 9, 9), ">")]
    columns += [("task log-ppl mean ± std", 24, ">"), ("train s", 7, ">"), ("peak MB", 7, ">")]
    rows, notes = [], []
    for r in records:
        cells = [r["name"], r["solver"], str(r["steps"])]
        notes.append(f"FAILED: {r['error']}" if "error" in r else None)
        if "error" not in r:
            s = r["summary"]
            for c in constraints:
                cells += [mean_pm(s[f"{c.name}/mean"], s[f"{c.name}/std"], 2),
                          "yes" if s[f"{c.name}/satisfied"] else "NO", f"{100 * s[f'{c.name}/inside_frac']:.0f}%"]
            cells += [mean_pm(s["log_ppl_mean"], s["log_ppl_std"], 3), f"{r['train_seconds']:.0f}",
                      f"{r['peak_memory_mb']:.0f}"]
        rows.append(cells)
    return f"constraints: {describe_constraints(constraints)}\n" + format_table(columns, rows, notes)


def plot_comparison(records: list[dict], constraints, output_dir: str) -> list[str]:
    """One Fig. 2/3 style figure per constraint (``compare_<name>.png``): task log-ppl per method against the
    constraint's mean reward, and box plots of the reward per method with the range (:mod:`l3m.experiments.plots`)."""
    from l3m.experiments.plots import LengthResult, plot_length_figure

    done = [r for r in records if "error" not in r]
    if not done:
        return []
    figures = []
    for c in constraints:
        results = [LengthResult(r["name"], r["rewards"][c.name], r["summary"]["log_ppl_mean"],
                                r["summary"]["log_ppl_std"], (c.min, c.max)) for r in done]
        label = "response length (tokens)" if c.reward == "length_tokens" else f"{c.name} reward"
        figures.append(plot_length_figure(results, os.path.join(output_dir, f"compare_{slug(c.name)}.png"),
                                          reward_label=label,
                                          title=f"Methods under one budget: {describe_constraints([c])}"))
    return figures

