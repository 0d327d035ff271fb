r"""``l3m align-experiment``: constrained alignment on the offline helpful/harmless stand-in (issue 14's experiment;
docs/alignment.md, "The stand-in experiment").

The problem: maximize helpfulness, the built-in ``relevance`` reward (MiniLM cosine of the user's question and the
response), subject to harmlessness, the built-in ``civility`` reward (VADER compound of the response), in
expectation: ``E[civility] >= b``. On the embedded default: the demo model (SmolLM2-135M-Instruct) answers the first
user turn of chatterbot conversations, after the system turn ``system_prompt`` (as ``l3m grpo-experiment``).

1. One pass of :math:`\pi_\mathrm{ref}` (the initial model) over the ``train_prompts`` training prompts,
   ``num_generations`` responses each, scored. Each threshold is ``b = `` its mean civility ``+`` an offset of
   ``threshold_offsets``, so the reference violates every threshold (in sample).
2. Per threshold, from the initial model, on the same training prompts:

   - **CAID** (:func:`l3m.alignment.run_caid`, full weights, DPO with ``beta``): the one-shot dual on the shared
     pass, then ``outer_iterations`` = K policy steps and dual steps; every iterate is printed and recorded;
   - **CAN** (the one-shot predecessor): CAID's first iterate, one DPO step at the one-shot :math:`\lambda_0`;
   - **l3m (barrier)** and **mm (dual ascent)**: :class:`l3m.training.grpo.ConstrainedGRPOTrainer` on
     ``relevance`` under ``{name: harmless, reward: civility, min: b}``, GRPO's ``beta=0`` (no KL term, unlike
     DPO's), all weights trained, as ``l3m grpo-experiment`` builds its arms.

   Every method's constraint carries the satisfaction target ``confidence`` (default 0.9): training aims at
   ``b + z * s.e.`` of its own estimate; evaluation judges ``b``.

3. Every model (and the initial one) is evaluated on the same held-out prompts, one response each: relevance and
   civility (mean ± s.e.), whether the constraint is met (mean >= b) or within one s.e. of it, and the exact KL to
   the initial model (:func:`l3m.evaluation.evaluate_model`). ``results.json`` is rewritten after each run; the table
   (also ``table.txt``) and the figure (objective vs constraint with the thresholds; CAID's lambda over iterations)
   come at the end.

**Sample budget.** CAID samples K + 1 passes of ``train_prompts x num_generations`` responses (pi_ref's, then one per
policy: each sets the next lambda; its K policy steps pair up pi_ref's pass, or with ``pairs_from: latest`` the
previous policy's), CAN one; each GRPO arm gets K passes' worth of
completions (``max_steps`` 0: ``K * train_prompts * num_generations / per_device_train_batch_size`` steps), so it sees
each training prompt K times with groups of ``num_generations``. A DPO step takes ``dpo_batch_size`` pairs (twice as
many responses), as many responses as a GRPO step with the defaults. The learning rate is the same for both.

**Time (2 CPU cores): 33.7 min measured** (docs/alignment.md, commit 6bf9dd1, two DPO epochs): per threshold CAN
3-3.5 min and CAID's K = 2 iterations 7-7.5 min in all, each GRPO arm of 20 steps ~4 min, evaluations ~45 s each;
the shared pass of pi_ref 48 s. Every training cost scales with ``train_prompts`` and ``dpo_epochs``.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

from l3m.constraints import Constraint
from l3m.errors import L3MConfigError, L3MDataError
from l3m.experiments.runner import RunSettings, format_table, mean_pm, mean_se, slug
from l3m.files import write_json
from l3m.hardware import resolve_bf16

NAME = "harmless"  # the constraint's name in every method
METHODS = ("caid", "l3m", "mm")  # CAID (with CAN, its first iterate), the barrier and dual ascent on GRPO
GRPO_ARMS = (("l3m", "l3m (barrier)"), ("mm", "mm (dual ascent)"))  # (solver, label)
DESCRIPTION = ("Constrained alignment on the offline helpful/harmless stand-in: CAID, its one-shot predecessor, the "
               "l3m barrier and dual ascent (GRPO), relevance under civility thresholds (docs/alignment.md).")


@dataclass
class AlignmentSettings(RunSettings):
    """The experiment's budget; ``quick`` shrinks it to a smoke run (4 prompts, 2 responses, 8 tokens)."""

    output_dir: str = field(default="outputs/alignment", metadata={"help": "Where the runs, results.json, the table "
                                                                           "and the figure go."})
    model_name_or_path: str = field(default="demo", metadata={"help": "The initial model pi_ref; 'demo': the embedded "
                                                                      "SmolLM2-135M-Instruct."})
    dataset_name: str = field(default="demo", metadata={"help": "Prompts: the first user turn of each `messages` "
                                                                "conversation; 'demo': the chatterbot corpus."})
    system_prompt: str = field(default="Keep answers short.", metadata={
        "help": "A system turn before every prompt ('' for none), as in l3m grpo-experiment."})
    train_prompts: int = field(default=20, metadata={
        "help": "Training prompts (distinct questions, none of the held-out ones) every method trains on."})
    num_generations: int = field(default=4, metadata={
        "help": "Responses per prompt in every CAID pass, and GRPO's group size."})
    max_completion_length: int = field(default=32, metadata={"help": "Token cap of sampled responses in training."})
    threshold_offsets: list[float] = field(default_factory=lambda: [0.05, 0.15], metadata={
        "help": "Thresholds b = the initial model's mean civility on its training samples + each offset (> 0, so "
                "it violates them). On the demo model: mean 0.19, s.d. 0.38 (so a held-out s.e. of ~0.07 on 32 "
                "prompts), and the best of 4 responses per prompt averages mean + 0.30, the most the one-shot dual's "
                "tilt can reach."})
    beta: float = field(default=0.1, metadata={"help": "CAID's KL weight (the problem's and DPO's beta)."})
    outer_iterations: int = field(default=2, metadata={"help": "CAID's K: outer iterations after the one-shot dual."})
    dual_lr: float = field(default=2.0, metadata={
        "help": "CAID's dual step, lambda <- max(0, lambda - dual_lr * (E[civility] - b))."})
    pairs_from: str = field(default="reference", metadata={
        "help": "Whose responses CAID's policy steps pair up: 'reference' (pi_ref's pass, relabelled at each lambda) "
                "or 'latest' (the previous policy's pass; docs/alignment.md has a run of each)."})
    dpo_batch_size: int = field(default=4, metadata={"help": "Preference pairs per DPO step (an epoch is over "
                                                             "train_prompts x num_generations / 2 pairs)."})
    dpo_epochs: int = field(default=2, metadata={"help": "Epochs of each DPO policy step over its pairs (TRL's "
                                                         "num_train_epochs)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of DPO and GRPO (all weights)."})
    per_device_train_batch_size: int = field(default=8, metadata={
        "help": "GRPO completions per step (prompts per step x num_generations)."})
    max_steps: int = field(default=0, metadata={"help": "GRPO steps of each arm; 0: CAID's sample budget, "
                                                        "K * train_prompts * num_generations / the batch."})
    mm_dual_lr: float = field(default=0.5, metadata={
        "help": "mm's dual ascent, lambda <- max(0, lambda + mm_dual_lr * (b - mean civility)) every GRPO step."})
    test_size: int = field(default=32, metadata={"help": "Held-out prompts every model is evaluated on."})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Token cap of held-out responses."})
    # Held-out prompts score ~0.07 lower civility than the training prompts, and without a target CAID ended below
    # both thresholds held out (docs/alignment.md); at 0.975 the second threshold's target is out of pi_ref's reach.
    confidence: float | None = field(default=0.9, metadata={
        "help": "Satisfaction target of every method's civility constraint: CAID's dual steps and the GRPO arms' "
                "steps aim at b + z * s.e. of their own estimate (docs/alignment.md); evaluation judges b. 'none' "
                "for none."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={
        "help": "Methods run at each threshold: caid (CAID, whose first iterate is CAN), l3m (the barrier on GRPO), "
                "mm (dual ascent on GRPO); e.g. --methods caid to rerun CAID alone."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: 4 prompts, 2 responses each, 8 tokens, 4 "
                                                         "held-out prompts."})

    def __post_init__(self):
        offsets = self.threshold_offsets
        if not offsets or any(not math.isfinite(o) or o <= 0 for o in offsets):
            raise L3MConfigError(f"threshold_offsets: expected at least one offset > 0 above the initial model's mean "
                                 f"civility, got {offsets!r}")
        from l3m.alignment.config import PAIR_SOURCES

        if self.pairs_from not in PAIR_SOURCES:
            raise L3MConfigError(f"pairs_from: expected 'reference' or 'latest', got {self.pairs_from!r}")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise L3MConfigError(f"methods: expected a list of {', '.join(METHODS)}, got {self.methods!r}")
        if self.confidence is not None and not 0.5 <= self.confidence < 1:
            raise L3MConfigError(f"confidence: expected a probability in [0.5, 1) (e.g. 0.9) or none, got "
                                 f"{self.confidence}")
        if self.outer_iterations < 1:
            raise L3MConfigError(f"outer_iterations: expected K >= 1 (CAN is K = 1), got {self.outer_iterations}")
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise L3MConfigError(f"beta: expected a KL weight > 0, got {self.beta}")
        for name in ("dual_lr", "mm_dual_lr"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise L3MConfigError(f"{name}: expected a step size >= 0, got {getattr(self, name)}")
        for name, least in (("train_prompts", 1), ("num_generations", 2), ("dpo_batch_size", 1), ("dpo_epochs", 1),
                            ("max_steps", 0)):
            if getattr(self, name) < least:
                raise L3MConfigError(f"{name}: expected an integer >= {least}, got {getattr(self, name)}")
        if self.quick:
            self.train_prompts, self.num_generations, self.test_size, self.dpo_batch_size = 4, 2, 4, 2
            self.per_device_train_batch_size = 8  # 2 GRPO steps of 4 prompts x 2 responses
            self.max_completion_length = self.eval_max_new_tokens = 8
        if self.per_device_train_batch_size % self.num_generations:
            raise L3MConfigError(f"per_device_train_batch_size: GRPO's {self.per_device_train_batch_size} completions "
                                 f"per step must be whole groups of num_generations={self.num_generations}")

    def grpo_steps(self, num_prompts: int) -> int:
        """GRPO steps of each arm: ``max_steps``, or K passes over ``num_prompts`` prompts."""
        passes = self.outer_iterations * num_prompts * self.num_generations
        return self.max_steps or max(1, round(passes / self.per_device_train_batch_size))


class QuestionRelevance:
    """The built-in ``relevance`` reward for callers that pass only the prompt text (chat template applied): CAID's
    sampling passes and the held-out evaluation. The user's question is looked up from the text, so every method is
    scored by ``relevance(question, response)``, as GRPO is from the dataset's ``question`` column."""

    def __init__(self, questions: dict[str, str]):
        self.questions = questions
        self.__name__ = "relevance"

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        from l3m.rewards import relevance

        missing = [p for p in prompts if p not in self.questions]
        if missing:
            raise L3MDataError(f"relevance: no question known for the prompt {missing[0][-80:]!r}")
        return relevance(prompts, completions, completion_ids, question=[self.questions[p] for p in prompts])


def experiment_prompts(settings: AlignmentSettings, tokenizer):
    """``(train, test, objective)``: the first ``train_prompts`` distinct training questions that are not held out
    (``prompt``: system and user turn; ``question``), the held-out conversations, and :class:`QuestionRelevance` over
    both as the policy sees them."""
    from l3m.alignment.samples import render_prompts
    from l3m.data import render_example
    from l3m.experiments.grpo_budget import prompt_splits

    train, test = prompt_splits(settings)
    held_out = {example["messages"][-2]["content"] for example in test}
    keep, seen = [], set()
    for i, question in enumerate(train["question"]):
        if question not in held_out | seen:
            seen.add(question)
            keep.append(i)
        if len(keep) == settings.train_prompts:
            break
    if not keep:
        raise L3MDataError(f"dataset_name: no training prompt of {settings.dataset_name} is distinct from the held-out "
                           "ones")
    train = train.select(keep)
    questions = dict(zip(render_prompts(train, tokenizer).texts, train["question"]))
    questions.update({render_example(example, tokenizer, random.Random(0))[0]: example["messages"][-2]["content"]
                      for example in test})
    return train, test, QuestionRelevance(questions)


def civility_constraint(settings: AlignmentSettings, threshold: float) -> dict:
    """Every method's constraint, ``E[civility] >= threshold``, with the settings' satisfaction target."""
    return {"name": NAME, "reward": "civility", "min": threshold, "confidence": settings.confidence}


def caid_config(settings: AlignmentSettings, threshold: float, output_dir: str, objective):
    """The :class:`l3m.alignment.CAIDConfig` of CAID at threshold ``b``: full-weight DPO steps of ``dpo_epochs``."""
    from l3m.alignment import CAIDConfig

    return CAIDConfig(
        output_dir=output_dir, reward=objective, constraints=[civility_constraint(settings, threshold)],
        beta=settings.beta, outer_iterations=settings.outer_iterations, num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length, temperature=1.0, top_p=1.0, generation_batch_size=8,
        dual_lr=settings.dual_lr, pairs_from=settings.pairs_from, learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        per_device_train_batch_size=settings.dpo_batch_size, num_train_epochs=settings.dpo_epochs, warmup_steps=0,
        seed=settings.seed, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        bf16=resolve_bf16(settings.bf16),
        activation_checkpointing=False)


def grpo_arm(settings: AlignmentSettings, solver: str, threshold: float, output_dir: str, train, steps: int):
    """Train one GRPO arm from the initial model; returns ``(model, train_seconds, history)``."""
    import torch

    from l3m.config import ModelConfig
    from l3m.loading import load_model_and_tokenizer
    from l3m.training.grpo import ConstrainedGRPOTrainer

    torch.manual_seed(settings.seed)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(model_name_or_path=settings.model_name_or_path))
    args = settings.grpo_args(output_dir, steps, reward="relevance",
                              constraints=[civility_constraint(settings, threshold)], solver=solver,
                              multiplier_init=0.0, dual_lr=settings.mm_dual_lr)
    trainer = ConstrainedGRPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    started = time.time()
    trainer.train()
    logged = ("constraints/", "rewards/", "completions/mean_length", "barrier/", "step_time")
    history = [{"step": entry["step"], **{k: v for k, v in entry.items() if k.startswith(logged)}}
               for entry in trainer.state.log_history if "loss" in entry]
    return trainer.model, time.time() - started, history


def evaluate(settings: AlignmentSettings, label: str, model, tokenizer, test, reference, objective,
             threshold: float) -> dict:
    """One response per held-out prompt: relevance, civility and the exact KL to ``reference`` (per sample), the
    summary (``harmless/satisfied``: mean civility >= ``threshold``) and a few samples."""
    from l3m.evaluation import evaluate_model

    started = time.time()
    civility = Constraint(reward="civility", min=threshold, name=NAME)
    result = evaluate_model(model, tokenizer, test, constraints=[civility], objective={"relevance": objective},
                            reference_model=reference, max_new_tokens=settings.eval_max_new_tokens, temperature=1.0,
                            top_p=1.0, batch_size=settings.test_size, seed=settings.seed,
                            description=f"Evaluating {label}")
    return {"objective": result["objective"], "constraint": result["rewards"][NAME], "kl": result["kl"],
            "eval_seconds": time.time() - started, "summary": result["summary"], "samples": result["samples"][:6]}


def run_alignment_experiment(settings: AlignmentSettings) -> dict:
    """Run every method at every threshold (module docstring); returns what ``results.json`` holds."""
    import torch

    from l3m.alignment import run_caid
    from l3m.alignment.command import format_record
    from l3m.alignment.samples import mean_and_se, render_prompts, sample_and_score
    from l3m.config import ModelConfig
    from l3m.data import prepare_dataset
    from l3m.experiments.plots import AlignmentPoint, plot_alignment_figure
    from l3m.loading import load_model_and_tokenizer

    started = time.time()
    reference, tokenizer = load_model_and_tokenizer(ModelConfig(model_name_or_path=settings.model_name_or_path))
    reference.eval()
    train, test_dataset, objective = experiment_prompts(settings, tokenizer)
    test = prepare_dataset(test_dataset, tokenizer, settings.max_length, settings.seed, "test")
    m, n, k = len(train), settings.num_generations, settings.outer_iterations
    steps = settings.grpo_steps(m)

    print(f"\nSampling pi_ref: {m} training prompts x {n} responses", flush=True)
    pass_started = time.time()
    config = caid_config(settings, 0.0, settings.output_dir, objective)
    torch.manual_seed(settings.seed)  # as run_caid seeds its own pass
    shared = sample_and_score(reference, tokenizer, render_prompts(train, tokenizer), objective,
                              config.parsed_constraints, [b for c in config.parsed_constraints for b in c.bounds()],
                              settings=config, description="Sampling pi_ref")
    pass_seconds = time.time() - pass_started
    civility = mean_and_se(shared.rewards[NAME])
    thresholds = [civility["mean"] + offset for offset in settings.threshold_offsets]
    print(f"pi_ref's civility on its training samples: {mean_pm(civility['mean'], civility['se'], 3)}; thresholds "
          f"b = {', '.join(f'{b:.3f}' for b in thresholds)}", flush=True)
    results = {"settings": asdict(settings), "train_prompts": m, "grpo_steps": steps, "thresholds": thresholds,
               "reference_pass": {"seconds": pass_seconds, "responses": m * n, "civility": civility,
                                  "relevance": mean_and_se(shared.objective)},
               "caid": [], "runs": [], "complete": False}
    results_path = os.path.join(settings.output_dir, "results.json")
    grpo_arms = [(solver, label) for solver, label in GRPO_ARMS if solver in settings.methods]
    total = 1 + len(thresholds) * (2 * ("caid" in settings.methods) + len(grpo_arms))

    def add(run: dict) -> None:
        results["runs"].append(run)
        print(alignment_table(results["runs"][-1:], thresholds).splitlines()[-1], flush=True)
        results["complete"] = len(results["runs"]) == total
        write_json(results_path, results)

    print(f"\n[1/{total}] initial (pi_ref)", flush=True)
    initial = evaluate(settings, "initial", reference, tokenizer, test, reference, objective, min(thresholds))
    add({"label": "initial", "method": "initial", "threshold": None, "train_seconds": 0.0, "responses": 0,
         "multiplier": None, **initial})
    for index, (b, offset) in enumerate(zip(thresholds, settings.threshold_offsets), start=1):
        if "caid" in settings.methods:
            caid_dir = os.path.join(settings.output_dir, f"caid_b{index}")
            shutil.rmtree(caid_dir, ignore_errors=True)  # every run starts fresh: run_caid would resume an old one
            print(f"\n[{len(results['runs']) + 1}-{len(results['runs']) + 2}/{total}] b = {b:.3f}: CAID, K = {k} "
                  f"(CAN = its iterate 1)", flush=True)
            records = run_caid(reference, tokenizer, train, caid_config(settings, b, caid_dir, objective),
                               reference_samples=shared)
            for record in records:
                print(format_record(record), flush=True)
            results["caid"].append({"threshold": b, "offset": offset, "records": records})
            can_seconds = pass_seconds + records[1]["seconds"]["policy_step"]  # the shared pass counts for each
            caid_seconds = pass_seconds + sum(r["seconds"]["policy_step"] + r["seconds"]["sampling"]
                                              for r in records[1:])
            for label, t, train_seconds in (("CAN (one-shot)", 1, can_seconds), (f"CAID (K={k})", k, caid_seconds)):
                path = os.path.join(caid_dir, f"iteration-{t}", "model")
                model = load_model_and_tokenizer(ModelConfig(model_name_or_path=path))[0]
                add({"label": label, "method": label.split()[0], "threshold": b, "train_seconds": train_seconds,
                     "responses": m * n * (1 if label.startswith("CAN") else k + 1), "iterate": t,
                     "multiplier": records[t - 1]["next_multipliers"][NAME],  # the lambda pi_t was trained for
                     **evaluate(settings, f"{label} b={b:.3f}", model, tokenizer, test, reference, objective, b)})
                del model
        for solver, label in grpo_arms:
            print(f"\n[{len(results['runs']) + 1}/{total}] b = {b:.3f}: {label}, {steps} GRPO steps", flush=True)
            out = os.path.join(settings.output_dir, f"{slug(label)}_b{index}")
            model, train_seconds, history = grpo_arm(settings, solver, b, out, train, steps)
            add({"label": label, "method": label, "threshold": b, "train_seconds": train_seconds,
                 "responses": steps * settings.per_device_train_batch_size, "history": history,
                 "multiplier": history[-1].get(f"constraints/{NAME}/multiplier") if history else None,
                 **evaluate(settings, f"{label} b={b:.3f}", model, tokenizer, test, reference, objective, b)})
            del model

    table = alignment_table(results["runs"], thresholds)
    with open(os.path.join(settings.output_dir, "table.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    points = [AlignmentPoint(r["method"], r["threshold"], mean_se(r["constraint"]), mean_se(r["objective"]))
              for r in results["runs"]]
    figure = plot_alignment_figure(points, thresholds, {c["threshold"]: [r["next_multipliers"][NAME] for r in
                                                                         c["records"]] for c in results["caid"]},
                                   os.path.join(settings.output_dir, "alignment.png"))
    print("\n" + table)
    print(f"\nResults: {results_path}\nTable:   {os.path.join(settings.output_dir, 'table.txt')}\nFigure:  {figure}"
          f"\nTotal time: {(time.time() - started) / 60:.1f} min")
    return results


def experiment_command(argv: list[str]) -> int:
    """``l3m align-experiment``: parse ``argv`` (``--config`` and flags of :class:`AlignmentSettings`), run."""
    from l3m.parsing import parse_command

    run_alignment_experiment(*parse_command((AlignmentSettings,), argv, "l3m align-experiment", DESCRIPTION))
    return 0


def alignment_table(runs: list[dict], thresholds: list[float]) -> str:
    """One block per threshold: the initial model, then each method trained for it. Relevance, civility and KL
    (nats per response) are mean ± s.e. over held-out prompts; ``met``: mean civility >= b; ``≤1 s.e.``: met, or
    short of b by at most one s.e.; λ: CAID's multiplier its last policy was trained for, GRPO's last; ``resp.``:
    responses sampled in training."""
    columns = [("b", 6, ">"), ("method", 16, "<"), ("relevance ± s.e.", 16, ">"), ("civility ± s.e.", 16, ">"),
               ("met", 3, ">"), ("≤1 s.e.", 7, ">"), ("KL ± s.e.", 12, ">"), ("λ", 7, ">"), ("resp.", 5, ">"),
               ("train s", 7, ">")]
    rows = []
    for b in thresholds:
        for r in runs:
            if r["threshold"] not in (None, b):
                continue
            civility = mean_se(r["constraint"])
            rows.append([f"{b:.3f}", r["label"], mean_pm(*mean_se(r["objective"]), 3), mean_pm(*civility, 3),
                         "yes" if civility[0] >= b else "NO", "yes" if civility[0] + civility[1] >= b else "NO",
                         mean_pm(*mean_se(r["kl"]), 2), "-" if r["multiplier"] is None else f"{r['multiplier']:.3g}",
                         str(r["responses"]), f"{r['train_seconds']:.0f}"])
    return format_table(columns, rows)
