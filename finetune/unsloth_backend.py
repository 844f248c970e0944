"""The `unsloth` backend (CUDA only): FastLanguageModel in 4 bits, its gradient checkpointing, PatchDPOTrainer.

Unsloth patches transformers, PEFT and TRL when it is imported, and cannot be imported without a CUDA GPU:
`import_unsloth()` must run before anything imports transformers in the training process.
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import TrainConfig


def import_unsloth() -> None:
    import unsloth  # noqa: F401
    from unsloth import PatchDPOTrainer

    # Unsloth says ORPO is not among the trainers this patches; its model patches still apply.
    PatchDPOTrainer()


def load_for_training(config: TrainConfig):
    """The base model with LoRA adapters ready to train, and its tokenizer."""
    import_unsloth()
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=config.model_name, max_seq_length=config.max_length, load_in_4bit=config.load_in_4bit,
        dtype=None)
    checkpointing = {"unsloth": "unsloth", "true": True, "false": False}[config.gradient_checkpointing]
    model = FastLanguageModel.get_peft_model(
        model, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules), bias="none", use_gradient_checkpointing=checkpointing,
        random_state=config.seed, max_seq_length=config.max_length)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_merged_16bit(model, tokenizer, out_dir: Path) -> None:
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
