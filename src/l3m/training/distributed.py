"""What the trainer needs to run correctly on several processes (``accelerate launch`` / ``torchrun``).

- :func:`check_launch`: a multi-process launch whose processes did not join one process group (e.g. ``torchrun`` on a
  machine without GPUs and without ``use_cpu``) would train every process alone as rank 0; refuse it. Two launches
  that run, but not as asked, get one warning line each: ``accelerate launch --cpu --num_processes N`` without an MPI
  hostfile (one process is started, not N), and an FSDP accelerate config with ``use_cpu`` (accelerate trains DDP).
- :func:`process_local_sampling`: responses are sampled with a different random stream on every process.
- :func:`shards_weights`: under FSDP or ZeRO-3 every process runs all decoding steps (a forward gathers weights).

The coin of Sec. 5.4 (:func:`l3m.training.coin.is_constraint_step`) is a pure function of the seed and the step, so it is
the same on every process without communication; the trainer gathers the per-response constraint values of all
processes before they set multipliers (every process holds the same estimate and EMA); DDP/FSDP/DeepSpeed average the
gradients (once) in ``backward``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from l3m.errors import L3MConfigError

logger = logging.getLogger(__name__)

# the variables through which a launcher tells a process how many processes it started (torchrun and accelerate's
# torchrun-based launchers: WORLD_SIZE; mpirun, which accelerate's multi-CPU mode uses: one of the others)
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``torchrun`` and ``accelerate launch``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def single_process_launch_warning() -> str | None:
    """The warning for ``accelerate launch --cpu --num_processes N`` (N > 1) without ``--mpirun_hostfile``, or None.

    accelerate (checked with 1.15) runs ``--cpu`` through its simple launcher: with an MPI hostfile it starts
    ``mpirun``, without one it starts the script once, as a plain process. It still sets ``MASTER_ADDR`` and
    ``MASTER_PORT`` because more than one process was asked for, and ``ACCELERATE_USE_CPU=True``; no launcher sets a
    world size. That combination is what is looked for (``MASTER_ADDR`` set by hand for another reason would also
    match: the line says what was seen).
    """
    if not _env_flag("ACCELERATE_USE_CPU") or "MASTER_ADDR" not in os.environ:
        return None
    if any(name in os.environ for name in _WORLD_SIZE_VARIABLES):
        return None
    return ("accelerate launch --cpu started this run as ONE process (ACCELERATE_USE_CPU and MASTER_ADDR are set, no "
            "WORLD_SIZE): with --num_processes > 1 and no --mpirun_hostfile accelerate does not start the others; for "
            "several CPU processes use --multi_gpu --num_processes N (or examples/accelerate/ddp.yaml) with "
            "use_cpu: true")


def fsdp_on_cpu_warning(args) -> str | None:
    """The warning for an FSDP accelerate config run with ``use_cpu``, or None.

    accelerate (1.15) turns its FSDP plugin on only when the processes are on GPUs (or another accelerator):
    ``AcceleratorState`` sets ``DistributedType.FSDP`` from the GPU-type distributed types alone, and on CPU the type
    stays ``MULTI_CPU``. The run then trains as DDP over gloo, every process holding the whole model, correct but
    not sharded. Said by the first process only.
    """
    if _env_flag("ACCELERATE_USE_FSDP") and getattr(args, "use_cpu", False) and os.environ.get("RANK", "0") == "0":
        return ("the accelerate config asks for FSDP, but with use_cpu accelerate does not shard: this run trains as "
                "DDP over gloo (every process holds the whole model); FSDP needs GPUs (docs/scaling.md)")
    return None


def check_launch(args) -> None:
    """Fail when the launcher started several processes but the Trainer sees a world of one on each; warn (one line
    each) when ``accelerate launch --cpu`` started one process although several were asked for, or when an FSDP
    config runs on CPU (as DDP).

    ``args`` is a `TrainingArguments`; reading ``args.world_size`` sets up its devices and process group.
    """
    for warning in (single_process_launch_warning(), fsdp_on_cpu_warning(args)):
        if warning is not None:
            logger.warning(warning)
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



def shards_weights(accelerator) -> bool:
    """Whether every forward pass gathers weights from all processes (FSDP, DeepSpeed ZeRO-3), so that all of them
    must run the same number of decoding steps (:func:`l3m.sampling.sample_completions`'s ``synced``)."""
    from accelerate.utils import DistributedType

    if accelerator.num_processes == 1:
        return False
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3
