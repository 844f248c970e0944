"""TRL's ORPO trainer with memory-lean log-probabilities, honest logging and a stop on a non-finite loss.

Import this module only after the backend is loaded: for the unsloth backend, unsloth must be imported
before transformers and TRL.
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
from accelerate.utils import is_peft_model
from trl.experimental.orpo import ORPOTrainer

from errors import TrainingError
from finetune.orpo_loss import odds_ratio_terms, sequence_logprobs


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped before the optimizer applied it."""


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class LeanORPOTrainer(ORPOTrainer):
    """ORPO as TRL computes it (loss = chosen NLL + beta * -log sigmoid(log odds)), with three changes:

    - log-probabilities come from the final hidden states in chunks (`finetune.orpo_loss`) when
      `logprob_chunk_size` > 0, so no [2 x batch, length, vocab] logits tensor exists;
    - a NaN or infinite loss raises `NonFiniteLossError` before backward, so no bad update or checkpoint is made
      (the stock Trainer replaces such a loss in its log by the running mean, which starts at 0.0);
    - each log also carries tokens/s, counted from the attention masks of the real batches, and peak memory.
    """

    def __init__(self, *args, logprob_chunk_size: int = 1024, **kwargs):
        self.logprob_chunk_size = logprob_chunk_size
        self._tokens_since_log = 0
        self.tokens_seen = 0  # real (attention-mask) tokens of chosen and rejected sequences, all steps
        self._time_of_last_log: float | None = None  # set when the first batch starts
        super().__init__(*args, **kwargs)

    def _decoder_and_head(self, model):
        model = self.accelerator.unwrap_model(model)
        if is_peft_model(model):
            model = model.get_base_model()
        return model.get_decoder(), model.get_output_embeddings()

    def concatenated_forward(self, model, batch):
        if self.logprob_chunk_size <= 0 or self.is_encoder_decoder:
            return super().concatenated_forward(model, batch)
        concatenated = self.concatenated_inputs(batch, padding_value=self.padding_value,
                                                device=self.accelerator.device)
        n_chosen = batch["chosen_labels"].shape[0]
        decoder, lm_head = self._decoder_and_head(model)
        if lm_head.bias is not None:
            raise NotImplementedError("chunked log-probs assume an lm_head without bias; set logprob_chunk_size=0")
        # Mixed precision is applied by accelerate around the wrapped model's forward; calling the decoder
        # directly needs the same autocast, or every layer runs in float32 (3x slower, +18 GiB at 14B/4096).
        with self.accelerator.autocast():
            hidden = self._final_hidden_states(model, decoder, concatenated)
            mean_logps, chosen_nll = sequence_logprobs(
                hidden, lm_head.weight, concatenated["concatenated_input_ids"],
                concatenated["concatenated_attention_mask"], concatenated["concatenated_labels"] != -100,
                n_chosen, self.logprob_chunk_size)
        return mean_logps[:n_chosen], mean_logps[n_chosen:], None, None, chosen_nll

    def _final_hidden_states(self, model, decoder, concatenated) -> torch.Tensor:
        inputs = {"input_ids": concatenated["concatenated_input_ids"],
                  "attention_mask": concatenated["concatenated_attention_mask"], "use_cache": False}
        if self.accelerator.num_processes == 1:
            return decoder(**inputs).last_hidden_state
        # Several processes: the forward must go through the DDP wrapper, whose hooks all-reduce the
        # gradients. With the head swapped for the identity, the model's "logits" are the final hidden
        # states, and no [batch, length, vocabulary] tensor is made.
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if is_peft_model(base) else base
        head = base.get_output_embeddings()
        base.set_output_embeddings(torch.nn.Identity())
        try:
            return model(**inputs).logits
        finally:
            base.set_output_embeddings(head)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        chosen_logps, rejected_logps, _, _, chosen_nll = self.concatenated_forward(model, batch)[:5]
        log_odds, or_losses = odds_ratio_terms(chosen_logps, rejected_logps)
        or_loss = or_losses.mean()
        loss = chosen_nll + self.beta * or_loss
        chosen_rewards = self.beta * chosen_logps.detach()
        rejected_rewards = self.beta * rejected_logps.detach()
        prefix = "eval_" if train_eval == "eval" else ""
        gather = self.accelerator.gather_for_metrics
        metrics = {
            "rewards/chosen": gather(chosen_rewards).mean(),
            "rewards/rejected": gather(rejected_rewards).mean(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": gather(chosen_logps.detach()).mean(),
            "logps/rejected": gather(rejected_logps.detach()).mean(),
            "nll_loss": gather(chosen_nll.detach()).mean(),
            "or_loss": gather(or_loss.detach()).mean(),
            # TRL's names: log_odds_ratio is mean log sigmoid(log odds), log_odds_chosen the mean log odds.
            "log_odds_ratio": gather(-or_loss.detach()).mean(),
            "log_odds_chosen": gather(log_odds.detach().mean()).mean(),
        }
        metrics = {f"{prefix}{k}": v.item() for k, v in metrics.items()}
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._time_of_last_log is None:
            self._time_of_last_log = time.perf_counter()
        loss, metrics = self.get_batch_loss_metrics(model, inputs, train_eval="train")
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            saved = f"the last checkpoint is in {self.args.output_dir}" if self.state.global_step >= \
                self.args.save_steps else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at optimizer step {step} (nll_loss {metrics['nll_loss']}, "
                f"logps/chosen {metrics['logps/chosen']}, logps/rejected {metrics['logps/rejected']}); training "
                f"stopped before applying it and {saved}. Lower learning_rate, check the data for empty "
                "completions, or use precision=bf16/fp32 instead of fp16; then train again with --resume.")
        tokens = int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
        self._tokens_since_log += tokens
        self.tokens_seen += tokens
        self.store_metrics(metrics, train_eval="train")
        loss = loss.to(self.args.device)
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            elapsed = now - (self._time_of_last_log or now)
            logs["tokens_per_s"] = self._tokens_since_log / elapsed if elapsed > 0 else math.nan
            logs["peak_memory_gib"] = peak_memory_gib()
            self._tokens_since_log = 0
            self._time_of_last_log = now
        super().log(logs, start_time)
