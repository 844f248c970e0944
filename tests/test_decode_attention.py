"""Attention over the written positions of the cache (assistant/decode_attention.py), run by Triton's
interpreter on the CPU, against plain softmax attention; and the whole-cache masked attention the fast decode
step falls back to, against the same."""

from __future__ import annotations

import math

import pytest
import torch

from assistant.decode_attention import TILINGS, AttentionTiling, DecodeAttention
from assistant.fast_decode import attend


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: int) -> torch.Tensor:
    heads, head_dim = q.shape
    group = heads // k_cache.shape[1]
    out = []
    for h in range(heads):
        keys, values = k_cache[0, h // group, :position + 1].double(), v_cache[0, h // group, :position + 1].double()
        weights = torch.softmax(q[h].double() @ keys.T / math.sqrt(head_dim), dim=-1)
        out.append(weights @ values)
    return torch.stack(out).view(1, 1, -1)


CHUNK = AttentionTiling().chunk


@pytest.mark.parametrize("heads, kv_heads, head_dim, position, tiling", [
    (4, 2, 16, 0, AttentionTiling()),  # one position
    *[(4, 2, 16, p, AttentionTiling()) for p in (CHUNK - 1, CHUNK, 2 * CHUNK + 7)],  # chunk edges
    *[(4, 2, 16, 2 * t.chunk + t.block + 3, t) for t in TILINGS],  # every tiling, mid-chunk and mid-block
    (12, 2, 32, 700, AttentionTiling()),  # the 1.5B model's grouping (6 query heads a key head)
    (40, 8, 16, 599, AttentionTiling(64, 64)),  # the 14B model's (5), at the cache's last position
])
def test_attention_reads_the_written_positions_as_softmax_attention_does(heads, kv_heads, head_dim, position,
                                                                         tiling):
    torch.manual_seed(position)
    max_len = 600 if heads == 40 else 1024
    q = torch.randn(heads, head_dim)
    k_cache, v_cache = torch.randn(1, kv_heads, max_len, head_dim), torch.randn(1, kv_heads, max_len, head_dim)
    expected = reference(q, k_cache, v_cache, position)
    kernels = DecodeAttention(heads, kv_heads, max_len, head_dim, 1 / math.sqrt(head_dim), torch.device("cpu"),
                              tiling)
    got = kernels(q, k_cache, v_cache, torch.tensor([position]))
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
    # Positions past the current one (stale keys of earlier answers) change nothing.
    k_cache[:, :, position + 1:] = 1e4
    assert torch.allclose(kernels(q, k_cache, v_cache, torch.tensor([position])), got)


def test_the_whole_cache_masked_attends_as_softmax_attention_does():
    torch.manual_seed(0)
    q, k_cache, v_cache = torch.randn(12, 32), torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    expected = reference(q, k_cache, v_cache, 300)
    got = attend(q, k_cache, v_cache, torch.tensor([300]), 1 / math.sqrt(32))
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5
