"""The fast decode path (engine/decode/) on CPU: the same loop and static cache as on a GPU, without
graph capture, checked token for token against transformers' generate on a tiny model trained on real text."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from engine.runtime import GenerationParams, LocalRuntime
from settings import Settings
from tests.assistant_fixtures import save_adapter

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["The knowledge store is", "## Settings\n\nThe app", "Adapters are trained with"]
GREEDY = GenerationParams(max_new_tokens=48, temperature=0.0)


def runtime(model_dir: Path, fast_decode: str, adapter_dir: Path = Path("/nonexistent")) -> LocalRuntime:
    return LocalRuntime(Settings.from_env(environ={}, chat_model=str(model_dir), adapter_dir=adapter_dir,
                                          fast_decode=fast_decode, context_length=512))


@pytest.fixture(scope="module")
def adapter_dir(trained_tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fast-adapters")
    save_adapter(trained_tiny_model_dir, folder / "all-layers", str(trained_tiny_model_dir),
                 target_modules=ALL_PROJECTIONS)
    return folder


def answers(rt: LocalRuntime, params: GenerationParams = GREEDY) -> list[tuple[str, int]]:
    return [("".join(rt.stream(p, params)), rt.last_usage["completion_tokens"]) for p in PROMPTS]


def test_fast_decode_writes_what_generate_writes_greedily(trained_tiny_model_dir):
    fast = runtime(trained_tiny_model_dir, "on")
    assert fast.decoder is not None and fast.decode_plan.path == "fast" and fast.decode_plan.fallback_reason is None
    assert fast.decode_plan.kernels["attention"] == "the written positions (Triton)"
    standard = runtime(trained_tiny_model_dir, "off")
    assert standard.decoder is None and standard.decode_plan.path == "standard"
    assert "FAST_DECODE=off" in standard.decode_plan.fallback_reason
    written = answers(fast)
    assert int(fast.decoder.position) > 0  # the answers came from the fast decoder's cache
    assert fast.decoder.reads_written_positions_only  # through the Triton attention, interpreted here
    assert written == answers(standard)
    assert all(text.strip() for text, _ in written)


def test_a_decode_step_that_differs_from_the_model_is_refused_at_start(trained_tiny_model_dir):
    import contextlib

    from transformers import AutoModelForCausalLM

    from engine.decode.start import build_decoder

    model = AutoModelForCausalLM.from_pretrained(trained_tiny_model_dir).eval()
    decoder = build_decoder(model, 64, {0}, contextlib.nullcontext)
    assert decoder.check() is None
    cache = decoder.cache
    cache.cos, cache.sin = torch.ones_like(cache.cos), torch.zeros_like(cache.sin)  # RoPE left out
    assert "from the model's forward" in decoder.check()


def test_fast_decode_answers_with_the_adapter_merged_and_swaps_it_exactly(trained_tiny_model_dir, adapter_dir):
    fast = runtime(trained_tiny_model_dir, "on", adapter_dir)
    standard = runtime(trained_tiny_model_dir, "off", adapter_dir)
    assert fast.adapter == standard.adapter == "all-layers"
    with_adapter = answers(fast)
    assert with_adapter == answers(standard)
    entry = fast.active_adapter
    fast.activate(None)
    standard.activate(None)
    assert answers(fast) == answers(standard) != with_adapter
    base = runtime(trained_tiny_model_dir, "off")
    fast_weights = {name.replace(".base_layer", ""): weight for name, weight in
                    fast.model.get_base_model().state_dict().items() if "lora_" not in name}
    for name, weight in base.model.state_dict().items():  # the base weights are back, bit for bit
        assert torch.equal(fast_weights[name], weight), name
    fast.activate(entry)
    assert answers(fast) == with_adapter


def test_fast_decode_stops_at_max_new_tokens_and_when_asked(trained_tiny_model_dir):
    fast = runtime(trained_tiny_model_dir, "on")
    "".join(fast.stream(PROMPTS[0], GenerationParams(max_new_tokens=5, temperature=0.0)))
    assert fast.last_usage["completion_tokens"] == 5
    stop = threading.Event()
    pieces = []
    for piece in fast.stream(PROMPTS[0], GenerationParams(max_new_tokens=200, temperature=0.0), stop):
        pieces.append(piece)
        stop.set()
    assert fast.last_usage["completion_tokens"] < 10


def test_sampling_draws_from_the_top_p_mass_only():
    from engine.kernels.sampling import choose_sampled

    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0]])  # about 0.84, 0.11, 0.04, 0.02
    narrow = {int(choose_sampled(logits, torch.tensor([1.0]), torch.tensor([0.5]))) for _ in range(200)}
    wide = {int(choose_sampled(logits, torch.tensor([1.0]), torch.tensor([0.9]))) for _ in range(200)}
    assert (narrow, wide) == ({0}, {0, 1})


def test_sampled_answers_stream_and_vary(trained_tiny_model_dir):
    fast = runtime(trained_tiny_model_dir, "on")
    hot = GenerationParams(max_new_tokens=24, temperature=1.5, top_p=1.0)
    assert len({"".join(fast.stream(PROMPTS[0], hot)) for _ in range(4)}) > 1


def test_an_unsupported_architecture_takes_the_standard_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.decode.start import start_fast_decoder

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    decoder, plan = start_fast_decoder(model, 64, {0}, lambda: torch.no_grad())
    assert decoder is None and plan.path == "standard"
    assert "the gpt2 architecture is not one of qwen2, llama" in plan.fallback_reason
    assert plan.to_dict()["path"] == "standard"


def test_a_swap_whose_capture_fails_falls_back_to_generate_with_the_new_adapter(trained_tiny_model_dir, adapter_dir):
    fast = runtime(trained_tiny_model_dir, "on", adapter_dir)
    standard = runtime(trained_tiny_model_dir, "off", adapter_dir)
    entry = fast.active_adapter

    def failing_capture() -> None:  # as a capture on a GPU can fail (an allocator assertion was seen)
        raise RuntimeError("capture failed")

    fast.decoder.capture = failing_capture
    fast.activate(None)
    standard.activate(None)
    assert fast.decoder is None and fast.decode_plan.path == "standard"
    assert "the new adapter failed: capture failed" in fast.decode_plan.fallback_reason
    assert answers(fast) == answers(standard)
    fast.activate(entry)
    standard.activate(entry)
    assert answers(fast) == answers(standard)
