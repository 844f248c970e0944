"""Attention over the written positions of the cache, the new token's rotary embedding and cache write included
(engine/kernels/decode_attention.py), run by Triton's interpreter on the CPU, against the eager rotary and plain
softmax attention; and the whole-cache masked attention the fast decode step falls back to, against the same."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels.decode_attention import TILINGS, AttentionTiling, DecodeAttention, attend_native
from engine.kernels.rotary_store import rotate_and_store_native


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: int) -> torch.Tensor:
    heads, head_dim = q.shape
    group = heads // k_cache.shape[1]
    out = []
    for h in range(heads):
        keys, values = k_cache[0, h // group, :position + 1].double(), v_cache[0, h // group, :position + 1].double()
        weights = torch.softmax(q[h].double() @ keys.T / math.sqrt(head_dim), dim=-1)
        out.append(weights @ values)
    return torch.stack(out).view(1, 1, -1)


EDGES = AttentionTiling(runs=8, block=16)
RUN = EDGES.runs * EDGES.block  # written positions where runs grow past one step


@pytest.mark.parametrize("heads, kv_heads, head_dim, position, tiling", [
    (4, 2, 16, 0, AttentionTiling()),  # one position
    (4, 2, 16, 40, AttentionTiling()),  # fewer positions than runs: most runs read nothing
    *[(4, 2, 16, p, EDGES) for p in (RUN - 1, RUN, RUN + 7)],  # one step a run, then two (5 runs used)
    *[(4, 2, 16, 1000, t) for t in TILINGS],  # every tiling, the last run short, mid-step
    (12, 2, 32, 700, AttentionTiling()),  # the 1.5B model's grouping (6 query heads a key head)
    (40, 8, 16, 599, AttentionTiling(64, 64)),  # the 14B model's (5), at the cache's last position
])
def test_attention_reads_the_written_positions_as_softmax_attention_does(heads, kv_heads, head_dim, position,
                                                                         tiling):
    """The kernels take the new token's projections before rotary embedding: they rotate them, write the key and
    value at the position, and attend over it and the positions before it."""
    torch.manual_seed(position)
    max_len = 600 if heads == 40 else 1024
    q, k, v = (torch.randn(n * head_dim) for n in (heads, kv_heads, kv_heads))
    cos, sin = torch.randn(max_len, head_dim), torch.randn(max_len, head_dim)
    k_cache, v_cache = torch.randn(1, kv_heads, max_len, head_dim), torch.randn(1, kv_heads, max_len, head_dim)
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    rotated = rotate_and_store_native(q, k, v, cos, sin, expected_k_cache, expected_v_cache, torch.tensor([position]))
    expected = reference(rotated, expected_k_cache, expected_v_cache, position)
    kernels = DecodeAttention(heads, kv_heads, max_len, head_dim, 1 / math.sqrt(head_dim), torch.device("cpu"),
                              tiling)
    got = kernels(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([position]))
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
    assert torch.equal(k_cache, expected_k_cache) and torch.equal(v_cache, expected_v_cache)
    # Positions past the current one (stale keys of earlier answers) change nothing.
    k_cache[:, :, position + 1:] = 1e4
    assert torch.allclose(kernels(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([position])), got)
    # A shorter answer after it: fewer runs in use, the longer answer's partial sums left in the scratch buffers.
    earlier = position // 3
    rotated = rotate_and_store_native(q, k, v, cos, sin, expected_k_cache, expected_v_cache, torch.tensor([earlier]))
    expected = reference(rotated, expected_k_cache, expected_v_cache, earlier)
    got = kernels(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([earlier]))
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5


def test_the_whole_cache_masked_attends_as_softmax_attention_does():
    torch.manual_seed(0)
    q, k_cache, v_cache = torch.randn(12, 32), torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    expected = reference(q, k_cache, v_cache, 300)
    got = attend_native(q, k_cache, v_cache, torch.tensor([300]), 1 / math.sqrt(32))
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
