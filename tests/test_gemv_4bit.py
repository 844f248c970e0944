"""The Triton GEMV on bitsandbytes 4-bit weights (engine/kernels/gemv_4bit.py), run on CPU by Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET):
the same kernel the GPU compiles, its indexing checked against bitsandbytes' own product, and the fast decode
path on a 4-bit model checked token for token against generate."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine.decode.decoder import FastDecoder
from engine.decode.projections import PROJECTIONS
from engine.decode.start import build_decoder
from engine.kernels.gemv_4bit import GemvConfig, Nf4Weight, gemv

bnb = pytest.importorskip("bitsandbytes")

PROMPTS = ["The knowledge store is", "Adapters are trained with"]


def nf4_linear(linear: torch.nn.Linear, double_quant: bool = True):
    """``linear`` quantized by bitsandbytes (nf4, blocks of 64), computing in float32 on the CPU."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantized here


@pytest.mark.parametrize("out_features, in_features, config", [
    (48, 256, GemvConfig()),
    (40, 320, GemvConfig(block_n=16, block_k=256)),  # rows and inputs that do not fill the last tile
    (24, 192, GemvConfig(block_n=4, block_k=128)),
    (24, 192, GemvConfig(block_n=2, block_k=64)),  # one absmax block a tile
])
@pytest.mark.parametrize("double_quant", [True, False])
def test_the_gemv_multiplies_as_bitsandbytes_does(out_features, in_features, config, double_quant):
    torch.manual_seed(0)
    layer = nf4_linear(torch.nn.Linear(in_features, out_features), double_quant)
    x = torch.randn(1, 1, in_features)
    with torch.no_grad():
        expected = layer(x)
    weight = Nf4Weight.from_bnb(layer)
    got = gemv(x, weight, layer.bias, config)
    assert got.shape == expected.shape
    # Exactly the product with the weight it holds; within the float16 absmax's rounding of bitsandbytes'.
    exact = x.view(1, -1) @ weight.dequantize(torch.float32).T + layer.bias.detach()
    assert float((got.view(1, -1) - exact).norm() / exact.norm()) < 1e-5
    assert float((got - expected).norm() / expected.norm()) < 1e-3


def test_layers_with_the_same_inputs_make_one_weight_that_they_keep_reading():
    torch.manual_seed(0)
    layers = [nf4_linear(torch.nn.Linear(128, rows, bias=False)) for rows in (64, 16, 16)]
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
    fused = Nf4Weight.from_bnb(*layers)
    assert fused.out_features == 96
    got = gemv(x, fused).split([64, 16, 16], dim=-1)
    for y, e in zip(got, expected, strict=True):
        assert float((y - e).norm() / e.norm()) < 1e-3
    # The layers' own bytes are now views of the one weight's: no copy, and their forward is unchanged.
    assert all(layer.weight.data.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()
               for layer in layers)
    with torch.no_grad():
        assert all(torch.equal(layer(x), e) for layer, e in zip(layers, expected, strict=True))
    with pytest.raises(ValueError, match="same inputs"):
        Nf4Weight.from_bnb(layers[0], nf4_linear(torch.nn.Linear(64, 16)))


def test_the_gemv_takes_one_row_only():
    layer = nf4_linear(torch.nn.Linear(64, 16))
    with pytest.raises(ValueError, match="one row of 64 inputs"):
        gemv(torch.randn(2, 64), Nf4Weight.from_bnb(layer))


def four_bit_model(folder):
    """The trained tiny model with every projection quantized to nf4 by bitsandbytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for layer in model.model.layers:
        for path in PROJECTIONS.values():
            parent, name = path.rsplit(".", 1)
            module = layer.get_submodule(parent)
            setattr(module, name, nf4_linear(getattr(module, name)))
    return model


def greedy_answers(model, tokenizer, decoder: FastDecoder | None) -> list[list[int]]:
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        if decoder is None:
            out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            answers.append(out[0, ids.shape[1]:].tolist())
        else:
            tokens = []
            decoder.generate(ids, 16, 0.0, 1.0, None, tokens.append)
            answers.append(tokens)
    return answers


def test_a_4bit_model_decodes_through_the_gemv_as_generate_does(trained_tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.decode.projections import Nf4Rows

    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_model_dir)
    model = four_bit_model(trained_tiny_model_dir)
    decoder = build_decoder(model, 128, {tokenizer.eos_token_id}, contextlib.nullcontext)
    assert all(isinstance(p, Nf4Rows) for layer in decoder.projections for p in layer.values())
    assert decoder.check() is None
    written = greedy_answers(model, tokenizer, decoder)
    assert written == greedy_answers(model, tokenizer, None)
    assert all(len(tokens) > 3 for tokens in written)


def test_a_lora_adapter_on_a_4bit_model_is_applied_in_the_step(trained_tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_tiny_model_dir)
    model = four_bit_model(trained_tiny_model_dir)
    decoder = build_decoder(model, 128, {tokenizer.eos_token_id}, contextlib.nullcontext)
    before = greedy_answers(model, tokenizer, decoder)
    torch.manual_seed(0)  # the adapter arrives after the decoder was built, as the runtime loads one
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False)).eval()
    decoder.capture()
    assert decoder.check() is None
    with_adapter = greedy_answers(model, tokenizer, decoder)
    assert with_adapter == greedy_answers(model, tokenizer, None) != before
    with model.disable_adapter():  # as the runtime answers for the base model
        assert greedy_answers(model, tokenizer, decoder) == before
