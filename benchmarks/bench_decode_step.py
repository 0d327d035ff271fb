"""One decoding step of the demo model at several batch sizes, with the default float32 product and with the linear
weights packed for oneDNN (``l3m.packed_linear``), side by side in one process. Prints a table of milliseconds per
decoding step (best of ``--repeats`` interleaved rounds) and the ratio, and the share of the bandwidth limit each
reaches (every weight read once per step, at the read bandwidth of a 512 MiB tensor's ``sum()``).

    python benchmarks/bench_decode_step.py                 # the machine's thread count
    python benchmarks/bench_decode_step.py --threads 1

Each step appends one token to a KV cache of 60 prompt tokens per row; the packed weights are made once, outside
the timing (a sampling call packs once and then runs tens of steps; the packing time is printed).
"""

from __future__ import annotations

import argparse
import copy
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 48], help="batch sizes to time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--steps", type=int, default=4, help="decoding steps timed per round")
    args = parser.parse_args(argv)

    import torch

    from bench_demo import machine_limits
    from l3m.config import ModelConfig
    from l3m.loading import load_model_and_tokenizer
    from l3m.packed_linear import packed_linears

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(ModelConfig(model_name_or_path="demo"))
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limits = machine_limits()
    bandwidth = limits["read_bandwidth_gbs"] * 1e9
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prompts = {}
        for rows in args.rows:
            ids = torch.randint(0, 1000, (rows, 60), generator=generator)
            prompts[rows] = (model(input_ids=ids, use_cache=True).cache, ids[:, -1:])

        def step_ms(rows):
            cache, token = prompts[rows]
            cache = copy.deepcopy(cache)
            model(input_ids=token, cache=cache, use_cache=True)
            start = time.perf_counter()
            for _ in range(args.steps):
                model(input_ids=token, cache=cache, use_cache=True)
            return (time.perf_counter() - start) / args.steps * 1e3

        best = {}
        for _ in range(args.repeats):
            for rows in args.rows:
                best.setdefault(("default", rows), []).append(step_ms(rows))
            start = time.perf_counter()
            with packed_linears(model) as packed:
                pack_ms = (time.perf_counter() - start) * 1e3
                for rows in args.rows:
                    best.setdefault(("packed", rows), []).append(step_ms(rows))
    limit_ms = weight_bytes / bandwidth * 1e3
    print(f"{limits['cpu']}, {limits['threads']} threads; {packed} linear layers packed in {pack_ms:.0f} ms; "
          f"bandwidth limit {limit_ms:.1f} ms per step ({weight_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s)")
    print(f"{'rows':>5} {'default ms':>11} {'packed ms':>10} {'ratio':>7} {'default of limit':>17} "
          f"{'packed of limit':>16}")
    for rows in args.rows:
        default, packed_ms = min(best[("default", rows)]), min(best[("packed", rows)])
        print(f"{rows:>5} {default:>11.1f} {packed_ms:>10.1f} {packed_ms / default:>6.2f}x "
              f"{limit_ms / default:>16.0%} {limit_ms / packed_ms:>16.0%}")


if __name__ == "__main__":
    main()
