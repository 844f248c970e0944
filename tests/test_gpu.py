"""The CUDA paths, on the tiny model: run with `pytest -m gpu tests/test_gpu.py` on a GPU machine.

Unsloth must be imported before transformers, so this module imports it first when a GPU is present.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

if torch.cuda.is_available():
    import unsloth  # noqa: F401 - before transformers, as Unsloth requires

from engine.runtime import GenerationParams, LocalRuntime  # noqa: E402
from finetune.adapters import read_training_info  # noqa: E402
from finetune.prompts import prompt_token_ids  # noqa: E402
from finetune.train import train  # noqa: E402
from settings import Settings  # noqa: E402
from tests.finetune_fixtures import repeat_task_rows, tiny_config, write_jsonl

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Two logits closer than this may swap places between two bf16 paths: bf16 keeps 8 significant bits (steps of
# 1/16 near 10), and the paths' roundings compound over the layers. The tiny model's decided tokens lead by more
# (0.4-0.6 in the CPU run that chose it).
NEAR_TIE = 0.25


@pytest.mark.parametrize("engine", ["unsloth", "transformers"])
def test_runtime_streams_on_cuda_with_a_trained_adapter(engine, trained_tiny_model_dir, tmp_path):
    """On the tiny model trained on text, with an adapter trained here: what streams is the fast decoder's tokens,
    each the model's own greedy choice after the same tokens, within bf16 rounding."""
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_task_rows(8, seed=1))
    train(tiny_config(trained_tiny_model_dir, data, tmp_path / "adapters" / "orpo-gpu", max_steps=2))
    settings = Settings.from_env(chat_model=str(trained_tiny_model_dir), adapter_dir=tmp_path / "adapters",
                                 local_engine=engine, load_in_4bit=False)
    runtime = LocalRuntime(settings)
    prompt = "### Response:\n<think>"
    text = "".join(runtime.stream(prompt, GenerationParams(max_new_tokens=16, temperature=0.0)))
    assert (runtime.engine, runtime.adapter, runtime.device.type) == (engine, "orpo-gpu", "cuda")
    assert runtime.decoder is not None  # FAST_DECODE=auto takes the fast path on CUDA, either engine
    assert runtime.decode_plan.path == "fast" and runtime.decode_plan.device.startswith("cuda")
    # Each token the fast path chose is the model's own greedy choice after the same tokens (its forward over them,
    # with Unsloth's or transformers' kernels), or within NEAR_TIE of it: the two round differently, and this tiny
    # model's two likeliest tokens are at times only hundredths apart (0.02-0.1 at the first two tokens of this
    # prompt, in bf16 on the CPU), so two greedy runs, compared whole, part at the first near-tie. What streamed is
    # the decoder's tokens, as text.
    ids = prompt_token_ids(runtime.tokenizer, prompt)
    chosen: list[int] = []
    with runtime._answering_model(), torch.no_grad():  # the fast path holds the adapter merged into the weights
        runtime.decoder.generate(torch.tensor([ids], device="cuda"), 16, 0.0, 1.0, None, chosen.append)
        logits = runtime.decoder.lm(input_ids=torch.tensor([ids + chosen], device="cuda"),
                                    return_dict=True).logits[0, len(ids) - 1:-1].float()
    gaps = logits.max(-1).values - logits[torch.arange(len(chosen)), torch.tensor(chosen)]
    logger.info("streamed %r; each token's gap to the likeliest %s", text, [round(float(g), 3) for g in gaps])
    assert bool((gaps <= NEAR_TIE).all())
    eos = runtime.tokenizer.eos_token
    assert text == runtime.tokenizer.decode(chosen, skip_special_tokens=False).split(eos)[0] != ""
    assert runtime.last_usage["completion_tokens"] == len(chosen)


@pytest.mark.parametrize("engine, four_bit", [("unsloth", True), ("transformers", True), ("transformers", False)])
def test_fast_decode_swaps_adapters_back_and_forth_on_cuda(engine, four_bit, tiny_model_dir, tmp_path):
    """Every swap captures the decode step again (the bug this guards: the second capture failed an allocator
    assertion, seen in the services check); after each, the captured step's logits agree with the model in use
    (the load-time check, run again), and swapping back gives back the same answer."""
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_task_rows(8, seed=1))
    train(tiny_config(tiny_model_dir, data, tmp_path / "adapters" / "orpo-gpu", max_steps=4, learning_rate=5e-2))
    runtime = LocalRuntime(Settings.from_env(chat_model=str(tiny_model_dir), adapter_dir=tmp_path / "adapters",
                                             local_engine=engine, load_in_4bit=four_bit))
    assert runtime.decoder is not None and runtime.adapter == "orpo-gpu"
    entry, prompt = runtime.active_adapter, "### Response:\n<think>"
    greedy = GenerationParams(max_new_tokens=16, temperature=0.0)
    answers = []
    for adapter in (entry, None, entry, None):
        if adapter is not entry or answers:
            runtime.activate(adapter)
        answers.append("".join(runtime.stream(prompt, greedy)))
        assert runtime.decoder is not None and runtime.adapter == (adapter.name if adapter else None)
        assert runtime._generator.submit(runtime.decoder.check).result() is None
    assert answers[0] == answers[2] and answers[1] == answers[3]


@pytest.mark.parametrize("with_adapter", [False, True])
def test_fast_decode_logits_match_the_eager_forward_on_the_1_5b_shape(with_adapter):
    """Teacher-forced: the logits of every captured decode step against one eager forward over the same tokens
    (with an adapter: PEFT computing the LoRA layers apart, against its product merged into bf16 weights).
    Random weights give near-flat logits, so the tokens are compared through their logits, not greedily."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.adapter_merge import MergedAdapter
    from engine.decode.start import build_decoder
    from scripts.gpu_generation_bench import SHAPES

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES["1.5b"])).to(torch.bfloat16).eval()
    answering, merged = contextlib.nullcontext, None
    if with_adapter:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                 init_lora_weights=False)).eval()
        merged = MergedAdapter()
        merged.merge(model, "default")
        answering = model.disable_adapter
    decoder = build_decoder(model, 1024, set(), answering)  # captured, overlapping launches where faster
    prompt = torch.randint(0, 150000, (1, 300), device="cuda")
    fast_logits, tokens = [], prompt
    with answering():
        decoder.prefill(prompt)
        for _ in range(8):
            decoder.token.copy_(decoder.logits.argmax(-1).view(1, 1) if fast_logits else
                                decoder.last_prefill_logits.argmax(-1).view(1, 1))
            tokens = torch.cat([tokens, decoder.token], 1)
            decoder.run_step(False)
            fast_logits.append(decoder.logits.clone())
    if merged:
        merged.restore(model)
    with torch.no_grad():
        eager = model(input_ids=tokens).logits[0, -8:].float()
        exact = model.float()(input_ids=tokens).logits[0, -8:]  # the same weights in float32: the truth here
    fast = torch.cat(fast_logits)

    def error(logits):
        return float((logits - exact).norm() / exact.norm())

    # Within bf16 tolerance: no further from float32 than twice what the eager bf16 forward itself is.
    assert error(fast) <= 2 * error(eager) + 1e-3, (error(fast), error(eager))


def test_overlapping_launches_decode_exactly_as_launches_one_after_another_on_cuda(tmp_path):
    """The step captured with programmatic dependent launch (the 4-bit GEMVs, attention and norms starting while
    the kernel before them finishes, and waiting for it before they read its output) writes bit for bit the
    logits of the step captured without it, teacher-forced over the same tokens: a kernel reading its input
    before the kernel before it has written it would change them."""
    from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    from engine.decode.start import build_decoder
    from engine.kernels import dependent_launch, gemv_4bit_mma
    from scripts.gpu_generation_bench import SHAPES

    if dependent_launch.why_unsupported(torch.device("cuda")) is not None:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and a Triton that has it")
    torch.manual_seed(0)
    with torch.device("cuda"):
        Qwen2ForCausalLM(Qwen2Config(**{**SHAPES["1.5b"], "num_hidden_layers": 4})).to(torch.bfloat16).save_pretrained(
            tmp_path)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen2ForCausalLM.from_pretrained(tmp_path, quantization_config=nf4, device_map="cuda").eval()
    decoder = build_decoder(model, 1024, set(), contextlib.nullcontext)
    # the step runs our GEMV, attention and norms, the kernels that launch overlapping
    assert any(chosen.func is gemv_4bit_mma.gemv for chosen in decoder.kernels.products.values())
    assert decoder.reads_written_positions_only
    prompt, forced = (torch.randint(0, 150000, (1, n), device="cuda") for n in (300, 8))
    logits = {}
    for overlap in (False, True):
        decoder.capture(overlap=overlap)
        decoder.prefill(prompt)
        steps = []
        for token in forced[0]:
            decoder.token.fill_(token)
            decoder.run_step(False)
            steps.append(decoder.logits.clone())
        logits[overlap] = torch.cat(steps)
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("out_features, in_features", [(64, 1024), (2048, 1536), (5120, 13824), (48, 5120 + 192)])
def test_the_tensor_core_gemv_multiplies_as_bitsandbytes_on_cuda(out_features, in_features):
    """Every tiling, with a bias and without, against the same nf4 weights in float64: no further from it than
    bitsandbytes' own product (both round to bf16); inputs whose blocks do not fill a warp's last round, or (83
    blocks) the last pair of blocks that a thread of the wide-load kernel reads, too."""
    import bitsandbytes as bnb

    from engine.kernels import gemv_4bit_mma
    from engine.kernels.gemv_4bit import Nf4Weight

    torch.manual_seed(out_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02,
                                     requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.cuda()
    layer.bias.data = torch.randn(out_features, device="cuda").to(torch.bfloat16)
    x = torch.randn(1, 1, in_features, dtype=torch.bfloat16, device="cuda")
    weight = Nf4Weight.from_bnb(layer)
    assert gemv_4bit_mma.why_unsupported(weight, x.device) is None
    truth = x.double().view(-1) @ weight.dequantize(torch.float64).T
    with torch.no_grad():
        own = layer(x).double().view(-1)

    def error(y, with_bias):
        expected = truth + layer.bias.double() if with_bias else truth
        return float((y.double().view(-1) - expected).norm() / expected.norm())

    for config in gemv_4bit_mma.CANDIDATES:
        got = gemv_4bit_mma.gemv(x, weight, layer.bias, config)
        assert got.shape == (1, 1, out_features)
        assert error(got, True) <= 2 * error(own, True) + 1e-4, (config, error(got, True), error(own, True))
        assert error(gemv_4bit_mma.gemv(x, weight, None, config), False) <= 2 * error(own, True) + 1e-4


def test_every_attention_tiling_attends_as_softmax_attention_does_on_cuda():
    """bf16 on the GPU, the 14B model's heads (40 query heads on 8 key heads, 128 dims) at a retrieval answer's
    position: each tiling the fast path may choose (rotary embedding and the cache write included) against the
    eager rotary and float64 softmax attention, within bf16 rounding; the new key written as the fused rotary
    kernel writes it (within a bf16 step: the two may contract their float32 products differently), the value
    copied, nothing else touched."""
    import math

    from engine.kernels.decode_attention import TILINGS, DecodeAttention
    from engine.kernels.rotary_store import rotate_and_store
    from tests.test_decode_attention import reference

    torch.manual_seed(0)
    heads, kv_heads, head_dim, max_len, position = 40, 8, 128, 8192, 3701
    with torch.device("cuda"):
        q, k, v = (torch.randn(n * head_dim, dtype=torch.bfloat16) for n in (heads, kv_heads, kv_heads))
        angles = torch.arange(max_len)[:, None] * torch.rand(head_dim // 2).repeat(2)[None]
        cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
        k_cache, v_cache = (torch.randn(1, kv_heads, max_len, head_dim, dtype=torch.bfloat16) for _ in range(2))
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    rotated = rotate_and_store(q, k, v, cos, sin, expected_k_cache, expected_v_cache, torch.tensor([position]).cuda())
    expected = reference(rotated.cpu(), expected_k_cache.cpu(), expected_v_cache.cpu(), position)
    for tiling in TILINGS:
        kernels = DecodeAttention(heads, kv_heads, max_len, head_dim, 1 / math.sqrt(head_dim), q.device, tiling)
        got = kernels(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([position], device="cuda")).cpu()
        assert float((got.double() - expected).norm() / expected.norm()) < 1e-2, tiling
        assert torch.equal(v_cache, expected_v_cache), tiling
        new_key, expected_key = k_cache[0, :, position].double(), expected_k_cache[0, :, position].double()
        assert bool(((new_key - expected_key).abs() <= 2**-7 * expected_key.abs()).all()), tiling
        k_cache[0, :, position] = expected_k_cache[0, :, position]
        assert torch.equal(k_cache, expected_k_cache), tiling


def test_the_residual_norm_program_rounds_as_the_formula_does_on_cuda():
    """bf16 on the GPU at the 14B width: the sum exactly the formula's; the normed row within two bf16 rounding
    steps of the formula's (the two differ only in the order the squares are summed and in the rsqrt, which can
    flip the rounding of the normalised value, then multiplied by a weight up to 1.5 and rounded again), and no
    further from the float64 norm than the formula is."""
    from engine.kernels.residual_norm import add_rms_norm as fused
    from engine.kernels.residual_norm import add_rms_norm_native as eager

    torch.manual_seed(0)
    with torch.device("cuda"):
        x, delta = torch.randn(2, 1, 5120, dtype=torch.bfloat16) * 4, torch.randn(2, 1, 5120, dtype=torch.bfloat16)
        weight = (torch.rand(5120) + 0.5).to(torch.bfloat16)
    expected_total, expected = eager(x, delta, weight, 1e-6)
    for warps in (4, 8, 16):
        total, normed = fused(x, delta, weight, 1e-6, num_warps=warps)
        assert torch.equal(total, expected_total)
        step = torch.exp2(torch.floor(torch.log2(expected.double().abs().clamp_min(1e-30))) - 7)
        assert bool(((normed.double() - expected.double()).abs() <= 2 * step).all()), warps
        truth = eager(x.double(), delta.double(), weight.double(), 1e-6)[1]
        assert (normed.double() - truth).norm() <= 1.01 * (expected.double() - truth).norm(), warps


def test_the_fused_rotary_kernel_rounds_once_on_cuda():
    """bf16 on the GPU (Triton's interpreter on the CPU computes bf16 wrongly): each value within half a bf16
    rounding step of the exact rotation (the eager formula rounds three times), the value copied exactly."""
    from engine.kernels.rotary_store import rotate_and_store as fused
    from engine.kernels.rotary_store import rotate_and_store_native as eager

    torch.manual_seed(0)
    heads, kv_heads, head_dim, max_len = 40, 8, 128, 64
    with torch.device("cuda"):
        qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16) * 10
        cos, sin = torch.randn(max_len, head_dim, dtype=torch.bfloat16), torch.randn(max_len, head_dim,
                                                                                    dtype=torch.bfloat16)
        caches = torch.randn(2, 1, kv_heads, max_len, head_dim, dtype=torch.bfloat16)
        position = torch.tensor([33])
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    exact_caches = caches.double()
    exact = eager(q.double(), k.double(), v.double(), cos.double(), sin.double(), *exact_caches, position)
    got = fused(q, k, v, cos, sin, *caches, position)

    def within_half_a_step(value: torch.Tensor, truth: torch.Tensor, x: torch.Tensor) -> bool:
        step = torch.exp2(torch.floor(torch.log2(truth.abs().clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
        x, c, s, half = x.view(-1, head_dim).double().abs(), cos[33].double().abs(), sin[33].double().abs(), head_dim // 2
        terms = torch.cat([x[:, :half] * c[:half] + x[:, half:] * s[:half],  # float32's own rounding: of these
                           x[:, half:] * c[half:] + x[:, :half] * s[half:]], dim=-1)
        return bool(((value.double() - truth).abs() <= 0.5 * step + 2**-22 * terms).all())

    assert within_half_a_step(got, exact, q)
    assert within_half_a_step(caches[0, 0, :, 33], exact_caches[0, 0, :, 33], k)
    assert torch.equal(caches[1, 0, :, 33], v.view(kv_heads, head_dim))
    untouched = torch.ones(max_len, dtype=torch.bool)
    untouched[33] = False
    assert torch.equal(caches[:, :, :, untouched].double(), exact_caches[:, :, :, untouched])


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_backend_trains_the_tiny_model_in_4_bits_with_the_recipes_optimizer(backend, tiny_model_dir, tmp_path):
    """Last in this module: run before the stream tests, it made their shared fixture (the tiny model trained on
    the CPU with transformers' Qwen2) fail to set up on the H200 (2026-11-30); Unsloth patches transformers'
    Qwen2 classes for the rest of the process when it loads a model, which is the likely cause."""
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_task_rows(16, seed=0))
    config = tiny_config(tiny_model_dir, data, tmp_path / backend, backend=backend, load_in_4bit=True,
                         optim="adamw_8bit", precision="auto", gradient_checkpointing="unsloth", max_steps=3)
    result = train(config)
    info = read_training_info(result.output_dir)
    assert (result.backend, info.backend, result.global_step) == (backend, backend, 3)
    assert (result.output_dir / "adapter_model.safetensors").exists()
