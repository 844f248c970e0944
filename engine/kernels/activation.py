"""The feed-forward block's activation: SiLU of the gate times the up projection (no kernel of ours:
torch.compile fuses it on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
