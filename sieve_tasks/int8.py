"""int8 linear layers for CPU inference (``--int8``): the captioner's and the sentence encoder's matmuls on
int8 dot-product instructions (fbgemm; AVX512-VNNI/AVX-VNNI where the CPU has them), about 3-4x the fp32 rate.

Weights are quantised once, symmetrically per output channel; activations are quantised per call. On CPUs with VNNI
they use their full 8-bit range; PyTorch's stock dynamic quantisation narrows them to 7 bits, which doubles the error,
because without VNNI fbgemm adds pairs of 8-bit products in saturating 16-bit arithmetic, where the full range could
overflow. So the 7-bit range is kept on CPUs without VNNI. Outputs deviate slightly from fp32; the measured deviation
is in BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch


@functools.cache
def full_range_activations() -> bool:
    """Whether this CPU has VNNI (int8 dot products into 32-bit sums), read from Linux's /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class Int8Linear(torch.nn.Module):
    """Drop-in replacement for an ``nn.Linear`` (CPU): int8 weights, dynamically quantised int8 activations."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        with warnings.catch_warnings():  # quantised tensors are deprecated; torch is pinned, and a test runs them
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantised = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                                   torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(quantised, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.reduce_range = not full_range_activations()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        activations = "7-bit" if self.reduce_range else "8-bit"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {activations} activations"


def quantize_linears(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an :class:`Int8Linear`, in place; returns how many.

    Tied weights (an output projection sharing the word embeddings) keep the embedding in fp32: only the projection's
    own copy is quantised.
    """
    if next(module.parameters()).device.type != "cpu":
        raise ValueError("--int8 runs on CPU only (fbgemm kernels); on a GPU use --dtype bf16")
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8Linear(child))
                count += 1
    return count
