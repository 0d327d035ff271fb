"""benchmarks/bench_demo.py's side-by-side view of two committed runs: ratios per part, one roofline for both."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_demo", os.path.join(ROOT, "benchmarks", "bench_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_prints_each_part_with_its_ratio_and_judges_both_runs_against_the_better_limits(capsys):
    paths = [os.path.join(ROOT, "docs", f"bench_demo_{name}.json") for name in ("before", "after")]
    before, after = (json.load(open(path)) for path in paths)
    _bench().main(["--compare", *paths])
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total "))
    assert f"{after['total_s'] / before['total_s']:.2f}x" in total
    best_peak = max(before["machine"]["matmul_peak_gflops"], after["machine"]["matmul_peak_gflops"])
    assert out.count(f"fp32 matmul peak {best_peak:.0f} GFLOP/s") == 2  # one set of limits for both runs
    # a decoding step of 16 rows against that roofline: 2 * P * 16 FLOPs at the peak
    record = after["generation"]["L3M [13, 30] / constraint"]
    roofline = max(after["weight_bytes"] / (max(before["machine"]["read_bandwidth_gbs"],
                                                after["machine"]["read_bandwidth_gbs"]) * 1e9),
                   2 * after["model_params"] * record["rows"] / (best_peak * 1e9))
    line = next(line for line in out.splitlines() if line.startswith("L3M [13, 30] / constraint") and
                f"{1e3 * record['seconds_per_decode_step']:.1f}" in line)
    assert line.rstrip().endswith(f"{100 * roofline / record['seconds_per_decode_step']:.0f}%")
