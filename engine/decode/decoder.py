"""Batch-1 generation with a static cache and a decode step replayed from CUDA graphs: the layer loop (one, for the
prompt and for each new token, as gpt-fast's ``forward(x, input_pos)``) and the loop that generates an answer.

The prompt is prefilled through the layers with attention by PyTorch's fused kernel, its keys and values written
straight into the cache; every further token is one replay of a captured step (engine/decode/capture.py) that
ends with the choice of the next token. The host reads each token back one step behind the GPU, so the GPU never
waits on Python. On CPU the same step runs eagerly (the Triton kernels interpreted when TRITON_INTERPRET=1).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.decode import capture, check
from engine.decode.cache import KVCache
from engine.decode.ops import Ops
from engine.decode.projections import FusedWeights, bind
from engine.decode.tuning import StepKernels
from engine.kernels.sampling import choose_greedy, choose_sampled


@dataclass
class Pass:
    """How one pass through the layers runs: the prompt's (prefill) or one token's (the step). ``attention(i, q, k,
    v)`` writes layer i's keys and values into the cache and returns the attention output, [1, n, heads *
    head_dim]."""

    ops: Ops
    projections: list[dict[str, Callable]]
    attention: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FastDecoder:
    """Batch-1 generation of ``model`` with ``cache`` and the step's kernels chosen at load (engine/decode/start.py
    builds one: ``build_decoder``).

    ``answering`` gives the context in which the model answers as the model in use (the runtime's: adapters
    switched off when their weights are merged, or for the base model); graphs are captured inside it, and
    `capture` is called again whenever that changes (an adapter swap).
    """

    def __init__(self, model, cache: KVCache, weights: FusedWeights, ops: Ops, prefill_ops: Ops,
                 kernels: StepKernels, eos_token_ids: set[int], answering: Callable[[], AbstractContextManager]):
        self.model = model
        self.lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache, self.weights, self.kernels = cache, weights, kernels
        self.ops, self.prefill_ops = ops, prefill_ops
        self.answering = answering
        self.eos_token_ids = set(eos_token_ids)
        self.max_len = cache.max_len
        inner = self.lm.model
        self.layers = list(inner.layers)
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, self.lm.lm_head
        self.eps = float(self.lm.config.rms_norm_eps)
        self.scaling = float(self.layers[0].self_attn.scaling)
        self.device, self.dtype = cache.device, cache.dtype
        self.cuda = self.device.type == "cuda"
        # The graph's inputs and outputs: fixed tensors that each step reads and writes in place.
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.temperature = torch.ones(1, device=self.device)
        self.top_p = torch.ones(1, device=self.device)
        self.logits = torch.zeros(1, self.lm_head.weight.shape[0], device=self.device)  # Unsloth may pad the vocabulary
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.overlap = False  # whether the captured step's kernels launch overlapping (tuning.choose_overlap)
        self._host = torch.zeros(self.max_len, dtype=torch.long, pin_memory=self.cuda)
        self.last_prefill_logits: torch.Tensor | None = None  # for checks against the model's own forward
        self.projections, self.prefill_projections = bind(self.layers, weights, kernels.products)

    @property
    def reads_written_positions_only(self) -> bool:
        """Whether the step's attention reads only the cache's written positions (else the whole cache, masked)."""
        return self.kernels.reads_written_positions_only

    # -- the layers ----------------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, way: Pass) -> torch.Tensor:
        """The layers over ``tokens`` (1 x n), writing their keys and values into the cache; the last position's
        hidden state after the final norm, [1, 1, hidden]."""
        ops, eps = way.ops, self.eps
        x = self.embed(tokens)
        h = ops.rms_norm(x, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            p = way.projections[i]
            q, k, v = p["qkv"](h)
            x, h = ops.add_rms_norm(x, p["o"](way.attention(i, q, k, v))[0], layer.post_attention_layernorm.weight, eps)
            mlp_out = p["down"](ops.silu_mul(*p["gate_up"](h)))[0]
            following = self.layers[i + 1].input_layernorm.weight if i + 1 < len(self.layers) else self.norm.weight
            x, h = ops.add_rms_norm(x, mlp_out, following, eps)
        return h[:, -1:]

    def _prompt_pass(self, n: int, ops: Ops) -> Pass:
        """The prefill's pass: rotary embedding of every position, the cache written at 0..n-1, causal attention
        by PyTorch's fused kernel."""
        head_dim, cache = self.cache.head_dim, self.cache
        cos, sin = cache.cos[:n, None], cache.sin[:n, None]  # [n, 1, head_dim]: every head

        def attention(i: int, q, k, v) -> torch.Tensor:
            q, k = ops.rotate(q.view(n, -1, head_dim), k.view(n, -1, head_dim), cos, sin)
            keys, values = cache.write_prompt(i, k, v.view(n, -1, head_dim))
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, is_causal=True,
                                               scale=self.scaling, enable_gqa=True)
            return a[0].transpose(0, 1).reshape(1, n, -1)

        return Pass(ops, self.prefill_projections, attention)

    def _token_pass(self) -> Pass:
        """The step's pass: the chosen attention kernels at ``self.position``, read from the GPU's memory."""
        cache = self.cache

        def attention(i: int, q, k, v) -> torch.Tensor:
            return self.kernels.attention(q, k, v, cache.cos, cache.sin, cache.keys[i], cache.values[i],
                                          self.position)

        return Pass(self.ops, self.projections, attention)

    def fits(self, prompt_tokens: int) -> bool:
        return 0 < prompt_tokens < self.max_len

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, ops: Ops | None = None) -> torch.Tensor:
        """Run the prompt through the layers, writing its keys and values into the static cache; the position
        is then the prompt's length, and ``last_prefill_logits`` (returned too) the next token's logits.
        ``ops``: the small operations, by default the prefill's (compiled for any length on CUDA)."""
        h = self.forward(input_ids, self._prompt_pass(input_ids.shape[1], ops or self.prefill_ops))
        self.position.fill_(input_ids.shape[1])
        self.last_prefill_logits = self.lm_head(h)[:, -1].float()
        return self.last_prefill_logits

    @torch.no_grad()
    def step(self, sample: bool) -> None:
        """Decode ``self.token`` at ``self.position``: the next token into ``self.token``, position + 1."""
        logits = self.lm_head(self.forward(self.token, self._token_pass()))[:, -1].float()
        self.logits.copy_(logits)
        chosen = choose_sampled(logits, self.temperature, self.top_p) if sample else choose_greedy(logits)
        self.token.copy_(chosen.view(1, 1))
        self.position.add_(1)

    # -- capture and replay --------------------------------------------------------------------------------

    def capture(self, overlap: bool | None = None) -> None:
        """Bind the projections as the layers are now and capture the greedy and the sampling step (CUDA only).
        ``overlap``: whether the kernels that can launch overlapping; by default as chosen at load."""
        self.projections, self.prefill_projections = bind(self.layers, self.weights, self.kernels.products)
        if not self.cuda:
            return
        self.overlap = self.overlap if overlap is None else overlap
        self.graphs = {}
        self.graphs = capture.capture_steps(self.step, self.token, self.position, self.answering, self.overlap)

    def step_ms(self) -> float:
        """Milliseconds of one replay of the captured greedy step from the cache's middle position, where a long
        retrieval prompt's answer is (the attention there reads what a real answer reads)."""
        return capture.step_ms(self.graphs[False], self.token, self.position, self.max_len // 2, self.answering)

    def run_step(self, sample: bool) -> None:
        """One decode step: the captured graph on CUDA, the step itself elsewhere."""
        if self.cuda:
            self.graphs[sample].replay()
        else:
            self.step(sample)

    def check(self) -> str | None:
        """None if a short prompt's prefill and one step give the model's own logits; else what differs
        (engine/decode/check.py)."""
        return check.against_the_model(self)

    # -- one answer ----------------------------------------------------------------------------------------

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
        logits = self.prefill(input_ids)
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
