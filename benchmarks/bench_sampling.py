"""A constraint step's two model passes on one fixed model, with whichever l3m is first on the path: sampling
(``sample_completions``) and the log-prob pass with its backward (``completion_logps``), for 12 steps of 4 held-out
demo prompts x 4 samples, at most 64 new tokens, top-p 0.9, one thread. Prints one JSON line (seconds per step).

    python benchmarks/bench_sampling.py MODEL_DIR                                  # this checkout
    PYTHONPATH=/tmp/old/src python benchmarks/bench_sampling.py MODEL_DIR          # an older commit, side by side

``MODEL_DIR`` is a saved model (e.g. a demo run's ``outputs/demo/l3m__2__8``) or ``demo``. Unlike the whole demo
(``bench_demo.py``), whose runs sample different responses once the code's draws differ, this times old and new code
on the same model and prompts; the responses still differ between the two (different draws), so their token counts
are printed too.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder, or 'demo'")
    args = parser.parse_args(argv)

    import torch

    import l3m
    from l3m.config import ModelConfig, ScriptArguments
    from l3m.data import CompletionCollator, prepare_dataset
    from l3m.loading import load_model_and_tokenizer, load_splits
    from l3m.sampling import completion_logps, eos_ids, sample_completions

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(model_name_or_path=args.model))
    splits = load_splits(ScriptArguments(dataset_name="demo", test_size=48, validation_size=48), 0)
    test = prepare_dataset(splits["test"], tokenizer, 128, name="test")
    collate = CompletionCollator(tokenizer.pad_token_id)
    torch.manual_seed(0)
    sampling = logprob = tokens = 0.0
    steps = range(0, 48, 4)
    for start in steps:
        batch = collate([test[i] for i in range(start, start + 4)])
        begin = time.perf_counter()
        completions = sample_completions(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                         eos_ids(tokenizer, model), tokenizer.pad_token_id, num_generations=4,
                                         max_new_tokens=64, top_p=0.9)
        sampling += time.perf_counter() - begin
        model.train()
        model.zero_grad()
        begin = time.perf_counter()
        completion_logps(model, completions).sum().backward()
        logprob += time.perf_counter() - begin
        tokens += int(completions.completion_mask.sum())
    print(json.dumps({"l3m": l3m.__file__, "steps": len(steps), "sampling_s_per_step": sampling / len(steps),
                      "logprob_forward_backward_s_per_step": logprob / len(steps),
                      "tokens_per_step": tokens / len(steps)}))


if __name__ == "__main__":
    main()
