"""An experiment's independent runs at once, each in its own process with its share of the cores.

A run of the demo decodes a few rows at a time and trains on batches of 4: matrix products that small keep two
threads of one process far from twice the speed of one. Two runs side by side, one thread each, use two cores better
than one run after the other with both (docs/benchmark.md has the measurement). A run's result depends on its thread
count (float sums), not on which runs share the machine with it.

Each worker's output (progress bars, transformers' messages) goes to its run's log file; its ``l3m`` log records
(e.g. the end-of-training verdicts) come back to this process's handlers, prefixed with the run's name, and a
progress bar here counts the optimizer steps of all runs. A failed run, Ctrl-C or the end of this process (however it
ends) ends the workers too.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from l3m.errors import L3MError
from l3m.hardware import available_cpus, available_memory_gb, keep_freed_memory

logger = logging.getLogger("l3m")


@dataclass
class Job:
    """One run for a worker: ``function(*args, progress=callbacks)`` returns its record; its output goes to ``log``."""

    name: str
    function: Callable
    args: tuple
    steps: int  # optimizer steps, for the progress bar
    log: str


def plan_processes(num_proc: int | None, num_jobs: int, cpus: int | None = None, gb_per_process: float = 0.0,
                   memory_gb: float | None = None) -> tuple[int, int]:
    """``(processes, threads of each)`` for ``num_jobs`` runs on ``cpus`` cores (default: :func:`available_cpus`).

    ``num_proc`` None: one process per core, at most one per run, and no more than ``memory_gb`` (default: the
    system's available memory, :func:`available_memory_gb`) holds at ``gb_per_process`` each. Threads: the cores shared
    out, at least one each. A ``num_proc`` above the cores is kept, with a warning.

    >>> plan_processes(None, 4, cpus=2), plan_processes(1, 4, cpus=2), plan_processes(None, 4, cpus=8)
    ((2, 1), (1, 2), (4, 2))
    >>> plan_processes(None, 4, cpus=4, gb_per_process=5, memory_gb=12)  # memory for two
    (2, 2)
    """
    cpus = available_cpus() if cpus is None else cpus
    if num_proc is None:
        processes = max(1, min(cpus, num_jobs))
        memory_gb = available_memory_gb() if memory_gb is None else memory_gb
        if gb_per_process > 0 and memory_gb is not None and memory_gb < processes * gb_per_process:
            fits = max(1, int(memory_gb // gb_per_process))
            logger.info("num_proc: %d runs at a time instead of %d: %.0f GB of memory available, about %.0f GB per "
                        "run", fits, processes, memory_gb, gb_per_process)
            processes = fits
    else:
        processes = max(1, min(num_proc, num_jobs))
        if processes > cpus:
            logger.warning("num_proc %d on %d cores: the runs will share cores, each slower than alone", processes,
                           cpus)
    return processes, max(1, cpus // processes)


class _RunName(logging.Filter):
    """Prefixes a worker's log records with its run's name (formatted here: a record's args may not pickle)."""

    def __init__(self):
        super().__init__()
        self.run = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = f"[{self.run}] {record.getMessage()}", None
        return True


_worker: dict = {}


def _start_worker(threads: int, queue, levels: dict[str, int]) -> None:
    import torch

    torch.set_num_threads(threads)
    keep_freed_memory()
    handler = logging.handlers.QueueHandler(queue)
    run_name = _RunName()
    handler.addFilter(run_name)
    root = logging.getLogger()
    root.handlers = [handler]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    _worker.update(queue=queue, run_name=run_name)
    parent = multiprocessing.parent_process()
    if parent is not None:  # a parent killed without a chance to stop its workers would leave them training
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent) -> None:
    parent.join()  # returns when the parent process has ended, however it ended
    os._exit(1)


def _run_job(job: Job):
    from transformers import TrainerCallback

    queue = _worker["queue"]

    class StepProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            queue.put(1)

    _worker["run_name"].run = job.name
    os.makedirs(os.path.dirname(job.log) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(job.log, "w", encoding="utf-8") as log:  # C-level writes too: the file replaces fds 1 and 2
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    return job.function(*job.args, progress=[StepProgress()])


def _relay(queue, bar) -> None:
    """Hand the workers' log records to this process's loggers and their step counts to ``bar``; stop at None."""
    while (item := queue.get()) is not None:
        if isinstance(item, logging.LogRecord):
            logging.getLogger(item.name).handle(item)
        else:
            bar.update(item)


def run_jobs(jobs: Sequence[Job], processes: int, threads: int,
             on_result: Callable[[int, object], None] | None = None) -> list:
    """Run ``jobs`` in ``processes`` worker processes (``threads`` torch threads each), the most steps first;
    returns their results in the order of ``jobs``, and hands each to ``on_result(index, result)`` as it arrives.
    The first failure (or Ctrl-C) stops the other runs and is raised here, with the failed run's log named."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    context = multiprocessing.get_context("spawn")  # a fork of a process with torch's threads can deadlock
    queue = context.Queue()
    levels = {name: logging.getLogger(name or None).level for name in ("", "l3m")}
    bar = tqdm(total=sum(job.steps for job in jobs), desc=f"Training, {processes} runs at a time", unit="step")
    relay = threading.Thread(target=_relay, args=(queue, bar), daemon=True)
    relay.start()
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                               initargs=(threads, queue, levels))
    results: list = [None] * len(jobs)
    try:
        with logging_redirect_tqdm():
            order = sorted(range(len(jobs)), key=lambda i: -jobs[i].steps)
            futures = {pool.submit(_run_job, jobs[i]): i for i in order}
            for future in as_completed(futures):
                job = jobs[futures[future]]
                try:
                    results[futures[future]] = future.result()
                except BrokenProcessPool as error:  # every unfinished run fails with it: name them all
                    unfinished = [jobs[i] for f, i in futures.items() if not f.done() or f.exception() is not None]
                    raise L3MError(f"a worker process died ({error}) with these runs unfinished: "
                                   + "; ".join(f"{j.name} (output: {j.log})" for j in unfinished)) from error
                except Exception:
                    logger.error("run %r failed; its output: %s", job.name, job.log)
                    raise
                bar.write(f"{job.name}: done (output: {job.log})")
                if on_result is not None:
                    on_result(futures[future], results[futures[future]])
    except BaseException:
        _stop(pool)
        raise
    finally:
        pool.shutdown()
        queue.put(None)
        relay.join()
        bar.close()
    return results


def run_all(jobs: Sequence[Job], processes: int, threads: int, noun: str = "run",
            on_result: Callable[[int, object], None] | None = None) -> list:
    """Every job's result, in the order of ``jobs``: one after another in this process when ``processes`` is 1 (with
    every core; a line as each starts), else side by side in worker processes (:func:`run_jobs`; one line saying so,
    and where each ``noun``'s output goes). ``on_result(index, result)`` sees each result as it arrives."""
    if processes > 1:
        logs = os.path.join(os.path.dirname(os.path.dirname(jobs[0].log)), f"<{noun}>", "output.log")
        print(f"\n{len(jobs)} {noun}s, {processes} at a time with {threads} thread{'s' * (threads > 1)} each "
              f"(num_proc); each {noun}'s output goes to {logs}", flush=True)
        return run_jobs(jobs, processes, threads, on_result)
    results = []
    for index, job in enumerate(jobs):
        print(f"\n[{index + 1}/{len(jobs)}] {job.name}: training {job.steps} steps", flush=True)
        results.append(job.function(*job.args))
        gc.collect()  # free the run's model before the next one loads (and its peak memory is measured)
        if on_result is not None:
            on_result(index, results[-1])
    return results


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the runs not started and end the running ones (``terminate_workers`` from Python 3.14 on)."""
    pool.shutdown(wait=False, cancel_futures=True)
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
