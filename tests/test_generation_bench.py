"""The GPU generation bench's bounds, on the CPU: the prefill a 4-bit model owes is the bf16 model's."""

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from scripts.gpu_generation_bench import prefill_flops


def test_a_4_bit_model_owes_the_prefill_flops_of_its_bf16_weights(tiny_model_dir):
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4, device_map="cpu")
    assert packed.model.layers[0].mlp.down_proj.weight.dtype == torch.uint8  # two weights a byte

    config, prompt = full.config, 300
    weights = sum(p.numel() for n, p in full.named_parameters() if "layers." in n and p.dim() == 2)
    expected = (2 * weights * prompt + 2 * config.num_hidden_layers * config.hidden_size * prompt**2
                + 2 * config.hidden_size * config.vocab_size)
    assert prefill_flops(full, prompt) == expected
    assert prefill_flops(packed, prompt) == expected
