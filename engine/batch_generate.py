"""Whole completions of many prompts at once, through transformers' ``generate``: what ``LocalRuntime.complete``
runs, and what the evaluation and pair generation answer with.

Each prompt is fed the token ids training gave it (``finetune.prompts.prompt_token_ids``), left-padded in
batches, and decoded up to its first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.prompts import prompt_token_ids


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy, the same answer every run
    top_p: float = 0.95
    samples: int = 1  # answers per prompt (with a temperature above 0)
    batch_size: int = 8


def generate(model, tokenizer, prompts: list[str], config: GenerationConfig) -> list[str]:
    """Completions of ``prompts``, in batches, fed the ids training gave each prompt (``prompt_token_ids``)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(prompts), config.batch_size):
        batch = [prompt_token_ids(tokenizer, p) for p in prompts[i:i + config.batch_size]]
        width = max(map(len, batch))
        # Left padding: every row's last prompt token sits at the end, where generation continues.
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        sampling = config.temperature > 0
        kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=sampling, pad_token_id=pad)
        if sampling:
            kwargs.update(temperature=config.temperature, top_p=config.top_p)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row in generated[:, width:]:
            out.append(_decode_until_eos(tokenizer, row.tolist()))
    return out


def _decode_until_eos(tokenizer, ids: list[int]) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=False)
