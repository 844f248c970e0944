"""The decode step's fused rotary embedding and cache write (engine/kernels/rotary_store.py), run by Triton's
interpreter on the CPU, against the eager formula it replaces: in float32 the same numbers, written in the same
places (bf16, which the interpreter computes wrongly, is tested on the GPU: tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.rotary_store import rotate_and_store as fused
from engine.kernels.rotary_store import rotate_and_store_native as eager


@pytest.mark.parametrize("heads, kv_heads, head_dim, position", [
    (4, 2, 16, 0), (12, 2, 64, 37), (40, 8, 128, 49), (5, 1, 80, 20),  # 80: a half that is no power of two
])
def test_one_kernel_rotates_and_writes_what_the_eager_formula_does(heads, kv_heads, head_dim, position):
    torch.manual_seed(position)
    max_len = 50
    qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim)  # as the fused product returns them: views
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    cos, sin = torch.randn(max_len, head_dim), torch.randn(max_len, head_dim)
    caches = torch.randn(2, 1, kv_heads, max_len, head_dim)
    original, expected_caches = caches.clone(), caches.clone()
    expected = eager(q, k, v, cos, sin, *expected_caches, torch.tensor([position]))
    got = fused(q, k, v, cos, sin, *caches, torch.tensor([position]))
    assert torch.equal(got, expected)
    assert torch.equal(caches, expected_caches)  # the new key and value at the position, nothing else touched
    assert not torch.equal(caches[:, :, :, position], original[:, :, :, position])
