"""One token's product with bitsandbytes 4-bit (nf4) weights, read where they lie: a Triton GEMV for batch 1.

bitsandbytes dequantizes a whole weight to bf16 and then multiplies, or runs a batch-1 kernel that reads its
weights at about a fifth of the memory bandwidth (docs/benchmarks.md). Here each program reads a few rows'
packed codes once, in 16-byte loads, turns every code into its value in registers (the 16-value codebook, scaled
by the block's absmax) and sums against the input: the weight is read once, at the width of its 4 bits.

The weights are bitsandbytes' own (``Params4bit`` and its quant state): codes packed two to a byte, the first
element of a pair in the high nibble, row after row; one absmax per block of ``blocksize`` elements. Layers that
take the same input (q, k and v; gate and up) are one weight here, their rows one after another: their bytes are
moved into one buffer that the layers then read views of (no extra memory), so one launch covers them. The
absmax is decoded from its 8-bit double quantization once and kept in float16 (a quarter bit per weight;
float16's rounding, 2^-11, is far below the 4-bit codes' own).
The model's own forward, prefill included, still runs bitsandbytes on the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kernels.triton_runtime import graph_ms, triton

if triton is not None:
    import triton.language as tl


@dataclass
class Nf4Weight:
    """A [out_features, in_features] weight in bitsandbytes' 4-bit layout."""

    packed: torch.Tensor  # uint8, out*in/2: two codes a byte, high nibble first
    absmax: torch.Tensor  # float16, out*in/blocksize
    code: torch.Tensor  # float32, 16: the nf4 codebook
    out_features: int
    in_features: int
    blocksize: int
    quant_type: str = "nf4"
    # The tensor-core kernel's (gemv_4bit_mma), made on its first use: its table of byte values, and the absmax
    # in the order it reads them (a second copy: a sixteenth of the packed bytes)
    pairs: torch.Tensor | None = None
    tiled_absmax: torch.Tensor | None = None
    split_sums: torch.Tensor | None = None  # float32: the partial sums of a row tile split over thread blocks
    arrivals: torch.Tensor | None = None  # int32, a row tile's blocks finished (zero between launches)

    @classmethod
    def from_bnb(cls, *modules) -> Nf4Weight:
        """The weight of a bitsandbytes ``Linear4bit``, or of several with the same inputs and quantization as
        one, their rows one after another (their bytes then live in one buffer, their modules reading views)."""
        import bitsandbytes.functional as bnbf

        states = [m.weight.quant_state for m in modules]
        first = states[0]
        if any((s.shape[1], s.blocksize, s.quant_type) != (first.shape[1], first.blocksize, first.quant_type)
               for s in states):
            raise ValueError("only layers with the same inputs and quantization make one weight")
        absmax = []
        for state in states:
            values = state.absmax
            if state.nested:
                values = bnbf.dequantize_blockwise(values, state.state2) + state.offset
            absmax.append(values.half())
        if len(modules) == 1:
            packed = modules[0].weight.data.view(-1)
        else:
            packed = torch.cat([m.weight.data.view(-1) for m in modules])
            start = 0
            for m in modules:  # the layers read their bytes where the GEMV reads them: one copy in memory
                size = m.weight.data.numel()
                m.weight.data = packed[start:start + size].view(m.weight.data.shape)
                start += size
        return cls(packed, torch.cat(absmax).contiguous(), first.code.float().to(first.absmax.device),
                   sum(s.shape[0] for s in states), first.shape[1], first.blocksize, first.quant_type)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense [out, in] matrix (the reference the kernel is checked against)."""
        codes = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).view(-1).long()
        values = self.code[codes].view(-1, self.blocksize) * self.absmax.float().view(-1, 1)
        return values.view(self.out_features, self.in_features).to(dtype)


def why_unsupported(module) -> str | None:
    """Why the kernel cannot take the weight of ``module`` (a bitsandbytes ``Linear4bit``); None if it can."""
    if triton is None:
        return "Triton is not installed"
    state = module.weight.quant_state
    if state.quant_type != "nf4":
        return f"{state.quant_type} weights (only nf4)"
    if state.blocksize < 8 or state.blocksize & (state.blocksize - 1):
        return f"block size {state.blocksize} (a power of two from 8)"
    if state.shape[1] % state.blocksize:
        return f"in_features {state.shape[1]} is not a multiple of the block size {state.blocksize}"
    return None


@dataclass(frozen=True)
class GemvConfig:
    """The kernel's tiling: rows per program, input elements per loop step, warps, pipelining depth."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2


# Tilings tried at load time (fastest_config); the sweep in scripts/gpu_gemv_bench.py tries more.
CANDIDATES = (GemvConfig(2, 1024, 2), GemvConfig(4, 512, 4), GemvConfig(4, 1024, 4), GemvConfig(4, 2048, 8),
              GemvConfig(8, 256, 2), GemvConfig(8, 512, 4), GemvConfig(8, 1024, 4), GemvConfig(8, 1024, 8),
              GemvConfig(16, 256, 4), GemvConfig(16, 512, 4), GemvConfig(16, 512, 8), GemvConfig(32, 256, 8))


def fastest_config(weights: list[Nf4Weight], device: torch.device, kernel: Callable | None = None,
                   candidates: tuple = CANDIDATES, default=GemvConfig()) -> tuple[object, float]:
    """The candidate tiling in which ``kernel`` (this module's GEMV, or another with its signature) takes
    ``weights`` (same size; several layers', so the L2 cache does not serve them) fastest on this GPU, and its
    milliseconds for all of them; elsewhere, or where no candidate compiles, the default, untimed (inf)."""
    if device.type != "cuda":
        return default, float("inf")
    kernel = kernel or gemv
    x = torch.randn(weights[0].in_features, dtype=torch.bfloat16, device=device)
    times = {}
    for config in candidates:
        try:
            times[config] = graph_ms(lambda config=config: [kernel(x, w, config=config) for w in weights])
        except Exception:  # noqa: BLE001, S112 - a tiling this GPU's compiler refuses is skipped
            continue
    if not times:
        return default, float("inf")
    best = min(times, key=times.get)
    return best, times[best]


def gemv(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None,
         config: GemvConfig = GemvConfig()) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for one row of input (``x``: [..., in] with one row in all), in ``x``'s dtype."""
    k, n = weight.in_features, weight.out_features
    if x.numel() != k:
        raise ValueError(f"gemv takes one row of {k} inputs, not {tuple(x.shape)}")
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    block_k = max(min(config.block_k, triton.next_power_of_2(k)), weight.blocksize)
    grid = (triton.cdiv(n, config.block_n),)
    _nf4_gemv[grid](x.reshape(-1), weight.packed, weight.absmax, weight.code, out,
                    bias if bias is not None else out, n, k, k // 2, k // weight.blocksize,
                    HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=block_k,
                    BLOCKSIZE=weight.blocksize, num_warps=config.num_warps, num_stages=config.num_stages)
    return out.view(*x.shape[:-1], n)


if triton is not None:

    @triton.jit
    def _nf4_gemv(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, bias_ptr, N, K, row_bytes, row_blocks,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCKSIZE: tl.constexpr):
        # A tile is [BLOCK_N rows, BLOCKS absmax blocks, HALF bytes of a block], read as bytes (contiguous along
        # a row, so each thread's share is one wide load); the next tile's bytes are loaded before this one's
        # arithmetic, so a load is always in flight. The input comes as [BLOCKS, HALF, 2] and is split into the
        # elements of the high and of the low nibbles. A code becomes its value by the codebook, read from
        # memory (16 values: always in the L1 cache).
        HALF: tl.constexpr = BLOCKSIZE // 2
        BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        blocks = tl.arange(0, BLOCKS)
        tile_byte = blocks[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [BLOCKS, HALF]
        w_rows = w_ptr + rows[:, None, None].to(tl.int64) * row_bytes
        absmax_rows = absmax_ptr + rows[:, None].to(tl.int64) * row_blocks
        pair = tl.arange(0, 2)
        acc = tl.zeros([BLOCK_N, BLOCKS], dtype=tl.float32)
        w_next = tl.load(w_rows + tile_byte[None, :, :],
                         mask=row_ok[:, None, None] & (tile_byte < row_bytes)[None, :, :], other=0)
        for k0 in range(0, K, BLOCK_K):
            w = w_next
            byte = k0 // 2 + tile_byte
            following = byte + BLOCK_K // 2
            w_next = tl.load(w_rows + following[None, :, :],
                             mask=row_ok[:, None, None] & (following < row_bytes)[None, :, :], other=0)
            x = tl.load(x_ptr + 2 * byte[:, :, None] + pair[None, None, :],
                        mask=(byte < row_bytes)[:, :, None], other=0.0).to(tl.float32)
            x_high, x_low = tl.split(x)
            high = tl.load(code_ptr + (w >> 4).to(tl.int32))
            low = tl.load(code_ptr + (w & 15).to(tl.int32))
            block_sums = tl.sum(high * x_high[None, :, :] + low * x_low[None, :, :], axis=2)
            block = k0 // BLOCKSIZE + blocks
            scale = tl.load(absmax_rows + block[None, :], mask=row_ok[:, None] & (block < row_blocks)[None, :],
                            other=0.0).to(tl.float32)
            acc += block_sums * scale
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
