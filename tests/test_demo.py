"""The embedded default: the demo model and data packages, and a miniature `l3m demo` (marked slow)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow


def test_chatterbot_conversations_alternate_user_and_assistant():
    from l3m.assets import chatterbot_conversations

    records = chatterbot_conversations()
    assert len(records) > 1000
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles[0] == "user" and "assistant" in roles
        assert all(a != b for a, b in zip(roles, roles[1:]))


def test_demo_model_converts_to_plain_safetensors(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l3m.assets import demo_model_path

    monkeypatch.setenv("L3M_CACHE", str(tmp_path))
    path = demo_model_path()
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert demo_model_path() == path  # reused, not converted again
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is AI?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_miniature_demo_writes_table_results_and_figure(tmp_path, capsys):
    from l3m.experiments.demo import DemoRun, DemoSettings, run_demo

    settings = DemoSettings(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                            max_completion_length=8, test_size=4, eval_max_new_tokens=8,
                            shift_categories=["trivia", "history"])
    records = run_demo(settings, runs=(DemoRun("initial", max_steps=0), DemoRun("SFT", match_objective_steps=True),
                                       DemoRun("L3M [2, 8]", 2, 8)))
    assert [r["run"]["name"] for r in records] == ["initial", "SFT", "L3M [2, 8]"]
    assert records[0]["steps"] == 0 and records[1]["steps"] == 1  # seed 0: steps 0 and 1 are objective, constraint
    assert os.path.getsize(tmp_path / "fig2_lengths.png") > 10_000
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["runs"][2]["shift"]["summary"]["num_examples"] == 4  # 4 trivia/history conversations
    assert saved["runs"][2]["summary"]["num_examples"] <= 4  # the test split without them
    out = capsys.readouterr().out
    assert "task log-ppl" in out and "L3M [2, 8]" in out and "shift in range" in out


def test_runs_in_worker_processes_give_the_numbers_of_one_process_at_their_thread_count(tmp_path, capsys):
    import torch

    from l3m.experiments.demo import DemoRun, DemoSettings, run_demo
    from l3m.experiments.parallel import plan_processes
    from l3m.experiments.runner import slug

    runs = (DemoRun("SFT", match_objective_steps=True), DemoRun("L3M [2, 8]", 2, 8))
    tiny = dict(max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=8, test_size=4,
                eval_max_new_tokens=8)
    apart = run_demo(DemoSettings(output_dir=str(tmp_path / "apart"), num_proc=2, **tiny), runs=runs)
    assert "2 runs, 2 at a time" in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "apart" / slug("L3M [2, 8]") / "output.log") > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(plan_processes(2, len(runs))[1])
    try:
        together = run_demo(DemoSettings(output_dir=str(tmp_path / "together"), num_proc=1, **tiny), runs=runs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(apart, together):
        assert a["lengths"] == b["lengths"] and a["summary"]["log_ppl_mean"] == b["summary"]["log_ppl_mean"]
        assert a["solver_state"] == b["solver_state"]
