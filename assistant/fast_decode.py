"""Decoding one answer at a time near the memory-bandwidth bound: a static KV cache, and the decode step replayed
from a CUDA graph.

`generate` of transformers spends most of a batch-1 token in Python and kernel launches (a 14B model read at 0.17
of the bandwidth bound, docs/benchmarks.md). Here the prompt is prefilled by the model's own forward, its keys
and values are copied into a cache of fixed size (CONTEXT_LENGTH), and every further token is one replay of a
graph captured once: the decoder layers written out for batch 1 (bf16 weights read directly, q/k/v and
gate/up each as one product; bitsandbytes 4-bit weights through a Triton GEMV on their own bytes
(assistant/gemv_4bit.py) or bitsandbytes' kernel, with the LoRA products beside them; other layers called as
the model's own modules), attention over the positions written so far (assistant/decode_attention.py) or over
the whole cache masked, the small operations between them fused by `torch.compile`, and
the choice of the next token (greedy, or temperature and top-p) inside the same graph. The host only reads each
token back, one step behind the GPU, so the GPU never waits on Python. Where two ways exist, the GPU times both
at load and the faster is kept.

On CPU the same step runs eagerly, without capture (the Triton kernels interpreted by Triton when
TRITON_INTERPRET=1): that is how the tests check it against `generate`.
Architectures: the Llama family as transformers writes it (Qwen2 and Llama; DeepSeek-R1-Distill-Qwen and -Llama).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from assistant.gemv_4bit import GemvConfig

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


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, and the new key and value written at ``position``; returns the rotated query as
    [heads, head_dim]."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    c, s = cos[position], sin[position]  # (1, head_dim)
    q = q.view(-1, head_dim)
    k = k.view(kv_heads, head_dim)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
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
        self.ops = _compiled_ops() if self.cuda else _eager_ops()
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._host = torch.zeros(max_len, dtype=torch.long, pin_memory=self.cuda)
        self.last_prefill_logits: torch.Tensor | None = None  # for checks against the model's own forward
        self.fused = _plain_linears(self.layers)
        if self.fused:
            self.qkv = [_fuse_rows([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                        for layer in self.layers]
            self.gate_up = [_fuse_rows([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]
            self.qkv_sizes = [config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        # For bitsandbytes 4-bit weights, the product of each size (the Triton GEMV or bitsandbytes' own),
        # chosen once by timing; the projections are bound again at every capture, as an adapter swap may wrap
        # the modules anew.
        self.nf4_choice = _nf4_choice(self.layers, self.device) if not self.fused and _nf4_linears(self.layers) else None
        self.projections = self._bind_projections()
        self.attention, self.reads_written_positions_only = self._choose_attention(
            config.num_attention_heads, kv_heads, head_dim)

    def _choose_attention(self, heads: int, kv_heads: int, head_dim: int) -> tuple[Callable, bool]:
        """Attention over the cache as the step calls it: the Triton kernels that read only the positions
        written so far (assistant/decode_attention.py) where they run and, on a GPU, are faster than the whole
        cache masked (timed at the cache's last position, their worst case); else the whole cache masked. Also
        whether the chosen one reads the written positions only."""
        from assistant.decode_attention import DecodeAttention
        from assistant.triton_runtime import graph_ms, runs_on

        def whole_cache(q, k_cache, v_cache):
            return self.ops.attend(q, k_cache, v_cache, self.position, self.scaling)

        if not runs_on(self.device) or head_dim & (head_dim - 1) or head_dim < 16:
            return whole_cache, False
        kernels = DecodeAttention(heads, kv_heads, self.max_len, head_dim, self.scaling, self.device)

        def written_positions(q, k_cache, v_cache):
            return kernels(q, k_cache, v_cache, self.position)

        if not self.cuda:
            return written_positions, True
        saved = self.position.clone()
        self.position.fill_(self.max_len - 1)
        q = torch.randn(heads, head_dim, dtype=self.dtype, device=self.device)
        caches = list(zip(self.k_cache, self.v_cache, strict=True))[:8]
        times = {}
        with torch.no_grad():
            for name, fn in (("whole", whole_cache), ("written", written_positions)):
                try:
                    times[name] = graph_ms(lambda fn=fn: [fn(q, k, v) for k, v in caches])
                except Exception as e:  # noqa: BLE001 - kernels this GPU's compiler refuses: the whole cache
                    if name == "whole":
                        raise
                    print(f"generation: attention over the whole cache; the Triton kernels failed: {e}",
                          file=sys.stderr, flush=True)
                    self.position.copy_(saved)
                    return whole_cache, False
        self.position.copy_(saved)
        faster = times["written"] < times["whole"]
        print(f"generation: attention over {'the written positions (Triton)' if faster else 'the whole cache'}: "
              f"{1000 * times['written'] / len(caches):.1f} us a layer at the cache's last position, against "
              f"{1000 * times['whole'] / len(caches):.1f} for the whole cache masked", file=sys.stderr, flush=True)
        return (written_positions, True) if faster else (whole_cache, False)

    def _bind_projections(self) -> list[dict]:
        """Each projection of each layer as the step calls it: the module itself, or for bitsandbytes 4-bit
        weights the Triton GEMV on their bytes (assistant/gemv_4bit.py) with the LoRA products beside it."""
        from assistant.gemv_4bit import Nf4Weight

        projections = [{name: layer.get_submodule(path) for name, path in PROJECTIONS.items()}
                       for layer in self.layers]
        if self.nf4_choice is None:
            return projections
        bound = []
        for layer in projections:
            row = {}
            for name, module in layer.items():
                config = self.nf4_choice[tuple(_base(module).weight.quant_state.shape)]
                row[name] = module if config is None else _Nf4Projection(module, Nf4Weight.from_bnb(_base(module)),
                                                                          config)
            bound.append(row)
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
            if self.fused:  # one product for q, k and v, one for gate and up
                q, k, v = F.linear(h, *self.qkv[i]).split(self.qkv_sizes, dim=-1)
            else:
                q, k, v = p["q"](h), p["k"](h), p["v"](h)
            q = ops.rotate_and_store(q, k, v, self.cos, self.sin, self.k_cache[i], self.v_cache[i], self.position)
            a = self.attention(q, self.k_cache[i], self.v_cache[i])
            x, h = ops.add_rms_norm(x, _base(p["o"])(a) if self.fused else p["o"](a),
                                    layer.post_attention_layernorm.weight, eps)
            if self.fused:
                h = ops.silu_mul(*F.linear(h, self.gate_up[i][0]).chunk(2, dim=-1))
                mlp_out = _base(p["down"])(h)
            else:
                mlp_out = p["down"](ops.silu_mul(p["gate"](h), p["up"](h)))
            following = self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight
            x, h = ops.add_rms_norm(x, mlp_out, following, eps)
        logits = self.lm_head(h)[:, -1].float()
        self.logits.copy_(logits)
        chosen = choose_sampled(logits, self.temperature, self.top_p) if sample else choose_greedy(logits)
        self.token.copy_(chosen.view(1, 1))
        self.position.add_(1)

    def capture(self) -> float:
        """Compile and capture the greedy and the sampling step (CUDA only); returns the seconds it took."""
        self.projections = self._bind_projections()
        if not self.cuda:
            return 0.0
        started = time.perf_counter()
        self.graphs = {}
        saved_token, saved_position = self.token.clone(), self.position.clone()
        # A memory pool of its own for each capture, shared by its two graphs: a pool lives only as long as a
        # graph uses it, and capturing into the pool of graphs just dropped fails an allocator assertion.
        pool = torch.cuda.graph_pool_handle()
        with self.answering(), torch.no_grad():
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
        self.token.copy_(saved_token)
        self.position.copy_(saved_position)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def run_step(self, sample: bool) -> None:
        """One decode step: the captured graph on CUDA, the step itself elsewhere."""
        if self.cuda:
            self.graphs[sample].replay()
        else:
            self._step(sample)

    @torch.no_grad()
    def check(self) -> str | None:
        """None if one decode step after a short prompt gives the logits of the model's own forward over the
        same tokens, within the rounding that separates two eager paths of the model itself, else what differs.

        The tolerance is measured, not fixed: the model's own cached decode step against its full forward shows
        how far bf16 rounding alone moves the logits (about 0.07 relative on random 14B-shape weights, 1e-6 in
        float32), and a wrong step (a RoPE or layer it gets wrong) lands far beyond a few times that."""
        ids = torch.arange(1, 17, device=self.device)[None] % self.logits.shape[1]
        with self.answering():
            self.prefill(ids)
            first = choose_greedy(self.last_prefill_logits).view(1, 1)
            self.token.copy_(first)
            self.run_step(False)
            reference = self.lm(input_ids=torch.cat([ids, first], 1), return_dict=True).logits[:, -1].float()
            cache = self.lm(input_ids=ids, use_cache=True, return_dict=True).past_key_values
            # Unsloth's patched decode step reads position_ids (transformers infers them) and returns a tuple
            # unless asked for return_dict.
            eager_step = self.lm(input_ids=first, past_key_values=cache, use_cache=True, return_dict=True,
                                 position_ids=torch.full_like(first, ids.shape[1])).logits[:, -1].float()

        def distance(logits: torch.Tensor) -> float:
            return float((logits - reference).norm() / reference.norm())

        error, rounding = distance(self.logits), distance(eager_step)
        # A floor for where rounding is nil: float32's is 0.002, as a step without RoPE was 0.008 off on the tests'
        # tiny model (a floor of 0.01 let it through); 16-bit weights keep the 0.01 their GPU runs passed with.
        floor = 0.002 if self.lm.dtype == torch.float32 else 0.01
        if error <= 3 * rounding + floor:
            return None
        return (f"the decode step's logits are {error:.3f} (relative) from the model's forward, where its own "
                f"cached step is {rounding:.3f}")

    # -- one answer ----------------------------------------------------------------------------------------

    def fits(self, prompt_tokens: int) -> bool:
        return 0 < prompt_tokens < self.max_len

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Run the prompt through the model's own forward and copy its keys and values into the static cache;
        the position is then the prompt's length."""
        n = input_ids.shape[1]
        out = self.lm(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        for i in range(len(self.layers)):
            keys, values = (cache.layers[i].keys, cache.layers[i].values) if hasattr(cache, "layers") else cache[i]
            self.k_cache[i][:, :, :n].copy_(keys[:, :, -n:])
            self.v_cache[i][:, :, :n].copy_(values[:, :, -n:])
        self.last_prefill_logits = out.logits[:, -1].float()
        self.position.fill_(n)

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


def _plain_linears(layers) -> bool:
    """Whether every projection is an nn.Linear with float weights (under any LoRA wrapper): then the step reads
    the weights itself, fused, and an adapter must be merged into them (assistant/adapter_merge.py)."""
    modules = [_base(layer.get_submodule(path)) for layer in layers for path in PROJECTIONS.values()]
    return all(type(m) is torch.nn.Linear and m.weight.is_floating_point() for m in modules)


def _nf4_linears(layers) -> bool:
    """Whether every projection is a bitsandbytes 4-bit layer that the Triton GEMV takes, where it can run."""
    from assistant import gemv_4bit
    from assistant.triton_runtime import runs_on

    modules = [_base(layer.get_submodule(path)) for layer in layers for path in PROJECTIONS.values()]
    if not runs_on(modules[0].weight.device) or not all(
            type(m).__name__ == "Linear4bit" and getattr(m.weight, "quant_state", None) is not None for m in modules):
        return False
    return all(gemv_4bit.supported(gemv_4bit.Nf4Weight.from_bnb(m)) is None for m in modules)


class _Nf4Projection:
    """A projection whose base weight is bitsandbytes 4-bit, for one row: the GEMV on the weight's own bytes,
    plus the LoRA products of the adapters active when the step is captured (PEFT's forward for vanilla LoRA,
    written out; any other variant runs the module itself)."""

    def __init__(self, module, weight, config):
        self.module, self.weight, self.config = module, weight, config
        self.bias = _base(module).bias

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        from assistant.gemv_4bit import gemv

        m = self.module
        lora = m is not _base(m) and not m.disable_adapters and not m.merged
        if lora and any(name in getattr(m, "lora_variant", {}) for name in m.active_adapters):
            return m(h)
        y = gemv(h, self.weight, self.bias, self.config)
        if lora:
            for name in m.active_adapters:
                if name in m.lora_A:
                    a = m.lora_A[name]
                    y = y + (m.lora_B[name](a(h.to(a.weight.dtype))) * m.scaling[name]).to(y.dtype)
        return y


def _nf4_choice(layers, device: torch.device) -> dict[tuple[int, int], GemvConfig | None]:
    """For each projection size (out, in), the GEMV's tiling timed fastest where it beats bitsandbytes' own
    product on this GPU, else None (bitsandbytes'), timed on eight layers' weights; off CUDA the GEMV's default."""
    from assistant.gemv_4bit import Nf4Weight, fastest_config
    from assistant.triton_runtime import graph_ms

    chosen, report = {}, []
    for path in PROJECTIONS.values():
        modules = [_base(layer.get_submodule(path)) for layer in layers[:8]]
        weights = [Nf4Weight.from_bnb(m) for m in modules]
        size = (weights[0].out_features, weights[0].in_features)
        if size in chosen:
            continue
        config, gemv_ms = fastest_config(weights, device)
        if device.type != "cuda":
            chosen[size] = config
            continue
        x = torch.randn(1, 1, size[1], dtype=torch.bfloat16, device=device)
        own_ms = graph_ms(lambda modules=modules, x=x: [m(x) for m in modules])
        chosen[size] = config if gemv_ms <= own_ms else None
        report.append(f"{size[0]}x{size[1]} {'gemv' if chosen[size] else 'bitsandbytes'} "
                      f"({1000 * gemv_ms / len(modules):.1f} us against {1000 * own_ms / len(modules):.1f})")
    if report:
        print(f"generation: 4-bit products: {', '.join(report)}", file=sys.stderr, flush=True)
    return chosen


def _fuse_rows(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding the rows of several linear layers, which from now on read views of it:
    one matrix-vector product instead of several, at no extra memory."""
    linears = [_base(m) for m in linears]
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


def _eager_ops() -> _Ops:
    return _Ops(lambda fn: fn)


def _compiled_ops() -> _Ops:
    return _Ops(lambda fn: torch.compile(fn, dynamic=False, fullgraph=True))


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
