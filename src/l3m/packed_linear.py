"""Decoding on the CPU with linear weights packed once per sampling call (oneDNN).

A decoding step multiplies a few rows of activations (one per response still going) by every weight matrix of the
model. At such sizes PyTorch's default float32 CPU product reads the weights far below the memory bandwidth: on a
2-core AMD EPYC (AVX-512) a ``[4, 576] x [576, 1536]`` product whose weight is not in cache takes about 0.43 ms
(8 GB/s) against 0.17 ms (21 GB/s) through oneDNN's linear with the weight reordered beforehand into oneDNN's own
layout, and a 4-row decoding step of the demo model 85 ms against 42 ms (``benchmarks/bench_decode_step.py``,
``docs/benchmark.md``).

The reorder costs a tenth to a third of a second for the demo model and must be redone whenever the weights change,
so it pays over the tens of decoding steps of one :func:`l3m.sampling.sample_completions` call, which runs inside
:func:`packed_linears`. The results equal the default product's to float32 rounding (summation order differs), so a
sampled token can differ where two candidates' cumulative probabilities meet the drawn uniform number almost exactly.

The ops are PyTorch's own (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the pair inductor's
CPU backend uses for the same purpose); where they are missing, or for weights that are not plain float32 CPU tensors
(CUDA, bf16, sharded FSDP/ZeRO-3 parameters) or under CPU autocast, the layers run as they are.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

# The batch size oneDNN picks the packed layout for. Decoding runs 1 to tens of rows (the responses still going); a
# 4-row layout was the fastest or within noise of it from 2 to 32 rows, on one thread and on two (docs/benchmark.md).
PACKED_FOR_ROWS = 4


def packing_available() -> bool:
    """True when this torch build has oneDNN and its linear-weight reorder."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packable(module: torch.nn.Module) -> bool:
    if not isinstance(module, torch.nn.Linear):
        return False
    weight = module.weight.detach()
    return (type(weight) is torch.Tensor and weight.numel() > 0
            and weight.device.type == "cpu" and weight.dtype == torch.float32
            and "forward" not in vars(module))  # a forward already replaced (e.g. accelerate's hooks) is left alone


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


@contextmanager
def packed_linears(model: torch.nn.Module):
    """Within the block, every float32 CPU ``nn.Linear`` of ``model`` multiplies through oneDNN with its weight
    packed once (:data:`PACKED_FOR_ROWS`); each layer's own forward is restored after the block. Yields how many
    layers were packed.

    For no-grad inference only: the packed copies do not follow changes of the weights made inside the block, and
    carry no gradient. Peak memory rises by one copy of the packed weights while the block runs.
    """
    layers = []
    if packing_available() and not torch.is_autocast_enabled("cpu"):
        layers = [m for m in model.modules() if _packable(m)]
    for module in layers:
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACKED_FOR_ROWS)
        module.forward = partial(_packed_forward, module, packed)
    try:
        yield len(layers)
    finally:
        for module in layers:
            del module.forward
