"""The kernels of the decode step, chosen at load: where several ways exist, the GPU times them (each in a CUDA
graph, as the step pays for its kernels) and the fastest is kept; elsewhere a fixed choice. Each choice keeps its
candidates' times for the DecodePlan (engine/decode/plan.py). The decoder takes what is chosen here and times
nothing itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from engine.decode.cache import KVCache
from engine.decode.ops import Ops
from engine.decode.projections import GROUPS, base, group_modules
from engine.kernels import dependent_launch, gemv_4bit, gemv_4bit_mma, residual_norm
from engine.kernels.decode_attention import TILINGS, DecodeAttention
from engine.kernels.triton_runtime import graph_ms, runs_on


@dataclass
class Choice:
    """The kernel chosen for one op, and each candidate's microseconds where they were timed."""

    kernel: str
    timings_us: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # a candidate that failed


class WholeCache:
    """Attention over the whole cache, the unwritten positions masked, after the rotary embedding and the cache
    write (``ops``: the step's, so the Triton rotary kernel where it runs)."""

    def __init__(self, ops: Ops, scaling: float):
        self.ops, self.scaling = ops, scaling

    def __call__(self, q, k, v, cos, sin, k_cache, v_cache, position) -> torch.Tensor:
        q = self.ops.rotate_and_store(q, k, v, cos, sin, k_cache, v_cache, position)
        return self.ops.attend(q, k_cache, v_cache, position, self.scaling)


@dataclass
class StepKernels:
    """What the step calls, as chosen: the residual norm, the attention (the rotary embedding and cache write
    included; called as ``attention(q, k, v, cos, sin, k_cache, v_cache, position)``), and for each 4-bit product
    our GEMV in its tiling (the products absent run bitsandbytes'). ``choices``: op -> Choice, for the plan."""

    add_rms_norm: Callable
    attention: Callable
    products: dict[str, Callable]
    choices: dict[str, Choice]

    @property
    def reads_written_positions_only(self) -> bool:
        return isinstance(self.attention, DecodeAttention)


def choose_step_kernels(lm, cache: KVCache, nf4: list[dict] | None, ops: Ops) -> StepKernels:
    """The step's kernels for ``lm`` (the base causal LM) with ``cache``; ``nf4``: its fused 4-bit weights, if
    any (projections.FusedWeights); ``ops``: the step's small operations (torch.compile's, a candidate)."""
    config, choices = lm.config, {}
    norm = lm.model.norm
    if runs_on(cache.device):  # the Triton program, or torch.compile's kernel where timed faster
        choices["add_rms_norm"], add_rms_norm = choose_add_rms_norm(ops, norm.weight, float(config.rms_norm_eps))
    else:
        choices["add_rms_norm"], add_rms_norm = Choice("eager"), ops.add_rms_norm
    scaling = float(lm.model.layers[0].self_attn.scaling)
    choices["attention"], attention = choose_attention(config.num_attention_heads, cache, ops, scaling)
    products = {}
    if nf4 is not None:
        product_choices, products = choose_products(nf4, list(lm.model.layers), cache.device, cache.dtype)
        choices.update(product_choices)
    return StepKernels(add_rms_norm, attention, products, choices)


def choose_add_rms_norm(ops: Ops, weight: torch.Tensor, eps: float) -> tuple[Choice, Callable]:
    """The residual sum and RMSNorm as the step calls it: one Triton program a row (engine/kernels/residual_norm.py)
    in the warps timed fastest, unless torch.compile's kernel is faster (on CUDA; elsewhere the Triton one)."""
    if weight.device.type != "cuda":
        return Choice("one Triton program of 8 warps"), residual_norm.add_rms_norm
    x, delta = (torch.randn(1, 1, weight.shape[0], dtype=weight.dtype, device=weight.device) for _ in range(2))
    candidates = {"torch.compile": ops.add_rms_norm}
    candidates.update({f"one Triton program of {warps} warps": partial(residual_norm.add_rms_norm, num_warps=warps)
                       for warps in (4, 8, 16)})
    with torch.no_grad():
        times = {name: 1000 * graph_ms(lambda fn=fn: [fn(x, delta, weight, eps) for _ in range(16)]) / 16
                 for name, fn in candidates.items()}
    best = min(times, key=times.get)
    return Choice(best, times), candidates[best]


def choose_attention(heads: int, cache: KVCache, ops: Ops, scaling: float) -> tuple[Choice, Callable]:
    """The new token's rotary embedding, cache write and attention: the Triton kernels that do all three and read
    only the positions written so far (engine/kernels/decode_attention.py), in the tiling timed fastest, where
    they run and, on a GPU, are faster than the whole cache masked after the rotary kernel (all timed at the
    cache's middle position, where a long retrieval prompt's answer is, and at its last, their worst case, on
    eight layers' caches); else the latter."""
    kv_heads, head_dim, device = cache.kv_heads, cache.head_dim, cache.device
    whole_cache = WholeCache(ops, scaling)
    if not runs_on(device) or head_dim & (head_dim - 1) or head_dim < 16:
        return Choice("the whole cache"), whole_cache

    def written_positions(tiling=TILINGS[0]) -> DecodeAttention:
        return DecodeAttention(heads, kv_heads, cache.max_len, head_dim, scaling, device, tiling)

    if device.type != "cuda":
        return Choice("the written positions (Triton)"), written_positions()
    q, k, v = (torch.randn(n * head_dim, dtype=cache.dtype, device=device) for n in (heads, kv_heads, kv_heads))
    caches = list(zip(cache.keys, cache.values, strict=True))[:8]
    position = torch.zeros(1, dtype=torch.long, device=device)
    candidates = {"the whole cache": whole_cache}
    candidates.update({f"the written positions (Triton, {t.runs} runs a key head, {t.block} positions a step)":
                       written_positions(t) for t in TILINGS})
    times, failure = {}, None
    with torch.no_grad():
        for name, fn in candidates.items():
            try:
                times[name] = 0.0
                for at in (cache.max_len // 2, cache.max_len - 1):
                    position.fill_(at)
                    times[name] += 1000 * graph_ms(lambda fn=fn: [fn(q, k, v, cache.cos, cache.sin, *kv, position)
                                                                  for kv in caches]) / 2 / len(caches)
            except Exception as e:  # noqa: BLE001 - a tiling this GPU's compiler refuses is skipped
                if fn is whole_cache:
                    raise
                del times[name]
                failure = f"an attention tiling failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    best = min(times, key=times.get)
    return Choice(best, times, failure), candidates[best]


def choose_products(nf4: list[dict], layers, device: torch.device,
                    dtype: torch.dtype) -> tuple[dict[str, Choice], dict[str, Callable]]:
    """For every 4-bit product (GROUPS) where a GEMV of ours, in its fastest tiling, beats bitsandbytes' own
    product on this GPU (timed on eight layers), that GEMV: the tensor-core kernel (gemv_4bit_mma) where it
    compiles and takes the weight, else the Triton one; off CUDA every product, the Triton GEMV in its default
    tiling. Microseconds are per layer's product."""
    choices, chosen = {}, {}
    for group in GROUPS:
        sample = [row[group] for row in nf4[:8]]
        config, triton_ms = gemv_4bit.fastest_config(sample, device)
        kernels = {"triton gemv": (partial(gemv_4bit.gemv, config=config), triton_ms)}
        if dtype == torch.bfloat16 and gemv_4bit_mma.why_unsupported(sample[0], device) is None:
            config, mma_ms = gemv_4bit.fastest_config(sample, device, gemv_4bit_mma.gemv, gemv_4bit_mma.CANDIDATES,
                                                      gemv_4bit_mma.MmaConfig())
            kernels["tensor-core gemv"] = (partial(gemv_4bit_mma.gemv, config=config), mma_ms)
        name = min(kernels, key=lambda k: kernels[k][1])
        tiling = ", ".join(f"{k}={v}" for k, v in vars(kernels[name][0].keywords["config"]).items())
        if device.type != "cuda":
            chosen[group] = kernels[name][0]
            choices[group] = Choice(f"{name} [{tiling}]")
            continue
        modules = [base(m) for layer in layers[:8] for m in group_modules(layer, group)]
        x = torch.randn(1, 1, modules[0].in_features, dtype=torch.bfloat16, device=device)
        own_ms = graph_ms(lambda modules=modules, x=x: [m(x) for m in modules])
        if kernels[name][1] <= own_ms:
            chosen[group] = kernels[name][0]
        per_layer = 1000 / len(sample)  # microseconds per layer's product
        times = {k: ms * per_layer for k, (_, ms) in kernels.items() if ms < float("inf")}
        times["bitsandbytes"] = own_ms * per_layer
        failed = [k for k, (_, ms) in kernels.items() if ms == float("inf")]
        shape = f"{sample[0].out_features}x{sample[0].in_features}"
        choices[group] = Choice(f"{f'{name} [{tiling}]' if group in chosen else 'bitsandbytes'} ({shape})", times,
                                f"{group}: {', '.join(failed)} failed to compile or run" if failed else None)
    return choices, chosen


def choose_overlap(decoder) -> Choice:
    """Capture ``decoder``'s step without overlapping launches and, where the GPU can, with them
    (engine/kernels/dependent_launch.py); keep the faster captured. Microseconds per captured step, timed from
    the cache's middle position."""
    if not decoder.cuda:
        return Choice("eager, no capture")
    decoder.capture(overlap=False)
    if dependent_launch.why_unsupported(decoder.device) is not None:
        return Choice("one after another")
    without = decoder.step_ms()
    try:
        decoder.capture(overlap=True)
    except Exception as e:  # noqa: BLE001 - a driver or Triton that refuses it: launch one after another
        decoder.capture(overlap=False)
        return Choice("one after another", {"one after another": 1000 * without},
                      f"overlapping launches failed to capture ({type(e).__name__}: {e})")
    overlapping = decoder.step_ms()
    faster = overlapping < without
    if not faster:
        decoder.capture(overlap=False)
    return Choice("overlapping" if faster else "one after another",
                  {"overlapping": 1000 * overlapping, "one after another": 1000 * without})
