"""The residual sum and the next layer's RMSNorm of one token: one Triton program that holds the whole row.

The decode step runs this twice a layer (97 times a 14B token). `torch.compile` makes it one kernel, but one that
loops over the row twice (a reduction over 5,120 values is too long for its single-pass form), so it waits on
memory twice: 3.2 us a launch on an H200, 0.31 ms of a 14B token (docs/benchmarks.md). Here one program keeps
the row in registers: the sum is written, squared and reduced, and the normed row written, from one read of
each input. The roundings are transformers' (Qwen2/Llama RMSNorm): the sum rounded to the model's dtype, the
normalised row rounded to it, then multiplied by the norm's weight.
"""

from __future__ import annotations

import torch

from engine.kernels import dependent_launch
from engine.kernels.triton_runtime import triton

if triton is not None:
    import triton.language as tl


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2/Llama RMSNorm, in the same order of roundings."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_native(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The formula: the residual sum and its RMSNorm (one kernel on CUDA when torch.compile fuses it)."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``add_rms_norm_native``: ``x + delta`` and its RMSNorm with ``weight``, over the last dimension
    (``x`` and ``delta`` of one shape)."""
    x, delta, hidden = x.contiguous(), delta.contiguous(), x.shape[-1]
    total = torch.empty_like(x)
    normed = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _add_rms_norm[(x.numel() // hidden,)](x, delta, weight, total, normed, hidden, eps,
                                         BLOCK=triton.next_power_of_2(hidden), num_warps=num_warps,
                                         **dependent_launch.triton_options())
    return total, normed


if triton is not None:

    @triton.jit
    def _add_rms_norm(x_ptr, delta_ptr, weight_ptr, total_ptr, normed_ptr, hidden, eps, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
        dependent_launch.wait_and_signal(PDL)
        row = tl.program_id(0) * hidden
        i = tl.arange(0, BLOCK)
        ok = i < hidden
        x = tl.load(x_ptr + row + i, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + row + i, mask=ok, other=0.0)
        weight = tl.load(weight_ptr + i, mask=ok, other=0.0)  # read with the row, not after the sum
        total = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
        tl.store(total_ptr + row + i, total, mask=ok)
        h = total.to(tl.float32)
        h = (h * tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)).to(x.dtype)
        tl.store(normed_ptr + row + i, weight.to(tl.float32) * h.to(tl.float32), mask=ok)
