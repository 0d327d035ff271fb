"""Crash and signal recovery of a real ``l3m train`` process on the tiny model.

A run killed with SIGKILL at an arbitrary moment, or stopped with SIGTERM, resumes from its last complete checkpoint
with ``--resume_from_checkpoint true`` and ends with the same weights, bit for bit on CPU, as a run that was never
interrupted (the SIGTERM test is marked slow). The killed or signalled run is a subprocess; the uninterrupted and the resumed runs run in-process (one
interpreter start less), with the subprocess on the same number of threads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import l3m
from fixtures.tiny import save_model_and_data
from l3m.training.checkpoints import SOLVER_STATE_NAME, TRAINER_STATE_NAME
from l3m.cli import main

SRC = os.path.dirname(os.path.dirname(os.path.abspath(l3m.__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model, data = save_model_and_data(root, 48)

    def config(name: str) -> str:
        values = dict(model_name_or_path=model, dataset_name=data,
                      constraints=[{"name": "length", "reward": "length_tokens", "min": 2, "max": 5}],
                      max_steps=16, per_device_train_batch_size=4, num_generations=2, max_completion_length=16,
                      max_length=128, learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2,
                      save_total_limit=2, seed=0, use_cpu=True, report_to="none", disable_tqdm=True,
                      output_dir=str(root / name))
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    straight = config("straight")
    assert main(["train", "--config", straight]) == 0
    return {"root": root, "config": config, "final": load_file(str(root / "straight" / "model.safetensors"))}


def _start(config: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "l3m.cli", "train", "--config", config], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


def _checkpoints(run_dir) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if name.startswith("checkpoint-"))


def _assert_complete(checkpoint) -> None:
    for name in (TRAINER_STATE_NAME, SOLVER_STATE_NAME, "model.safetensors", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth"):
        assert (checkpoint / name).is_file(), f"{checkpoint.name} lacks {name}"


def _assert_same_weights(expected: dict, path) -> None:
    got = load_file(str(path))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name  # bit for bit on CPU


def test_kill_9_at_any_moment_then_resume_gives_the_same_weights(setup):
    config = setup["config"]("killed")
    run_dir = setup["root"] / "killed"
    proc = _start(config)
    _wait_for(run_dir / "checkpoint-2", proc)
    proc.send_signal(signal.SIGKILL)  # wherever it is: in a step, or in the middle of the next save
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "model.safetensors").exists()  # it did not finish
    for name in _checkpoints(run_dir):  # whatever was published is complete
        _assert_complete(run_dir / name)

    assert main(["train", "--config", config, "--resume_from_checkpoint", "true"]) == 0
    _assert_same_weights(setup["final"], run_dir / "model.safetensors")
    assert _checkpoints(run_dir) == ["checkpoint-14", "checkpoint-16"]  # save_total_limit: 2
    assert not [name for name in os.listdir(run_dir) if name.startswith("tmp-")]


@pytest.mark.slow  # 20 s; test_reliability.py sends a real SIGTERM to the test process in the default suite
def test_sigterm_saves_a_checkpoint_and_stops_then_resume_gives_the_same_weights(setup):
    config = setup["config"]("terminated")
    run_dir = setup["root"] / "terminated"
    proc = _start(config)
    _wait_for(run_dir / "checkpoint-2", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("l3m: SIGTERM: stopped at step "), last
    step = int(last.split("stopped at step ")[1].split()[0])
    assert 2 < step < 16
    assert f"saved {run_dir / f'checkpoint-{step}'}" in last and "resume_from_checkpoint" in last
    _assert_complete(run_dir / f"checkpoint-{step}")
    with open(run_dir / f"checkpoint-{step}" / TRAINER_STATE_NAME) as f:
        assert json.load(f)["global_step"] == step
    assert not (run_dir / "model.safetensors").exists()  # a stopped run does not save a final model

    assert main(["train", "--config", config, "--resume_from_checkpoint", "true"]) == 0
    _assert_same_weights(setup["final"], run_dir / "model.safetensors")
