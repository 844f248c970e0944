"""The new token's rotary embedding and its key and value written into the cache: one Triton kernel.

The decode step's small operations between its products cost a launch each (docs/benchmarks.md: rotary and the
two cache writes were three kernels, 0.18 ms of a 14B token). Here one program per head rotates a query head,
or rotates a key head and writes it and its value head at the current position, read from the GPU's memory
so that a graph captured once writes where each replay is. ``q * cos + rotate_half(q) * sin`` is computed in
float32 and rounded once to the model's dtype, as the compiled step did: in float32 the eager formula's numbers,
in bf16 within half a rounding step of the exact value, where the eager formula rounds three times.
"""

from __future__ import annotations

import torch

from engine.kernels.triton_runtime import triton

if triton is not None:
    import triton.language as tl


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of queries and keys ([..., heads, head_dim]; cos and sin broadcast against them: a
    prompt's [n, 1, head_dim], one position's [1, head_dim])."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotate_and_store_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            position: torch.Tensor) -> torch.Tensor:
    """The formula: rotary embedding, and the new key and value written at ``position``; returns the rotated
    query as [heads, head_dim]."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    c, s = cos[position], sin[position]  # (1, head_dim)
    q, k = rotate(q.view(-1, head_dim), k.view(kv_heads, head_dim), c, s)
    k_cache.index_copy_(2, position, k.view(1, kv_heads, 1, head_dim))
    v_cache.index_copy_(2, position, v.view(1, kv_heads, 1, head_dim))
    return q


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """As ``rotate_and_store_native``: ``q``, ``k``, ``v`` one token's projections (any shape, contiguous),
    ``cos``/``sin`` [max_len, head_dim], caches [1, kv_heads, max_len, head_dim]; returns the rotated query as
    [heads, head_dim]."""
    kv_heads, max_len, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    heads = q.numel() // head_dim
    out = torch.empty(heads, head_dim, dtype=q.dtype, device=q.device)
    _rotate_and_store[(heads + kv_heads,)](q, k, v, cos, sin, k_cache, v_cache, position, out, heads, max_len,
                                          HALF=head_dim // 2, HALF_PADDED=triton.next_power_of_2(head_dim // 2),
                                          num_warps=1)
    return out


if triton is not None:

    @triton.jit
    def _rotate_and_store(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, position_ptr, out_ptr,
                          heads, max_len, HALF: tl.constexpr, HALF_PADDED: tl.constexpr):
        head = tl.program_id(0)  # query heads first, then key-value heads
        position = tl.load(position_ptr)
        first = tl.arange(0, HALF_PADDED)
        ok = first < HALF
        second = first + HALF
        table = position * 2 * HALF
        cos1, cos2 = tl.load(cos_ptr + table + first, mask=ok), tl.load(cos_ptr + table + second, mask=ok)
        sin1, sin2 = tl.load(sin_ptr + table + first, mask=ok), tl.load(sin_ptr + table + second, mask=ok)
        if head < heads:
            source = q_ptr + head * 2 * HALF
        else:
            source = k_ptr + (head - heads) * 2 * HALF
        x1, x2 = tl.load(source + first, mask=ok), tl.load(source + second, mask=ok)
        dtype = x1.dtype
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = (x1 * cos1.to(tl.float32) - x2 * sin1.to(tl.float32)).to(dtype)
        y2 = (x2 * cos2.to(tl.float32) + x1 * sin2.to(tl.float32)).to(dtype)
        if head < heads:
            tl.store(out_ptr + head * 2 * HALF + first, y1, mask=ok)
            tl.store(out_ptr + head * 2 * HALF + second, y2, mask=ok)
        else:
            kv_head = head - heads
            at = (kv_head * max_len + position) * 2 * HALF
            tl.store(k_cache_ptr + at + first, y1, mask=ok)
            tl.store(k_cache_ptr + at + second, y2, mask=ok)
            value = v_ptr + kv_head * 2 * HALF
            tl.store(v_cache_ptr + at + first, tl.load(value + first, mask=ok), mask=ok)
            tl.store(v_cache_ptr + at + second, tl.load(value + second, mask=ok), mask=ok)
