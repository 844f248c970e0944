"""ORPO's loss terms, computed from final hidden states without full-vocabulary logits.

The stock trainer builds logits of shape [2 x batch, length, vocab] (152064 wide for DeepSeek-R1-Distill-Qwen),
then copies them for the cross-entropy and the log-softmax, and keeps their gradient. Here the per-token
log-probabilities of the labels are computed a chunk of positions at a time from `hidden @ lm_head.T`; the
backward pass recomputes each chunk's logits instead of storing them. Peak extra memory is one chunk's
logits (chunk_size x vocab) instead of several copies of the whole batch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedLabelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        logps = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = (hidden[start:end] @ weight.T).to(acc)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, labels[start:end, None]).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        acc = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            g = grad_logps[start:end].to(acc)[:, None]
            # d log p(label) / d logits = onehot(label) - softmax(logits)
            grad_logits = (hidden[start:end] @ weight.T).to(acc)
            grad_logits.sub_(lse[start:end, None]).exp_().mul_(-g)
            grad_logits.scatter_add_(1, labels[start:end, None], g)
            if need_hidden:
                grad_hidden[start:end] = grad_logits.to(hidden.dtype) @ weight
            if need_weight:
                grad_weight += grad_logits.T @ hidden[start:end].to(acc)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_label_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[label] per row, in float32 (at least), never holding more than chunk_size rows of
    logits. hidden: [N, H], weight: [V, H] (the lm_head), labels: [N] token ids."""
    return _ChunkedLabelLogProbs.apply(hidden.to(weight.dtype), weight, labels, chunk_size)


def full_label_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same through full logits: the reference the chunked version is tested against."""
    logits = (hidden.to(weight.dtype) @ weight.T).to(torch.promote_types(weight.dtype, torch.float32))
    return logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, completion_mask: torch.Tensor, n_chosen: int,
                      chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the final hidden states [B, T, H] of chosen rows then rejected rows:
    - the mean log-probability of each row's completion tokens, [B] (ORPO's log P(y|x), length-normalised);
    - the chosen rows' NLL over all their real tokens, prompt included, as TRL's ORPO computes it.
    completion_mask [B, T] marks completion tokens (TRL's labels != -100)."""
    targets = input_ids[:, 1:]
    real = attention_mask[:, 1:].bool()
    completion = completion_mask[:, 1:].bool()
    nll_rows = torch.zeros_like(real)
    nll_rows[:n_chosen] = real[:n_chosen]
    needed = nll_rows | completion
    flat = chunked_label_logprobs(hidden[:, :-1][needed], weight, targets[needed], chunk_size)
    per_token = torch.zeros(targets.shape, dtype=flat.dtype, device=hidden.device)
    per_token = per_token.masked_scatter(needed, flat)
    mean_logps = (per_token * completion).sum(-1) / completion.sum(-1)
    chosen_nll = -(per_token * nll_rows).sum() / nll_rows.sum()
    return mean_logps, chosen_nll


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log odds of chosen over rejected, per pair; the odds-ratio loss -log sigmoid(log odds), per pair)."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    return log_odds, -F.logsigmoid(log_odds)
