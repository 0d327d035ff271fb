"""``l3m compare`` on the tiny model saved to disk: every method trained and evaluated under one budget, one table,
results.json and a figure; a failing method is reported, not lost; bad compare configs stop early with one line."""

from __future__ import annotations

import json

import pytest
import yaml

from l3m.cli import main
from l3m.files import write_jsonl
from l3m.experiments.compare import compare_table, expand_methods, plan_comparison
from l3m.errors import L3MConfigError
from l3m.training.coin import objective_step_count

METHODS = [
    {"name": "SFT", "solver": "sft", "match_objective_steps": True},
    {"name": "L3M", "solver": "l3m"},
    {"name": "MM", "solver": "mm", "sweep": {"dual_lr": [0.05, 0.5]}},
    {"name": "lagged_dual", "solver": "lagged_dual", "dual_update_steps": 1},
]
NAMES = ["SFT", "L3M", "MM (dual_lr=0.05)", "MM (dual_lr=0.5)", "lagged_dual"]


def _compare_yaml(assets, path, **overrides) -> str:
    values = dict(model_name_or_path=assets["model"], dataset_name=assets["data"], test_size=8, validation_size=4,
                  constraints=[{"name": "length", "reward": "length_tokens", "min": 2, "max": 5}], max_steps=3,
                  per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_length=128,
                  per_device_eval_batch_size=8, eval_max_new_tokens=12, logging_steps=1, seed=0, use_cpu=True,
                  report_to="none", disable_tqdm=True, output_dir=str(path.parent / "compare"), methods=METHODS,
                  num_proc=1)
    values.update(overrides)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({k: v for k, v in values.items() if v is not None}, f, sort_keys=False)
    return str(path)


def test_compare_trains_every_method_and_reports_one_table(assets, tmp_path, capsys):
    config = _compare_yaml(assets, tmp_path / "compare.yaml")
    assert main(["compare", "--config", config]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\nconstraints: length (expectation) in [2, 5]\n") + 1:]
    header = table.splitlines()[1]
    for column in ("method", "solver", "steps", "length mean ± std", "length ok", "length in range",
                   "task log-ppl mean ± std", "train s", "peak MB"):
        assert column in header, column
    rows = table.splitlines()[3:3 + len(NAMES)]
    assert [row[:28].strip() for row in rows] == NAMES
    assert all("FAILED" not in row for row in rows)
    for name in NAMES:  # progress is printed as each method runs
        assert f"] {name}: training" in out and f"] {name}: trained in" in out

    with open(tmp_path / "compare" / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    methods = results["methods"]
    assert [m["name"] for m in methods] == NAMES
    assert [m["solver"] for m in methods] == ["sft", "l3m", "mm", "mm", "lagged_dual"]
    assert methods[0]["steps"] == objective_step_count(0, 3) and all(m["steps"] == 3 for m in methods[1:])
    assert methods[2]["overrides"] == {"solver": "mm", "dual_lr": 0.05}
    for m in methods:
        s = m["summary"]
        assert s["num_examples"] == 8 and len(m["rewards"]["length"]) == 8
        for key in ("length/mean", "length/satisfied", "length/inside_frac", "length/min/value",
                    "length/max/value", "log_ppl_mean", "log_ppl_std"):
            assert key in s, (m["name"], key)
        assert m["train_seconds"] > 0 and m["peak_memory_mb"] > 0
    assert methods[0]["solver_state"] is None  # SFT ignores the constraints
    assert methods[4]["solver_state"]["history"]  # the lagged dual iterates are kept
    assert (tmp_path / "compare" / "compare_length.png").stat().st_size > 0


def test_constrained_methods_sample_the_constraint_dataset(assets, tmp_path, monkeypatch, capsys):
    """`constraint_dataset_name` at the top level: every constrained method's constraint steps sample only those
    prompts (SFT gets none), and evaluation stays on the test split."""
    from l3m.training.trainer import L3MTrainer

    sampled_for, constraint_prompts = {}, {}
    constraint_loss, init = L3MTrainer._constraint_loss, L3MTrainer.__init__

    def record(self, model, inputs):
        sampled_for.setdefault(self.args.solver, []).extend(inputs["prompts"])
        return constraint_loss(self, model, inputs)

    def count(self, *args, **kwargs):
        init(self, *args, **kwargs)
        constraint_prompts[self.args.solver] = self._constraint_prompts

    monkeypatch.setattr(L3MTrainer, "_constraint_loss", record)
    monkeypatch.setattr(L3MTrainer, "__init__", count)
    prompts = write_jsonl(tmp_path / "deployed.jsonl", [{"prompt": [{"role": "user", "content": "tell me more"}]}])
    methods = [{"name": "SFT", "solver": "sft"}, {"name": "L3M", "solver": "l3m"}, {"name": "MM", "solver": "mm"}]
    config = _compare_yaml(assets, tmp_path / "compare.yaml", methods=methods, constraint_dataset_name=prompts)
    assert main(["compare", "--config", config]) == 0
    assert "Constraint steps sample the 1 prompts of" in capsys.readouterr().out
    assert constraint_prompts == {"sft": 0, "l3m": 1, "mm": 1}
    assert set(sampled_for) == {"l3m", "mm"}
    assert all("tell me more" in prompt for values in sampled_for.values() for prompt in values)
    with open(tmp_path / "compare" / "results.json", encoding="utf-8") as f:
        assert all(m["summary"]["num_examples"] == 8 for m in json.load(f)["methods"])


def test_methods_side_by_side_match_one_after_another_at_the_same_thread_count(assets, tmp_path, capsys):
    """num_proc 2: two methods at a time in worker processes (on two cores one thread each). The same methods one
    after another with as many threads give the same table, to the bit; a failing method is reported and the others
    finish."""
    import torch

    from l3m.experiments.parallel import plan_processes

    methods = [{"name": "SFT", "solver": "sft", "match_objective_steps": True}, {"name": "L3M", "solver": "l3m"},
               {"name": "broken", "solver": "l3m", "model_name_or_path": str(tmp_path / "no-such-model")}]
    results = {}
    for num_proc in (2, 1):
        config = _compare_yaml(assets, tmp_path / f"compare{num_proc}.yaml", methods=methods, num_proc=num_proc,
                               output_dir=str(tmp_path / f"compare{num_proc}"))
        threads = torch.get_num_threads()
        torch.set_num_threads(plan_processes(2, len(methods))[1])  # the workers' thread count
        try:
            assert main(["compare", "--config", config]) == 0
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr().out
        assert ("3 methods, 2 at a time with" in out) == (num_proc == 2)
        assert "] broken: FAILED: L3MConfigError: model_name_or_path: cannot load" in out
        assert "] L3M: trained in" in out and "] SFT: trained in" in out
        with open(tmp_path / f"compare{num_proc}" / "results.json", encoding="utf-8") as f:
            results[num_proc] = json.load(f)["methods"]
    assert (tmp_path / "compare2" / "l3m" / "output.log").is_file()  # each worker's output in its own log
    assert "model_name_or_path: cannot load" in (tmp_path / "compare2" / "broken" / "output.log").read_text()
    for parallel, sequential in zip(results[2], results[1]):
        assert parallel["name"] == sequential["name"] and ("error" in parallel) == ("error" in sequential)
        for key in ("rewards", "log_ppl", "lengths", "solver_state"):
            assert parallel.get(key) == sequential.get(key), (parallel["name"], key)


def test_the_default_num_proc_plans_each_method_memory_from_its_model_size(assets, tmp_path, monkeypatch):
    from l3m.experiments import compare

    config = _compare_yaml(assets, tmp_path / "compare.yaml", num_proc=None)
    plans, _, args = plan_comparison(["--config", config])
    planned = {}
    monkeypatch.setattr("l3m.experiments.parallel.plan_processes",
                        lambda num_proc, jobs, gb_per_process: planned.update(gb=gb_per_process) or (2, 1))
    assert args.num_proc is None and compare._plan_processes(None, plans) == (2, 1)
    from transformers import AutoModelForCausalLM

    parameters = AutoModelForCausalLM.from_pretrained(assets["model"]).num_parameters()
    assert planned["gb"] == pytest.approx(parameters * compare.RUN_BYTES_PER_PARAMETER / 1e9)
    with pytest.raises(L3MConfigError, match=r"^num_proc: expected at least 1"):
        plan_comparison(["--config", config, "--num_proc", "0"])


def test_sft_matches_the_objective_steps_of_the_constrained_methods(assets, tmp_path):
    config = _compare_yaml(assets, tmp_path / "compare.yaml", max_steps=10)
    plans, _, _ = plan_comparison(["--config", config, "--seed", "3"])
    steps = {method.name: args.max_steps for method, args, _ in plans}
    assert steps["SFT"] == objective_step_count(3, 10) < 10
    assert all(steps[name] == 10 for name in NAMES[1:])


def test_a_failing_method_is_reported_and_the_others_still_run(assets, tmp_path, capsys):
    methods = [{"name": "broken", "solver": "l3m", "model_name_or_path": str(tmp_path / "no-such-model")},
               {"name": "L3M", "solver": "l3m"}]
    config = _compare_yaml(assets, tmp_path / "compare.yaml", methods=methods, max_steps=2)
    assert main(["compare", "--config", config]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("broken "))
    assert "FAILED: L3MConfigError: model_name_or_path: cannot load" in row
    with open(tmp_path / "compare" / "results.json", encoding="utf-8") as f:
        broken, ok = json.load(f)["methods"]
    assert "error" in broken and "error" not in ok and ok["summary"]["num_examples"] == 8
    assert "FAILED" not in compare_table([ok], plan_comparison(["--config", config])[1][1].parsed_constraints)


@pytest.mark.parametrize("methods, message", [
    (None, r"^methods: expected a non-empty list"),
    ([], r"^methods: expected a non-empty list"),
    (["l3m"], r"^methods\[0\]: expected a mapping"),
    ([{"solver": "mm"}], r"^methods\[0\]\.name: required"),
    ([{"name": "MM", "solver": "mm", "dual_rl": 0.1}], r"^methods\[MM\]: unknown field\(s\) \['dual_rl'\]"),
    ([{"name": "MM", "solver": "mm", "sweep": {"dual_lr": 0.1}}],
     r"^methods\[MM\]\.sweep\.dual_lr: expected a non-empty list"),
    ([{"name": "MM", "solver": "mm", "sweep": {"lr": [1]}}], r"^methods\[MM\]\.sweep: unknown field 'lr'"),
    ([{"name": "A", "solver": "mm"}, {"name": "A", "solver": "l3m"}], r"^methods: duplicated name\(s\) \['A'\]"),
    ([{"name": "PPO", "solver": "ppo"}], r"^methods\[PPO\]: solver: must be one of l3m, mm, lagged_dual, fixed, sft"),
    ([{"name": "L3M", "solver": "l3m", "constraints": [{"reward": "length_tokens", "max": 3}]}],
     r"^methods\[L3M\]: \['constraints'\] must be the same for every method; set them at the top level"),
    ([{"name": "MM", "solver": "mm", "sweep": {"test_size": [4, 8]}}], r"^methods\[MM\]: \['test_size'\] must be"),
    ([{"name": "MM", "solver": "mm", "constraint_dataset_name": "prompts.jsonl"}],
     r"^methods\[MM\]: \['constraint_dataset_name'\] must be the same for every method"),
    ([{"name": "MM", "solver": "mm", "sweep": {"dual_lr": [0.1, -1]}}],
     r"^methods\[MM \(dual_lr=-1\)\]: dual_lr: must be >= 0"),
])
def test_bad_compare_configs_stop_with_one_line(assets, tmp_path, capsys, methods, message):
    config = _compare_yaml(assets, tmp_path / "compare.yaml", methods=methods)
    with pytest.raises(L3MConfigError, match=message):
        plan_comparison(["--config", config])
    assert main(["compare", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("l3m: error: ") and "\n" not in err
    assert not (tmp_path / "compare").exists()  # nothing trained, nothing written


def test_compare_needs_a_config_and_a_constraint(assets, tmp_path, capsys):
    assert main(["compare"]) == 2
    assert capsys.readouterr().err.strip() == ("l3m: error: --config: required (a compare YAML, e.g. "
                                               "examples/configs/compare.yaml)")
    config = _compare_yaml(assets, tmp_path / "compare.yaml", constraints=None)
    assert main(["compare", "--config", config]) == 2
    assert capsys.readouterr().err.startswith("l3m: error: constraints: a comparison needs at least one constraint")


def test_sweeps_expand_into_one_method_per_combination():
    fields = {"solver", "dual_lr", "dual_update_steps"}
    methods = expand_methods([{"name": "dual", "solver": "lagged_dual",
                               "sweep": {"dual_lr": [0.1, 1.0], "dual_update_steps": [2, 5]}}], fields)
    assert [m.name for m in methods] == ["dual (dual_lr=0.1, dual_update_steps=2)",
                                         "dual (dual_lr=0.1, dual_update_steps=5)",
                                         "dual (dual_lr=1.0, dual_update_steps=2)",
                                         "dual (dual_lr=1.0, dual_update_steps=5)"]
    assert methods[1].overrides == {"solver": "lagged_dual", "dual_lr": 0.1, "dual_update_steps": 5}
