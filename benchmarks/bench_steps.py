"""Step time, throughput and peak memory of l3m's steps against TRL's GRPO and a PPO-Lagrangian setup, in one run.

    python benchmarks/bench_steps.py                 # the embedded demo model (SmolLM2-135M-Instruct), CPU
    python benchmarks/bench_steps.py --model tiny    # the tests' tiny random Llama: a quick check of the script

Every configuration runs in its own subprocess, so that its peak resident memory (``ru_maxrss``) is its own. All
use the same model, the same prompts in the same order (sequential sampling), ``B`` prompts per step, ``G`` samples
per prompt, the same sampling settings and cap on new tokens, float32, no gradient checkpointing:

- ``l3m objective``: an L3M objective step (length-normalized NLL of the task responses, Eq. 1/3), B examples.
- ``l3m constraint``: an L3M constraint step (sample B*G responses, score, REINFORCE on the barrier's multipliers).
- ``TRL GRPO beta=0`` / ``beta>0``: `trl.GRPOTrainer` steps on the same prompts with a length reward; with
  ``beta > 0`` TRL holds a reference model for the KL term.
- ``PPO-Lag models``: the models a PPO-Lagrangian run (Safe-RLHF) keeps resident, loaded from the same checkpoint:
  policy and reference (causal LMs), reward and cost models and their two critics (sequence-classification heads),
  each run once on 8 tokens (so that their weights are resident), plus gradients and AdamW states of the three
  trained ones (policy, two critics). No step is run: a lower bound on a PPO-Lag step's memory.
- ``matmul peak``: the best FLOP/s of ``torch.matmul`` on large float32 matrices, the machine's practical peak.

Model FLOPs per step (the usual ``6 * params * tokens`` convention, counting work as if nothing were shared):
objective step ``6 N T``; a sampling step ``2 N T`` to generate plus ``6 N T`` to train (``+ 2 N T`` for TRL's
reference forward with ``beta > 0``), with ``N`` parameters and ``T`` the prompt plus response tokens of the step.
Tokens/s: trained tokens per second for objective steps, sampled response tokens per second for sampling steps.

Times are CPU seconds of the worker process (``time.process_time``), not wall time: on a machine shared with other
jobs (which may also pause processes) CPU time is what a step costs; with ``--threads 1`` (the default) it equals
the wall time of an unshared core. The wall-clock median is kept in the JSON output (``wall_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from transformers import TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ["matmul", "l3m-objective", "l3m-constraint", "trl-grpo-beta0", "trl-grpo-beta", "ppo-lag"]
LENGTH_RANGE = (2, 8)  # the demo's shortening range


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def common_parser(description: str) -> argparse.ArgumentParser:
    """The options every step benchmark takes (this one and bench_grpo.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="demo", help="'demo' (default), 'tiny', or a local model folder")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step (B)")
    parser.add_argument("--num-generations", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--max-completion-length", type=int, default=24, help="cap on sampled tokens")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    parser = common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--beta", type=float, default=0.04, help="TRL's KL coefficient for the beta>0 row")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------- workers

def _model_and_data(args):
    """The model folder's tokenizer, and the prepared task examples (prompt + response), in a fixed order."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from l3m.data import prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.model == "tiny":
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from fixtures.tiny import make_examples

        raw = Dataset.from_list(make_examples(256, 8, 12, seed=0))
    else:
        from l3m.assets import demo_data_path
        from l3m.data import load_task_splits

        raw = load_task_splits(demo_data_path(), test_size=48, validation_size=48, seed=0)["train"]
    needed = args.batch * (args.warmup + args.steps)
    data = prepare_dataset(raw.select(range(min(len(raw), 4 * needed))), tokenizer, 128, 0, "bench")
    return tokenizer, data.select(range(needed))


class StepTimer(TrainerCallback):
    """Times optimizer steps (CPU time of the process, and wall time) and keeps each step's logged metrics."""

    def __init__(self):
        self.times, self.wall_times, self.logs, self._start = [], [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.process_time(), time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.process_time() - self._start[0])
        self.wall_times.append(time.perf_counter() - self._start[1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _step_result(args, timer, data, model, sampling: bool, extra_forward: bool = False) -> dict:
    timed = slice(args.warmup, args.warmup + args.steps)
    params = sum(p.numel() for p in model.parameters())
    prompt_tokens = [len(p) for p in data["prompt_ids"]]
    response_tokens = [len(c) for c in data["completion_ids"]]
    per_step = []
    for step in range(args.warmup + args.steps):
        rows = range(step * args.batch, (step + 1) * args.batch)
        if sampling:
            mean_length = [log["completions/mean_length"] for log in timer.logs if "completions/mean_length" in log]
            sampled = mean_length[step] * args.batch * args.num_generations
            tokens = args.num_generations * sum(prompt_tokens[i] for i in rows) + sampled
            flops = (10 if extra_forward else 8) * params * tokens
            per_step.append((timer.times[step], sampled, flops))
        else:
            tokens = sum(prompt_tokens[i] + response_tokens[i] for i in rows)
            per_step.append((timer.times[step], tokens, 6 * params * tokens))
    times = [t for t, _, _ in per_step[timed]]
    return {
        "step_s": statistics.median(times),
        "step_s_all": times,
        "wall_s": statistics.median(timer.wall_times[timed]),
        "tokens_per_s": statistics.median(n / t for t, n, _ in per_step[timed]),
        "flops_per_s": statistics.median(f / t for t, _, f in per_step[timed]),
        "params": params,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_l3m(args, kind: str) -> dict:
    from l3m import Constraint, L3MConfig, L3MTrainer

    tokenizer, data = _model_and_data(args)
    baseline = peak_rss_mb()
    model = _load_causal_lm(args.model_path)
    config = L3MConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-l3m-"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, top_p=0.9, temperature=1.0, learning_rate=2e-5,
        lr_scheduler_type="constant", objective_step_probability=1.0 if kind == "objective" else 0.0,
        train_sampling_strategy="sequential", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", seed=0, max_length=128)
    timer = StepTimer()
    trainer = L3MTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer],
                         constraints=[Constraint("length_tokens", min=LENGTH_RANGE[0], max=LENGTH_RANGE[1])])
    trainer.train()
    return {"models": 1, "rss_before_mb": baseline,
            **_step_result(args, timer, data, model, sampling=kind == "constraint")}


def run_trl(args, beta: float) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer, data = _model_and_data(args)
    baseline = peak_rss_mb()
    model = _load_causal_lm(args.model_path)
    low, high = LENGTH_RANGE

    def length_reward(completion_ids, **kwargs):
        # the reward analogue of l3m's length range: 0 inside, minus the distance outside
        return [-max(low - len(ids), 0, len(ids) - high) for ids in completion_ids]

    # the same rendered prompts (chat template applied by l3m.data) as plain strings: TRL adds nothing to them
    prompts = Dataset.from_dict({"prompt": list(data["prompt"])})
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch * args.num_generations, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, top_p=0.9, temperature=1.0, beta=beta,
        learning_rate=2e-5, lr_scheduler_type="constant", shuffle_dataset=False, bf16=False,
        activation_checkpointing=False, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
        save_strategy="no", seed=0)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=prompts,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    models = 1 + (trainer.ref_model is not None)
    return {"models": models, "rss_before_mb": baseline, **_step_result(args, timer, data, model, sampling=True, extra_forward=beta > 0)}


def _load_causal_lm(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_ppo_lag(args) -> dict:
    """Load what a PPO-Lagrangian run keeps resident; allocate AdamW states for the trained models."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401 (imports first)

    before = peak_rss_mb()
    policy, reference = _load_causal_lm(args.model_path), _load_causal_lm(args.model_path)
    heads = [AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=1, dtype=torch.float32)
             for _ in range(4)]  # reward, cost, reward critic, cost critic
    models = [policy, reference, *heads]
    # Weights may be memory-mapped from the checkpoint and only become resident when read: one small forward each
    # (a PPO-Lag step runs all six) makes them resident.
    tokens = torch.randint(0, policy.config.vocab_size, (1, 8))
    with torch.no_grad():
        for model in models:
            model(input_ids=tokens)
    loaded = peak_rss_mb()
    trained = [policy, heads[2], heads[3]]
    for model in trained:
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        optimizer.step()  # allocates exp_avg and exp_avg_sq for every parameter
        model._bench_optimizer = optimizer
    return {"models": len(models), "params": sum(p.numel() for m in models for p in m.parameters()),
            "rss_before_mb": before, "rss_models_mb": loaded, "peak_rss_mb": peak_rss_mb()}


def run_matmul(args, size: int = 2048, repeats: int = 5, per_repeat: int = 8) -> dict:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(per_repeat):
            torch.matmul(a, b)
        best = max(best, per_repeat * 2 * size**3 / (time.process_time() - start))
    return {"flops_per_s": best, "size": size, "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb()}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    runs = {
        "matmul": lambda: run_matmul(args),
        "l3m-objective": lambda: run_l3m(args, "objective"),
        "l3m-constraint": lambda: run_l3m(args, "constraint"),
        "trl-grpo-beta0": lambda: run_trl(args, 0.0),
        "trl-grpo-beta": lambda: run_trl(args, args.beta),
        "ppo-lag": lambda: run_ppo_lag(args),
    }
    return runs[args.worker]()


# ------------------------------------------------------------------------------------------------------------ parent

def model_folder(args, scratch: str) -> str:
    if args.model == "demo":
        from l3m.assets import demo_model_path

        return demo_model_path()
    if args.model == "tiny":
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from fixtures.tiny import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        folder = os.path.join(scratch, "tiny")
        build_model(tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder
    return args.model


def run_config(name: str, args, path: str, argv: list[str], script: str = __file__) -> dict:
    """Run configuration ``name`` in its own process of ``script`` (a worker), with ``args.threads`` threads."""
    command = [sys.executable, os.path.abspath(script), *argv, "--worker", name, "--model-path", path]
    started = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-4000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {name}: done in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return record


LABELS = {"l3m-objective": "l3m objective step", "l3m-constraint": "l3m constraint step",
          "trl-grpo-beta0": "TRL GRPO step, beta=0", "trl-grpo-beta": "TRL GRPO step, beta={beta}",
          "ppo-lag": "PPO-Lag resident models"}


def format_table(results: dict, args) -> str:
    peak = results.get("matmul", {}).get("flops_per_s")
    header = (f"{'configuration':<26} {'models':>6} {'CPU s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8} "
              f"{'peak RSS MB':>12} {'above imports':>14}")
    lines = [header, "-" * len(header)]
    for name in CONFIGS:
        if name == "matmul" or name not in results:
            continue
        r = results[name]
        label = LABELS[name].format(beta=args.beta)
        if name == "ppo-lag":
            lines.append(f"{label:<26} {r['models']:>6} {'-':>7} {'-':>9} {'-':>8} {'-':>8} {r['peak_rss_mb']:>12.0f} "
                         f"{r['peak_rss_mb'] - r['rss_before_mb']:>14.0f}")
            continue
        share = f"{100 * r['flops_per_s'] / peak:.0f}%" if peak else "-"
        lines.append(f"{label:<26} {r['models']:>6} {r['step_s']:>7.2f} {r['tokens_per_s']:>9.1f} "
                     f"{r['flops_per_s'] / 1e9:>8.1f} {share:>8} {r['peak_rss_mb']:>12.0f} "
                     f"{r['peak_rss_mb'] - r['rss_before_mb']:>14.0f}")
    if peak:
        lines.append(f"{'matmul peak (fp32)':<26} {'':>6} {'':>7} {'':>9} {peak / 1e9:>8.1f} {'100%':>8} "
                     f"{results['matmul']['peak_rss_mb']:>12.0f}")
    lines.append("")
    lines.extend(ratio_lines(results))
    return "\n".join(lines)


def ratio_lines(results: dict) -> list[str]:
    lines = []
    get = results.get
    if get("l3m-constraint") and get("trl-grpo-beta0"):
        c, t0 = results["l3m-constraint"], results["trl-grpo-beta0"]
        lines.append(f"l3m constraint step / TRL GRPO beta=0 step: time {c['step_s'] / t0['step_s']:.2f}x, "
                     f"peak RSS {c['peak_rss_mb'] / t0['peak_rss_mb']:.2f}x ({_above(c) / _above(t0):.2f}x above imports)")
    if get("l3m-constraint") and get("trl-grpo-beta"):
        c, t1 = results["l3m-constraint"], results["trl-grpo-beta"]
        lines.append(f"l3m constraint step / TRL GRPO beta>0 step: time {c['step_s'] / t1['step_s']:.2f}x, "
                     f"peak RSS {c['peak_rss_mb'] / t1['peak_rss_mb']:.2f}x ({_above(c) / _above(t1):.2f}x above imports)")
    if get("ppo-lag"):
        p = results["ppo-lag"]
        l3m = [results[k] for k in ("l3m-objective", "l3m-constraint") if get(k)]
        if l3m:
            worst = max(l3m, key=lambda r: r["peak_rss_mb"])
            lines.append(f"l3m peak RSS / PPO-Lag models + optimizer states: {worst['peak_rss_mb'] / p['peak_rss_mb']:.2f}x "
                         f"({_above(worst) / _above(p):.2f}x above imports; 1 model vs {p['models']})")
    if get("matmul"):
        peak = results["matmul"]["flops_per_s"]
        for name in ("l3m-objective", "l3m-constraint", "trl-grpo-beta0"):
            if get(name):
                lines.append(f"{LABELS[name].format(beta='')}: achieved / matmul peak = "
                             f"{results[name]['flops_per_s'] / peak:.2f}")
    return lines


def _above(record: dict) -> float:
    """Peak RSS above what the process held before loading any model (the imports)."""
    return record["peak_rss_mb"] - record["rss_before_mb"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        path = model_folder(args, scratch)
        print(f"model {path}: B={args.batch} prompts x G={args.num_generations} samples, <= "
              f"{args.max_completion_length} new tokens, {args.steps} timed steps after {args.warmup}", file=sys.stderr)
        results = {name: run_config(name, args, path, argv) for name in args.configs.split(",")}
    table = format_table(results, args)
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
