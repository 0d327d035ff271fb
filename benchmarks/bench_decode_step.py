"""One decoding step of the demo model at several batch sizes, with the default float32 product and with the linear
weights packed for oneDNN (``l3m.packed_linear``), side by side in one process. Prints a table of milliseconds per
decoding step (best of ``--repeats`` interleaved rounds) and the ratio, and the share of the bandwidth limit each
reaches (every float32 weight read once per step, at the read bandwidth of a 512 MiB tensor's ``sum()``).

    python benchmarks/bench_decode_step.py                 # the machine's thread count
    python benchmarks/bench_decode_step.py --threads 1
    python benchmarks/bench_decode_step.py --bf16          # the same two under CPU bf16 autocast (as bf16: true)

Each step appends one token to a KV cache of 60 prompt tokens per row. The packed weights are made at each layer's
first call, in an untimed step before the timed ones (a sampling call packs once and then runs tens of steps).
With ``--bf16`` both columns run under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the default casts every
float32 weight to bf16 at each step, the packed one multiplies with bf16 copies packed once; the limit stays the
float32 weights' (a bf16 copy can beat it).
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
    parser.add_argument("--bf16", action="store_true", help="run both under CPU bf16 autocast")
    args = parser.parse_args(argv)

    import contextlib

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

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    with torch.no_grad():
        prompts = {}
        for rows in args.rows:
            ids = torch.randint(0, 1000, (rows, 60), generator=generator)
            with autocast():  # the cache in the dtype the steps write
                prompts[rows] = (model(input_ids=ids, use_cache=True).cache, ids[:, -1:])

        def step_ms(rows):
            cache, token = prompts[rows]
            cache = copy.deepcopy(cache)
            with autocast():
                model(input_ids=token, cache=cache, use_cache=True)
                start = time.perf_counter()
                for _ in range(args.steps):
                    model(input_ids=token, cache=cache, use_cache=True)
            return (time.perf_counter() - start) / args.steps * 1e3

        best = {}
        for _ in range(args.repeats):
            for rows in args.rows:
                best.setdefault(("default", rows), []).append(step_ms(rows))
            with packed_linears(model) as packed:
                for rows in args.rows:
                    best.setdefault(("packed", rows), []).append(step_ms(rows))
    limit_ms = weight_bytes / bandwidth * 1e3
    print(f"{limits['cpu']}, {limits['threads']} threads, {'bf16 autocast' if args.bf16 else 'float32'}; "
          f"{packed} linear layers packed; bandwidth limit {limit_ms:.1f} ms per step "
          f"({weight_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s)")
    print(f"{'rows':>5} {'default ms':>11} {'packed ms':>10} {'ratio':>7} {'default of limit':>17} "
          f"{'packed of limit':>16}")
    for rows in args.rows:
        default, packed_ms = min(best[("default", rows)]), min(best[("packed", rows)])
        print(f"{rows:>5} {default:>11.1f} {packed_ms:>10.1f} {packed_ms / default:>6.2f}x "
              f"{limit_ms / default:>16.0%} {limit_ms / packed_ms:>16.0%}")


if __name__ == "__main__":
    main()
