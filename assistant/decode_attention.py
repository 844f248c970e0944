"""Attention of one new token over the KV cache, reading only the positions written so far: two Triton kernels.

The captured decode step has one shape for every token, so the plain way attends over the whole static cache
(CONTEXT_LENGTH positions) and masks the unwritten ones: at the 14B shape and 8,192 positions that reads 1.6 GB
of keys and values per token, a fifth of what the 4-bit weights take. Here the current position is read from the
GPU's memory inside the kernels, so a graph captured once reads only the positions up to it. The cache is cut
into chunks, each attended by its own program for one key-value head and the query heads that share it
(flash-decoding: a running maximum and sum per chunk); a second kernel merges the chunks. How long a chunk is
trades programs in flight against chunks to merge: the fast decode path times the TILINGS at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from assistant.triton_runtime import triton

if triton is not None:
    import triton.language as tl

@dataclass(frozen=True)
class AttentionTiling:
    """Cache positions per program (``chunk``), positions per loop step inside it (``block``), warps."""

    chunk: int = 256
    block: int = 32
    num_warps: int = 4


# Tried at load by the fast decode path: short chunks put more programs in flight (a 14B layer at 3,700
# positions is 120 programs of 256 positions, fewer than an H200 has multiprocessors), long ones merge fewer.
TILINGS = (AttentionTiling(256, 32), AttentionTiling(128, 32), AttentionTiling(64, 32), AttentionTiling(64, 64),
           AttentionTiling(128, 64), AttentionTiling(32, 32, 2))


class DecodeAttention:
    """Attention for a cache of ``kv_heads`` x ``max_len`` x ``head_dim``, ``heads`` query heads; its scratch
    buffers are allocated once, so that the call can be captured in a CUDA graph."""

    def __init__(self, heads: int, kv_heads: int, max_len: int, head_dim: int, scaling: float,
                 device: torch.device, tiling: AttentionTiling = AttentionTiling()):
        self.heads, self.kv_heads, self.head_dim, self.scaling = heads, kv_heads, head_dim, scaling
        self.tiling = tiling
        self.group = heads // kv_heads
        self.group_padded = max(16, triton.next_power_of_2(self.group))  # tl.dot takes 16 rows at least
        self.chunks = triton.cdiv(max_len, tiling.chunk)
        shape = (kv_heads, self.chunks, self.group_padded)
        self.maxima = torch.empty(shape, dtype=torch.float32, device=device)
        self.sums = torch.empty(shape, dtype=torch.float32, device=device)
        self.partial = torch.empty(*shape, head_dim, dtype=torch.float32, device=device)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 position: torch.Tensor) -> torch.Tensor:
        """``q``: [heads, head_dim] (rotary applied); caches [1, kv_heads, max_len, head_dim] holding positions
        0..``position`` (a one-element tensor on the device). Returns [1, 1, heads * head_dim] in q's dtype."""
        out = torch.empty(self.heads, self.head_dim, dtype=q.dtype, device=q.device)
        k, v = k_cache[0], v_cache[0]
        tiling = self.tiling
        _chunk_attention[(self.kv_heads, self.chunks)](
            q, k, v, position, self.maxima, self.sums, self.partial, self.scaling,
            k.stride(0), k.stride(1), self.chunks,
            GROUP=self.group, GROUP_PADDED=self.group_padded, HEAD_DIM=self.head_dim, CHUNK=tiling.chunk,
            BLOCK=tiling.block, num_warps=tiling.num_warps)
        _merge_chunks[(self.heads,)](
            self.maxima, self.sums, self.partial, position, out, self.chunks,
            GROUP=self.group, GROUP_PADDED=self.group_padded, HEAD_DIM=self.head_dim, CHUNK=tiling.chunk,
            CHUNKS_PADDED=triton.next_power_of_2(self.chunks))
        return out.view(1, 1, -1)


if triton is not None:

    @triton.jit
    def _chunk_attention(q_ptr, k_ptr, v_ptr, position_ptr, maxima_ptr, sums_ptr, partial_ptr, scaling,
                         head_stride, position_stride, chunks,
                         GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        head = tl.program_id(0)
        chunk = tl.program_id(1)
        length = tl.load(position_ptr) + 1
        start = chunk * CHUNK
        if start < length:  # chunks past the current position read nothing; the merge skips them
            rows = tl.arange(0, GROUP_PADDED)
            dims = tl.arange(0, HEAD_DIM)
            q = tl.load(q_ptr + (head * GROUP + rows)[:, None] * HEAD_DIM + dims[None, :],
                        mask=(rows < GROUP)[:, None], other=0.0)
            maximum = tl.full([GROUP_PADDED], float("-inf"), dtype=tl.float32)
            total = tl.zeros([GROUP_PADDED], dtype=tl.float32)
            acc = tl.zeros([GROUP_PADDED, HEAD_DIM], dtype=tl.float32)
            end = tl.minimum(start + CHUNK, length)
            for first in range(start, end, BLOCK):
                positions = first + tl.arange(0, BLOCK)
                valid = positions < end
                offsets = head * head_stride + positions[:, None] * position_stride + dims[None, :]
                k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)
                v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)
                scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scaling
                scores = tl.where(valid[None, :], scores, float("-inf"))
                new_maximum = tl.maximum(maximum, tl.max(scores, axis=1))
                weights = tl.exp(scores - new_maximum[:, None])
                shrink = tl.exp(maximum - new_maximum)
                total = total * shrink + tl.sum(weights, axis=1)
                acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
                maximum = new_maximum
            at = (head * chunks + chunk) * GROUP_PADDED + rows
            tl.store(maxima_ptr + at, maximum)
            tl.store(sums_ptr + at, total)
            tl.store(partial_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc)

    @triton.jit
    def _merge_chunks(maxima_ptr, sums_ptr, partial_ptr, position_ptr, out_ptr, chunks,
                      GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
                      CHUNKS_PADDED: tl.constexpr):
        query_head = tl.program_id(0)  # one program per query head
        head, row = query_head // GROUP, query_head % GROUP
        used = tl.cdiv(tl.load(position_ptr) + 1, CHUNK)
        chunk = tl.arange(0, CHUNKS_PADDED)
        dims = tl.arange(0, HEAD_DIM)
        in_use = chunk < used
        at = (head * chunks + chunk) * GROUP_PADDED + row
        maxima = tl.load(maxima_ptr + at, mask=in_use, other=float("-inf"))
        sums = tl.load(sums_ptr + at, mask=in_use, other=0.0)
        weights = tl.where(in_use, tl.exp(maxima - tl.max(maxima, axis=0)), 0.0)
        partial = tl.load(partial_ptr + at[:, None] * HEAD_DIM + dims[None, :], mask=in_use[:, None], other=0.0)
        out = tl.sum(partial * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(out_ptr + query_head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))
