"""Where the demo's time goes: each run's objective and constraint steps (sampling, log-prob forward, the rest),
each evaluation, and generation's speed against this machine's limits. Keeps a JSON per run for side-by-side
comparison of two commits.

    python benchmarks/bench_demo.py --json new.json                           # the full demo (l3m demo), timed
    python benchmarks/bench_demo.py --max_steps 4 --test_size 8 --json q.json # a quick check of the script
    python benchmarks/bench_demo.py --compare old.json new.json               # the two runs side by side

To time an older commit with this script, put that commit's code first on the path:
``git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old/src python benchmarks/bench_demo.py --json old.json``.

The demo runs unchanged (``l3m.experiments.demo.run_demo``); the script only wraps the functions the trainer and
the evaluation call (``sample_completions``, ``completion_logps``, ``response_nll``, ``L3MTrainer.training_step``)
with timers. Times are wall-clock seconds: run it alone on the machine.

Generation's limit. One decoding step of ``R`` rows reads every weight once (``W`` bytes; the tied embedding /
output matrix once) and does ``2 * P * R`` FLOPs (``P`` parameters). Its fastest possible time is the roofline
``max(W / bandwidth, 2 P R / peak)``, with ``bandwidth`` the measured read bandwidth of a 512 MiB float32 tensor
(``tensor.sum()``, best of 5) and ``peak`` the best ``torch.matmul`` rate on 2048x2048 float32 matrices (best of 10), both
at the thread count the demo uses; ``--compare`` judges both runs against the better of their two measurements. The
bandwidth-only limit is ``W / bandwidth``. ``R`` is the mean number of rows a decoding step runs (responses leave the
batch at their EOS, so it is the tokens sampled over the decoding steps; code that ran every row at every step: the
batch). Reported: achieved time per decoding step (a sampling call's time over its number of decoding steps, prefill
included) as a fraction of each.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import time
from collections import defaultdict
from contextlib import contextmanager


def machine_limits() -> dict:
    """Read bandwidth (GB/s) and fp32 matmul peak (GFLOP/s) at torch's thread count, and the CPU model."""
    import torch

    data = torch.randn(128 * 1024 * 1024)  # 512 MiB, touched
    read = best_seconds(data.sum, 5)
    del data
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = best_seconds(lambda: a @ b, 10)
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "read_bandwidth_gbs": 512 * 2**20 / read / 1e9, "matmul_peak_gflops": 2 * 2048**3 / matmul / 1e9,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def best_seconds(function, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``function``, after one untimed call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def git_commit(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Timers:
    """Accumulates wall time per (run, part) and generation counts per (run, kind)."""

    def __init__(self):
        self.run = "setup"
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.generation = defaultdict(lambda: {"seconds": 0.0, "decode_steps": 0, "rows": 0, "tokens": 0,
                                               "row_steps": 0})

    def add(self, name: str, seconds: float) -> None:
        self.seconds[(self.run, name)] += seconds
        self.calls[(self.run, name)] += 1

    @contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


def instrument(timers: Timers) -> None:
    """Wrap the functions the demo's trainer and evaluation call with timers (module attributes, so the callers'
    own imported names are replaced)."""
    import l3m.evaluation as evaluation
    import l3m.sampling as sampling
    import l3m.training.trainer as trainer_module

    # with l3m's own decoding loop (the one with ``synced``) a response leaves the decoding batch at its EOS:
    # a decoding step runs the rows still going, so the rows it computes add up to the tokens sampled; before, every
    # decoding step ran every row
    drops_finished_rows = "synced" in inspect.signature(sampling.sample_completions).parameters

    def timed_sampler(kind, sample):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            completions = sample(*args, **kwargs)
            seconds = time.perf_counter() - start
            record = timers.generation[(timers.run, kind)]
            record["seconds"] += seconds
            record["decode_steps"] += completions.completion_mask.shape[1]
            record["rows"] = max(record["rows"], completions.completion_mask.shape[0])
            tokens, steps = int(completions.completion_mask.sum()), completions.completion_mask.shape[1]
            record["tokens"] += tokens
            record["row_steps"] += tokens if drops_finished_rows else completions.completion_mask.shape[0] * steps
            timers.add(f"{kind} sampling", seconds)
            return completions
        return wrapper

    def timed(name, function):
        def wrapper(*args, **kwargs):
            with timers.part(name):
                return function(*args, **kwargs)
        return wrapper

    trainer_module.sample_completions = timed_sampler("constraint", trainer_module.sample_completions)
    trainer_module.completion_logps = timed("constraint log-prob forward", trainer_module.completion_logps)
    evaluation.sample_completions = timed_sampler("evaluation", evaluation.sample_completions)
    evaluation.response_nll = timed("evaluation log-ppl", evaluation.response_nll)

    step = trainer_module.L3MTrainer.training_step

    def training_step(self, *args, **kwargs):
        start = time.perf_counter()
        loss = step(self, *args, **kwargs)
        name = f"{'constraint' if self._constraint_step else 'objective'} steps"  # the coin is flipped inside
        timers.add(name, time.perf_counter() - start)
        return loss

    trainer_module.L3MTrainer.training_step = training_step


def run(args) -> dict:
    import torch

    import l3m
    from l3m.config import ModelConfig
    from l3m.experiments import demo
    from l3m.loading import load_model_and_tokenizer

    limits = machine_limits()
    print(f"{limits['cpu']}, {limits['threads']} threads: read bandwidth {limits['read_bandwidth_gbs']:.1f} GB/s, "
          f"fp32 matmul peak {limits['matmul_peak_gflops']:.0f} GFLOP/s", flush=True)
    model, _ = load_model_and_tokenizer(ModelConfig(model_name_or_path="demo"))
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model

    timers = Timers()
    instrument(timers)
    original = demo.train_and_evaluate

    def train_and_evaluate(*a, description="", **kw):  # names the run for the timers
        timers.run = description.removeprefix("Evaluating ").strip() or "run"
        with timers.part("total"):
            return original(*a, description=description, **kw)

    demo.train_and_evaluate = train_and_evaluate
    fields = {k: v for k, v in (("max_steps", args.max_steps), ("test_size", args.test_size), ("seed", args.seed),
                                ("bf16", args.bf16), ("num_proc", args.num_proc))
              if v is not None}
    settings = demo.DemoSettings(output_dir=args.output_dir, **fields)
    start = time.perf_counter()
    records = demo.run_demo(settings)
    total = time.perf_counter() - start
    if not any(part == "total" for _, part in timers.seconds):
        # the runs trained in worker processes, which the timers do not reach: each run's own train and evaluation
        print("(the runs trained in worker processes: parts are each run's training and evaluation; --num_proc 1 "
              "times every part)", flush=True)
        for record in records:
            timers.run = record["run"]["name"]
            timers.add("training (own process)", record["train_seconds"])
            timers.add("evaluation (own process)", record["eval_seconds"])

    generation = {}
    for (name, kind), record in timers.generation.items():
        per_step = record["seconds"] / max(record["decode_steps"], 1)
        bandwidth_limit = weight_bytes / (limits["read_bandwidth_gbs"] * 1e9)
        mean_rows = record["row_steps"] / max(record["decode_steps"], 1)
        compute_limit = 2 * params * mean_rows / (limits["matmul_peak_gflops"] * 1e9)
        generation[f"{name} / {kind}"] = {
            **record, "mean_rows": mean_rows, "seconds_per_decode_step": per_step, "bandwidth_limit_s": bandwidth_limit,
            "roofline_s": max(bandwidth_limit, compute_limit), "of_bandwidth_limit": bandwidth_limit / per_step,
            "of_roofline": max(bandwidth_limit, compute_limit) / per_step}
    return {"commit": git_commit(os.path.dirname(os.path.dirname(os.path.abspath(l3m.__file__)))),
            "l3m_path": os.path.dirname(os.path.abspath(l3m.__file__)), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": limits, "model_params": params,
            "weight_bytes": weight_bytes, "settings": fields, "total_s": total,
            "parts": {f"{name} | {part}": seconds for (name, part), seconds in timers.seconds.items()},
            "calls": {f"{name} | {part}": n for (name, part), n in timers.calls.items()},
            "generation": generation}


def parts_table(results: list[dict]) -> str:
    labels = [r["commit"] for r in results]
    keys = list(dict.fromkeys(k for r in results for k in r["parts"]))
    width = max(len(k) for k in keys + ["total"]) + 2
    lines = [f"{'part (wall s)':<{width}}" + "".join(f"{label:>12}" for label in labels)
             + ("       ratio" if len(results) == 2 else "")]
    for key in keys + ["total"]:
        values = [r["total_s"] if key == "total" else r["parts"].get(key) for r in results]
        line = f"{key:<{width}}" + "".join(f"{v:>12.1f}" if v is not None else f"{'-':>12}" for v in values)
        if len(results) == 2 and None not in values and values[0] > 0:
            line += f"{values[1] / values[0]:>11.2f}x"
        lines.append(line)
    return "\n".join(lines)


def generation_table(result: dict, machine: dict | None = None) -> str:
    """Generation against the roofline of ``machine`` (default: the limits measured in ``result``'s own run)."""
    m = machine or result["machine"]
    bandwidth_limit = result["weight_bytes"] / (m["read_bandwidth_gbs"] * 1e9)
    lines = [f"{'generation':<34}{'rows':>6}{'ms/decode step':>16}{'bandwidth limit':>17}{'roofline':>10}"
             f"{'of bandwidth':>14}{'of roofline':>13}"]
    for key, g in result["generation"].items():
        per_step = g["seconds_per_decode_step"]
        rows = g.get("mean_rows", g["rows"])  # runs before mean_rows was recorded ran every row at every step
        roofline = max(bandwidth_limit, 2 * result["model_params"] * rows / (m["matmul_peak_gflops"] * 1e9))
        lines.append(f"{key:<34}{rows:>6.1f}{1e3 * per_step:>16.1f}{1e3 * bandwidth_limit:>14.1f} ms"
                     f"{1e3 * roofline:>7.1f} ms{100 * bandwidth_limit / per_step:>13.0f}%"
                     f"{100 * roofline / per_step:>12.0f}%")
    lines.append(f"({m['cpu']}, {m['threads']} threads, {m['cpu_capability']}: read bandwidth "
                 f"{m['read_bandwidth_gbs']:.1f} GB/s, fp32 matmul peak {m['matmul_peak_gflops']:.0f} GFLOP/s; "
                 f"{result['weight_bytes'] / 1e6:.0f} MB of weights, {result['model_params'] / 1e6:.0f}M parameters)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="print two JSON results side by side")
    parser.add_argument("--output_dir", default="outputs/bench_demo", help="the demo's output folder")
    parser.add_argument("--max_steps", type=int, help="override the demo's steps per L3M (quick checks)")
    parser.add_argument("--test_size", type=int, help="override the demo's held-out prompts (quick checks)")
    parser.add_argument("--seed", type=int, help="override the demo's seed")
    parser.add_argument("--bf16", choices=("auto", "true", "false"), help="override the demo's bf16 setting")
    parser.add_argument("--num_proc", type=int, help="override the demo's num_proc (1: every part timed)")
    args = parser.parse_args(argv)
    if args.compare:
        results = []
        for path in args.compare:
            with open(path) as f:
                results.append(json.load(f))
        print(parts_table(results))
        # the limits are measured at the start of each run and move with the machine's load: judge both runs
        # against the best of them
        best = {**results[0]["machine"],
                **{key: max(r["machine"][key] for r in results) for key in ("read_bandwidth_gbs",
                                                                          "matmul_peak_gflops")}}
        for result in results:
            print(f"\n{result['commit']}:\n{generation_table(result, best)}")
        return
    import l3m.hardware

    if hasattr(l3m.hardware, "tune_process"):  # what `l3m demo` does first (commits before c5b2262 lack it)
        l3m.hardware.tune_process()
    result = run(args)
    print("\n" + parts_table([result]) + "\n\n" + generation_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
