"""The learning loop's model work on a GPU: `pairs generate` and `assistant eval`, answers per second.

Random weights of the DeepSeek-R1-Distill-Qwen-1.5B shape (speed does not depend on the values), a random LoRA
adapter on it, and the project's own code paths: ``assistant.learning.pair_generation.generate_pairs`` through the app's
``Assistant`` (so the engine is the app's, Unsloth on CUDA when installed) and ``assistant.learning.evaluation.evaluate``
(the base and the adapter side by side). On the GPU machine:

    python scripts/gpu_loop_bench.py --engine unsloth --questions 32 --samples 4 --max-new-tokens 256

prints one JSON line per stage. Each engine in its own process: Unsloth patches transformers when imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["What does the {n}th audit say about the pumps?", "Who keeps lighthouse number {n}?",
             "第{n}号の報告書は何と言っていますか？", "How much did project {n} cost, and why?"]


def random_adapter(model_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    from finetune.adapters import INFO_NAME

    (out / INFO_NAME).write_text(json.dumps({"base_model": str(model_dir), "prompt_format": "alpaca"}))
    return out


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("unsloth", "transformers"), default="unsloth")
    parser.add_argument("--shape", default="1.5b")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/loop-bench"))
    args = parser.parse_args()
    if args.engine == "unsloth":
        import unsloth  # noqa: F401 - before transformers

    import torch

    from scripts.gpu_generation_bench import build

    model_dir = args.work / f"r1-{args.shape}"
    if args.shape == "tiny":  # a dry run of the script on CPU
        from finetune.tiny_model import build_tiny_model

        build_tiny_model(model_dir)
    elif not (model_dir / "config.json").exists():
        build(args.shape, model_dir)
    adapter = random_adapter(model_dir, args.work / "adapter")
    questions = [QUESTIONS[i % len(QUESTIONS)].format(n=i + 1) for i in range(args.questions)]
    cuda = torch.cuda.is_available()
    env = {"engine": args.engine, "shape": args.shape, "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
           "max_new_tokens": args.max_new_tokens}

    from assistant.chat import Assistant
    from assistant.learning.pair_generation import PairGenerationConfig, generate_pairs
    from settings import Settings

    settings = Settings.from_env(chat_model=str(model_dir), adapter_dir=args.work / "no-adapters",
                                 local_engine=args.engine, load_in_4bit=False, knowledge_dir=args.work / "k")
    assistant = Assistant(settings)
    assistant.runtime  # noqa: B018 - load before timing
    config = PairGenerationConfig(samples=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                  rules=("duplication", "think", "length"), max_answer_chars=400, margin=0.5,
                                  retrieval=False)
    out = args.work / "pairs.sqlite"
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    report = generate_pairs(assistant, questions, out, config)
    seconds = time.perf_counter() - started
    answers = args.questions * args.samples
    print(json.dumps({"stage": "pairs generate", **env, "questions": args.questions, "samples": args.samples,
                      "answers": answers, "seconds": round(seconds, 1), "answers_per_s": round(answers / seconds, 2),
                      "pairs": report.pairs, "peak_gib": peak_gib()}),
          flush=True)
    del assistant
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    from assistant.learning.evaluation import evaluate, load_base
    from engine.batch_generate import GenerationConfig
    from finetune.evaluation import EvalPrompt
    from finetune.prompts import THINK_OPEN, alpaca_prompt

    prompts = [EvalPrompt(alpaca_prompt(q, "") + THINK_OPEN) for q in questions]
    loaded = load_base(str(model_dir), args.engine)
    started = time.perf_counter()
    reports = evaluate(str(model_dir), [adapter], prompts, None,
                       GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=16), loaded=loaded)
    seconds = time.perf_counter() - started
    answers = 2 * len(prompts)
    print(json.dumps({"stage": "eval", **env, "models": [r.name for r in reports], "answers": answers,
                      "seconds": round(seconds, 1), "answers_per_s": round(answers / seconds, 2),
                      "think_rate": [r.summary["think_rate"] for r in reports],
                      "peak_gib": peak_gib()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
