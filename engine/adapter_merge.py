"""A LoRA adapter merged into bf16 base weights, for the fast decode path, and taken out again exactly.

Merged, the adapter costs nothing per token (the captured step reads the same weights as the base model).
Adding the LoRA product and subtracting it again in bf16, as PEFT's merge/unmerge do, leaves each weight one
rounding away from the base after every swap, and swaps add up; so a copy of every weight an adapter changes is
kept in CPU memory from its first merge on, and restoring copies it back bit for bit (the cost: CPU memory the
size of the adapted weights, 28 GB for the recipe's all-module adapter on the 14B model).
"""

from __future__ import annotations

import torch


def can_merge(model) -> bool:
    """Whether the linear layers hold plain float weights (bf16/fp16/fp32) that a LoRA product can be added to."""
    layer = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.layers[0]
    weight = getattr(layer.self_attn.q_proj, "base_layer", layer.self_attn.q_proj).weight
    return weight.dtype in (torch.bfloat16, torch.float16, torch.float32)


class MergedAdapter:
    """Which adapter's weights are added into the base weights (``merged``: its PEFT name, None for none)."""

    def __init__(self):
        self.merged: str | None = None
        self._originals: dict[str, torch.Tensor] = {}  # module name -> its base weight before any merge, on CPU

    @torch.no_grad()
    def merge(self, model, adapter_name: str | None) -> None:
        """Make the base weights those of the base model plus ``adapter_name``'s LoRA product (None: the base)."""
        from peft.tuners.lora import LoraLayer

        self.restore(model)
        if adapter_name is None:
            return
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            weight = module.get_base_layer().weight
            if name not in self._originals:
                self._originals[name] = weight.detach().to("cpu", copy=True)
            delta = module.get_delta_weight(adapter_name)
            weight.copy_((weight.float() + delta.float()).to(weight.dtype))
        self.merged = adapter_name

    @torch.no_grad()
    def restore(self, model) -> None:
        """Put back the base weights of every module a merge changed."""
        if self.merged is None:
            return
        modules = dict(model.named_modules())
        for name, original in self._originals.items():
            modules[name].get_base_layer().weight.copy_(original)
        self.merged = None
