"""Decoding one answer at a time near the memory-bandwidth bound: a static KV cache, and the decode step replayed
from a CUDA graph (docs/benchmarks.md: transformers' `generate` reads a 14B model at 0.17 of the bound).

By job: ``plan`` (the DecodePlan: which path answers, the kernels chosen and the timings that chose them, and
``why_unsupported``), ``cache`` (the static KV cache), ``projections`` (the linear layers fused into four products
a layer), ``ops`` (the small operations, compiled), ``decoder`` (the one layer loop for prefill and step, and the
generate loop), ``capture`` (CUDA graphs), ``tuning`` (the GPU times the candidate kernels at load), ``check`` (the
self-check against the model's own forward) and ``start`` (build, check, or fall back). The kernels, each beside
its formula, are in engine/kernels/. Start one with ``engine.decode.start.start_fast_decoder``.
Architectures: the Llama family as transformers writes it (Qwen2 and Llama; DeepSeek-R1-Distill-Qwen and -Llama).
"""

from engine.decode.plan import DecodePlan, why_unsupported  # light: no torch, for the runtime and the app

__all__ = ["DecodePlan", "why_unsupported"]
