"""The check before a training run: what its data holds, whether it fits the context, what the run will cost.

The app's Train tab shows it when asked ("Check the data") and runs it again on "Start", which refuses data
that holds no usable pair, at once, instead of launching a job that fails a few seconds later.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from finetune import runs
from finetune.config import load_config
from finetune.training_log import read_log

PREVIEW_ROWS = 5
PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class RunCheck:
    """What a run's data and settings come to, before it starts."""

    pairs: int  # usable pairs over every source
    left_out: list[str]  # rows that cannot be used, each with its source and why (the first PROBLEMS_SHOWN)
    left_out_count: int
    held_out: int  # pairs kept out of training for the evaluation after it
    eval_note: str | None  # why there is no evaluation, when there is none
    max_length: int  # the training context, in tokens
    longest: int  # tokens of the longest pair (prompt and its longer answer), after truncation
    median: int
    truncated: int  # pairs cut to fit ``max_length``
    steps: int
    epochs: float | None  # when the run is measured in epochs (max_steps -1)
    memory_gib: float | None
    seconds_per_step: float | None  # measured in the newest earlier run of the same base model, if any
    measured_in: str | None  # that run's name
    preview: list[dict] = field(default_factory=list)  # the first pairs: prompt, chosen, rejected

    @property
    def train(self) -> int:
        return self.pairs - self.held_out

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_step is None else self.seconds_per_step * self.steps


def check_run(spec: runs.RunSpec, adapter_dir: Path, cuda: bool = False) -> RunCheck:
    """Prepare ``spec``'s sources as the run will (its config's context and truncation) and sum them up."""
    from finetune.data import prepare_data
    from finetune.hf_backend import load_tokenizer
    from finetune.memory import training_memory_gib

    config = load_config(spec.config, [f"{k}={v}" for k, v in spec.overrides.items()]
                         + [f"model_name={spec.model_name}"])
    tokenizer = load_tokenizer(spec.model_name, "CHAT_MODEL")
    pairs, problems, truncated = [], [], 0
    for source in spec.sources:
        prepared = prepare_data(source, tokenizer, max_length=config.max_length,
                                max_prompt_length=config.max_prompt_length, on_overlength=config.on_overlength)
        pairs += prepared.pairs
        truncated += prepared.truncated
        problems += [f"{Path(source).name}: {r.reason}" for r in prepared.rejected]
    held = runs.held_out_count(len(pairs), spec.held_out_share)
    lengths = [len(tokenizer(p.prompt + max(p.chosen, p.rejected, key=len), add_special_tokens=False)["input_ids"])
               for p in pairs]
    by_epochs = config.max_steps <= 0
    # As transformers' Trainer counts them (one process): batches an epoch, over the accumulation, at least one.
    per_epoch = max(math.ceil((len(pairs) - held) / config.per_device_train_batch_size)
                    // config.gradient_accumulation_steps, 1)
    steps = math.ceil(config.num_train_epochs * per_epoch) if by_epochs else config.max_steps
    try:
        memory = training_memory_gib(config, cuda=cuda)
    except (OSError, ValueError):
        memory = None  # the model's config cannot be read here; the run itself will say why
    per_step, measured_in = _measured_pace(adapter_dir, spec.model_name)
    return RunCheck(len(pairs), problems[:PROBLEMS_SHOWN], len(problems), held, runs.eval_note(len(pairs), held,
                                                                                                  spec.held_out_share),
                    config.max_length, max(lengths, default=0), int(statistics.median(lengths)) if lengths else 0,
                    truncated, max(steps, 0), config.num_train_epochs if by_epochs else None, memory, per_step,
                    measured_in, [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                  for p in pairs[:PREVIEW_ROWS]])


def _measured_pace(adapter_dir: Path, model_name: str) -> tuple[float | None, str | None]:
    """Seconds a step in the newest earlier run of ``model_name`` that logged at least two steps."""
    for record in runs.list_runs(adapter_dir):
        if record.spec.model_name != model_name:
            continue
        log = [r for r in read_log(Path(adapter_dir) / record.name) if "time" in r and "step" in r]
        if len(log) >= 2 and log[-1]["step"] > log[0]["step"]:
            return (log[-1]["time"] - log[0]["time"]) / (log[-1]["step"] - log[0]["step"]), record.name
    return None, None
