"""Decode speed of `generate` by the thread it runs on: why LocalRuntime keeps one generating thread.

    python scripts/gpu_generation_bench.py build --shape 1.5b --out /tmp/r1-1.5b
    python scripts/gpu_thread_bench.py --model /tmp/r1-1.5b [--4bit]

Times greedy decoding of the same retrieval-sized prompt (about 3,000 tokens) with the runtime's streamer
(`TextIteratorStreamer`, read by the calling thread) while `generate` runs: in the calling thread with no
streamer (the reference), in a new thread for each answer (how the runtime ran before), in one long-lived
thread, and through `LocalRuntime.stream` itself. Decode = 128 tokens over the time a 129-token answer takes
beyond a 1-token one, best of --rounds taken round-robin over the variants, after a warm-up of each. Prints
one JSON line a variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--4bit", dest="four_bit", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from gpu_generation_bench import retrieval_prompt
    from transformers import TextIteratorStreamer

    from engine.runtime import GenerationParams, LocalRuntime
    from finetune.prompts import prompt_token_ids
    from settings import Settings

    runtime = LocalRuntime(Settings.from_env(chat_model=args.model, local_engine="transformers",
                                             load_in_4bit=args.four_bit, adapter_dir=Path("/nonexistent")))
    tokenizer = runtime.tokenizer
    prompt = retrieval_prompt(runtime, tokenizer, 3000)
    input_ids = torch.tensor([prompt_token_ids(tokenizer, prompt)], device=runtime.device)
    common = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    long_lived = ThreadPoolExecutor(max_workers=1)
    cuda = torch.cuda.is_available()

    def streamed(tokens: int, start) -> None:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False, timeout=600)
        finish = start(lambda: runtime.model.generate(**common, max_new_tokens=tokens, min_new_tokens=tokens,
                                                      streamer=streamer))
        for _ in streamer:
            pass
        finish()

    def new_thread(job):
        thread = threading.Thread(target=job)
        thread.start()
        return thread.join

    def one_thread(job):
        return long_lived.submit(job).result

    variants = {
        "calling thread, no streamer": lambda n: runtime.model.generate(**common, max_new_tokens=n, min_new_tokens=n),
        "new thread per answer, streamed": lambda n: streamed(n, new_thread),
        "one long-lived thread, streamed": lambda n: streamed(n, one_thread),
        "LocalRuntime.stream": lambda n: list(runtime.stream(prompt, GenerationParams(max_new_tokens=n,
                                                                                      temperature=0.0))),
    }
    def timed(answer, tokens: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        answer(tokens)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for answer in variants.values():
        answer(4)
    seconds: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):  # round-robin, so a drift of the machine falls on every variant alike
        for name, answer in variants.items():
            for tokens in (1, 129):
                seconds.setdefault((name, tokens), []).append(timed(answer, tokens))
    for name in variants:
        one, full = min(seconds[name, 1]), min(seconds[name, 129])
        print(json.dumps({"model": Path(args.model).name, "weights": "4-bit" if args.four_bit else "bf16",
                          "variant": name, "one_token_s": round(one, 4), "decode_tok_s": round(128 / (full - one), 1),
                          "gpu": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)

if __name__ == "__main__":
    main()
