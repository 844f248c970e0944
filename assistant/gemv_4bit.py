"""One token's product with a bitsandbytes 4-bit (nf4) weight, read where it lies: a Triton GEMV for batch 1.

bitsandbytes dequantizes a whole weight to bf16 and then multiplies, or runs a batch-1 kernel that reads its
weights at about a fifth of the memory bandwidth (docs/benchmarks.md). Here each program reads a few rows'
packed codes once, turns every code into its value in registers (the 16-value codebook, scaled by the block's
absmax) and sums against the input: the weight is read once, at the width of its 4 bits.

The weight is bitsandbytes' own (``Params4bit`` and its quant state): codes packed two to a byte, the first
element of a pair in the high nibble, row after row; one absmax per block of ``blocksize`` elements. Only the
absmax is copied, decoded from its 8-bit double quantization into float32 once (half a bit per weight, for
the layer sizes the GEMV takes).
The model's own forward, prefill included, still runs bitsandbytes on the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from assistant.triton_runtime import graph_ms, triton

if triton is not None:
    import triton.language as tl


@dataclass
class Nf4Weight:
    """A [out_features, in_features] weight in bitsandbytes' 4-bit layout."""

    packed: torch.Tensor  # uint8, out*in/2: two codes a byte, high nibble first
    absmax: torch.Tensor  # float32, out*in/blocksize
    code: torch.Tensor  # float32, 16: the nf4 codebook
    out_features: int
    in_features: int
    blocksize: int
    quant_type: str = "nf4"

    @classmethod
    def from_bnb(cls, module) -> Nf4Weight:
        """The weight of a bitsandbytes ``Linear4bit`` (its bytes shared, its absmax decoded)."""
        import bitsandbytes.functional as bnbf

        weight = module.weight
        state = weight.quant_state
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
        out_features, in_features = state.shape
        return cls(weight.data.view(-1), absmax.float().contiguous(), state.code.float().to(absmax.device),
                   out_features, in_features, state.blocksize, state.quant_type)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense [out, in] matrix (the reference the kernel is checked against)."""
        codes = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).view(-1).long()
        values = self.code[codes].view(-1, self.blocksize) * self.absmax.view(-1, 1)
        return values.view(self.out_features, self.in_features).to(dtype)


def supported(weight: Nf4Weight) -> str | None:
    """Why the kernel cannot take ``weight``; None if it can."""
    if triton is None:
        return "Triton is not installed"
    if weight.quant_type != "nf4":
        return f"{weight.quant_type} weights (only nf4)"
    if weight.blocksize < 8 or weight.blocksize & (weight.blocksize - 1):
        return f"block size {weight.blocksize} (a power of two from 8)"
    if weight.in_features % weight.blocksize:
        return f"in_features {weight.in_features} is not a multiple of the block size {weight.blocksize}"
    return None


@dataclass(frozen=True)
class GemvConfig:
    """The kernel's tiling: rows per program, input elements per loop step, warps, pipelining depth, and how a
    tile's codes are unpacked: all eight codes of each word at once (a tile eight times the words' size in
    registers), or one code position after another (``nibble_loop``: an eighth of the registers, so larger tiles
    and more loads in flight)."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2
    nibble_loop: bool = False


# Tilings tried at load time (fastest_config); the sweep in scripts/gpu_gemv_bench.py tries more.
CANDIDATES = (GemvConfig(2, 512, 4), GemvConfig(4, 256, 4), GemvConfig(4, 512, 4), GemvConfig(8, 256, 4),
              GemvConfig(8, 512, 4), GemvConfig(8, 1024, 8), GemvConfig(16, 256, 4), GemvConfig(16, 512, 8),
              GemvConfig(8, 1024, 4, nibble_loop=True), GemvConfig(16, 1024, 4, nibble_loop=True),
              GemvConfig(16, 2048, 8, nibble_loop=True), GemvConfig(32, 1024, 8, nibble_loop=True))


def fastest_config(weights: list[Nf4Weight], device: torch.device) -> tuple[GemvConfig, float]:
    """The candidate tiling that takes ``weights`` (same size; several layers', so the L2 cache does not serve
    them) fastest on this GPU, and its milliseconds for all of them; elsewhere the default, untimed (inf)."""
    if device.type != "cuda":
        return GemvConfig(), float("inf")
    x = torch.randn(weights[0].in_features, dtype=torch.bfloat16, device=device)
    times = {}
    for config in CANDIDATES:
        try:
            times[config] = graph_ms(lambda config=config: [gemv(x, w, config=config) for w in weights])
        except Exception:  # noqa: BLE001, S112 - a tiling this GPU's compiler refuses is skipped
            continue
    if not times:
        return GemvConfig(), float("inf")
    best = min(times, key=times.get)
    return best, times[best]


def gemv(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None,
         config: GemvConfig = GemvConfig()) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for one row of input (``x``: [..., in] with one row in all), in ``x``'s dtype."""
    k, n = weight.in_features, weight.out_features
    if x.numel() != k:
        raise ValueError(f"gemv takes one row of {k} inputs, not {tuple(x.shape)}")
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    block_k = min(config.block_k, triton.next_power_of_2(k))
    block_k = max(block_k, 2 * weight.blocksize)
    grid = (triton.cdiv(n, config.block_n),)
    _nf4_gemv[grid](x.reshape(-1), weight.packed.view(torch.int32), weight.absmax, weight.code, out,
                    bias if bias is not None else out, n, k,
                    HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=block_k,
                    BLOCKSIZE=weight.blocksize, NIBBLE_LOOP=config.nibble_loop,
                    num_warps=config.num_warps, num_stages=config.num_stages)
    return out.view(*x.shape[:-1], n)


if triton is not None:

    @triton.jit
    def _nf4_gemv(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, bias_ptr, N, K,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCKSIZE: tl.constexpr, NIBBLE_LOOP: tl.constexpr):
        # The packed bytes are read as 32-bit words, 8 codes each (byte i of a word holds elements 2i, 2i + 1,
        # the first in the high nibble). A tile is [BLOCK_N rows, BLOCKS absmax blocks, WORDS words]; the next
        # tile's words are loaded before this one's arithmetic, so a load is always in flight. A code becomes its
        # value by the codebook, read from memory (16 values: always in the L1 cache).
        BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE
        WORDS: tl.constexpr = BLOCKSIZE // 8
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        blocks = tl.arange(0, BLOCKS)
        words = tl.arange(0, WORDS)
        row_words = rows[:, None, None].to(tl.int64) * (K // 8)
        word_in_tile = blocks[None, :, None] * WORDS + words[None, None, :]  # [1, BLOCKS, WORDS]
        words_per_row = K // 8
        acc = tl.zeros([BLOCK_N, BLOCKS], dtype=tl.float32)
        w_next = tl.load(w_ptr + row_words + word_in_tile,
                         mask=row_ok[:, None, None] & (word_in_tile < words_per_row), other=0)
        for k0 in range(0, K, BLOCK_K):
            w = w_next
            first_word = (k0 + BLOCK_K) // 8
            w_next = tl.load(w_ptr + row_words + first_word + word_in_tile,
                             mask=row_ok[:, None, None] & (first_word + word_in_tile < words_per_row), other=0)
            k_word = k0 + (blocks[:, None] * WORDS + words[None, :]) * 8  # [BLOCKS, WORDS]: each word's first
            if NIBBLE_LOOP:  # code position j of every word, one after another
                part = tl.zeros([BLOCK_N, BLOCKS, WORDS], dtype=tl.float32)
                for j in tl.static_range(8):
                    x = tl.load(x_ptr + k_word + j, mask=k_word + j < K, other=0.0).to(tl.float32)
                    codes = (w >> (8 * (j // 2) + 4 * (1 - j % 2))) & 15
                    part += tl.load(code_ptr + codes) * x[None, :, :]
                block_sums = tl.sum(part, axis=2)
            else:  # all eight positions at once: [BLOCK_N, BLOCKS, WORDS, 8]
                nibble = tl.arange(0, 8)
                shifts = 8 * (nibble // 2) + 4 * (1 - nibble % 2)
                k = k_word[:, :, None] + nibble[None, None, :]
                x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                codes = (w[:, :, :, None] >> shifts[None, None, None, :]) & 15
                block_sums = tl.sum(tl.sum(tl.load(code_ptr + codes) * x[None, :, :, :], axis=3), axis=2)
            block = k0 // BLOCKSIZE + blocks
            scale = tl.load(absmax_ptr + rows[:, None].to(tl.int64) * (K // BLOCKSIZE) + block[None, :],
                            mask=row_ok[:, None] & (block < K // BLOCKSIZE)[None, :], other=0.0)
            acc += block_sums * scale
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
