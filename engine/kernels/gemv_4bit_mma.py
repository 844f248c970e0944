"""One token's product with bitsandbytes nf4 weights on the tensor cores: a CUDA kernel compiled at load.

The Triton GEMV (engine/kernels/gemv_4bit.py) spends about six instructions on each weight (a code's value read from
memory, converted, multiplied, summed) and so reads its weights at a fifth of the memory bandwidth. Here a warp
turns two codes at once into their two bf16 values with one shared-memory read, from a table of the 256 byte
values replicated for each of the 32 lanes (no bank conflicts), and lets the tensor cores multiply and sum:
one ``mma.m16n8k16`` takes 16 rows x 16 inputs. The input vector is every column of the mma's B operand, so each
thread finds its rows' sums in its own accumulators; a 64-element block's sum is scaled by its absmax once.

Which input a code meets is ours to choose, as long as the weight's and the input's agree. Each thread reads 16
bytes of a row at once (fewer cache-line requests than 8, which with the table reads are what the load/store
unit is busy with): threads 0 and 1 of a group the first block of a pair of blocks (a chunk), 2 and 3 the
second, and the B operand carries the first block's inputs in columns 0-3 (zero where they would meet the second
block's codes) and the second's in columns 4-7, so each thread's accumulator holds its own block's sum, scaled
by that block's absmax. On an H200 it reads the 14B shape's products at 0.45 of the copy bandwidth; reading 8
bytes a thread, or copying the weights into shared memory first (cp.async, or the tensor memory accelerator's
bulk copies), was slower (docs/benchmarks.md).

The weights are bitsandbytes' own bytes where they lie (``gemv_4bit.Nf4Weight``); the values differ from
bitsandbytes' only in rounding: the codebook is rounded to bf16 before the absmax scales the block's sum, where
bitsandbytes rounds their product.

CUDA only (compiled by NVRTC, which CUDA builds of PyTorch ship); nf4 with 64-element blocks, rows a multiple of
16. The fast decode path times the tilings at load against the Triton GEMV and bitsandbytes, and keeps the
fastest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

import compat
from engine.kernels import dependent_launch
from engine.kernels.gemv_4bit import Nf4Weight

BLOCKSIZE = 64  # elements per absmax block the kernel handles
ROWS = 16  # rows per thread block: the mma's M
MAX_SPLIT = 4  # thread blocks a row tile's chunks may be split over (each weight keeps slots for this many)

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
__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load_streaming(const u8* p) {  // weights: read once, kept out of L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Two 64-element blocks (a chunk) of rows g and g+8, thread t holding 16 bytes of each row: threads 0 and 1 the
// first block's, 2 and 3 the second's. mma m takes bytes 2m and 2m+1 of each row and input words 2m and 2m+1; a
// byte's two codes become their bf16 values with one read of the table (this lane's copy). The mma's B columns
// 0-3 carry the first block's inputs (lanes of t < 2; zero in the rest), columns 4-7 the second's, so c[0] and
// c[2] of thread t are rows g and g+8 summed over its own block, scaled by that block's absmax once.
__device__ __forceinline__ void multiply_chunk(uint4 w0, uint4 w8, const u32 (&xs)[16], u32 scale, const u32* tab,
                                               float& acc0, float& acc8) {
  const u32 q0[4] = {w0.x, w0.y, w0.z, w0.w}, q8[4] = {w8.x, w8.y, w8.z, w8.w};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int m = 0; m < 8; ++m) {
    const u32 a = q0[m >> 1] >> (16 * (m & 1)), b = q8[m >> 1] >> (16 * (m & 1));
    mma(c, tab[(a & 0xFF) << 5], tab[(b & 0xFF) << 5], tab[((a >> 8) & 0xFF) << 5], tab[((b >> 8) & 0xFF) << 5],
        xs[2 * m], xs[2 * m + 1]);
  }
  acc0 += c[0] * half_to_float(scale & 0xFFFF);
  acc8 += c[2] * half_to_float(scale >> 16);
}

__device__ __forceinline__ void build_table(u32* table, const u32* pairs) {  // table[byte * 32 + lane]
  for (int i = threadIdx.x; i < 256 * 8; i += WARPS * 32) {
    const u32 v = __ldg(pairs + (i >> 3));
    reinterpret_cast<uint4*>(table)[i] = make_uint4(v, v, v, v);
  }
}

#if SPLIT > 1
// A row tile's blocks split over SPLIT thread blocks: each leaves its 16 sums in a slot of its own, and the last
// of them to finish adds the slots in order (the same order whichever is last) and writes the rows.
__device__ __forceinline__ bool last_of_split(float& sum, float* split_sums, int* arrivals) {
  __shared__ int last;
  if (threadIdx.x < 16) {
    split_sums[(blockIdx.x * SPLIT + blockIdx.y) * 16 + threadIdx.x] = sum;
    __threadfence();
  }
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(arrivals + blockIdx.x, 1) == SPLIT - 1;
  __syncthreads();
  if (!last) return false;
  __threadfence();
  if (threadIdx.x < 16) {
    sum = 0.f;
#pragma unroll
    for (int s = 0; s < SPLIT; ++s) sum += __ldcg(split_sums + (blockIdx.x * SPLIT + s) * 16 + threadIdx.x);
  }
  if (threadIdx.x == 0) arrivals[blockIdx.x] = 0;  // ready for the next launch
  return true;
}
#endif

// The 16 rows' sums over the warps (each warp's thread t == 0 of group g holds rows g and g+8), plus the bias.
__device__ __forceinline__ void write_rows(float (*partial)[16], float acc0, float acc8, int row0, u16* y,
                                           const u16* bias, int has_bias, float* split_sums, int* arrivals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);  // threads t and t + 2 hold a row's two blocks
  acc8 += __shfl_xor_sync(0xffffffffu, acc8, 2);
  if ((lane & 3) == 0) {
    partial[warp][lane >> 2] = acc0;
    partial[warp][(lane >> 2) + 8] = acc8;
  }
  __syncthreads();
  float sum = 0.f;
  if (threadIdx.x < 16) {
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][threadIdx.x];
  }
#if SPLIT > 1
  if (!last_of_split(sum, split_sums, arrivals)) return;
#endif
  if (threadIdx.x < 16) {
    if (has_bias) sum += __uint_as_float(((u32)bias[row0 + threadIdx.x]) << 16);
    y[row0 + threadIdx.x] = float_to_bf16(sum);
  }
}

struct Round {  // what one round of a warp reads: UNROLL chunks of rows g and g + 8, their absmax
  uint4 w0[UNROLL], w8[UNROLL];
  u32 s[UNROLL];
};

// Chunk c's bytes and absmax for this thread; past the last block (K of an odd number of blocks) the other
// block's bytes, whose inputs are then zero.
__device__ __forceinline__ void load_round(Round& r, int first, int end, int blocks, const u8* w0, const u8* w8,
                                           const u32* scales, int half) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int c = first + u < end ? first + u : end - 1;  // past this block's chunks: a chunk read, never used
    const bool past = 2 * c + half >= blocks;
    const int offset = 64 * c - (past ? 32 : 0);
    r.w0[u] = load_streaming(w0 + offset);
    r.w8[u] = load_streaming(w8 + offset);
    r.s[u] = __ldg(scales + (past ? blocks - 1 : 2 * c + half) * 8);
  }
}

// y[16 rows of this block] = W x. packed: [N, K/2] (the first code of a pair in the high nibble); scales: the
// absmax in fp16 pairs, [N/16, K/64, 8] (rows g and g+8 of a 16-row tile, so that a warp reads one sector a
// block); pairs: 256 bf16 pairs, a byte's two codes' values (first in the low half); x, y, bias: bf16.
// The warps take rounds of UNROLL chunks in turn, each warp's double-buffered (the next round's loads in flight
// while this one is multiplied, the first round's while the table is built). The inputs, read from the L1
// cache, are loaded as they are multiplied. With SPLIT > 1, blockIdx.y takes its share of the row's chunks.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_mma_gemv(const u8* __restrict__ packed, const u32* __restrict__ scales, const u32* __restrict__ pairs,
             const u16* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias, int has_bias, int K,
             float* __restrict__ split_sums, int* __restrict__ arrivals) {
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
  const int per = (chunks + SPLIT - 1) / SPLIT, end = min(chunks, (int)(blockIdx.y + 1) * per);  // this block's
  Round current, following;
  int first = blockIdx.y * per + warp * UNROLL;
  if (first < end) load_round(current, first, end, blocks, w0, w8, tile_scales, half);
  build_table(table, pairs);
  __syncthreads();
  // Only the weights, their scales and the code table are read above: the kernel before may still be writing x.
  WAIT_AND_SIGNAL
  const u32* tab = table + lane;
  float acc0 = 0.f, acc8 = 0.f;
  for (; first < end; first += WARPS * UNROLL) {
    const int next = first + WARPS * UNROLL;
    if (next < end) load_round(following, next, end, blocks, w0, w8, tile_scales, half);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = first + u;
      if (c < end) {
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
  write_rows(partial, acc0, acc8, row0, y, bias, has_bias, split_sums, arrivals);
}
"""


@dataclass(frozen=True)
class MmaConfig:
    """Warps per thread block (they take the row tile's chunks in turn), chunks (pairs of 64-element blocks)
    each warp loads at once, and thread blocks a row tile's chunks are split over (more blocks in flight for
    products of few rows)."""

    warps: int = 8
    unroll: int = 1
    split: int = 1

    def __post_init__(self):
        if not 1 <= self.split <= MAX_SPLIT:
            raise ValueError(f"split {self.split}: from 1 to {MAX_SPLIT}")


# Timed at load. On an H200 (docs/benchmarks.md): 8 warps won every product of the 14B shape; at 1.5B, 16 warps
# won q/k/v and o, and a split over 4 blocks the down product (96 row tiles for 132 multiprocessors).
CANDIDATES = (MmaConfig(8, 1), MmaConfig(16, 1), MmaConfig(8, 1, 2), MmaConfig(8, 1, 3), MmaConfig(8, 1, 4))


def why_unsupported(weight: Nf4Weight, device: torch.device) -> str | None:
    """Why the kernel cannot take ``weight`` on ``device``; None if it can."""
    if device.type != "cuda":
        return "it runs on CUDA only"
    if reason := compat.why_no_cuda_compiler():
        return reason
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "bf16 tensor cores need compute capability 8.0"
    if weight.quant_type != "nf4" or weight.blocksize != BLOCKSIZE:
        return f"{weight.quant_type} in blocks of {weight.blocksize} (only nf4 in blocks of {BLOCKSIZE})"
    if weight.in_features % BLOCKSIZE:
        return f"{weight.in_features} inputs (a multiple of {BLOCKSIZE})"
    if weight.out_features % ROWS:
        return f"{weight.out_features} rows (a multiple of {ROWS})"
    return None


@cache
def _kernel(config: MmaConfig, pdl: bool):
    """The kernel in ``config``'s tiling; with ``pdl``, waiting for the kernel before it (dependent_launch)."""
    source = (f"#define WARPS {config.warps}\n#define UNROLL {config.unroll}\n#define SPLIT {config.split}\n"
              f"#define PDL {int(pdl)}\n{SOURCE}").replace("WAIT_AND_SIGNAL", dependent_launch.CUDA_WAIT_AND_SIGNAL)
    return compat.compile_cuda_kernel(source, "nf4_mma_gemv")


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
    if config.split > 1 and weight.arrivals is None:  # slots for every split, so that they are made once
        tiles = n // ROWS  # each tile's partial sums, and its count of blocks arrived (zero between launches)
        weight.split_sums = torch.empty(tiles * MAX_SPLIT * ROWS, dtype=torch.float32, device=x.device)
        weight.arrivals = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    slots = (weight.split_sums, weight.arrivals) if config.split > 1 else (out, out)  # unread unsplit
    dependent_launch.launch_compiled(
        _kernel(config, dependent_launch.active()), grid=(n // ROWS, config.split, 1), block=(32 * config.warps, 1, 1),
        args=[weight.packed, weight.tiled_absmax, weight.pairs, x.reshape(-1).contiguous(), out,
              bias if bias is not None else out, int(bias is not None), k, *slots])
    return out.view(*x.shape[:-1], n)
