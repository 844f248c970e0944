"""Decoding one answer at a time near the memory-bandwidth bound: a static KV cache, and the decode step replayed
from a CUDA graph.

`generate` of transformers spends most of a batch-1 token in Python and kernel launches (a 14B model read at 0.17
of the bandwidth bound, docs/benchmarks.md). Here the prompt is prefilled by the same layers written out for a
whole prompt (the products of the step below, attention by PyTorch's fused kernel, the small operations fused by
`torch.compile` for any prompt length), its keys and values written straight into a cache of fixed size
(CONTEXT_LENGTH), and every further token is one replay of a graph captured once: the decoder layers written
out for batch 1 (bf16 weights read directly, q/k/v and gate/up each as one product; bitsandbytes 4-bit weights
on their own bytes through a tensor-core GEMV compiled at load (engine/kernels/gemv_4bit_mma.py), a Triton GEMV
(engine/kernels/gemv_4bit.py) or bitsandbytes' kernel, with the LoRA products beside them; other layers called as
the model's own modules), rotary embedding, the cache writes and attention over the positions written so far in
Triton kernels (engine/kernels/decode_attention.py; or rotary and the writes in one kernel, engine/kernels/rotary_store.py,
and the whole cache masked), the residual sums and norms in one program each (engine/kernels/residual_norm.py), the
other small operations fused by `torch.compile`, and the choice of the next token (greedy, or
temperature and top-p) inside the same graph; on Hopper, our kernels launch overlapping the one before them
(engine/kernels/dependent_launch.py) where the captured step is timed faster so. The host only reads each token
back, one step behind the GPU, so the GPU never waits on Python. Where several ways exist, the GPU times them at
load and the fastest is kept.

On CPU the same step runs eagerly, without capture (the Triton kernels interpreted by Triton when
TRITON_INTERPRET=1): that is how the tests check it against `generate`.
Architectures: the Llama family as transformers writes it (Qwen2 and Llama; DeepSeek-R1-Distill-Qwen and -Llama).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.kernels import dependent_launch, residual_norm, rotary_store
from engine.kernels.triton_runtime import graph_ms, replay_ms, runs_on

SUPPORTED_ARCHITECTURES = ("qwen2", "llama")


def unsupported_reason(model) -> str | None:
    """Why ``model`` (a transformers causal LM, possibly wrapped by PEFT) cannot take the fast path; None if it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        return f"the {config.model_type} architecture is not one of {', '.join(SUPPORTED_ARCHITECTURES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act} (only silu)"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "sliding-window attention layers"
    return None


# -- the small operations between the linear layers (fused by torch.compile on CUDA) -------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2/Llama RMSNorm, in the same order of roundings."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual sum and its norm, one kernel on CUDA."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of queries and keys ([..., heads, head_dim]; cos and sin broadcast against them: a
    prompt's [n, 1, head_dim], one position's [1, head_dim])."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, and the new key and value written at ``position``; returns the rotated query as
    [heads, head_dim]."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    c, s = cos[position], sin[position]  # (1, head_dim)
    q, k = rotate(q.view(-1, head_dim), k.view(kv_heads, head_dim), c, s)
    k_cache.index_copy_(2, position, k.view(1, kv_heads, 1, head_dim))
    v_cache.index_copy_(2, position, v.view(1, kv_heads, 1, head_dim))
    return q


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """Attention of one query ([heads, head_dim]) over the whole cache, positions past ``position`` masked out
    (they hold stale keys of earlier answers); [1, 1, heads * head_dim].

    The query heads that share a key head are one matrix against that head's keys, so the cache is read once
    (transformers repeats it for every query head when a mask is given)."""
    kv_heads, length, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    scores = torch.matmul(q.view(kv_heads, -1, head_dim), k_cache[0].transpose(1, 2)) * scaling
    future = torch.arange(length, device=q.device) > position
    probs = torch.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v_cache[0]).reshape(1, 1, -1)


def choose_greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def choose_sampled(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """A token drawn from the temperature-scaled distribution cut to its top-p mass, as `generate` samples.

    Drawn by the exponential race (argmax of p / E with E ~ Exp(1)), which needs no host-side random state and
    draws fresh noise at every replay of a captured graph."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    beyond = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the most likely token always stays
    sorted_probs = sorted_probs.masked_fill(beyond, 0.0)
    pick = (sorted_probs / torch.empty_like(sorted_probs).exponential_()).argmax(-1, keepdim=True)
    return order.gather(-1, pick).squeeze(-1)


class FastDecoder:
    """Batch-1 generation of ``model`` with a static cache of ``max_len`` positions and captured decode steps.

    ``answering`` gives the context in which the model answers as the model in use (the runtime's: adapters
    switched off when their weights are merged, or for the base model); graphs are captured inside it, and
    `capture` is called again whenever that changes (an adapter swap).
    """

    def __init__(self, model, max_len: int, eos_token_ids: set[int],
                 answering: Callable[[], AbstractContextManager]):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        self.lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.answering = answering
        self.eos_token_ids = set(eos_token_ids)
        self.max_len = max_len
        config = self.lm.config
        inner = self.lm.model
        self.layers = list(inner.layers)
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, self.lm.lm_head
        self.eps = float(config.rms_norm_eps)
        attention = self.layers[0].self_attn
        self.scaling = float(attention.scaling)
        weight = self.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache_shape = (1, kv_heads, max_len, head_dim)
        self.k_cache = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        with torch.no_grad():  # the model's own rotary embedding, so every RoPE variant it knows is honoured
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        # The graph's inputs and outputs: fixed tensors that each step reads and writes in place.
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.temperature = torch.ones(1, device=self.device)
        self.top_p = torch.ones(1, device=self.device)
        self.logits = torch.zeros(1, self.lm_head.weight.shape[0], device=self.device)  # Unsloth may pad the vocabulary
        self.cuda = self.device.type == "cuda"
        self.ops = _compiled_ops(dynamic=False) if self.cuda else _eager_ops()
        if runs_on(self.device):  # the small operations as Triton kernels: rotary and cache writes, residual norms
            self.ops.rotate_and_store = rotary_store.rotate_and_store
            self.ops.add_rms_norm = self._choose_add_rms_norm(config.hidden_size)
        self.prefill_ops = _compiled_ops(dynamic=True) if self.cuda else self.ops  # for any prompt length
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.overlap: bool | None = None  # whether the step's kernels launch overlapping (chosen at first capture)
        self._host = torch.zeros(max_len, dtype=torch.long, pin_memory=self.cuda)
        self.last_prefill_logits: torch.Tensor | None = None  # for checks against the model's own forward
        # Each layer's projections as four products (GROUPS), each over the rows of the projections that share
        # an input. Float weights: the step reads them itself, fused (an adapter is merged into them). bitsandbytes
        # 4-bit weights: one of our GEMVs on their bytes (_nf4_choice), fused too, for the groups where it was
        # timed faster than bitsandbytes' own product; the projections are bound again at every capture, as an
        # adapter swap may wrap the modules anew.
        self.dense = [{group: _fuse_rows([layer.get_submodule(PROJECTIONS[n]) for n in names])
                       for group, names in GROUPS.items()} for layer in self.layers] if _plain_linears(self.layers) else None
        self.nf4, self.nf4_choice = (_nf4_choice(self.layers, self.device, self.dtype)
                                     if self.dense is None and _nf4_linears(self.layers) else (None, None))
        self.projections = self._bind_projections()
        self.attention, self.reads_written_positions_only = self._choose_attention(
            config.num_attention_heads, kv_heads, head_dim)

    def _choose_add_rms_norm(self, hidden: int) -> Callable:
        """The residual sum and RMSNorm as the step calls it: one Triton program a row (engine/kernels/residual_norm.py)
        in the warps timed fastest, unless torch.compile's kernel is faster (on CUDA; elsewhere the Triton one)."""
        if not self.cuda:
            return residual_norm.add_rms_norm
        x, delta = (torch.randn(1, 1, hidden, dtype=self.dtype, device=self.device) for _ in range(2))
        candidates = {"torch.compile": self.ops.add_rms_norm}
        candidates.update({f"one Triton program of {warps} warps": partial(residual_norm.add_rms_norm,
                                                                           num_warps=warps) for warps in (4, 8, 16)})
        with torch.no_grad():
            times = {name: graph_ms(lambda fn=fn: [fn(x, delta, self.norm.weight, self.eps) for _ in range(16)]) / 16
                     for name, fn in candidates.items()}
        best = min(times, key=times.get)
        print(f"generation: residual sum and RMSNorm by {best} (" + ", ".join(
            f"{name} {1000 * ms:.1f} us" for name, ms in times.items()) + ")", file=sys.stderr, flush=True)
        return candidates[best]

    def _choose_attention(self, heads: int, kv_heads: int, head_dim: int) -> tuple[Callable, bool]:
        """The new token's rotary embedding, cache write and attention, as the step calls them: the Triton kernels
        that do all three and read only the positions written so far (engine/kernels/decode_attention.py), in the
        tiling timed fastest, where they run and, on a GPU, are faster than the whole cache masked after the
        rotary kernel (all timed at the cache's middle position, where a long retrieval prompt's answer is, and
        at its last, their worst case); else the latter. Also whether the chosen one reads the written positions
        only."""
        from engine.kernels.decode_attention import TILINGS, DecodeAttention

        def whole_cache(q, k, v, k_cache, v_cache):
            q = self.ops.rotate_and_store(q, k, v, self.cos, self.sin, k_cache, v_cache, self.position)
            return self.ops.attend(q, k_cache, v_cache, self.position, self.scaling)

        if not runs_on(self.device) or head_dim & (head_dim - 1) or head_dim < 16:
            return whole_cache, False

        def written_positions(tiling=TILINGS[0]):
            kernels = DecodeAttention(heads, kv_heads, self.max_len, head_dim, self.scaling, self.device, tiling)
            return lambda q, k, v, k_cache, v_cache: kernels(q, k, v, self.cos, self.sin, k_cache, v_cache,
                                                             self.position)

        if not self.cuda:
            return written_positions(), True
        q, k, v = (torch.randn(n * head_dim, dtype=self.dtype, device=self.device)
                   for n in (heads, kv_heads, kv_heads))
        caches = list(zip(self.k_cache, self.v_cache, strict=True))[:8]
        candidates = {"the whole cache": whole_cache}
        candidates.update({f"the written positions (Triton, {t.runs} runs a key head, {t.block} positions a step)":
                           written_positions(t) for t in TILINGS})
        times, failure = {}, None
        with torch.no_grad(), self._state_kept():
            for name, fn in candidates.items():
                try:
                    times[name] = 0.0
                    for position in (self.max_len // 2, self.max_len - 1):
                        self.position.fill_(position)
                        times[name] += graph_ms(lambda fn=fn: [fn(q, k, v, *cache) for cache in caches]) / 2
                except Exception as e:  # noqa: BLE001 - a tiling this GPU's compiler refuses is skipped
                    if fn is whole_cache:
                        raise
                    del times[name]
                    failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        best = min(times, key=times.get)
        print(f"generation: attention over {best}: {1000 * times[best] / len(caches):.1f} us a layer (the mean of "
              f"the cache's middle and last positions), against {1000 * times['the whole cache'] / len(caches):.1f} "
              f"for the whole cache masked" + (f" (a tiling failed: {failure})" if failure else ""),
              file=sys.stderr, flush=True)
        return candidates[best], candidates[best] is not whole_cache

    def _bind_projections(self) -> list[dict[str, Callable]]:
        """Each layer's products as the step calls them (GROUPS), each returning its projections' outputs; and
        as the prefill calls them (``self.prefill_projections``: the same, but the modules where the step runs
        the one-row GEMV)."""
        bound, prefill = [], []
        for i, layer in enumerate(self.layers):
            row, prefill_row = {}, {}
            for group, names in GROUPS.items():
                modules = [layer.get_submodule(PROJECTIONS[n]) for n in names]
                sizes = [_base(m).out_features for m in modules]
                if self.dense is not None:
                    row[group] = prefill_row[group] = _DenseRows(*self.dense[i][group], sizes)
                    continue
                prefill_row[group] = _ModuleRows(modules)
                if self.nf4 is not None and group in self.nf4[i]:
                    row[group] = _Nf4Rows(modules, self.nf4[i][group], self.nf4_choice[group], sizes)
                else:
                    row[group] = prefill_row[group]
            bound.append(row)
            prefill.append(prefill_row)
        self.prefill_projections = prefill
        return bound

    # -- one step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _step(self, sample: bool) -> None:
        """Decode ``self.token`` at ``self.position``: the next token into ``self.token``, position + 1."""
        ops, eps = self.ops, self.eps
        x = self.embed(self.token)
        h = ops.rms_norm(x, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            p = self.projections[i]
            q, k, v = p["qkv"](h)
            a = self.attention(q, k, v, self.k_cache[i], self.v_cache[i])
            x, h = ops.add_rms_norm(x, p["o"](a)[0], layer.post_attention_layernorm.weight, eps)
            mlp_out = p["down"](ops.silu_mul(*p["gate_up"](h)))[0]
            following = self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight
            x, h = ops.add_rms_norm(x, mlp_out, following, eps)
        logits = self.lm_head(h)[:, -1].float()
        self.logits.copy_(logits)
        chosen = choose_sampled(logits, self.temperature, self.top_p) if sample else choose_greedy(logits)
        self.token.copy_(chosen.view(1, 1))
        self.position.add_(1)

    def capture(self, overlap: bool | None = None) -> float:
        """Compile and capture the greedy and the sampling step (CUDA only); returns the seconds it took.
        ``overlap``: whether the kernels that can launch overlapping (engine/kernels/dependent_launch.py); by default
        as chosen at the first capture, where the GPU can, by capturing the step both ways and keeping the faster."""
        self.projections = self._bind_projections()
        if not self.cuda:
            return 0.0
        started = time.perf_counter()
        if overlap is None and self.overlap is None:
            self.overlap = self._capture_the_faster()
        else:
            self.overlap = self.overlap if overlap is None else overlap
            self._capture(self.overlap)
        return time.perf_counter() - started

    def _capture_the_faster(self) -> bool:
        """Capture the step without overlapping launches and, where the GPU can, with them; keep the faster
        captured, and return whether it overlaps."""
        self._capture(False)
        if not dependent_launch.supported(self.device):
            return False
        without = self._step_ms()
        try:
            self._capture(True)
        except Exception as e:  # noqa: BLE001 - a driver or Triton that refuses it: launch one after another
            print(f"generation: overlapping launches failed to capture ({type(e).__name__}: {e}); not used",
                  file=sys.stderr, flush=True)
            self._capture(False)
            return False
        overlapping = self._step_ms()
        faster = overlapping < without
        print(f"generation: a decode step {overlapping:.3f} ms with overlapping launches (programmatic dependent "
              f"launch), {without:.3f} ms without; {'overlapping' if faster else 'without'}",
              file=sys.stderr, flush=True)
        if not faster:
            self._capture(False)
        return faster

    @contextmanager
    def _state_kept(self) -> Iterator[torch.Tensor]:
        """The step's token and position as they were when the block began, put back when it ends (timing and
        capturing run the step, which moves them); yields a copy of the position."""
        token, position = self.token.clone(), self.position.clone()
        try:
            yield position
        finally:
            self.token.copy_(token)
            self.position.copy_(position)

    def _step_ms(self, replays: int = 25) -> float:
        """Milliseconds of one replay of the captured greedy step (the median) from the cache's middle position,
        where a long retrieval prompt's answer is (the attention there reads what a real answer reads); the token
        and position restored."""
        with self._state_kept(), self.answering():
            self.position.fill_(self.max_len // 2)
            return replay_ms(self.graphs[False], replays)

    def _capture(self, overlap: bool) -> None:
        self.graphs = {}
        # A memory pool of its own for each capture, shared by its two graphs: a pool lives only as long as a
        # graph uses it, and capturing into the pool of graphs just dropped fails an allocator assertion.
        pool = torch.cuda.graph_pool_handle()
        with self._state_kept() as saved_position, self.answering(), torch.no_grad(), \
                dependent_launch.overlapping(overlap):
            for sample in (False, True):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # compiles, and lets the allocator settle, before capture
                    for _ in range(3):
                        self.position.copy_(saved_position)
                        self._step(sample)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                self.position.copy_(saved_position)
                with torch.cuda.graph(graph, pool=pool):
                    self._step(sample)
                self.graphs[sample] = graph
        torch.cuda.synchronize()

    def run_step(self, sample: bool) -> None:
        """One decode step: the captured graph on CUDA, the step itself elsewhere."""
        if self.cuda:
            self.graphs[sample].replay()
        else:
            self._step(sample)

    @torch.no_grad()
    def check(self) -> str | None:
        """None if the prefill of a short prompt and one decode step after it give the logits of the model's own
        forward over the same tokens, within the rounding that separates two eager paths of the model itself,
        else what differs.

        The tolerance is measured, not fixed: how far bf16 rounding alone moves the logits, as the larger of the
        model's own cached decode step against its full forward (about 0.07 relative on random 14B-shape weights,
        1e-6 in float32) and of the prefill with its small operations fused against the same prefill unfused.
        The second is needed where the model's two paths happen to agree exactly (random 1.5B-shape weights,
        where the fused prefill is 0.035 from the model's forward and, by the GPU test, no further from the
        float32 truth than the model's bf16 forward is). A wrong step or prefill (a RoPE or layer it gets wrong)
        lands far beyond a few times that."""
        ids = torch.arange(1, 17, device=self.device)[None] % self.logits.shape[1]
        with self.answering():
            unfused = self._prefill(ids, _eager_ops()) if self.prefill_ops is not self.ops else None
            self.prefill(ids)
            prefill_logits = self.last_prefill_logits
            first = choose_greedy(prefill_logits).view(1, 1)
            self.token.copy_(first)
            self.run_step(False)
            prompt_reference = self.lm(input_ids=ids, return_dict=True).logits[:, -1].float()
            reference = self.lm(input_ids=torch.cat([ids, first], 1), return_dict=True).logits[:, -1].float()
            cache = self.lm(input_ids=ids, use_cache=True, return_dict=True).past_key_values
            # Unsloth's patched decode step reads position_ids (transformers infers them) and returns a tuple
            # unless asked for return_dict.
            eager_step = self.lm(input_ids=first, past_key_values=cache, use_cache=True, return_dict=True,
                                 position_ids=torch.full_like(first, ids.shape[1])).logits[:, -1].float()

        def distance(logits: torch.Tensor, to: torch.Tensor) -> float:
            return float((logits - to).norm() / to.norm())

        rounding = distance(eager_step, reference)
        if unfused is not None:
            rounding = max(rounding, distance(prefill_logits, unfused))
        # A floor for where rounding is nil: float32's is 0.002, as a step without RoPE was 0.008 off on the tests'
        # tiny model (a floor of 0.01 let it through); 16-bit weights keep the 0.01 their GPU runs passed with.
        floor = 0.002 if self.lm.dtype == torch.float32 else 0.01
        for what, error in (("prefill", distance(prefill_logits, prompt_reference)),
                            ("decode step", distance(self.logits, reference))):
            if error > 3 * rounding + floor:
                return (f"the {what}'s logits are {error:.3f} (relative) from the model's forward, where rounding "
                        f"alone moves them {rounding:.3f}")
        return None

    # -- one answer ----------------------------------------------------------------------------------------

    def fits(self, prompt_tokens: int) -> bool:
        return 0 < prompt_tokens < self.max_len

    def prefill(self, input_ids: torch.Tensor) -> None:
        """Run the prompt through the layers, writing its keys and values into the static cache; the position
        is then the prompt's length, and ``last_prefill_logits`` the next token's logits."""
        self.last_prefill_logits = self._prefill(input_ids, self.prefill_ops)

    @torch.no_grad()
    def _prefill(self, input_ids: torch.Tensor, ops: _Ops) -> torch.Tensor:
        eps, n = self.eps, input_ids.shape[1]
        head_dim = self.k_cache[0].shape[3]
        cos, sin = self.cos[:n, None], self.sin[:n, None]  # [n, 1, head_dim]: every head
        x = self.embed(input_ids)
        h = ops.rms_norm(x, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            p = self.prefill_projections[i]
            q, k, v = p["qkv"](h)
            q, k = ops.rotate(q.view(n, -1, head_dim), k.view(n, -1, head_dim), cos, sin)
            self.k_cache[i][0, :, :n] = k.transpose(0, 1)
            self.v_cache[i][0, :, :n] = v.view(n, -1, head_dim).transpose(0, 1)
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], self.k_cache[i][:, :, :n],
                                               self.v_cache[i][:, :, :n], is_causal=True, scale=self.scaling,
                                               enable_gqa=True)
            x, h = ops.add_rms_norm(x, p["o"](a[0].transpose(0, 1).reshape(1, n, -1))[0],
                                    layer.post_attention_layernorm.weight, eps)
            mlp_out = p["down"](ops.silu_mul(*p["gate_up"](h)))[0]
            following = self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight
            x, h = ops.add_rms_norm(x, mlp_out, following, eps)
        self.position.fill_(n)
        return self.lm_head(h[:, -1:])[:, -1].float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                 stop: threading.Event | None, on_token: Callable[[int], None]) -> int:
        """Generate after ``input_ids`` (1 x n, on the model's device), calling ``on_token`` with each new token id
        as soon as it is known; returns how many were generated. Ends at an end-of-sequence token (given too),
        after ``max_new_tokens``, when the cache is full, or when ``stop`` is set."""
        budget = min(max_new_tokens, self.max_len - input_ids.shape[1])
        sample = temperature > 0
        self.temperature.fill_(max(temperature, 1e-5))
        self.top_p.fill_(top_p)
        self.prefill(input_ids)
        logits = self.last_prefill_logits
        first = choose_sampled(logits, self.temperature, self.top_p) if sample else choose_greedy(logits)
        self.token.copy_(first.view(1, 1))
        token, count = int(first), 0
        ahead = self._launch(sample, count + 1) if budget > 1 else None
        while True:
            on_token(token)
            count += 1
            if token in self.eos_token_ids or count >= budget or (stop is not None and stop.is_set()):
                break
            step, ahead = ahead, (self._launch(sample, count + 1) if count + 1 < budget else None)
            token = self._collect(step, count)
        if self.cuda:
            torch.cuda.current_stream().synchronize()  # a step launched ahead must not outlive this answer
        return count

    def _launch(self, sample: bool, index: int):
        """Queue the step that writes token ``index``; its id is copied to pinned host memory behind it."""
        self.run_step(sample)
        self._host[index:index + 1].copy_(self.token.view(1), non_blocking=self.cuda)
        if not self.cuda:
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def _collect(self, done, index: int) -> int:
        if done is not None:
            done.synchronize()
        return int(self._host[index])


def _base(module):
    """The linear layer under a PEFT LoRA wrapper (whose product, when used here, is merged into its weight)."""
    return getattr(module, "base_layer", module)


PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# The products of a step: projections that take the same input are one product over their rows.
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def _plain_linears(layers) -> bool:
    """Whether every projection is an nn.Linear with float weights (under any LoRA wrapper): then the step reads
    the weights itself, fused, and an adapter must be merged into them (engine/adapter_merge.py)."""
    modules = [_base(layer.get_submodule(path)) for layer in layers for path in PROJECTIONS.values()]
    return all(type(m) is torch.nn.Linear and m.weight.is_floating_point() for m in modules)


def _nf4_linears(layers) -> bool:
    """Whether every projection is a bitsandbytes 4-bit layer that the Triton GEMV takes, where it can run."""
    from engine.kernels import gemv_4bit

    modules = [_base(layer.get_submodule(path)) for layer in layers for path in PROJECTIONS.values()]
    if not runs_on(modules[0].weight.device) or not all(
            type(m).__name__ == "Linear4bit" and getattr(m.weight, "quant_state", None) is not None for m in modules):
        return False
    return all(gemv_4bit.supported(m) is None for m in modules)


class _DenseRows:
    """A product over fused float weights (an adapter merged into them), split into its projections' outputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        self.weight, self.bias, self.sizes = weight, bias, sizes

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(h, self.weight, self.bias).split(self.sizes, dim=-1)


class _ModuleRows:
    """The projections' own modules, one after another (bitsandbytes' product, and any adapter in them)."""

    def __init__(self, modules: list):
        self.modules = modules

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(h) for m in self.modules)


class _Nf4Rows:
    """Projections whose base weights are bitsandbytes 4-bit, for one row: one GEMV (``product``: a kernel of
    gemv_4bit or gemv_4bit_mma in its chosen tiling) on their fused bytes, plus the LoRA products of the
    adapters active when the step is captured (PEFT's forward for vanilla LoRA, written out: PEFT's own would
    call bitsandbytes' product again); any other LoRA variant runs the modules themselves."""

    def __init__(self, modules: list, weight, product: Callable, sizes: list[int]):
        self.modules, self.weight, self.product, self.sizes = modules, weight, product, sizes
        biases = [_base(m).bias for m in modules]
        some = next((b for b in biases if b is not None), None)
        self.bias = None if some is None else torch.cat(
            [torch.zeros(size, dtype=some.dtype, device=some.device) if b is None else b.detach()
             for b, size in zip(biases, sizes, strict=True)])

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lora = [m for m in self.modules if m is not _base(m) and not m.disable_adapters and not m.merged]
        if any(name in getattr(m, "lora_variant", {}) for m in lora for name in m.active_adapters):
            return _ModuleRows(self.modules)(h)
        outputs = list(self.product(h, self.weight, self.bias).split(self.sizes, dim=-1))
        for index, m in enumerate(self.modules):
            if m in lora:
                for name in m.active_adapters:
                    if name in m.lora_A:
                        a = m.lora_A[name]
                        delta = m.lora_B[name](a(h.to(a.weight.dtype))) * m.scaling[name]
                        outputs[index] = outputs[index] + delta.to(outputs[index].dtype)
        return tuple(outputs)


def _nf4_choice(layers, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], dict[str, Callable]]:
    """Each layer's fused 4-bit weight (gemv_4bit.Nf4Weight) for every product (GROUPS) where a GEMV of ours,
    in its fastest tiling, beats bitsandbytes' own product on this GPU (timed on eight layers), and that GEMV:
    the tensor-core kernel (gemv_4bit_mma) where it compiles and takes the weight, else the Triton one; off
    CUDA every product, the Triton GEMV in its default tiling."""
    from engine.kernels import gemv_4bit, gemv_4bit_mma

    weights = [{group: gemv_4bit.Nf4Weight.from_bnb(*[_base(layer.get_submodule(PROJECTIONS[n])) for n in names])
                for group, names in GROUPS.items()} for layer in layers]
    chosen, report = {}, []
    for group, names in GROUPS.items():
        sample = [row[group] for row in weights[:8]]
        config, triton_ms = gemv_4bit.fastest_config(sample, device)
        kernels = {"triton gemv": (partial(gemv_4bit.gemv, config=config), triton_ms)}
        if dtype == torch.bfloat16 and gemv_4bit_mma.supported(sample[0], device) is None:
            config, mma_ms = gemv_4bit.fastest_config(sample, device, gemv_4bit_mma.gemv, gemv_4bit_mma.CANDIDATES,
                                                      gemv_4bit_mma.MmaConfig())
            kernels["tensor-core gemv"] = (partial(gemv_4bit_mma.gemv, config=config), mma_ms)
        name = min(kernels, key=lambda k: kernels[k][1])
        if device.type != "cuda":
            chosen[group] = kernels[name][0]
            continue
        modules = [_base(layer.get_submodule(PROJECTIONS[n])) for layer in layers[:8] for n in names]
        x = torch.randn(1, 1, modules[0].in_features, dtype=torch.bfloat16, device=device)
        own_ms = graph_ms(lambda modules=modules, x=x: [m(x) for m in modules])
        if kernels[name][1] <= own_ms:
            chosen[group] = kernels[name][0]
        per_layer = 1000 / len(sample)  # microseconds per layer's product
        tiling = ", ".join(f"{k}={v}" for k, v in vars(kernels[name][0].keywords["config"]).items())
        timings = ", ".join(f"{k} {ms * per_layer:.1f} us" if ms < float("inf") else f"{k} failed to compile or run"
                            for k, (_, ms) in kernels.items())
        report.append(f"{group} {sample[0].out_features}x{sample[0].in_features} "
                      f"{f'{name} [{tiling}]' if group in chosen else 'bitsandbytes'} ({timings}, "
                      f"bitsandbytes {own_ms * per_layer:.1f})")
    if report:
        print(f"generation: 4-bit products: {'; '.join(report)}", file=sys.stderr, flush=True)
    return [{group: w for group, w in row.items() if group in chosen} for row in weights], chosen


def _fuse_rows(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding the rows of several linear layers, which from now on read views of it:
    one matrix-vector product instead of several, at no extra memory. One layer's is its own."""
    linears = [_base(m) for m in linears]
    if len(linears) == 1:
        return linears[0].weight, linears[0].bias
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[row:row + rows]
        if bias is not None:
            m.bias.data = bias[row:row + rows]
        row += rows
    return weight, bias


class _Ops:
    def __init__(self, wrap):
        self.rms_norm, self.add_rms_norm = wrap(rms_norm), wrap(add_rms_norm)
        self.silu_mul, self.rotate_and_store, self.attend = wrap(silu_mul), wrap(rotate_and_store), wrap(attend)
        self.rotate = wrap(rotate)


def _eager_ops() -> _Ops:
    return _Ops(lambda fn: fn)


def _compiled_ops(dynamic: bool) -> _Ops:
    return _Ops(lambda fn: torch.compile(fn, dynamic=dynamic, fullgraph=True))


def start_fast_decoder(model, max_len: int, eos_token_ids: set[int],
                       answering: Callable[[], AbstractContextManager]) -> FastDecoder | None:
    """A captured, checked FastDecoder for ``model``, or None (with the reason on stderr) where it cannot run.

    The check: the logits of one decode step after a short prompt agree with the model's own forward over
    the same tokens. A variant the step gets wrong (a patched model, an unusual RoPE) falls back here
    rather than answering wrongly; so does any failure to build, time, compile or capture the step."""
    reason = unsupported_reason(model)
    if reason:
        print(f"generation: the standard path (transformers generate); no fast decode for this model: {reason}",
              file=sys.stderr, flush=True)
        return None
    device = next(model.parameters()).device
    print(f"generation: fast decode ({'CUDA graphs' if device.type == 'cuda' else 'eager, no CUDA'}), static "
          f"cache of {max_len} positions; choosing kernels, compiling and capturing the decode step...",
          file=sys.stderr, flush=True)
    try:
        decoder = FastDecoder(model, max_len, eos_token_ids, answering)
        seconds = decoder.capture()
        error = decoder.check()
    except Exception as e:  # noqa: BLE001 - any failure to build, compile or capture means: use the standard path
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if Path(f.filename).parent == Path(__file__).parent] or frames
        places = [f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in (frames[-1], ours[-1])]
        where = " from ".join(dict.fromkeys(places))  # the innermost frame, and the last of this module's
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} at {where}"
        seconds = None
    if error:
        print(f"generation: the standard path (transformers generate); the fast decode failed its check: {error}",
              file=sys.stderr, flush=True)
        return None
    ready = f" in {seconds:.0f} s" if seconds else ""
    print(f"generation: fast decode ready{ready} on {device}", file=sys.stderr, flush=True)
    return decoder
