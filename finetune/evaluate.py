"""How often a model prefers the chosen completion of held-out pairs."""

from __future__ import annotations

import torch

from finetune.data import PreferencePair
from finetune.prompts import prompt_token_ids


@torch.no_grad()
def completion_logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """Mean log-probability per completion token given the prompt (ORPO's length-normalised log P(y|x))."""
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    token_logps = logps.gather(1, targets[:, None]).squeeze(1)[len(prompt_ids) - 1:]
    return token_logps.mean().item()


def preference_accuracy(model, tokenizer, pairs: list[PreferencePair]) -> float:
    """Share of pairs whose chosen completion is more probable (so has higher log odds) than the rejected."""
    model.eval()
    wins = sum(completion_logprob(model, tokenizer, p.prompt, p.chosen)
               > completion_logprob(model, tokenizer, p.prompt, p.rejected) for p in pairs)
    return wins / len(pairs)
