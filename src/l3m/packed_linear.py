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

Under CPU bf16 autocast (``bf16: true``: accelerate runs the model's forward inside ``torch.autocast``) a layer
multiplies in bf16, and PyTorch casts its float32 weight to bf16 at every call: a decoding step reads the float32
weights, writes bf16 copies and reads those. Inside :func:`packed_linears` such a call uses a bf16 copy of the weight
(and bias) packed once for the block instead: the product autocast computes, bit for bit
(``tests/test_packed_linear.py``), reading half the bytes of the float32 weights once. Which copy a layer needs is
only known when it runs (the autocast is entered inside the model's forward), so each copy is made at the layer's
first call of its kind. ``benchmarks/bench_decode_step.py --bf16`` times it (``docs/benchmark.md``).

The ops are PyTorch's own (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the pair inductor's
CPU backend uses for the same purpose); where they are missing, for weights that are not plain float32 CPU tensors
(CUDA, bf16, sharded FSDP/ZeRO-3 parameters), and for calls under an autocast to another dtype (float16), the layers
run as they are.
"""

from __future__ import annotations

from contextlib import contextmanager

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


class _PackedForward:
    """A layer's forward within :func:`packed_linears`: float32 calls use a float32 packed weight, calls under CPU bf16
    autocast a bf16 packed weight and bias; each is packed at its first use. Any other call runs the layer as is."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        self.packed: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dtype not in self.packed:
            weight, bias = self.module.weight.detach(), self.module.bias
            bias = None if bias is None else bias.detach().to(dtype)
            self.packed[dtype] = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), PACKED_FOR_ROWS), bias
        return self.packed[dtype]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            if not torch.is_autocast_enabled("cpu"):
                if x.dtype == torch.float32:
                    return torch.ops.mkldnn._linear_pointwise(x, *self._weights(torch.float32), "none", [], "")
            elif torch.get_autocast_dtype("cpu") == torch.bfloat16:
                return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), *self._weights(torch.bfloat16),
                                                          "none", [], "")
        return F.linear(x, self.module.weight, self.module.bias)


@contextmanager
def packed_linears(model: torch.nn.Module):
    """Within the block, every float32 CPU ``nn.Linear`` of ``model`` multiplies through oneDNN with its weight
    packed once (:data:`PACKED_FOR_ROWS`): a float32 copy for float32 calls, a bf16 copy for calls under CPU bf16
    autocast; each layer's own forward is restored after the block. Yields how many layers were packed.

    For no-grad inference only: the packed copies do not follow changes of the weights made after a layer's first
    call in the block, and carry no gradient. Peak memory rises by one copy of the packed weights (half of it for
    bf16) while the block runs.
    """
    layers = [m for m in model.modules() if _packable(m)] if packing_available() else []
    for module in layers:
        module.forward = _PackedForward(module)
    try:
        yield len(layers)
    finally:
        for module in layers:
            del module.forward
