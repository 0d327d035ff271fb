"""What this CPU does fast: bf16 autocast pays off on CPU only with native bf16 instructions.

Without them (e.g. AVX2-only CPUs) PyTorch emulates bf16 matrix products, which on this project's 2-core AVX2 machine
run about 20x slower than float32; with ``avx512_bf16`` or ``amx_bf16`` they are faster than float32.
"""

from __future__ import annotations

import logging

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
