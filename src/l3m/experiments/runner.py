"""The job every experiment repeats: train one method from the initial model, evaluate it on held-out prompts.

``l3m demo``, ``l3m compare`` and ``l3m reward experiment`` differ in which methods they run and what their tables
show; each run goes through :func:`train_and_evaluate`, each table through :func:`format_table`.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from l3m.constraints import Constraint
from l3m.errors import L3MConfigError
from l3m.hardware import resolve_bf16


@dataclass
class RunSettings:
    """The budget an experiment gives each of its runs (the fields every experiment command shares)."""

    output_dir: str = field(default="outputs/experiment", metadata={"help": "Where the runs, results and figure go."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps of every constrained run."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Prompts or task examples per step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Policy learning rate."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    num_generations: int = field(default=4, metadata={"help": "Sampled responses per prompt in constraint steps."})
    max_completion_length: int = field(default=48, metadata={"help": "Token cap of sampled responses in training."})
    max_length: int = field(default=128, metadata={"help": "Task examples longer than this are dropped."})
    # a 40-step run needs a shorter memory than the paper's 0.1 over thousands of steps
    ema_smoothing: float = field(default=0.5, metadata={"help": "EMA weight of the newest constraint estimate."})
    test_size: int = field(default=48, metadata={"help": "Held-out prompts every model is evaluated on."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Token cap of sampled responses in evaluation."})
    seed: int = field(default=0, metadata={"help": "Seed of splits, training and sampling."})
    bf16: str = field(default="false", metadata={
        "help": "bf16 autocast in training: auto (where the CPU has native bf16: avx512_bf16 or amx_bf16; float32 "
                "elsewhere), true or false. On a 2-core CPU with avx512_bf16 the demo took 0.88x of float32's time "
                "and one of its seed-0 ranges was missed (docs/benchmark.md); the README's numbers are float32."})

    def run_dir(self, name: str) -> str:
        """The folder of run ``name`` under ``output_dir``."""
        return os.path.join(self.output_dir, slug(name))

    def training_args(self, name: str, steps: int, **fields):
        """The :class:`l3m.L3MConfig` of run ``name`` (its folder under ``output_dir``): this budget, on CPU, no
        checkpoints, no warm-up, held-out prompts evaluated in one batch; ``fields`` override it."""
        from l3m.config import L3MConfig

        budget = {key: getattr(self, key) for key in ("per_device_train_batch_size", "learning_rate",
                                                      "lr_scheduler_type", "num_generations", "max_completion_length",
                                                      "max_length", "ema_smoothing", "seed")}
        return L3MConfig(output_dir=self.run_dir(name), max_steps=max(steps, 1),
                         per_device_eval_batch_size=self.test_size, warmup_steps=0, logging_steps=10,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=resolve_bf16(self.bf16),
                         **{**budget, **fields})


    def grpo_args(self, output_dir: str, steps: int, **fields):
        """The :class:`l3m.ConstrainedGRPOConfig` of a GRPO arm writing to ``output_dir``: this budget
        (``per_device_train_batch_size`` completions per step), on CPU in float32, sampling at temperature 1 without
        top-p, no KL term (``beta`` 0), no checkpoints, every step logged; ``fields`` (reward, constraints, solver,
        ...) complete or override it."""
        from l3m.training.grpo_config import ConstrainedGRPOConfig

        budget = {key: getattr(self, key) for key in ("per_device_train_batch_size", "num_generations",
                                                      "max_completion_length", "learning_rate", "lr_scheduler_type",
                                                      "ema_smoothing", "seed")}
        return ConstrainedGRPOConfig(output_dir=output_dir, max_steps=steps, warmup_steps=0, beta=0.0, temperature=1.0,
                                     top_p=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                     bf16=resolve_bf16(self.bf16), activation_checkpointing=False,
                                     **{**budget, **fields})


@dataclass
class ParallelSettings:
    """How many of an experiment's independent runs train at once (:mod:`l3m.experiments.parallel`)."""

    num_proc: int | None = field(default=None, metadata={
        "help": "Runs trained at once, each in its own process with the cores shared out; default one per core (at "
                "most one per run, and no more than the available memory holds). 1: one run after another, in this "
                "process, with every core. A run's numbers depend on its thread count (docs/demo.md)."})

    def check_num_proc(self) -> None:
        """Stop, naming the field, on a ``num_proc`` below 1 (before anything is trained)."""
        if self.num_proc is not None and self.num_proc < 1:
            raise L3MConfigError(f"num_proc: expected at least 1 (1 runs one run after another), got {self.num_proc}")


@dataclass
class TargetSettings:
    """The satisfaction target an experiment's constrained runs train with (``Constraint(confidence=...,
    heldout_size=...)``, docs/solver.md); evaluation judges the bounds themselves. Mixed into a :class:`RunSettings`
    (it reads ``test_size``)."""

    # Without a target an expectation constraint ends on its bound, and the held-out mean within about a standard
    # error of it on either side: the demo's lengthening range then needed 8 samples per prompt to end inside, and
    # L3M met the Fig. 3 experiment's bounds at one point of three (docs/demo.md, docs/reward_models.md).
    confidence: float | None = field(default=0.975, metadata={
        "help": "Satisfaction target of every constrained run: the solver's running estimate is raised by z standard "
                "errors of itself (docs/solver.md); 'none' for none."})
    # the tables judge each mean on test_size prompts, whose own sampling error (about 1 token on the demo's [2, 8])
    # was the larger part of the demo's misses with a target on the running estimate alone (docs/demo.md)
    target_heldout: bool = field(default=True, metadata={
        "help": "With a confidence: the target also covers the sampling error of the held-out mean the table judges "
                "(heldout_size: test_size on every constraint; docs/solver.md)."})

    def target_options(self) -> dict:
        """The ``confidence`` and ``heldout_size`` of every constraint a constrained run trains with; a bad
        ``confidence`` stops here, under its own name."""
        if self.confidence is not None and not 0.5 <= self.confidence < 1:
            raise L3MConfigError(f"confidence: expected a probability in [0.5, 1) (e.g. 0.975) or none, got "
                                 f"{self.confidence:g}")
        heldout = self.test_size if self.target_heldout and self.confidence is not None else None
        return {"confidence": self.confidence, "heldout_size": heldout}


def train_and_evaluate(args, model_args, train_dataset, test_dataset, constraints: Sequence[Constraint] | None = None,
                       eval_constraints: Sequence[Constraint] | None = None, eval_max_new_tokens: int = 64,
                       train: bool = True, save: bool = False, description: str = "Evaluating",
                       shift_dataset=None, callbacks=None, constraint_dataset=None) -> dict:
    """Train one method from the initial model (``args``: its :class:`l3m.L3MConfig`; ``constraints`` default to
    ``args.constraints``), then evaluate it on ``test_dataset`` under ``eval_constraints`` (default: the training
    constraints) with the sampling settings of ``args``. ``train=False`` evaluates the initial model. ``callbacks``
    and ``constraint_dataset`` (the constraint steps' prompts) go to the trainer.

    Returns the evaluation (:func:`l3m.evaluation.evaluate_model`) plus ``train_seconds``, ``eval_seconds``, the peak
    memory of the run and the solver's final state; with a ``shift_dataset``, its evaluation too, as ``shift``.
    """
    import torch
    from trl import get_peft_config

    from l3m.data import prepare_dataset
    from l3m.evaluation import evaluate_model
    from l3m.loading import load_model_and_tokenizer
    from l3m.training.trainer import L3MTrainer

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args)
    tests = {"test": prepare_dataset(test_dataset, tokenizer, args.max_length, args.seed, "test")}
    if shift_dataset is not None:
        tests["shift"] = prepare_dataset(shift_dataset, tokenizer, args.max_length, args.seed, "shift")
    trainer = L3MTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                         constraints=constraints, peft_config=get_peft_config(model_args), callbacks=callbacks,
                         constraint_dataset=constraint_dataset)
    memory = PeakMemory(trainer.model)
    started = time.time()
    if train:
        trainer.train()
        if save:
            trainer.save_model(args.output_dir)
    train_seconds = time.time() - started
    peak_mb, measure = memory.peak_mb()
    started = time.time()
    results = {label: evaluate_model(trainer.model, tokenizer, dataset,
                                     constraints=trainer.constraints if eval_constraints is None else eval_constraints,
                                     max_new_tokens=eval_max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, batch_size=args.per_device_eval_batch_size, seed=args.seed,
                                     description=description if label == "test" else f"{description} ({label})")
               for label, dataset in tests.items()}
    result = results.pop("test")
    result.update(results)  # "shift", with a shift_dataset
    return {"train_seconds": train_seconds, "eval_seconds": time.time() - started, "peak_memory_mb": peak_mb,
            "peak_memory_measure": measure, "solver_state": trainer.solver.state_dict() if trainer.bounds else None,
            **result}


class PeakMemory:
    """Peak memory of a run from its start: on a GPU the most memory torch allocated; on CPU the process's peak
    resident set size, reset at the start where Linux allows it (``/proc/self/clear_refs``), otherwise the peak of
    the whole process so far (``getrusage``; then a later run never reports less than an earlier one)."""

    def __init__(self, model):
        import torch

        self.cuda = next(model.parameters()).is_cuda
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.measure = "cuda max allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) of this process
            self.measure = "peak RSS of the run"
        except OSError:
            self.measure = "peak RSS of the process"

    def peak_mb(self) -> tuple[float, str]:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20, self.measure
        if self.measure == "peak RSS of the run":
            with open("/proc/self/status", encoding="utf-8") as f:
                match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
            if match:
                return int(match.group(1)) / 1024, self.measure
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
        return peak / (2**20 if sys.platform == "darwin" else 1024), "peak RSS of the process"


def format_table(columns: Sequence[tuple[str, int, str]], rows: Sequence[Sequence[str]],
                 notes: Sequence[str | None] = ()) -> str:
    """A fixed-width table: ``columns`` are ``(title, width, align)`` with align ``<`` or ``>``; a row may be
    shorter than the columns (a failed run); ``notes[i]``, if any, follows row ``i``."""
    header = " ".join(f"{title:{align}{width}}" for title, width, align in columns)
    lines = [header, "-" * len(header)]
    for i, cells in enumerate(rows):
        line = " ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, columns))
        note = notes[i] if i < len(notes) else None
        lines.append(f"{line}  {note}" if note else line)
    return "\n".join(lines)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (``std / sqrt(n)``, ``std`` with ``n - 1``; 0 for one value) of per-prompt values, as
    :func:`l3m.evaluation.evaluate_model` reports them."""
    n = len(values)
    mean = sum(values) / n
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, spread / math.sqrt(n)


def mean_pm(mean: float, spread: float, digits: int) -> str:
    """``"mean ± spread"`` with ``digits`` decimals."""
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def slug(name: str) -> str:
    """A folder name for a run's name: lower case, every other character than letters and digits an underscore."""
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
