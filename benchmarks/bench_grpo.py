"""Step time and peak memory of ConstrainedGRPOTrainer against plain trl.GRPOTrainer, side by side, in one run.

    python benchmarks/bench_grpo.py                 # the embedded demo model (SmolLM2-135M-Instruct), CPU
    python benchmarks/bench_grpo.py --model tiny    # the tests' tiny random Llama: a quick check of the script

Both trainers get the same model, the same prompts in the same order, ``B`` prompts x ``G`` completions per step,
the same sampling settings, float32, no gradient checkpointing, beta=0, and the same objective (words per
response). The constrained one adds one length constraint (mean response <= 8 tokens, violated by the demo model)
weighted by the log barrier (solver ``l3m``), so every step runs the solver, the extra reward column, the gather and
the weight update. ``learning_rate`` is 0: the weights never move, so both trainers sample exactly the same
completions step after step and the difference in step time is the wrapper's own cost, not a difference in response
lengths (with a learning rate the constrained policy would soon answer shorter, and step faster).

Every configuration runs in its own subprocess (peak resident memory ``ru_maxrss`` is its own), ``--repeats`` times,
interleaved (plain, constrained, plain, constrained, ...) so that a change in the machine's load hits both alike.
Times are CPU seconds of the worker (``time.process_time``) per optimizer step, median over the timed steps of all
repeats; with ``--threads 1`` (default) that is the wall time of an unshared core.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_steps import (StepTimer, _load_causal_lm, _model_and_data, common_parser, model_folder,  # noqa: E402
                         peak_rss_mb, run_config)

CONFIGS = ["trl-grpo", "l3m-grpo"]
LABELS = {"trl-grpo": "trl.GRPOTrainer", "l3m-grpo": "l3m ConstrainedGRPOTrainer (l3m)"}
BUDGET = 8.0  # tokens


def parse_args(argv=None):
    parser = common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved")
    return parser.parse_args(argv)


def run(args, constrained: bool) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from l3m import Constraint, ConstrainedGRPOConfig, ConstrainedGRPOTrainer
    from l3m.rewards import length_words

    torch.set_num_threads(args.threads)
    tokenizer, data = _model_and_data(args)
    prompts = Dataset.from_dict({"prompt": list(data["prompt"])})  # rendered with the chat template by l3m.data
    before = peak_rss_mb()
    model = _load_causal_lm(args.model_path)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch * args.num_generations, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, top_p=0.9, temperature=1.0, beta=0.0, learning_rate=0.0,
        lr_scheduler_type="constant", shuffle_dataset=False, bf16=False, activation_checkpointing=False,
        logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
        scale_rewards="batch")
    timer = StepTimer()
    if constrained:
        trainer = ConstrainedGRPOTrainer(model, reward_funcs="length_words", train_dataset=prompts,
                                         args=ConstrainedGRPOConfig(**common, solver="l3m"), processing_class=tokenizer,
                                         constraints=[Constraint("length_tokens", max=BUDGET, name="length")],
                                         callbacks=[timer])
    else:
        trainer = GRPOTrainer(model, reward_funcs=length_words, train_dataset=prompts, args=GRPOConfig(**common),
                              processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    timed = slice(args.warmup, args.warmup + args.steps)
    lengths = [log["completions/mean_length"] for log in timer.logs if "completions/mean_length" in log]
    return {"step_s_all": timer.times[timed], "wall_s_all": timer.wall_times[timed], "mean_length": lengths[timed],
            "multipliers": [log.get("constraints/length/multiplier") for log in timer.logs if "loss" in log][timed],
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}



def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, records in runs.items():
        steps = [t for r in records for t in r["step_s_all"]]
        out[name] = {"step_s": statistics.median(steps), "step_s_min": min(steps), "steps": len(steps),
                     "wall_s": statistics.median(t for r in records for t in r["wall_s_all"]),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
                     "above_imports_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in records),
                     "mean_length": statistics.mean(x for r in records for x in r["mean_length"])}
    return out


def format_table(summary: dict) -> str:
    header = (f"{'trainer':<34} {'CPU s/step':>10} {'min':>7} {'wall s':>7} {'peak RSS MB':>12} {'above imports':>14} "
              f"{'mean len':>9}")
    lines = [header, "-" * len(header)]
    for name in CONFIGS:
        r = summary[name]
        lines.append(f"{LABELS[name]:<34} {r['step_s']:>10.3f} {r['step_s_min']:>7.3f} {r['wall_s']:>7.2f} "
                     f"{r['peak_rss_mb']:>12.0f} {r['above_imports_mb']:>14.0f} {r['mean_length']:>9.1f}")
    plain, ours = summary["trl-grpo"], summary["l3m-grpo"]
    lines += ["", f"overhead: step time {100 * (ours['step_s'] / plain['step_s'] - 1):+.1f}% (median), "
                  f"{100 * (ours['step_s_min'] / plain['step_s_min'] - 1):+.1f}% (min); "
                  f"peak RSS {100 * (ours['peak_rss_mb'] / plain['peak_rss_mb'] - 1):+.1f}%"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run(args, constrained=args.worker == "l3m-grpo")))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        path = model_folder(args, scratch)
        print(f"model {path}: B={args.batch} prompts x G={args.num_generations}, <= {args.max_completion_length} new "
              f"tokens, {args.steps} timed steps after {args.warmup}, {args.repeats} repeats", file=sys.stderr)
        runs = {name: [] for name in CONFIGS}
        for _ in range(args.repeats):
            for name in CONFIGS:
                runs[name].append(run_config(name, args, path, argv, script=__file__))
    for plain, ours in zip(runs["trl-grpo"], runs["l3m-grpo"]):
        assert plain["mean_length"] == ours["mean_length"], "the two trainers sampled different completions"
    summary = summarize(runs)
    table = format_table(summary)
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
