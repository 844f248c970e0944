"""One 4-bit configuration: a model is served in the same 4-bit form it was trained against."""

from __future__ import annotations

import torch

from engine import runtime
from finetune import hf_backend
from finetune.config import TrainConfig
from settings import Settings


def test_serving_quantizes_exactly_as_training_does():
    # BitsAndBytesConfig builds without CUDA or bitsandbytes, so both sides' CUDA arguments can be read here.
    serving = runtime.model_kwargs(Settings.from_env({}, load_in_4bit=True), cuda=True)["quantization_config"]
    training = hf_backend.model_kwargs(TrainConfig(load_in_4bit=True), torch.bfloat16, cuda=True)["quantization_config"]
    assert serving.to_dict() == training.to_dict()
    assert (serving.bnb_4bit_quant_type, serving.bnb_4bit_use_double_quant, serving.bnb_4bit_compute_dtype) == (
        "nf4", True, torch.bfloat16)


def test_without_cuda_or_four_bits_nothing_is_quantized():
    assert "quantization_config" not in runtime.model_kwargs(Settings.from_env({}, load_in_4bit=True), cuda=False)
    assert "quantization_config" not in runtime.model_kwargs(Settings.from_env({}, load_in_4bit=False), cuda=True)
    assert "quantization_config" not in hf_backend.model_kwargs(TrainConfig(load_in_4bit=True), torch.float32,
                                                                cuda=False)
