"""One token's product with bitsandbytes nf4 weights on the tensor cores: a CUDA kernel compiled at load.

The Triton GEMV (assistant/gemv_4bit.py) spends about six instructions on each weight (a code's value read from
memory, converted, multiplied, summed) and so reads its weights at a fifth of the memory bandwidth. Here a warp
turns two codes at once into their two bf16 values with one shared-memory read, from a table of the 256 byte
values replicated for each of the 32 lanes (no bank conflicts), and lets the tensor cores multiply and sum:
one ``mma.m16n8k16`` takes 16 rows x 16 inputs. The input vector is every column of the mma's B operand, so each
thread finds its rows' sums in its own accumulators; a 64-element block's sum is scaled by its absmax once.

Which input a code meets is ours to choose, as long as the weight's and the input's agree: thread ``t`` of a
group reads 8 bytes (16 codes) of its row's block at byte ``8 t``, and mma ``m`` takes bytes ``2m`` and ``2m+1``
of them, so the input it needs is 16 consecutive elements, two 16-byte loads.

The wide variant halves the cache-line requests a weight byte costs (they, with the table reads, are what the
load/store unit is busy with): thread ``t`` reads 16 bytes of a row, threads 0 and 1 the first block of a pair,
2 and 3 the second, and the B operand carries the first block's inputs in columns 0-3 (zero where they would
meet the second block's codes) and the second's in columns 4-7, so each thread's accumulator again holds its
own block's sum, scaled by that block's absmax. On an H200 it reads the 14B shape's products at 0.45 of the copy
bandwidth, the 8-byte variant at 0.39.

The weights are bitsandbytes' own bytes where they lie (``gemv_4bit.Nf4Weight``); the values differ from
bitsandbytes' only in rounding: the codebook is rounded to bf16 before the absmax scales the block's sum, where
bitsandbytes rounds their product.

CUDA only (compiled by NVRTC, which CUDA builds of PyTorch ship); nf4 with 64-element blocks, rows a multiple of
16. The fast decode path times the variants at load against the Triton GEMV and bitsandbytes, and keeps the
fastest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from assistant.gemv_4bit import Nf4Weight

BLOCKSIZE = 64  # elements per absmax block the kernel handles
ROWS = 16  # rows per thread block: the mma's M

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

__device__ __forceinline__ float half_to_float(u16 h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 float_to_bf16(float f) {
  u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ uint2 load_streaming(const u8* p) {  // weights: read once, kept out of L1
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// This thread's WORDS words of rows g and g+8 (4 * WORDS bytes each, two codes a byte) against its inputs: mma m
// takes bytes 2m and 2m+1 of each row and input words 2m and 2m+1; a byte's two codes become their bf16 values
// with one read of the table (this lane's copy). The sum over the bytes' block is scaled by its absmax once.
template <int WORDS>
__device__ __forceinline__ void multiply(const u32 (&q0)[WORDS], const u32 (&q8)[WORDS], const u32 (&xs)[4 * WORDS],
                                         u32 scale, const u32* tab, float& acc0, float& acc8) {
  float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int m = 0; m < 2 * WORDS; ++m) {
    const u32 a = q0[m >> 1] >> (16 * (m & 1)), b = q8[m >> 1] >> (16 * (m & 1));
    mma(c, tab[(a & 0xFF) << 5], tab[(b & 0xFF) << 5], tab[((a >> 8) & 0xFF) << 5], tab[((b >> 8) & 0xFF) << 5],
        xs[2 * m], xs[2 * m + 1]);
  }
  acc0 += c[0] * half_to_float(scale & 0xFFFF);
  acc8 += c[2] * half_to_float(scale >> 16);
}

// One 64-element block of rows g and g+8: this thread's 8 bytes of each (16 codes), its 16 inputs, the two
// rows' absmax.
__device__ __forceinline__ void multiply_block(uint2 w0, uint2 w8, uint4 xa, uint4 xb, u32 scale, const u32* tab,
                                               float& acc0, float& acc8) {
  const u32 xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
  const u32 q0[2] = {w0.x, w0.y}, q8[2] = {w8.x, w8.y};
  multiply<2>(q0, q8, xs, scale, tab, acc0, acc8);
}

__device__ __forceinline__ uint4 load_streaming16(const u8* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Two 64-element blocks (a chunk) of rows g and g+8, thread t holding 16 bytes of each row: threads 0 and 1 the
// first block's, 2 and 3 the second's. The mma's B columns 0-3 carry the first block's inputs (lanes of t < 2;
// zero in the rest), columns 4-7 the second's, so c[0] and c[2] of thread t are rows g and g+8 summed over its
// own block, scaled by that block's absmax.
__device__ __forceinline__ void multiply_chunk(uint4 w0, uint4 w8, const u32 (&xs)[16], u32 scale, const u32* tab,
                                               float& acc0, float& acc8) {
  const u32 q0[4] = {w0.x, w0.y, w0.z, w0.w}, q8[4] = {w8.x, w8.y, w8.z, w8.w};
  multiply<4>(q0, q8, xs, scale, tab, acc0, acc8);
}

__device__ __forceinline__ void build_table(u32* table, const u32* pairs) {  // table[byte * 32 + lane]
  for (int i = threadIdx.x; i < 256 * 8; i += WARPS * 32) {
    const u32 v = __ldg(pairs + (i >> 3));
    reinterpret_cast<uint4*>(table)[i] = make_uint4(v, v, v, v);
  }
}

// The 16 rows' sums over the warps (each warp's thread t == 0 of group g holds rows g and g+8), plus the bias.
__device__ __forceinline__ void write_rows(float (*partial)[16], float acc0, float acc8, int row0, u16* y,
                                           const u16* bias, int has_bias) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#if WIDE  // threads t and t + 2 hold a row's two blocks
  acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
  acc8 += __shfl_xor_sync(0xffffffffu, acc8, 2);
#endif
  if ((lane & 3) == 0) {
    partial[warp][lane >> 2] = acc0;
    partial[warp][(lane >> 2) + 8] = acc8;
  }
  __syncthreads();
  if (threadIdx.x < 16) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][threadIdx.x];
    if (has_bias) sum += __uint_as_float(((u32)bias[row0 + threadIdx.x]) << 16);
    y[row0 + threadIdx.x] = float_to_bf16(sum);
  }
}

#if WIDE
struct Round {  // what one round of a warp reads: UNROLL chunks of rows g and g + 8, their absmax
  uint4 w0[UNROLL], w8[UNROLL];
  u32 s[UNROLL];
};

// Chunk c's bytes and absmax for this thread; past the last block (K of an odd number of blocks) the other
// block's bytes, whose inputs are then zero.
__device__ __forceinline__ void load_round(Round& r, int first, int chunks, int blocks, const u8* w0, const u8* w8,
                                           const u32* scales, int half) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = first + u < chunks ? first + u : chunks - 1;  // past the end: a chunk read, never used
    const bool past = 2 * c + half >= blocks;
    const int offset = 64 * c - (past ? 32 : 0);
    r.w0[u] = load_streaming16(w0 + offset);
    r.w8[u] = load_streaming16(w8 + offset);
    r.s[u] = __ldg(scales + (past ? blocks - 1 : 2 * c + half) * 8);
  }
}

// y[16 rows of this block] = W x, each thread reading 16 bytes of a row a chunk (half the cache-line requests
// of 8): the warps take rounds of UNROLL chunks in turn, each warp's double-buffered. The inputs, read from the
// L1 cache, are loaded as they are multiplied.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_mma_gemv(const u8* __restrict__ packed, const u32* __restrict__ scales, const u32* __restrict__ pairs,
             const u16* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias, int has_bias, int K) {
  __shared__ __align__(16) u32 table[256 * 32];
  __shared__ float partial[WARPS][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3, half = t >> 1;
  const int row0 = blockIdx.x * 16, blocks = K >> 6, chunks = (blocks + 1) >> 1, row_bytes = K >> 1;
  const bool columns_mine = (g < 4) == (t < 2);  // this lane's B column belongs to its own block
  const u8* w0 = packed + (size_t)(row0 + g) * row_bytes + 16 * t;
  const u8* w8 = w0 + (size_t)8 * row_bytes;
  const u32* tile_scales = scales + (size_t)blockIdx.x * blocks * 8 + g;
  const uint4* xt = reinterpret_cast<const uint4*>(x + 32 * t);
  Round current, following;
  int first = warp * UNROLL;
  load_round(current, first, chunks, blocks, w0, w8, tile_scales, half);
  build_table(table, pairs);
  __syncthreads();
  const u32* tab = table + lane;
  float acc0 = 0.f, acc8 = 0.f;
  for (; first < chunks; first += WARPS * UNROLL) {
    const int next = first + WARPS * UNROLL;
    if (next < chunks) load_round(following, next, chunks, blocks, w0, w8, tile_scales, half);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = first + u;
      if (c < chunks) {
        u32 xs[16];
        const bool use = columns_mine && 2 * c + half < blocks;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 v = use ? __ldg(xt + 16 * c + i) : make_uint4(0, 0, 0, 0);
          xs[4 * i] = v.x; xs[4 * i + 1] = v.y; xs[4 * i + 2] = v.z; xs[4 * i + 3] = v.w;
        }
        multiply_chunk(current.w0[u], current.w8[u], xs, current.s[u], tab, acc0, acc8);
      }
    }
    current = following;
  }
  write_rows(partial, acc0, acc8, row0, y, bias, has_bias);
}
#elif !STAGES
struct Round {  // what one round of a warp reads: UNROLL blocks of its two rows, their absmax, the input
  uint2 w0[UNROLL], w8[UNROLL];
  uint4 xa[UNROLL], xb[UNROLL];
  u32 s[UNROLL];  // the absmax of rows g (low half) and g + 8 (high half), fp16
};

__device__ __forceinline__ void load_round(Round& r, int first, int blocks, const u8* w0, const u8* w8,
                                           const u32* scales, const u16* xt) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int blk = first + u < blocks ? first + u : blocks - 1;  // past the end: a block read, never used
    r.w0[u] = load_streaming(w0 + blk * 32);
    r.w8[u] = load_streaming(w8 + blk * 32);
    const uint4* xv = reinterpret_cast<const uint4*>(xt + blk * 64);
    r.xa[u] = __ldg(xv);
    r.xb[u] = __ldg(xv + 1);
    r.s[u] = __ldg(scales + blk * 8);
  }
}

__device__ __forceinline__ void multiply_round(const Round& r, int first, int blocks, const u32* tab,
                                               float& acc0, float& acc8) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u)
    if (first + u < blocks) multiply_block(r.w0[u], r.w8[u], r.xa[u], r.xb[u], r.s[u], tab, acc0, acc8);
}

// y[16 rows of this block] = W x. packed: [N, K/2] (the first code of a pair in the high nibble); scales: the
// absmax in fp16 pairs, [N/16, K/64, 8] (rows g and g+8 of a 16-row tile, so that a warp reads one sector a
// block); pairs: 256 bf16 pairs, a byte's two codes' values (first in the low half); x, y, bias: bf16.
// A warp's rounds are double-buffered: the next round's loads are in flight while this one is multiplied, and
// the first round's while the table is built.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_mma_gemv(const u8* __restrict__ packed, const u32* __restrict__ scales, const u32* __restrict__ pairs,
             const u16* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias, int has_bias, int K) {
  __shared__ __align__(16) u32 table[256 * 32];  // table[byte * 32 + lane]: each lane its own bank
  __shared__ float partial[WARPS][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // the mma's group (row) and thread in group
  const int row0 = blockIdx.x * 16, blocks = K >> 6, row_bytes = K >> 1;
  const u8* w0 = packed + (size_t)(row0 + g) * row_bytes + 8 * t;
  const u8* w8 = w0 + (size_t)8 * row_bytes;
  const u32* tile_scales = scales + (size_t)blockIdx.x * blocks * 8 + g;
  const u16* xt = x + 16 * t;
  Round current, following;
  int first = warp * UNROLL;
  load_round(current, first, blocks, w0, w8, tile_scales, xt);
  build_table(table, pairs);
  __syncthreads();
  const u32* tab = table + lane;
  float acc0 = 0.f, acc8 = 0.f;
  for (; first < blocks; first += WARPS * UNROLL) {
    const int next = first + WARPS * UNROLL;
    if (next < blocks) load_round(following, next, blocks, w0, w8, tile_scales, xt);
    multiply_round(current, first, blocks, tab, acc0, acc8);
    current = following;
  }
  write_rows(partial, acc0, acc8, row0, y, bias, has_bias);
}
#else
__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ void copy_async(void* to, const void* from) {  // 16 bytes, past L1
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(to)), "l"(from));
}

// The same product, the weights and absmax copied into shared memory by cp.async (no registers held while they
// are in flight, every 16 bytes of a row read whole): a ring of STAGES rounds for each warp, STAGES - 1 in flight.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_mma_gemv(const u8* __restrict__ packed, const u32* __restrict__ scales, const u32* __restrict__ pairs,
             const u16* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias, int has_bias, int K) {
  constexpr int ROUND = UNROLL * 512 + UNROLL * 32;  // a round's weights (16 rows x 32 bytes a block), absmax
  __shared__ __align__(16) u32 table[256 * 32];
  extern __shared__ __align__(16) u8 ring[];  // [WARPS][STAGES][ROUND]: dynamic, beyond the static 48 KB
  __shared__ float partial[WARPS][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16, blocks = K >> 6, row_bytes = K >> 1;
  const int rounds = blocks > warp * UNROLL ? (blocks - warp * UNROLL + WARPS * UNROLL - 1) / (WARPS * UNROLL) : 0;
  const u8* copy_from = packed + (size_t)(row0 + (lane >> 1)) * row_bytes + 16 * (lane & 1);  // lane: 16 bytes of a row
  const u32* tile_scales = scales + (size_t)blockIdx.x * blocks * 8;
  u8* mine = ring + warp * STAGES * ROUND;
  auto issue = [&](int r) {
    u8* to = mine + (r % STAGES) * ROUND;
    const int first = (r * WARPS + warp) * UNROLL;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int blk = first + u < blocks ? first + u : blocks - 1;
      copy_async(to + u * 512 + lane * 16, copy_from + blk * 32);
    }
    if (lane < 2 * UNROLL) {
      const int blk = first + (lane >> 1) < blocks ? first + (lane >> 1) : blocks - 1;
      copy_async(to + UNROLL * 512 + lane * 16, tile_scales + blk * 8 + 4 * (lane & 1));
    }
  };
#pragma unroll
  for (int r = 0; r < STAGES - 1; ++r) {
    if (r < rounds) issue(r);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  build_table(table, pairs);
  __syncthreads();
  const u32* tab = table + lane;
  const u16* xt = x + 16 * t;
  float acc0 = 0.f, acc8 = 0.f;
  for (int r = 0; r < rounds; ++r) {
    const int first = (r * WARPS + warp) * UNROLL;
    uint4 xa[UNROLL], xb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int blk = first + u < blocks ? first + u : blocks - 1;
      const uint4* xv = reinterpret_cast<const uint4*>(xt + blk * 64);
      xa[u] = __ldg(xv);
      xb[u] = __ldg(xv + 1);
    }
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2) : "memory");
    __syncwarp();
    const u8* from = mine + (r % STAGES) * ROUND;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (first + u < blocks)
        multiply_block(*reinterpret_cast<const uint2*>(from + u * 512 + g * 32 + 8 * t),
                       *reinterpret_cast<const uint2*>(from + u * 512 + 256 + g * 32 + 8 * t), xa[u], xb[u],
                       *reinterpret_cast<const u32*>(from + UNROLL * 512 + u * 32 + 4 * g), tab, acc0, acc8);
    }
    __syncwarp();  // every lane is done with this slot before it is filled again
    if (r + STAGES - 1 < rounds) issue(r + STAGES - 1);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  write_rows(partial, acc0, acc8, row0, y, bias, has_bias);
}
#endif
"""


@dataclass(frozen=True)
class MmaConfig:
    """Warps per thread block (they split the row's blocks between them), blocks each warp loads at once, and
    how: into registers, two rounds in flight (``stages`` 0), or into shared memory, ``stages - 1`` in flight;
    ``wide``: each thread reads 16 bytes of a row (a warp two blocks at a time, into registers, ``unroll``
    pairs of blocks a round)."""

    warps: int = 8
    unroll: int = 2
    stages: int = 0
    wide: bool = False


# Timed at load; on an H200 the wide loads won every product of the 14B shape (docs/benchmarks.md).
CANDIDATES = (MmaConfig(8, 1, wide=True), MmaConfig(8, 2, wide=True), MmaConfig(16, 1, wide=True),
              MmaConfig(8, 1), MmaConfig(8, 2), MmaConfig(4, 2, 4), MmaConfig(4, 4, 3), MmaConfig(8, 2, 3))


def supported(weight: Nf4Weight, device: torch.device) -> str | None:
    """Why the kernel cannot take ``weight`` on ``device``; None if it can."""
    if device.type != "cuda":
        return "it runs on CUDA only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "bf16 tensor cores need compute capability 8.0"
    if weight.quant_type != "nf4" or weight.blocksize != BLOCKSIZE:
        return f"{weight.quant_type} in blocks of {weight.blocksize} (only nf4 in blocks of {BLOCKSIZE})"
    if weight.in_features % BLOCKSIZE:
        return f"{weight.in_features} inputs (a multiple of {BLOCKSIZE})"
    if weight.out_features % ROWS:
        return f"{weight.out_features} rows (a multiple of {ROWS})"
    return None


def _ring_bytes(config: MmaConfig) -> int:
    """The staged kernel's dynamic shared memory: each warp's ring of rounds (weights, then absmax)."""
    return 0 if config.wide else config.warps * config.stages * config.unroll * (512 + 32)


@cache
def _kernel(config: MmaConfig):
    source = (f"#define WARPS {config.warps}\n#define UNROLL {config.unroll}\n#define STAGES {config.stages}\n"
              f"#define WIDE {int(config.wide)}\n{SOURCE}")
    kernel = torch.cuda._compile_kernel(source, "nf4_mma_gemv")
    if config.stages and not config.wide:  # with the static table, more than the 48 KB a block gets unasked
        kernel.set_shared_memory_config(max(_ring_bytes(config), 48 * 1024))
    return kernel


def _pairs(weight: Nf4Weight) -> torch.Tensor:
    """The 256 byte values' two codes as bf16 bits, the first (high nibble) in the low half: int32 [256]."""
    bits = weight.code.to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
    byte = torch.arange(256, device=bits.device)
    pairs = bits[byte >> 4] | (bits[byte & 15] << 16)
    return torch.where(pairs >= 2**31, pairs - 2**32, pairs).to(torch.int32)


def _tiled_absmax(weight: Nf4Weight) -> torch.Tensor:
    """The absmax as the kernel reads it: for each 16-row tile and block, rows 0, 8, 1, 9, ... 7, 15 (float16)."""
    blocks = weight.in_features // BLOCKSIZE
    tiles = weight.absmax.view(-1, 2, 8, blocks)  # [tile, row // 8, row % 8, block]
    return tiles.permute(0, 3, 2, 1).contiguous()


def gemv(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None,
         config: MmaConfig = MmaConfig()) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for one row of bf16 input (``x``: [..., in] with one row in all), in bf16."""
    k, n = weight.in_features, weight.out_features
    if x.numel() != k or x.dtype != torch.bfloat16:
        raise ValueError(f"the kernel takes one bf16 row of {k} inputs, not {tuple(x.shape)} {x.dtype}")
    if weight.pairs is None:
        weight.pairs, weight.tiled_absmax = _pairs(weight), _tiled_absmax(weight)
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    _kernel(config)(grid=(n // ROWS, 1, 1), block=(32 * config.warps, 1, 1), shared_mem=_ring_bytes(config),
                    args=[weight.packed, weight.tiled_absmax, weight.pairs, x.reshape(-1).contiguous(), out,
                          bias if bias is not None else out, int(bias is not None), k])
    return out.view(*x.shape[:-1], n)
