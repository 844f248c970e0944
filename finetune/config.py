"""The training configuration: every value of the recipe as a documented default, every one overridable.

Load a YAML file with `load_config(path, overrides=["key=value", ...])`; keys are the field names below.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import UserError

BACKENDS = ("auto", "unsloth", "hf")


class ConfigError(UserError):
    """A configuration file or override the trainer cannot use."""


def _opt(default, help: str):
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """ORPO with LoRA on a reasoning model. The defaults are the seed recipe: DeepSeek-R1-Distill-Qwen-14B in
    4 bits, context 4096, LoRA r=16 on all projections, ORPO beta 0.1, batch 2 x 4, adamw_8bit, linear."""

    # model
    model_name: str = _opt("unsloth/DeepSeek-R1-Distill-Qwen-14B",
                           "Base model: a hub name or a local folder (e.g. from `python -m finetune tiny-model`).")
    backend: str = _opt("auto", "auto | unsloth | hf. auto: unsloth when a CUDA GPU and unsloth are present.")
    load_in_4bit: bool = _opt(True, "Load the base model in 4 bits (CUDA only; on CPU it trains in float32).")
    max_length: int = _opt(4096, "Context: most tokens of prompt + completion (the recipe's max_seq_length).")
    max_prompt_length: int = _opt(2048, "Most prompt tokens kept when a pair is too long (half the context).")
    gradient_checkpointing: str = _opt("unsloth", "unsloth | true | false. 'unsloth' is Unsloth's offloaded "
                                       "variant; the hf backend treats it as true.")
    seed: int = _opt(3407, "Seed for LoRA init, data order and dropout.")
    # LoRA
    lora_r: int = _opt(16, "LoRA rank.")
    lora_alpha: int = _opt(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA path.")
    target_modules: list[str] = _opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                     "Modules that get LoRA adapters.")
    init_adapter: str = _opt("", "An adapter folder whose LoRA weights training starts from (trained with the "
                             "same lora_r, lora_alpha and target_modules): a next round on new pairs. Empty: new "
                             "LoRA weights.")
    # data
    data: str = _opt("", "Preference data: a hub dataset name, a JSON/JSONL/CSV/Parquet file or a folder.")
    data_format: str = _opt("auto", "auto | seed | trl | chat (see docs/finetune.md).")
    data_split: str = _opt("train", "Split to load when `data` is a hub dataset.")
    columns: dict[str, str] = _opt({}, "Column renames, target: source (e.g. {prompt: question}).")
    on_overlength: str = _opt("truncate", "truncate | drop pairs longer than max_length.")
    # ORPO and optimizer
    beta: float = _opt(0.1, "Weight of the odds-ratio term (lambda in the ORPO paper).")
    per_device_train_batch_size: int = _opt(2, "Pairs per forward pass (each pair is two sequences).")
    gradient_accumulation_steps: int = _opt(4, "Forward passes per optimizer step.")
    learning_rate: float = _opt(8e-6, "Peak learning rate. The recipe left TRL's default; 8e-6 is the ORPO "
                                "paper's.")
    lr_scheduler_type: str = _opt("linear", "Learning-rate schedule (transformers' names).")
    warmup_steps: int = _opt(0, "Linear warm-up steps.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0: no clipping).")
    optim: str = _opt("adamw_8bit", "Optimizer (transformers' names). adamw_8bit needs bitsandbytes and CUDA; "
                      "elsewhere adamw_torch is used.")
    precision: str = _opt("auto", "auto | bf16 | fp16 | fp32. auto: bf16 where supported, else fp16 on CUDA, "
                          "fp32 on CPU.")
    num_train_epochs: float = _opt(1.0, "Passes over the data (ignored when max_steps > 0).")
    max_steps: int = _opt(-1, "Optimizer steps to run; -1: run num_train_epochs.")
    logprob_chunk_size: int = _opt(1024, "Positions per chunk when computing log-probabilities from hidden "
                                   "states without full-vocabulary logits; 0: TRL's full logits.")
    # output
    output_dir: str = _opt("outputs/orpo", "Where the adapter, tokenizer, config, log, plot and checkpoints go.")
    save_steps: int = _opt(50, "Save a checkpoint every N optimizer steps.")
    save_total_limit: int = _opt(2, "Checkpoints kept (the newest).")
    logging_steps: int = _opt(1, "Log every N optimizer steps.")
    merge_16bit: bool = _opt(False, "Also write the base model with the adapter merged, in 16 bits, to "
                             "output_dir/merged-16bit.")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.gradient_checkpointing not in ("unsloth", "true", "false"):
            raise ConfigError("gradient_checkpointing must be unsloth, true or false, "
                              f"not {self.gradient_checkpointing!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16, fp16 or fp32, not {self.precision!r}")
        if self.on_overlength not in ("truncate", "drop"):
            raise ConfigError(f"on_overlength must be truncate or drop, not {self.on_overlength!r}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be between 0 and max_length "
                              f"({self.max_length})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    expected = origin or hint
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    clean = {}
    for key, value in values.items():
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else "; see finetune/config.py for the keys"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        clean[key] = _coerce(key, value, hints[key])
    return TrainConfig(**clean)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` strings, values read as YAML (so 2 is an int, true a bool, [a, b] a list)."""
    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote it "
                              "or fix it") from None
    return values


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line, with the line and column it points at."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist; see finetune/configs/ for examples")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({_yaml_problem(e)}); fix it there") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must be a YAML mapping of key: value")
        values.update(loaded)
    values.update(parse_overrides(overrides or []))
    return config_from_dict(values)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
