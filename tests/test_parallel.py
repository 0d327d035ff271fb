"""Runs in worker processes (``l3m.experiments.parallel``): results in order, output in each run's log, log records
and step counts back in the parent, the first failure raised there."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from l3m.errors import L3MConfigError, L3MError
from l3m.experiments.parallel import Job, plan_processes, run_jobs


def _steps_and_a_warning(name: str, steps: int, progress=None) -> dict:
    import torch

    print(f"{name} writes to stdout")
    for _ in range(steps):
        progress[0].on_step_end(None, None, None)
    logging.getLogger("l3m.test").warning("%s took %d steps", name, steps)
    return {"name": name, "threads": torch.get_num_threads()}


def _bad_field(progress=None) -> dict:
    time.sleep(1)  # the other run has started
    raise L3MConfigError("field: bad value; use a good one")


def _pid_then_sleep(path: str, progress=None) -> dict:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    return {}


def _killed(progress=None) -> dict:
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would


def _slow(marker: str, progress=None) -> dict:
    time.sleep(60)
    with open(marker, "w") as f:
        f.write("finished")
    return {}


def test_cores_are_shared_out_one_process_per_core_at_most_one_per_run():
    assert plan_processes(None, 4, cpus=2) == (2, 1)
    assert plan_processes(None, 4, cpus=1) == (1, 1)
    assert plan_processes(None, 2, cpus=8) == (2, 4)
    assert plan_processes(1, 4, cpus=2) == (1, 2)  # one after another, every core
    assert plan_processes(3, 4, cpus=8) == (3, 2)
    assert plan_processes(None, 0, cpus=2) == (1, 2)  # nothing to run: still a valid plan


def test_the_default_starts_no_more_runs_than_memory_holds_and_an_oversubscribed_num_proc_warns(caplog):
    with caplog.at_level(logging.INFO, logger="l3m"):
        assert plan_processes(None, 4, cpus=4, gb_per_process=5, memory_gb=12) == (2, 2)
        assert plan_processes(None, 4, cpus=4, gb_per_process=5, memory_gb=3) == (1, 4)  # one, whatever it holds
        assert plan_processes(None, 4, cpus=2, gb_per_process=5, memory_gb=40) == (2, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "num_proc: 2 runs at a time instead of 4: 12 GB of memory available, about 5 GB per run",
        "num_proc: 1 runs at a time instead of 4: 3 GB of memory available, about 5 GB per run"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="l3m"):
        assert plan_processes(3, 4, cpus=2, memory_gb=1) == (3, 1)  # asked for: kept, whatever the memory
    assert caplog.records[0].getMessage() == "num_proc 3 on 2 cores: the runs will share cores, each slower than alone"


def test_jobs_return_in_order_with_their_output_in_their_logs_and_records_and_steps_here(tmp_path, caplog, capsys):
    jobs = [Job(name, _steps_and_a_warning, (name, steps), steps, str(tmp_path / name / "output.log"))
            for name, steps in (("short", 2), ("long", 3))]
    arrived = []
    with caplog.at_level(logging.WARNING):
        results = run_jobs(jobs, processes=2, threads=1, on_result=lambda i, result: arrived.append((i, result)))
    assert results == [{"name": "short", "threads": 1}, {"name": "long", "threads": 1}]
    assert sorted(arrived, key=lambda pair: pair[0]) == list(enumerate(results))  # each handed over as it came
    assert "short writes to stdout" in (tmp_path / "short" / "output.log").read_text()
    assert "long writes to stdout" in (tmp_path / "long" / "output.log").read_text()
    messages = {(r.name, r.getMessage()) for r in caplog.records}
    assert {("l3m.test", "[short] short took 2 steps"), ("l3m.test", "[long] long took 3 steps")} <= messages
    assert "5/5" in capsys.readouterr().err  # the progress bar counted every run's steps


def test_a_failed_run_is_raised_here_its_log_named_and_the_other_runs_stopped(tmp_path, caplog):
    marker = tmp_path / "slow_finished"
    jobs = [Job("bad", _bad_field, (), 1, str(tmp_path / "bad.log")),
            Job("slow", _slow, (str(marker),), 2, str(tmp_path / "slow.log"))]
    with pytest.raises(L3MConfigError, match=r"^field: bad value; use a good one$"):
        run_jobs(jobs, processes=2, threads=1)
    assert any(r.getMessage() == f"run 'bad' failed; its output: {tmp_path / 'bad.log'}" for r in caplog.records)
    assert (tmp_path / "slow.log").exists()  # it had started
    assert not marker.exists()  # and was not waited for (it writes the marker after 60 s)


def test_a_worker_killed_mid_run_is_a_one_line_error_naming_the_unfinished_runs(tmp_path):
    jobs = [Job("killed", _killed, (), 1, str(tmp_path / "killed.log")),
            Job("fine", _steps_and_a_warning, ("fine", 0), 0, str(tmp_path / "fine.log"))]
    message = r"^a worker process died \(.*\) with these runs unfinished: .*killed \(output: "
    with pytest.raises(L3MError, match=message):
        run_jobs(jobs, processes=1, threads=1)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (an ended, unreaped process is a zombie: state Z)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL gives the parent no chance to stop its workers; they must not go on training for nobody."""
    pid_file = tmp_path / "worker.pid"
    job = f"Job('sleeper', _pid_then_sleep, ({str(pid_file)!r},), 1, {str(tmp_path / 'log')!r})"
    script = ("from l3m.experiments.parallel import Job, run_jobs\nfrom test_parallel import _pid_then_sleep\n"
              f"run_jobs([{job}], 1, 1)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        worker = int(pid_file.read_text())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    for _ in range(100):
        if not _running(worker):
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker was still running 10 s after its parent was killed")
