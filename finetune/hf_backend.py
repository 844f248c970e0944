"""The `hf` backend: transformers + PEFT LoRA (+ bitsandbytes 4-bit on CUDA; full float32 on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from errors import ModelUnavailable
from finetune.config import TrainConfig
from finetune.quantization import four_bit_config, require_bitsandbytes


def load_tokenizer(model_name: str, setting: str = "model_name"):
    """The model's tokenizer, with a pad token. Loaded first, so a model that cannot be found fails here,
    with a message naming ``setting`` (where the user gave the name), before any weights are read."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except OSError as e:
        raise ModelUnavailable(model_load_failure(setting, model_name, e)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_load_failure(setting: str, name: str, error: OSError) -> str:
    """What went wrong loading model ``name`` (given as ``setting``: a folder or a hub name), and what to do."""
    path = Path(name).expanduser()
    if path.exists():
        return (f"cannot load {setting}={name!r} ({str(error).splitlines()[0]}): the folder must hold a "
                "transformers model and its tokenizer (config.json, tokenizer files)")
    tiny = "`python -m finetune tiny-model DIR` builds a tiny local model for a try-out."
    if path.is_absolute() or name.startswith((".", "~")):
        return f"cannot load {setting}={name!r}: there is no such folder. Point it to a model folder; {tiny}"
    return (f"cannot load {setting}={name!r}: there is no such folder, and as a hub name it cannot be loaded "
            f"({str(error).splitlines()[0]}). Check the spelling; a hub model is downloaded once while online "
            f"(HF_HUB_OFFLINE=1 uses only the local cache). {tiny}")


def using_fsdp() -> bool:
    """True under `accelerate launch` with an FSDP config (finetune/configs/accelerate-fsdp-qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def model_kwargs(config: TrainConfig, dtype: torch.dtype, cuda: bool) -> dict:
    """from_pretrained's arguments, but the device map: ``dtype`` on CUDA (4 bits when load_in_4bit), else fp32."""
    # sdpa: fused attention kernels, no [heads, length, length] score tensor
    kwargs: dict = {"dtype": dtype if cuda else torch.float32, "attn_implementation": "sdpa"}
    if cuda and config.load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(dtype, storage_dtype=dtype if using_fsdp() else torch.uint8)
    return kwargs


def load_for_training(config: TrainConfig, dtype: torch.dtype):
    """The base model with LoRA adapters ready to train, and its tokenizer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(config.model_name)
    on_cuda = torch.cuda.is_available()
    quantize = on_cuda and config.load_in_4bit
    if quantize:
        require_bitsandbytes("load_in_4bit")
    kwargs = model_kwargs(config, dtype, on_cuda)
    if on_cuda and not using_fsdp():  # each process of a multi-GPU DDP run holds its own copy on its own GPU
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
