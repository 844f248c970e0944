"""Attention of one new token over the KV cache, reading only the positions written so far: two Triton kernels,
the first of which also applies the token's rotary embedding and writes its key and value into the cache.

The captured decode step has one shape for every token, so the plain way attends over the whole static cache
(CONTEXT_LENGTH positions) and masks the unwritten ones: at the 14B shape and 8,192 positions that reads 1.6 GB
of keys and values per token, a fifth of what the 4-bit weights take. Here the current position is read from the
GPU's memory inside the kernels, so a graph captured once reads only the positions up to it. The written
positions are cut into a fixed number of equal runs (flash-decoding: a running maximum and sum per run), each
attended by its own program for one key-value head and the query heads that share it; a second kernel merges the
runs. The runs grow with the position, so every position keeps the same programs in flight (a fixed run length
leaves most of the GPU idle early in the cache, and merges many runs late in it); how many trades programs in
flight against runs to merge: the fast decode path times the TILINGS at load. The rotary embedding is computed in
float32 and rounded once, as engine/kernels/rotary_store.py (the step's kernel where the whole cache is attended) does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels import dependent_launch
from engine.kernels.triton_runtime import triton

if triton is not None:
    import triton.language as tl


def attend_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """The formula (and the step's path where the kernels do not run): attention of one query ([heads,
    head_dim], rotated) over the whole cache, positions past ``position`` masked out (they hold stale keys of
    earlier answers); [1, 1, heads * head_dim].

    The query heads that share a key head are one matrix against that head's keys, so the cache is read once
    (transformers repeats it for every query head when a mask is given)."""
    kv_heads, length, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    scores = torch.matmul(q.view(kv_heads, -1, head_dim), k_cache[0].transpose(1, 2)) * scaling
    future = torch.arange(length, device=q.device) > position
    probs = torch.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v_cache[0]).reshape(1, 1, -1)


@dataclass(frozen=True)
class AttentionTiling:
    """Runs (programs) per key-value head, positions per loop step inside a run (``block``; a run is a whole
    number of steps), warps per program."""

    runs: int = 32
    block: int = 32
    num_warps: int = 4

    def __post_init__(self):
        if self.runs & (self.runs - 1) or self.block & (self.block - 1):
            raise ValueError(f"runs and block must be powers of two, not {self.runs} and {self.block}")


# Tried at load by the fast decode path: the 14B model has 8 key-value heads, the 1.5B model 2, so 16 runs a head
# give 128 programs at 14B (about one an H200 multiprocessor) and 32 at 1.5B.
TILINGS = (AttentionTiling(16, 32), AttentionTiling(32, 32), AttentionTiling(64, 32), AttentionTiling(128, 32),
           AttentionTiling(32, 64), AttentionTiling(64, 16, 2))


class DecodeAttention:
    """Attention for a cache of ``kv_heads`` x ``max_len`` x ``head_dim``, ``heads`` query heads; its scratch
    buffers are allocated once, so that the call can be captured in a CUDA graph."""

    def __init__(self, heads: int, kv_heads: int, max_len: int, head_dim: int, scaling: float,
                 device: torch.device, tiling: AttentionTiling = AttentionTiling()):
        self.heads, self.kv_heads, self.head_dim, self.scaling = heads, kv_heads, head_dim, scaling
        self.tiling = tiling
        self.group = heads // kv_heads
        self.group_padded = max(16, triton.next_power_of_2(self.group))  # tl.dot takes 16 rows at least
        shape = (kv_heads, tiling.runs, self.group_padded)
        self.maxima = torch.empty(shape, dtype=torch.float32, device=device)
        self.sums = torch.empty(shape, dtype=torch.float32, device=device)
        self.partial = torch.empty(*shape, head_dim, dtype=torch.float32, device=device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The new token's attention: ``q``, ``k``, ``v`` its projections before rotary embedding (contiguous,
        any shape), ``cos``/``sin`` [max_len, head_dim], caches [1, kv_heads, max_len, head_dim] holding positions
        0..``position`` - 1 (a one-element tensor on the device). Writes the rotated key and the value at
        ``position``; returns [1, 1, heads * head_dim] in q's dtype."""
        out = torch.empty(self.heads, self.head_dim, dtype=q.dtype, device=q.device)
        k_all, v_all = k_cache[0], v_cache[0]
        tiling = self.tiling
        _run_attention[(self.kv_heads, tiling.runs)](
            q, k, v, cos, sin, k_all, v_all, position, self.maxima, self.sums, self.partial, self.scaling,
            k_all.stride(0), k_all.stride(1),
            GROUP=self.group, GROUP_PADDED=self.group_padded, HEAD_DIM=self.head_dim, RUNS=tiling.runs,
            BLOCK=tiling.block, num_warps=tiling.num_warps, **dependent_launch.triton_options())
        _merge_runs[(self.heads,)](
            self.maxima, self.sums, self.partial, out, GROUP=self.group, GROUP_PADDED=self.group_padded,
            HEAD_DIM=self.head_dim, RUNS=tiling.runs, num_warps=4 if tiling.runs <= 32 else 8,
            **dependent_launch.triton_options())
        return out.view(1, 1, -1)


if triton is not None:

    @triton.jit
    def _rotated(x_ptr, at, dims, cos, sin, HEAD_DIM: tl.constexpr, mask):
        """Rotary embedding of the rows of head_dim values at ``x_ptr + at``: x * cos + rotate_half(x) * sin in
        float32, rounded once to x's dtype (as engine/kernels/rotary_store.py)."""
        half = HEAD_DIM // 2
        x = tl.load(x_ptr + at + dims[None, :], mask=mask, other=0.0)
        partner = tl.load(x_ptr + at + ((dims + half) % HEAD_DIM)[None, :], mask=mask, other=0.0).to(tl.float32)
        turned = tl.where(dims < half, -partner, partner)  # rotate_half(x) = (-x2, x1)
        return (x.to(tl.float32) * cos[None, :] + turned * sin[None, :]).to(x.dtype)

    @triton.jit
    def _run_attention(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, position_ptr, maxima_ptr,
                       sums_ptr, partial_ptr, scaling, head_stride, position_stride,
                       GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr,
                       RUNS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        dependent_launch.wait_and_signal(PDL)
        head = tl.program_id(0)
        run = tl.program_id(1)
        position = tl.load(position_ptr)
        length = position + 1
        per_run = tl.cdiv(tl.cdiv(length, RUNS), BLOCK) * BLOCK  # the written positions in RUNS, whole steps
        start = run * per_run
        if start < length:  # runs past the current position (early in the cache) read nothing; the merge skips them
            rows = tl.arange(0, GROUP_PADDED)
            dims = tl.arange(0, HEAD_DIM)
            cos = tl.load(cos_ptr + position * HEAD_DIM + dims).to(tl.float32)
            sin = tl.load(sin_ptr + position * HEAD_DIM + dims).to(tl.float32)
            q = _rotated(q_ptr, (head * GROUP + rows)[:, None] * HEAD_DIM, dims, cos, sin, HEAD_DIM,
                         (rows < GROUP)[:, None])
            # The new position's key and value: the run that holds it writes them into the cache and attends to
            # them from registers; the cache is read for the positions before it.
            key = _rotated(k_ptr, head * HEAD_DIM, dims, cos, sin, HEAD_DIM, dims[None, :] < HEAD_DIM)
            value = tl.load(v_ptr + head * HEAD_DIM + dims)
            last = start + per_run >= length
            if last:
                new = head * head_stride + position * position_stride + dims
                tl.store(k_cache_ptr + new[None, :], key)
                tl.store(v_cache_ptr + new, value)
            maximum = tl.full([GROUP_PADDED], float("-inf"), dtype=tl.float32)
            total = tl.zeros([GROUP_PADDED], dtype=tl.float32)
            acc = tl.zeros([GROUP_PADDED, HEAD_DIM], dtype=tl.float32)
            end = tl.minimum(start + per_run, position)
            for first in range(start, end, BLOCK):
                positions = first + tl.arange(0, BLOCK)
                valid = positions < end
                offsets = head * head_stride + positions[:, None] * position_stride + dims[None, :]
                k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
                v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
                scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scaling
                scores = tl.where(valid[None, :], scores, float("-inf"))
                new_maximum = tl.maximum(maximum, tl.max(scores, axis=1))
                weights = tl.exp(scores - new_maximum[:, None])
                shrink = tl.exp(maximum - new_maximum)
                total = total * shrink + tl.sum(weights, axis=1)
                acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
                maximum = new_maximum
            if last:
                scores = tl.sum(q.to(tl.float32) * key.to(tl.float32), axis=1) * scaling
                new_maximum = tl.maximum(maximum, scores)
                weights = tl.exp(scores - new_maximum)
                shrink = tl.exp(maximum - new_maximum)
                total = total * shrink + weights
                acc = acc * shrink[:, None] + (weights.to(value.dtype).to(tl.float32)[:, None]
                                               * value.to(tl.float32)[None, :])
                maximum = new_maximum
            at = (head * RUNS + run) * GROUP_PADDED + rows
            real = rows < GROUP  # the padding rows (tl.dot's 16) are never merged
            tl.store(maxima_ptr + at, maximum, mask=real)
            tl.store(sums_ptr + at, total, mask=real)
            tl.store(partial_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc, mask=real[:, None])
        else:  # marked unused, so that the merge need not read the position first
            rows = tl.arange(0, GROUP_PADDED)
            tl.store(maxima_ptr + (head * RUNS + run) * GROUP_PADDED + rows, float("-inf"), mask=rows < GROUP)

    @triton.jit
    def _merge_runs(maxima_ptr, sums_ptr, partial_ptr, out_ptr, GROUP: tl.constexpr, GROUP_PADDED: tl.constexpr,
                    HEAD_DIM: tl.constexpr, RUNS: tl.constexpr, PDL: tl.constexpr):
        dependent_launch.wait_and_signal(PDL)
        query_head = tl.program_id(0)  # one program per query head
        head, row = query_head // GROUP, query_head % GROUP
        run = tl.arange(0, RUNS)
        dims = tl.arange(0, HEAD_DIM)
        at = (head * RUNS + run) * GROUP_PADDED + row
        maxima = tl.load(maxima_ptr + at)  # -inf for the runs that read nothing; their sums and partials are stale
        in_use = maxima > float("-inf")
        sums = tl.where(in_use, tl.load(sums_ptr + at), 0.0)
        partial = tl.where(in_use[:, None], tl.load(partial_ptr + at[:, None] * HEAD_DIM + dims[None, :]), 0.0)
        weights = tl.where(in_use, tl.exp(maxima - tl.max(maxima, axis=0)), 0.0)
        out = tl.sum(partial * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(out_ptr + query_head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))
