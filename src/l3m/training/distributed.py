"""What the trainer needs to run correctly on several processes (``accelerate launch`` / ``torchrun``).

- :func:`check_launch`: a multi-process launch whose processes did not join one process group (e.g. ``torchrun`` on a
  machine without GPUs and without ``use_cpu``) would train every process alone as rank 0; refuse it.
- :func:`process_local_sampling`: responses are sampled with a different random stream on every process.

The coin of Sec. 5.4 (:func:`l3m.training.coin.is_constraint_step`) is a pure function of the seed and the step, so it is
the same on every process without communication; the trainer gathers the per-response constraint values of all
processes before they set multipliers (every process holds the same estimate and EMA); DDP/FSDP/DeepSpeed average the
gradients (once) in ``backward``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from l3m.errors import L3MConfigError


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``torchrun`` and ``accelerate launch``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_launch(args) -> None:
    """Fail when the launcher started several processes but the Trainer sees a world of one on each.

    ``args`` is a `TrainingArguments`; reading ``args.world_size`` sets up its devices and process group.
    """
    launched = launched_world_size()
    if launched > 1 and args.world_size != launched:
        hint = ("set use_cpu: true (or pass --use_cpu true) so that the processes join a gloo process group"
                if not torch.cuda.is_available() else "check the launcher's configuration")
        raise L3MConfigError(
            f"use_cpu: {launched} processes were launched (WORLD_SIZE={launched}) but each sees a world of "
            f"{args.world_size} (torch.distributed not set up for DDP), so every one would train alone as rank 0; "
            f"{hint}")


@contextlib.contextmanager
def process_local_sampling(accelerator) -> Iterator[None]:
    """Inside the block, random sampling uses a stream that differs between processes; outside, nothing changes.

    The Trainer seeds every process alike, so without this two processes given the same prompt would sample the same
    responses. One seed is drawn from the (synchronised) global generator, offset by the process index, and the
    global generator state is restored afterwards, so dropout and data order stay in step across processes. With a
    single process the block uses the global generator as is (runs are unchanged by this function).
    """
    if accelerator.num_processes == 1:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,)).item())  # the same draw on every process
    device = accelerator.device
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + accelerator.process_index)
        yield

