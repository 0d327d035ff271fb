"""Crash-safe checkpoints: atomic saves, resuming from the last complete checkpoint, a save on SIGTERM/SIGINT.

The Trainer (transformers 5.24) writes a checkpoint's files straight into ``checkpoint-N``, one after the other and
without flushing them, so a process killed in the middle leaves a folder that
``transformers.trainer_utils.get_last_checkpoint`` takes for complete; with several processes, the main one writes
``trainer_state.json`` without waiting for the others' RNG states (docs/reliability.md). :class:`l3m.L3MTrainer` has
the Trainer write them into a staging folder ``tmp-checkpoint-N`` instead, and once every process is done
:func:`publish_checkpoint` renames the finished folder to ``checkpoint-N`` (a rename is atomic on POSIX file systems):
a ``checkpoint-N`` folder is always complete, and old checkpoints are rotated only after it exists. Staging folders
left by a killed save are removed by the next save and ignored by resume (``get_last_checkpoint`` and the Trainer's
rotation only match ``checkpoint-<step>``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from l3m.errors import L3MConfigError

logger = logging.getLogger(__name__)

SOLVER_STATE_NAME = "l3m_state.json"
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer writes it last, after weights, optimizer and RNG states
STAGING_PREFIX = "tmp-"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_STAGING = re.compile(rf"^{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-\d+$")


def staging_dir(run_dir: str, step: int) -> str:
    """The folder the Trainer saves into for step ``step``; it holds ``checkpoint-<step>`` until it is published."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}")


def remove_staging_dirs(run_dir: str) -> None:
    """Delete the staging folders of saves that never finished (a process killed while saving)."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if _STAGING.match(name):
            logger.warning("Removing %s, left by a save that did not finish", os.path.join(run_dir, name))
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def publish_checkpoint(staging: str, run_dir: str, name: str) -> str:
    """Move the finished ``staging/name`` to ``run_dir/name`` in one rename, after flushing its files to disk.

    An existing ``run_dir/name`` (from an earlier run of the same steps) is replaced. Returns the new path.
    """
    source, target = os.path.join(staging, name), os.path.join(run_dir, name)
    for entry in os.scandir(source):
        if entry.is_file():
            _fsync(entry.path)
    _fsync(source)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.rename(source, target)
    shutil.rmtree(staging, ignore_errors=True)
    _fsync(run_dir)
    return target


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def missing_files(folder: str, require_solver_state: bool) -> list[str]:
    """The files a complete l3m checkpoint has that ``folder`` lacks."""
    names = [TRAINER_STATE_NAME] + ([SOLVER_STATE_NAME] if require_solver_state else [])
    return [n for n in names if not os.path.isfile(os.path.join(folder, n))]


def last_complete_checkpoint(run_dir: str, require_solver_state: bool = True) -> str | None:
    """The ``checkpoint-<step>`` folder of ``run_dir`` with the highest step that is complete; None if there is none.

    Incomplete folders (written by a Trainer without l3m's atomic saves, or damaged by hand) are skipped with a
    warning.
    """
    if not os.path.isdir(run_dir):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _CHECKPOINT.match(name))
                    and os.path.isdir(os.path.join(run_dir, name))), reverse=True)
    for _, name in steps:
        folder = os.path.join(run_dir, name)
        missing = missing_files(folder, require_solver_state)
        if not missing:
            return folder
        logger.warning("Skipping %s: it is incomplete (no %s)", folder, ", ".join(missing))
    return None


def check_resumable(folder: str, require_solver_state: bool) -> None:
    """Fail early, naming ``resume_from_checkpoint``, when ``folder`` is not a complete checkpoint."""
    if not os.path.isdir(folder):
        raise L3MConfigError(f"resume_from_checkpoint: no such folder {folder!r}")
    missing = missing_files(folder, require_solver_state)
    if missing:
        raise L3MConfigError(f"resume_from_checkpoint: {folder} is incomplete or not an l3m checkpoint (no "
                             f"{', '.join(missing)}); resume from an earlier checkpoint or with `true` for the "
                             "last complete one")


class StopSignals:
    """Turn the first SIGTERM or SIGINT during training into a request to save a checkpoint and stop.

    Used as a context manager around training. The handler only records the signal (``received``); the trainer
    finishes its optimizer step, saves a checkpoint and stops. The previous handlers are back in place as soon as
    the first signal arrives, so a second one acts as it would without l3m (SIGINT raises ``KeyboardInterrupt``,
    SIGTERM ends the process). Outside the main thread, where Python cannot install handlers, it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()
        logger.warning("Received %s: saving a checkpoint at the end of this optimizer step, then stopping (send it "
                       "again to stop at once, without a checkpoint)", signal.Signals(signum).name)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
