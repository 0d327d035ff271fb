"""Where the time of an L3M constraint step goes: phases (sampling, log-prob forward, backward; CPU seconds of
this process, its system part and page faults, summed over ``--steps`` steps) and the top operators of one more.

    python benchmarks/profile_constraint_step.py            # the demo model, B=4 prompts x G=4 samples, 24 tokens
    python benchmarks/profile_constraint_step.py --whole    # without sharing each prompt's prefix (for comparison)
    python benchmarks/profile_constraint_step.py --default-malloc   # glibc's malloc as it comes (see below)

``--whole`` runs every response's whole sequence through the model (the prompt G times), as before prompt sharing.
The script keeps freed memory in the process as ``l3m``'s commands do (:func:`l3m.hardware.keep_freed_memory`);
``--default-malloc`` leaves glibc's default, under which the system time and page faults show the kernel handing
out and zeroing fresh pages for every step's activations.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer

from l3m.assets import demo_data_path, demo_model_path
from l3m.data import CompletionCollator, load_task_splits, prepare_dataset
from l3m.hardware import keep_freed_memory
from l3m.sampling import completion_logps, eos_ids, sample_completions


def usage() -> tuple[float, float, int]:
    """This process's user and system CPU seconds and minor page faults so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--whole", action="store_true", help="no prompt sharing: whole sequences, prompts G times")
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    parser.add_argument("--default-malloc", action="store_true", help="glibc's malloc as it comes")
    parser.add_argument("--warmup", type=int, default=1, help="unprofiled steps first")
    parser.add_argument("--steps", type=int, default=1, help="measured steps (phases: their sums); then one profiled")
    args = parser.parse_args()
    if not args.default_malloc:
        keep_freed_memory()

    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train = load_task_splits(demo_data_path(), test_size=48, validation_size=48, seed=0)["train"]
    data = prepare_dataset(train.select(range(4 * args.batch)), tokenizer, 128, 0, "profile")
    batch = CompletionCollator(tokenizer.pad_token_id)([data[i] for i in range(args.batch)])
    group = 1 if args.whole else args.num_generations
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if args.whole:  # every response gets its own copy of the prompt
        prompt_ids = prompt_ids.repeat_interleave(args.num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(args.num_generations, dim=0)
    model.train()

    def step() -> dict:
        phases, last = {}, usage()

        def done(phase):
            nonlocal last
            now = usage()
            phases[phase] = tuple(b - a for a, b in zip(last, now))
            last = now

        completions = sample_completions(model, prompt_ids, prompt_mask, eos_ids(tokenizer, model),
                                         tokenizer.pad_token_id, num_generations=group,
                                         max_new_tokens=args.max_completion_length)
        done("sampling")
        logps = completion_logps(model, dataclasses.replace(completions, group_size=group))
        done("log-prob forward")
        logps.mean().backward()
        done("backward")
        model.zero_grad()
        return phases

    for seed in range(args.warmup):
        torch.manual_seed(seed)
        step()
    phases = {}  # measured without the profiler, whose own records take memory as the steps run
    for seed in range(args.warmup, args.warmup + args.steps):
        torch.manual_seed(seed)
        for phase, used in step().items():
            phases[phase] = tuple(a + b for a, b in zip(phases.get(phase, (0, 0, 0)), used))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = sum(user + system for user, system, _ in phases.values())
    print(f"prompts {tuple(batch['prompt_input_ids'].shape)}, {args.num_generations} samples each, "
          f"{'whole sequences' if args.whole else 'shared prompts'}; {args.steps} step(s); threads "
          f"{torch.get_num_threads()}; "
          f"{'default malloc' if args.default_malloc else 'freed memory kept'}")
    print(f"  {'phase':<18} {'CPU s':>6}  {'share':>5}  {'system s':>8}  {'page faults':>11}")
    for phase, (user, system, faults) in phases.items():
        print(f"  {phase:<18} {user + system:6.2f}  {100 * (user + system) / total:4.0f}%  {system:8.2f}  {faults:11d}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
