"""What this CPU offers: native bf16, and how many cores the process may really use.

bf16 autocast pays off on CPU only with native bf16 instructions. Without them (e.g. AVX2-only CPUs) PyTorch emulates
bf16 matrix products, which on this project's 2-core AVX2 machine run about 20x slower than float32; with
``avx512_bf16`` or ``amx_bf16`` they are faster than float32 (a 4-row decoding step of the demo model 0.73x, the
whole demo 0.88x on a 2-core AMD EPYC with ``avx512_bf16``; docs/benchmark.md).

torch starts one thread per core it sees; in a container with a CPU quota (``docker run --cpus 2`` on a 64-core
host) that is one per host core, and the oversubscribed threads slow every matrix product. ``l3m``'s commands lower
the thread count to the quota (:func:`match_threads_to_cpus`).

glibc's ``malloc`` hands large freed blocks back to the operating system, so every training step's activations come
from fresh pages that the kernel faults in and zeroes again; ``l3m``'s commands keep freed memory in the process
instead (:func:`keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform

logger = logging.getLogger("l3m")

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU in ``path`` (Linux); empty where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """True when the CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``)."""
    return bool(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))


def resolve_bf16(choice: str, flags: set[str] | None = None) -> bool:
    """``"auto"``: bf16 where the CPU has native bf16, float32 elsewhere; ``"true"`` / ``"false"`` as written."""
    if choice not in ("auto", "true", "false"):
        from l3m.errors import L3MConfigError

        raise L3MConfigError(f"bf16: expected auto, true or false, got {choice!r}")
    return native_bf16(flags) if choice == "auto" else choice == "true"


def warn_slow_bf16(args, flags: set[str] | None = None) -> str | None:
    """Log (and return) one line when ``args`` (TrainingArguments) asks for bf16 on a CPU without native bf16."""
    import torch

    on_cpu = args.use_cpu or not torch.cuda.is_available()
    if not (args.bf16 and on_cpu) or native_bf16(flags):
        return None
    message = ("bf16: this CPU has no native bf16 instructions (no " + " or ".join(NATIVE_BF16_FLAGS) + "), so bf16 "
               "autocast is emulated and typically much slower than float32 here; set bf16: false")
    logger.warning(message)
    return message


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU quota in cores of the process's cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None without one."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (rounded up)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    return count if quota is None else max(1, min(count, math.ceil(quota)))


def available_memory_gb(path: str = "/proc/meminfo") -> float | None:
    """Memory the system can give new processes without swapping (``MemAvailable``, GB); None where unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return None


def match_threads_to_cpus(root: str = "/sys/fs/cgroup") -> int | None:
    """Lower torch's thread count to :func:`available_cpus` when it is higher and neither ``OMP_NUM_THREADS`` nor
    ``MKL_NUM_THREADS`` is set (a user's choice stays); returns the new count, or None when nothing changed."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    cpus = available_cpus(root)
    if torch.get_num_threads() <= cpus:
        return None
    torch.set_num_threads(cpus)
    return cpus


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep the memory this process frees for its next allocations; returns whether it did.

    By default glibc serves each block above its mmap threshold (128 KB, adaptively up to 32 MB) with its own
    ``mmap`` and unmaps it when it is freed, and it trims the heap back whenever its free top exceeds the trim
    threshold. A training step allocates and frees its activations and gradients (hundreds of MB on the demo
    model), so the next step's come from new pages, each faulted in and zeroed by the kernel: 381,000 page faults
    and 0.9 s of system time per constraint step of the demo at one thread (docs/benchmark.md). Here every block comes
    from the heap (``M_MMAP_MAX`` 0) and the heap is trimmed only when more than 2 GB at its top are free
    (``M_TRIM_THRESHOLD``, a C int), so the process keeps its peak memory and reuses it. No arithmetic changes.

    A user's own choice stays: with any ``MALLOC_*`` variable or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``
    set, or on a C library other than glibc (macOS, musl), nothing is changed and False is returned.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    if any(key.startswith("MALLOC_") for key in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def tune_process() -> None:
    """What every ``l3m`` command does first: torch's thread count down to the cores this process may use
    (:func:`match_threads_to_cpus`) and freed memory kept for reuse (:func:`keep_freed_memory`)."""
    match_threads_to_cpus()
    keep_freed_memory()
