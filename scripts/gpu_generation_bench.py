"""The app's generation path on a GPU: time to first token on a retrieval-sized prompt, and decode speed.

Random weights of the real shapes serve (speed does not depend on the values). On the GPU machine:

    python scripts/gpu_generation_bench.py build --shape 1.5b --out /tmp/r1-1.5b
    python scripts/gpu_generation_bench.py measure --model /tmp/r1-1.5b --engine transformers --bf16

`measure` goes through the runtime's `stream` and `assistant.prompting.answer_prompt`, exactly what a chat
turn runs, and prints one JSON line (`--fast-decode on|off` picks the path, as FAST_DECODE does). Each line
carries the bounds measured in the same process: decode tokens/s at the copy bandwidth of the card (the
weights read once per token, the embedding table excepted; and the same with the keys and values a token reads,
at the answer's mean position) and prefill seconds at the rate of a large bf16
matrix product. `reference` times the stock compiled loop (transformers' StaticCache, one decode step under
`torch.compile(mode="reduce-overhead", fullgraph=True)`) on the same prompt length, for comparison. `--engine openai` measures `OpenAIRuntime` against `transformers serve`
started with the same model (the server needs `transformers[serving]`: fastapi, uvicorn, openai). Run each
engine in its own process: Unsloth patches transformers when it is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger(__name__)

# DeepSeek-R1-Distill-Qwen configurations (config.json of the released models).
SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072,
                 tie_word_embeddings=False, rms_norm_eps=1e-6),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=131072,
                tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def build(shape: str, out: Path) -> None:
    """Random bf16 weights of the shape, built on the GPU, with the project's tiny tokenizer beside them.

    The output layer keeps rows only for tokens that decode to whole characters on their own (no special tokens,
    no ids past the tokenizer's 646, no partial UTF-8 bytes); the rest are zeroed. Greedy decoding then writes
    text token after token up to max tokens, as a real model does: a server streams text only, and random weights
    would otherwise pick ids that decode to nothing, so its first text would come late and time to first token
    would measure the weights rather than the path."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from finetune.tiny_model import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(out.parent / (out.name + "-tokenizer")))
    config = Qwen2Config(**SHAPES[shape], dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    silent = torch.ones(config.vocab_size, dtype=torch.bool)
    silent[whole_character_ids(tokenizer)] = False
    with torch.no_grad():
        model.lm_head.weight[silent.to(model.lm_head.weight.device)] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def whole_character_ids(tokenizer) -> list[int]:
    special = set(tokenizer.all_special_ids)
    texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special}
    return [i for i, text in texts.items() if text and "\ufffd" not in text]


def retrieval_prompt(runtime, tokenizer, target_tokens: int) -> str:
    from assistant.prompting import answer_prompt
    from knowledge import Hit

    sentence = "The maintenance log of pump station {n} records a pressure of {n} kPa at the inlet. "
    hits, n = [], 0
    while True:
        text = "".join(sentence.format(n=n + i) for i in range(8))
        hits.append(Hit(f"/docs/log-{n}.txt", None, f"c{n}", 1.0, text))
        n += 8
        prompt = answer_prompt([{"role": "user", "content": "What pressure did station 12 record?"}], hits,
                               runtime.prompt_format, runtime.render_chat)
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) >= target_tokens:
            return prompt


@contextlib.contextmanager
def transformers_serve(model: str, four_bit: bool) -> Iterator[str]:
    """`transformers serve` with the model on a loopback port, until the block ends; yields its /v1 URL."""
    import urllib.request

    port = 8765
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--host", "127.0.0.1",
               "--port", str(port)] + (["--quantization", "bnb-4bit"] if four_bit else [])
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("transformers serve did not start") from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=60)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read plus write), the best a decode step can read at."""
    import torch

    source = torch.empty(2**30, dtype=torch.int32, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 10 * 2 * source.nbytes / (time.perf_counter() - start)


def matmul_rate() -> float:
    """bf16 FLOP/s of a large matrix product on this card: the prefill's compute bound."""
    import torch

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start)


def prefill_flops(model, prompt_tokens: int) -> int:
    """The matrix products of a prompt's prefill: every layer's weights once per position, causal attention, and
    the output layer for the last position. A 4-bit weight counts its unpacked shape (bitsandbytes packs two
    weights a byte and keeps the shape in ``quant_state``), so both formats owe the same FLOPs."""

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    weights = 0
    for name, parameter in base.named_parameters():
        if "layers." in name and parameter.dim() == 2:
            state = getattr(parameter, "quant_state", None)
            weights += state.shape.numel() if state is not None else parameter.numel()
    layers, hidden = config.num_hidden_layers, config.hidden_size
    attention = 2 * layers * hidden * prompt_tokens**2  # causal QK^T and PV: half of 2 * 2 * hidden * n^2
    return 2 * weights * prompt_tokens + attention + 2 * hidden * config.vocab_size


def bounds(model, prompt_tokens: int, new_tokens: int) -> dict:
    """What one token must read, and what the prompt must compute, and the best times for them on this card.

    Two decode bounds: the weights alone (``bound_tok_s``, as every row before 2026-11-30 reported it), and the
    weights plus the bf16 keys and values of the positions before the token, at the answer's mean position
    (``bound_with_kv_tok_s``: issue 18's definition of the bound)."""

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    read = model.get_memory_footprint() - embedding.numel() * embedding.element_size()
    config = base.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = layers * 2 * config.num_key_value_heads * head_dim * 2 * (prompt_tokens + new_tokens / 2)
    flops = prefill_flops(model, prompt_tokens)
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    return {"read_gb_per_token": read / 1e9, "kv_gb_per_token": kv / 1e9, "copy_tb_s": bandwidth / 1e12,
            "bound_tok_s": bandwidth / read, "bound_with_kv_tok_s": bandwidth / (read + kv),
            "prefill_tflop": flops / 1e12, "matmul_tflop_s": rate / 1e12, "prefill_bound_s": flops / rate}


def with_bounds(row: dict, model) -> dict:
    """``row`` with the card's bounds for its model and prompt, and how near its measured times come to them."""
    row.update(bounds(model, row["prompt_tokens"], row["new_tokens"]))
    row["fraction_of_bound"] = row["decode_tok_s"] / row["bound_tok_s"]
    row["fraction_of_bound_with_kv"] = row["decode_tok_s"] / row["bound_with_kv_tok_s"]
    row["ttft_over_prefill_bound"] = row["ttft_s"] / row["prefill_bound_s"]
    return row


def measure(model: str, engine: str, four_bit: bool, prompt_tokens: int, new_tokens: int, runs: int,
            fast_decode: str = "auto", profile: Path | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from engine.runtime import GenerationParams, LocalRuntime, OpenAIRuntime
    from settings import Settings

    common = dict(chat_model=model, load_in_4bit=four_bit, adapter_dir=Path("/nonexistent"), fast_decode=fast_decode)
    with contextlib.ExitStack() as stack:
        start = time.perf_counter()
        if engine == "openai":
            url = stack.enter_context(transformers_serve(model, four_bit))
            runtime = OpenAIRuntime(Settings.from_env(model_backend="openai", openai_base_url=url, **common))
        else:
            runtime = LocalRuntime(Settings.from_env(local_engine=engine, **common))
        load_s = time.perf_counter() - start
        prompt = retrieval_prompt(runtime, AutoTokenizer.from_pretrained(model), prompt_tokens)
        greedy = GenerationParams(max_new_tokens=new_tokens, temperature=0.0)
        list(runtime.stream(prompt, GenerationParams(max_new_tokens=4, temperature=0.0)))  # warm-up
        ttft, decode = [], []
        cuda = torch.cuda.is_available()
        for _ in range(runs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            first = None
            for _piece in runtime.stream(prompt, greedy):
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            generated = runtime.last_usage["completion_tokens"]
            ttft.append(first - start)
            decode.append((generated - 1) / (end - first))
        if profile is not None and cuda:
            kernel_profile(lambda: list(runtime.stream(prompt, greedy)), new_tokens, profile)
        if not cuda:
            peak_gib = None
        elif engine == "openai":  # the server is another process: what nvidia-smi sees in use, reserve included
            peak_gib = gpu_memory_used_gib()
        else:
            peak_gib = torch.cuda.max_memory_allocated() / 2**30
        plan = runtime.decode_plan
        fast = plan is not None and plan.path == "fast"
        row = {"model": Path(model).name, "engine": getattr(runtime, "engine", "openai: transformers serve"),
               "path": "fast decode" if fast else "generate", "decode_plan": plan.to_dict() if plan else None,
               "weights": "4-bit" if four_bit else "bf16", "prompt_tokens": runtime.last_usage["prompt_tokens"],
               "new_tokens": generated, "load_s": load_s, "ttft_s": sorted(ttft)[len(ttft) // 2],
               "decode_tok_s": sorted(decode)[len(decode) // 2], "peak_gib": peak_gib,
               "gpu": torch.cuda.get_device_name() if cuda else "cpu"}
        if cuda and engine != "openai":
            with_bounds(row, runtime.model)
        return row


def kernel_profile(answer, new_tokens: int, out: Path) -> None:
    """The GPU kernels of one answer (captured graphs' kernels included) by total time, per decoded token:
    where a token's time goes. Written as a table to ``out``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        answer()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us > 0:
            rows.append((device_us / new_tokens, event.count / new_tokens, event.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"# GPU time per token of one answer of {new_tokens} tokens (prefill included): {total:.1f} us",
             "us/token  calls/token  kernel"]
    lines += [f"{us:9.1f}  {calls:11.2f}  {name[:160]}" for us, calls, name in rows[:60]]
    out.write_text("\n".join(lines) + "\n")
    logger.info("\n".join(lines[:30]))


def reference(model_dir: str, prompt_tokens: int, new_tokens: int, runs: int) -> dict:
    """The stock compiled decode loop, greedy, on random prompt ids: the reference row."""
    import torch
    from transformers import AutoModelForCausalLM, StaticCache

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens + 16)

    def step(token, position):
        return model(input_ids=token, past_key_values=cache, cache_position=position,
                     position_ids=position[None], use_cache=True).logits[:, -1]

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, 600, (1, prompt_tokens), device="cuda")
    ttft, decode = [], []
    with torch.no_grad():
        for run in range(runs + 1):  # the first run compiles
            cache.reset()
            torch.cuda.synchronize()
            began = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt_tokens,
                           device="cuda"), use_cache=True, logits_to_keep=1).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            token.item()
            first = time.perf_counter()
            for i in range(new_tokens - 1):
                torch.compiler.cudagraph_mark_step_begin()
                position = torch.tensor([prompt_tokens + i], device="cuda")
                token = compiled(token, position).clone().argmax(-1, keepdim=True)
                token.item()
            end = time.perf_counter()
            if run == 0:
                warm_up_s = end - start
                continue
            ttft.append(first - began)
            decode.append((new_tokens - 1) / (end - first))
    row = {"model": Path(model_dir).name, "engine": "stock compiled loop (reference)", "path": "reference",
           "weights": "bf16", "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "warm_up_s": warm_up_s,
           "ttft_s": sorted(ttft)[len(ttft) // 2], "decode_tok_s": sorted(decode)[len(decode) // 2],
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "gpu": torch.cuda.get_device_name()}
    return with_bounds(row, model)


def gpu_memory_used_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the decode plan, at load
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build")
    b.add_argument("--shape", choices=sorted(SHAPES), required=True)
    b.add_argument("--out", type=Path, required=True)
    m = commands.add_parser("measure")
    m.add_argument("--model", required=True)
    m.add_argument("--engine", choices=["transformers", "unsloth", "openai"], required=True,
                   help="openai: OpenAIRuntime against `transformers serve` started with the model")
    m.add_argument("--4bit", dest="four_bit", action="store_true")
    m.add_argument("--bf16", dest="four_bit", action="store_false")
    m.add_argument("--prompt-tokens", type=int, default=3000)
    m.add_argument("--new-tokens", type=int, default=256)
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--fast-decode", choices=["auto", "on", "off"], default="auto")
    m.add_argument("--profile", type=Path, help="write the GPU kernels of one more answer, by time, to this file")
    r = commands.add_parser("reference")
    r.add_argument("--model", required=True)
    r.add_argument("--prompt-tokens", type=int, default=3250)
    r.add_argument("--new-tokens", type=int, default=256)
    r.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if args.command == "build":
        build(args.shape, args.out)
    elif args.command == "reference":
        print(json.dumps(reference(args.model, args.prompt_tokens, args.new_tokens, args.runs)), flush=True)
    else:
        if args.engine == "unsloth":
            import unsloth  # noqa: F401 - before transformers, as Unsloth requires
        print(json.dumps(measure(args.model, args.engine, args.four_bit, args.prompt_tokens, args.new_tokens,
                                 args.runs, args.fast_decode, args.profile)), flush=True)


if __name__ == "__main__":
    main()
