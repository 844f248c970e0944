"""How much accelerator memory a training run needs, estimated before it starts from the model's config alone.

The app asks this to decide whether its chat model must make room for a run started from the Train tab. The
estimate is coarse on purpose, and errs high: the weights (4-bit NF4 with its scales, or 16-bit), the
activations kept for the backward pass (one hidden state per layer and token with gradient checkpointing,
about ten without), and a fixed allowance for the CUDA context, Unsloth's buffers, the LoRA weights and
their optimizer state, and the allocator's slack. Checked against peaks measured on an H200 with Unsloth:
the 14B shape at batch 2, 16.3 GiB estimated for 14.5 allocated by torch (the CUDA context comes on top) at
2048+2048 tokens; the 1.5B shape at batch 2 and 512 tokens, 4.0 GiB estimated for the 4.0 GiB the training
process held by nvidia-smi (``docs/gpu/train-tab-2026-11-29.jsonl``).
"""

from __future__ import annotations

from finetune.config import TrainConfig

NF4_BYTES_PER_PARAMETER = 0.56  # 4 bits, plus a float scale per 64 weights and the double-quantized constants
FIXED_GIB = 3.0
# 16-bit hidden states kept per layer and token, checkpointed or not: fitted to the measured peaks above
# (Unsloth's checkpointing moves part of them to the CPU) and to activation counts without checkpointing.
ACTIVATION_FACTOR = {True: 0.75, False: 10.0}


def parameter_count(model_config) -> int:
    """Parameters of a decoder-only transformer (Llama/Qwen2 layout) from its config."""
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * model_config.intermediate_size
    embeddings = model_config.vocab_size * hidden * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    return layers * (attention + mlp) + embeddings


def training_memory_gib(config: TrainConfig, model_config=None, cuda: bool = True) -> float:
    """Peak memory of ``config``'s run, in GiB (``model_config``: the base model's, read when not given)."""
    if model_config is None:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(config.model_name)
    four_bit = config.load_in_4bit and cuda
    weights = parameter_count(model_config) * (NF4_BYTES_PER_PARAMETER if four_bit else 2 if cuda else 4)
    checkpointed = config.gradient_checkpointing != "false"
    tokens = config.per_device_train_batch_size * 2 * config.max_length  # a chosen and a rejected sequence each
    activations = tokens * model_config.hidden_size * model_config.num_hidden_layers * 2 \
        * ACTIVATION_FACTOR[checkpointed]
    return (weights + activations) / 2**30 + FIXED_GIB
