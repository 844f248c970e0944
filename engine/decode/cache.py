"""The static KV cache: every layer's keys and values for ``max_len`` positions, allocated once, so that a decode
step captured in a CUDA graph reads and writes the same memory at every replay; and the rotary tables of those
positions."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of each layer as [1, kv_heads, max_len, head_dim]; ``cos``/``sin`` [max_len, head_dim],
    the model's own rotary embedding (so every RoPE variant it knows is honoured)."""

    def __init__(self, lm, max_len: int):
        config, inner = lm.config, lm.model
        weight = inner.embed_tokens.weight
        self.device, self.dtype, self.max_len = weight.device, weight.dtype, max_len
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (1, self.kv_heads, max_len, self.head_dim)
        layers = len(inner.layers)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a prompt's keys and values (each [n, kv_heads, head_dim], the keys rotated) at positions 0..n-1
        of ``layer``; returns that layer's written keys and values, [1, kv_heads, n, head_dim]."""
        n = k.shape[0]
        self.keys[layer][0, :, :n] = k.transpose(0, 1)
        self.values[layer][0, :, :n] = v.transpose(0, 1)
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]
