"""Shared fixtures of the finetune tests: the tiny model (built once per session) and toy preference data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from finetune.config import TrainConfig

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from finetune.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a tokenizer of its corpus's words, trained for a few hundred steps on that corpus (a
    frozen copy of the README, tests/data/tiny-model-corpus.md, so that editing the README changes no test).

    Its logits are far from flat, so two numerically different decoding paths pick the same tokens, as they do
    with a real model (random weights tie within rounding, and greedy paths part after a few tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.tiny_model import build_tiny_model, build_tokenizer

    text = (Path(__file__).resolve().parent / "data" / "tiny-model-corpus.md").read_text(encoding="utf-8")
    text = text.replace("<|endoftext|>", "")  # spelled as a special token by the saved tokenizer
    folder = build_tiny_model(tmp_path_factory.mktemp("trained-tiny-model"),
                              tokenizer=build_tokenizer(corpus=text.splitlines()))
    ids = torch.tensor(AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False).input_ids)
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(ids) - 49, (4,), generator=generator)
        batch = torch.stack([ids[s:s + 48] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def seed_row(i: int, **changes) -> dict:
    row = {"instruction": f"What is {i} plus one?", "input": f"Count up from {i}.",
           "output(CHOSEN)": f"{i + 1}", "reasoning(CHOSEN)": f"{i} and one make {i + 1}",
           "output(REJECTED)": f"{i + 2}", "reasoning(REJECTED)": f"{i} and one make {i + 2}",
           "question": "unused", "syslang": "en", "__index_level_0__": i}
    row.update(changes)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def repeat_task_rows(n: int, seed: int) -> list[dict]:
    """The toy preference task: chosen answers state the result; rejected ones repeat the reasoning first."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        reasoning = f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} makes {a + b}"
        rows.append({"instruction": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", "input": "",
                     "chosen": f"<think>{reasoning}</think>{a + b}",
                     "rejected": f"<think>{reasoning}</think>{reasoning}, so {a + b}"})
    return rows


def tiny_config(model_dir: Path, data: Path, output_dir: Path, **changes) -> TrainConfig:
    values = dict(model_name=str(model_dir), data=str(data), output_dir=str(output_dir), backend="hf",
                  load_in_4bit=False, max_length=256, max_prompt_length=128, gradient_checkpointing="false",
                  lora_r=8, lora_alpha=16, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                  learning_rate=2e-3, optim="adamw_torch", precision="fp32", max_steps=4, save_steps=2,
                  logging_steps=1)
    values.update(changes)
    return TrainConfig(**values)
