"""The 4-bit quantization that training, serving and the benchmarks share: one definition, so a model is
served in the same 4-bit form it was trained against.

nf4 weights with double quantization (the quantization constants are quantized too: about 0.4 bits per
weight less, for QLoRA's quality), computing in a 16-bit dtype. bitsandbytes does the work, on CUDA only.
"""

from __future__ import annotations

import importlib.util

import torch

from errors import ModelUnavailable


def four_bit_config(compute_dtype: torch.dtype = torch.bfloat16, storage_dtype: torch.dtype = torch.uint8):
    """The BitsAndBytesConfig for 4-bit loading. ``storage_dtype``: the dtype the packed 4-bit words are kept
    in (FSDP needs the compute dtype there, as it flattens parameters of one dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage_dtype)


def require_bitsandbytes(setting: str) -> None:
    """Raise ModelUnavailable, naming ``setting`` (e.g. "LOAD_IN_4BIT" or "load_in_4bit"), when bitsandbytes
    is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelUnavailable(f"{setting}=true loads the model in 4 bits on CUDA, which needs bitsandbytes: "
                               f"pip install '.[gpu]' (or bitsandbytes alone), or set {setting}=false")
