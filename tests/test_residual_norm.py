"""The decode step's residual sum and RMSNorm in one Triton program (engine/kernels/residual_norm.py), run by Triton's
interpreter on the CPU, against the formula it replaces, in float32 (bf16, which the interpreter computes wrongly,
is tested on the GPU: tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.residual_norm import add_rms_norm as fused
from engine.kernels.residual_norm import add_rms_norm_native as eager


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 1, 80), (3, 2, 96)])  # 80, 96: rows no power of two long
def test_one_program_sums_and_norms_as_the_formula_does(shape):
    torch.manual_seed(shape[-1])
    x, delta, weight = torch.randn(shape) * 3, torch.randn(shape), torch.rand(shape[-1]) + 0.5
    expected_total, expected_normed = eager(x, delta, weight, 1e-6)
    total, normed = fused(x, delta, weight, 1e-6)
    assert torch.equal(total, expected_total)
    assert normed.shape == expected_normed.shape and normed.dtype == expected_normed.dtype
    torch.testing.assert_close(normed, expected_normed, rtol=2e-6, atol=1e-7)
    # Each row is normed by its own length: a row scaled up comes out the same.
    x[0, 0] *= 100
    delta[0, 0] *= 100
    torch.testing.assert_close(fused(x, delta, weight, 1e-6)[1][0, 0], normed[0, 0], rtol=2e-5, atol=1e-6)
