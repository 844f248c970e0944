"""A layer's linear projections as the decode step calls them: four products (GROUPS), each over the rows of the
projections that share an input, returning those projections' outputs.

Float weights are fused (one weight holding the rows of q, k and v, of gate and up; the layers read views of
it) and multiplied directly, an adapter merged into them (engine/adapter_merge.py). bitsandbytes 4-bit weights
are fused likewise into one ``gemv_4bit.Nf4Weight`` a product, multiplied by the GEMV chosen at load
(engine/decode/tuning.py) with the active LoRA products beside it, or by the modules themselves (bitsandbytes'
product) where no GEMV of ours was chosen. The model's own forward, and the prefill of 4-bit weights, still
run the modules on the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.kernels import gemv_4bit
from engine.kernels.triton_runtime import runs_on

PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# The products of a step: projections that take the same input are one product over their rows.
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def base(module):
    """The linear layer under a PEFT LoRA wrapper (whose product, when used here, is merged into its weight)."""
    return getattr(module, "base_layer", module)


def group_modules(layer, group: str) -> list:
    """The modules (LoRA wrappers included) of ``group``'s projections in ``layer``."""
    return [layer.get_submodule(PROJECTIONS[n]) for n in GROUPS[group]]


def plain_linears(layers) -> bool:
    """Whether every projection is an nn.Linear with float weights (under any LoRA wrapper): then the step reads
    the weights itself, fused, and an adapter must be merged into them (engine/adapter_merge.py)."""
    modules = [base(layer.get_submodule(path)) for layer in layers for path in PROJECTIONS.values()]
    return all(type(m) is torch.nn.Linear and m.weight.is_floating_point() for m in modules)


def nf4_linears(layers) -> bool:
    """Whether every projection is a bitsandbytes 4-bit layer that the Triton GEMV takes, where it can run."""
    modules = [base(layer.get_submodule(path)) for layer in layers for path in PROJECTIONS.values()]
    if not runs_on(modules[0].weight.device) or not all(
            type(m).__name__ == "Linear4bit" and getattr(m.weight, "quant_state", None) is not None for m in modules):
        return False
    return all(gemv_4bit.why_unsupported(m) is None for m in modules)


def fuse_rows(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding the rows of several linear layers, which from now on read views of it:
    one matrix-vector product instead of several, at no extra memory. One layer's is its own."""
    linears = [base(m) for m in linears]
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


class FusedWeights:
    """Each layer's fused weights for every product: ``dense`` (float: (weight, bias)) or ``nf4``
    (``gemv_4bit.Nf4Weight``), or neither (the modules run as they are)."""

    def __init__(self, layers):
        self.dense = [{group: fuse_rows(group_modules(layer, group)) for group in GROUPS}
                      for layer in layers] if plain_linears(layers) else None
        self.nf4 = [{group: gemv_4bit.Nf4Weight.from_bnb(*[base(m) for m in group_modules(layer, group)])
                     for group in GROUPS} for layer in layers] if self.dense is None and nf4_linears(layers) else None

    def keep_nf4(self, groups) -> None:
        """Drop the 4-bit weights of the products our GEMV does not run (bitsandbytes' own does)."""
        if self.nf4 is not None:
            self.nf4 = [{group: w for group, w in row.items() if group in groups} for row in self.nf4]


class DenseRows:
    """A product over fused float weights (an adapter merged into them), split into its projections' outputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        self.weight, self.bias, self.sizes = weight, bias, sizes

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(h, self.weight, self.bias).split(self.sizes, dim=-1)


class ModuleRows:
    """The projections' own modules, one after another (bitsandbytes' product, and any adapter in them)."""

    def __init__(self, modules: list):
        self.modules = modules

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(h) for m in self.modules)


class Nf4Rows:
    """Projections whose base weights are bitsandbytes 4-bit, for one row: one GEMV (``product``: a kernel of
    gemv_4bit or gemv_4bit_mma in its chosen tiling) on their fused bytes, plus the LoRA products of the
    adapters active when the step is captured (PEFT's forward for vanilla LoRA, written out: PEFT's own would
    call bitsandbytes' product again); any other LoRA variant runs the modules themselves."""

    def __init__(self, modules: list, weight, product: Callable, sizes: list[int]):
        self.modules, self.weight, self.product, self.sizes = modules, weight, product, sizes
        biases = [base(m).bias for m in modules]
        some = next((b for b in biases if b is not None), None)
        self.bias = None if some is None else torch.cat(
            [torch.zeros(size, dtype=some.dtype, device=some.device) if b is None else b.detach()
             for b, size in zip(biases, sizes, strict=True)])

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lora = [m for m in self.modules if m is not base(m) and not m.disable_adapters and not m.merged]
        if any(name in getattr(m, "lora_variant", {}) for m in lora for name in m.active_adapters):
            return ModuleRows(self.modules)(h)
        outputs = list(self.product(h, self.weight, self.bias).split(self.sizes, dim=-1))
        for index, m in enumerate(self.modules):
            if m in lora:
                for name in m.active_adapters:
                    if name in m.lora_A:
                        a = m.lora_A[name]
                        delta = m.lora_B[name](a(h.to(a.weight.dtype))) * m.scaling[name]
                        outputs[index] = outputs[index] + delta.to(outputs[index].dtype)
        return tuple(outputs)


def bind(layers, weights: FusedWeights, products: dict[str, Callable]) -> tuple[list[dict], list[dict]]:
    """Each layer's products as the step calls them, and as the prefill calls them (the same, but the modules
    where the step runs a one-row GEMV). ``products``: the GEMV chosen for each 4-bit product (the groups
    absent run bitsandbytes' product). Bound again at every capture, as an adapter swap may wrap the modules
    anew."""
    step, prefill = [], []
    for i, layer in enumerate(layers):
        row, prefill_row = {}, {}
        for group in GROUPS:
            modules = group_modules(layer, group)
            sizes = [base(m).out_features for m in modules]
            if weights.dense is not None:
                row[group] = prefill_row[group] = DenseRows(*weights.dense[i][group], sizes)
                continue
            prefill_row[group] = ModuleRows(modules)
            if weights.nf4 is not None and group in products:
                row[group] = Nf4Rows(modules, weights.nf4[i][group], products[group], sizes)
            else:
                row[group] = prefill_row[group]
        step.append(row)
        prefill.append(prefill_row)
    return step, prefill
