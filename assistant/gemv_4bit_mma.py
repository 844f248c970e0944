"""One token's product with bitsandbytes nf4 weights on the tensor cores: a CUDA kernel compiled at load.

The Triton GEMV (assistant/gemv_4bit.py) spends about six instructions on each weight (a code's value read from
memory, converted, multiplied, summed) and so reads its weights at a fifth of the memory bandwidth. Here a warp
turns two codes at once into their two bf16 values with one shared-memory read, from a table of the 256 byte
values replicated for each of the 32 lanes (no bank conflicts), and lets the tensor cores multiply and sum:
one ``mma.m16n8k16`` takes 16 rows x 16 inputs. The input vector is every column of the mma's B operand, so each
thread finds its rows' sums in its own accumulators; a 64-element block's sum is scaled by its absmax once.

Which input a code meets is ours to choose, as long as the weight's and the input's agree: thread ``t`` of a
group reads 8 bytes (16 codes) of its row's block at byte ``8 t``, and mma ``m`` takes bytes ``2m`` and ``2m+1``
of them, so the input it needs is 16 consecutive elements, two 16-byte loads. The weights are bitsandbytes'
own bytes where they lie (``gemv_4bit.Nf4Weight``); the values differ from bitsandbytes' only in rounding: the
codebook is rounded to bf16 before the absmax scales the block's sum, where bitsandbytes rounds their product.

CUDA only (compiled by NVRTC, which CUDA builds of PyTorch ship); nf4 with 64-element blocks, rows a multiple of
16. The fast decode path times it at load against the Triton GEMV and bitsandbytes, and keeps the fastest.
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

// y[16 rows of this block] = W x. packed: [N, K/2] (the first code of a pair in the high nibble); absmax: fp16,
// [N, K/64]; pairs: 256 bf16 pairs, a byte's two codes' values (first in the low half); x, y, bias: bf16.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_mma_gemv(const u8* __restrict__ packed, const u16* __restrict__ absmax, const u32* __restrict__ pairs,
             const u16* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias, int has_bias, int K) {
  __shared__ __align__(16) u32 table[256 * 32];  // table[byte * 32 + lane]: each lane its own bank
  __shared__ float partial[WARPS][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < 256 * 8; i += WARPS * 32) {
    const u32 v = __ldg(pairs + (i >> 3));
    reinterpret_cast<uint4*>(table)[i] = make_uint4(v, v, v, v);
  }
  __syncthreads();
  const int g = lane >> 2, t = lane & 3;  // the mma's group (row) and thread in group
  const int row0 = blockIdx.x * 16, blocks = K >> 6, row_bytes = K >> 1;
  const u8* w0 = packed + (size_t)(row0 + g) * row_bytes + 8 * t;
  const u8* w8 = w0 + (size_t)8 * row_bytes;
  const u16* s0 = absmax + (size_t)(row0 + g) * blocks;
  const u16* s8 = s0 + (size_t)8 * blocks;
  const u16* xt = x + 16 * t;
  const u32* tab = table + lane;
  float acc0 = 0.f, acc8 = 0.f;
  for (int first = warp * UNROLL; first < blocks; first += WARPS * UNROLL) {
    uint2 q0[UNROLL], q8[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // every load of this round in flight before any arithmetic
      const int blk = first + u < blocks ? first + u : first;
      q0[u] = load_streaming(w0 + blk * 32);
      q8[u] = load_streaming(w8 + blk * 32);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int blk = first + u;
      if (blk < blocks) {
        const uint4* xv = reinterpret_cast<const uint4*>(xt + blk * 64);
        const uint4 xa = __ldg(xv), xb = __ldg(xv + 1);
        const u32 xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        const u32 r0[2] = {q0[u].x, q0[u].y}, r8[2] = {q8[u].x, q8[u].y};
        float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const u32 a = r0[m >> 1] >> (16 * (m & 1)), b = r8[m >> 1] >> (16 * (m & 1));
          mma(c, tab[(a & 0xFF) << 5], tab[(b & 0xFF) << 5], tab[((a >> 8) & 0xFF) << 5],
              tab[((b >> 8) & 0xFF) << 5], xs[2 * m], xs[2 * m + 1]);
        }
        acc0 += c[0] * half_to_float(s0[blk]);
        acc8 += c[2] * half_to_float(s8[blk]);
      }
    }
  }
  if (t == 0) {
    partial[warp][g] = acc0;
    partial[warp][g + 8] = acc8;
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
"""


@dataclass(frozen=True)
class MmaConfig:
    """Warps per thread block (they split the row's blocks between them), and blocks each warp loads at once."""

    warps: int = 4
    unroll: int = 4


CANDIDATES = (MmaConfig(4, 4), MmaConfig(4, 8), MmaConfig(8, 2), MmaConfig(8, 4), MmaConfig(2, 8))


def supported(weight: Nf4Weight, device: torch.device) -> str | None:
    """Why the kernel cannot take ``weight`` on ``device``; None if it can."""
    if device.type != "cuda":
        return "it runs on CUDA only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "bf16 tensor cores need compute capability 8.0"
    if weight.quant_type != "nf4" or weight.blocksize != BLOCKSIZE:
        return f"{weight.quant_type} in blocks of {weight.blocksize} (only nf4 in blocks of {BLOCKSIZE})"
    if weight.out_features % ROWS:
        return f"{weight.out_features} rows (a multiple of {ROWS})"
    return None


@cache
def _kernel(config: MmaConfig):
    source = f"#define WARPS {config.warps}\n#define UNROLL {config.unroll}\n{SOURCE}"
    return torch.cuda._compile_kernel(source, "nf4_mma_gemv")


def _pairs(weight: Nf4Weight) -> torch.Tensor:
    """The 256 byte values' two codes as bf16 bits, the first (high nibble) in the low half: int32 [256]."""
    bits = weight.code.to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
    byte = torch.arange(256, device=bits.device)
    pairs = bits[byte >> 4] | (bits[byte & 15] << 16)
    return torch.where(pairs >= 2**31, pairs - 2**32, pairs).to(torch.int32)


def gemv(x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None,
         config: MmaConfig = MmaConfig()) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for one row of bf16 input (``x``: [..., in] with one row in all), in bf16."""
    k, n = weight.in_features, weight.out_features
    if x.numel() != k or x.dtype != torch.bfloat16:
        raise ValueError(f"the kernel takes one bf16 row of {k} inputs, not {tuple(x.shape)} {x.dtype}")
    if weight.pairs is None:
        weight.pairs = _pairs(weight)
    out = torch.empty(n, dtype=torch.bfloat16, device=x.device)
    _kernel(config)(grid=(n // ROWS, 1, 1), block=(32 * config.warps, 1, 1),
                    args=[weight.packed, weight.absmax, weight.pairs, x.reshape(-1).contiguous(), out,
                          bias if bias is not None else out, int(bias is not None), k])
    return out.view(*x.shape[:-1], n)
