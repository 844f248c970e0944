"""The self-check the fast path passes before it answers: a short prompt's prefill and one decode step against the
model's own forward over the same tokens. A variant the step gets wrong (a patched model, an unusual RoPE) then
falls back to the standard path (engine/decode/start.py) rather than answering wrongly."""

from __future__ import annotations

import torch

from engine.decode.ops import eager_ops
from engine.kernels.sampling import choose_greedy


@torch.no_grad()
def against_the_model(decoder) -> str | None:
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
    lm = decoder.lm
    ids = torch.arange(1, 17, device=decoder.device)[None] % decoder.logits.shape[1]
    with decoder.answering():
        unfused = decoder.prefill(ids, eager_ops()).clone() if decoder.prefill_ops is not decoder.ops else None
        prefill_logits = decoder.prefill(ids)
        first = choose_greedy(prefill_logits).view(1, 1)
        decoder.token.copy_(first)
        decoder.run_step(False)
        prompt_reference = lm(input_ids=ids, return_dict=True).logits[:, -1].float()
        reference = lm(input_ids=torch.cat([ids, first], 1), return_dict=True).logits[:, -1].float()
        cache = lm(input_ids=ids, use_cache=True, return_dict=True).past_key_values
        # Unsloth's patched decode step reads position_ids (transformers infers them) and returns a tuple
        # unless asked for return_dict.
        eager_step = lm(input_ids=first, past_key_values=cache, use_cache=True, return_dict=True,
                        position_ids=torch.full_like(first, ids.shape[1])).logits[:, -1].float()

    def distance(logits: torch.Tensor, to: torch.Tensor) -> float:
        return float((logits - to).norm() / to.norm())

    rounding = distance(eager_step, reference)
    if unfused is not None:
        rounding = max(rounding, distance(prefill_logits, unfused))
    # A floor for where rounding is nil: float32's is 0.002, as a step without RoPE was 0.008 off on the tests'
    # tiny model (a floor of 0.01 let it through); 16-bit weights keep the 0.01 their GPU runs passed with.
    floor = 0.002 if lm.dtype == torch.float32 else 0.01
    for what, error in (("prefill", distance(prefill_logits, prompt_reference)),
                        ("decode step", distance(decoder.logits, reference))):
        if error > 3 * rounding + floor:
            return (f"the {what}'s logits are {error:.3f} (relative) from the model's forward, where rounding "
                    f"alone moves them {rounding:.3f}")
    return None
