"""The choice of the next token from its logits, inside the captured decode step (no kernel of ours)."""

from __future__ import annotations

import torch


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
