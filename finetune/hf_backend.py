"""The `hf` backend: transformers + PEFT LoRA (+ bitsandbytes 4-bit on CUDA; full float32 on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from finetune.config import TrainConfig


def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def using_fsdp() -> bool:
    """True under `accelerate launch` with an FSDP config (finetune/configs/accelerate-fsdp-qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def load_for_training(config: TrainConfig, dtype: torch.dtype):
    """The base model with LoRA adapters ready to train, and its tokenizer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tokenizer = load_tokenizer(config.model_name)
    on_cuda = torch.cuda.is_available()
    quantize = on_cuda and config.load_in_4bit
    if quantize and not _bitsandbytes_available():
        raise RuntimeError("load_in_4bit needs bitsandbytes on CUDA: pip install 'think-rag[gpu]', or set "
                           "load_in_4bit=false")
    # sdpa: fused attention kernels, no [heads, length, length] score tensor
    kwargs: dict = {"dtype": dtype if on_cuda else torch.float32, "attn_implementation": "sdpa"}
    fsdp = using_fsdp()
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP flattens parameters of one dtype: store the 4-bit words as the compute dtype.
            bnb_4bit_quant_storage=dtype if fsdp else torch.uint8)
    if on_cuda and not fsdp:  # each process of a multi-GPU DDP run holds its own copy on its own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    model = AutoModelForCausalLM.from_pretrained(config.model_name, **kwargs)
    checkpointing = config.gradient_checkpointing != "false"
    if quantize:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        # prepare_model_for_kbit_training upcasts embeddings and lm_head to float32 (6 GB more at 14B);
        # bring them back to the compute dtype, as TRL does for bf16 runs.
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.to(dtype)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    return model, tokenizer


def save_merged_16bit(config: TrainConfig, adapter_dir: Path, out_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    base = AutoModelForCausalLM.from_pretrained(config.model_name, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    load_tokenizer(config.model_name).save_pretrained(out_dir)
