"""Where the time of one L3M constraint step goes: phases (sampling, log-prob forward, backward; CPU seconds of
this process) and top operators.

    python benchmarks/profile_constraint_step.py            # the demo model, B=4 prompts x G=4 samples, 24 tokens
    python benchmarks/profile_constraint_step.py --whole    # without sharing each prompt's prefix (for comparison)

``--whole`` runs every response's whole sequence through the model (the prompt G times), as before prompt sharing.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer

from l3m.assets import demo_data_path, demo_model_path
from l3m.data import CompletionCollator, load_task_splits, prepare_dataset
from l3m.sampling import completion_logps, eos_ids, sample_completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--whole", action="store_true", help="no prompt sharing: whole sequences, prompts G times")
    parser.add_argument("--rows", type=int, default=15, help="operators to list")
    args = parser.parse_args()

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
        times = {}
        start = time.process_time()
        completions = sample_completions(model, prompt_ids, prompt_mask, eos_ids(tokenizer, model),
                                         tokenizer.pad_token_id, num_generations=group,
                                         max_new_tokens=args.max_completion_length)
        times["sampling"] = time.process_time() - start
        start = time.process_time()
        logps = completion_logps(model, dataclasses.replace(completions, group_size=group))
        times["log-prob forward"] = time.process_time() - start
        start = time.process_time()
        logps.mean().backward()
        times["backward"] = time.process_time() - start
        model.zero_grad()
        return times

    torch.manual_seed(0)
    step()  # warm-up
    torch.manual_seed(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = step()
    total = sum(times.values())
    print(f"prompts {tuple(batch['prompt_input_ids'].shape)}, {args.num_generations} samples each, "
          f"{'whole sequences' if args.whole else 'shared prompts'}; threads {torch.get_num_threads()}")
    for phase, seconds in times.items():
        print(f"  {phase:<18} {seconds:6.2f} s  {100 * seconds / total:4.0f}%")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
