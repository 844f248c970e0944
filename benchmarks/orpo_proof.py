"""The proof that ORPO removes the defect it exists for, reproduced from scratch on a CPU.

    python -m benchmarks.orpo_proof --out outputs/orpo-proof        # about 20 minutes on 2 cores (most of it the base model)

The recipe ORPO-trains DeepSeek-R1-Distill so that it stops repeating its <think> reasoning as its answer.
Here a small model gets that defect on purpose and ORPO takes it away, with nothing written by hand:

1. A synthetic task in English and Japanese: look up who keeps a fictional place named in the question, and
   add two small numbers. The training answers repeat their reasoning, as R1-Distill's do in the recipe's
   example, three times in five; the others are short (``--short-share``). Prompts are the app's own
   (``answer_prompt``).
2. A Qwen2-architecture model trained from scratch on that text, prompts included (``train_base``): greedy,
   it repeats.
3. ``python -m assistant pairs generate`` on the training questions, rules ``duplication,correct`` (the
   questions carry their expected answers): eight sampled answers per question, the best and the worst kept as
   a pair when they differ clearly, so a chosen answer is short and right and a rejected one repeats.
4. ``python -m finetune train --config finetune/configs/orpo-proof.yaml``: ORPO with LoRA on those pairs.
5. Optional next rounds (``--rounds``), as an owner would run the loop: ``pairs generate`` again with the
   adapter just trained (``--adapter``), rules ``--next-rules``, and ``train`` continuing that adapter
   (``init_adapter``) on the new pairs.
6. ``python -m assistant eval`` on held-out questions: base against each round's adapter; JSON, table, chart.

What counts: duplication rate down by at least half, think rate not lower, accuracy not lower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = "finetune/configs/orpo-proof.yaml"  # LoRA r 16, alpha 32, batches of 8, 512 tokens

PLACES_EN = ["Port Wren", "Ashcombe Light", "Harrow Mill", "Kestrel Point", "Tarn Bridge", "Fenwick Hall",
             "Gullhaven", "Orrin Keep", "Brackwater", "Sable Ferry", "Moss Tor", "Calder Locks", "Wyvern Pier",
             "Ember Cove", "Linton Spire", "Rookery Dam", "Quill Harbour", "Thistle Fort", "Vale Station",
             "Marrow Pass"]
NAMES_EN = ["Ada Lovelock", "Bram Oakes", "Cora Finch", "Dmitri Vale", "Edda Stone", "Felix Marr", "Greta Holm",
            "Hugo Pike", "Ines Crane", "Jonah Reed", "Kira Moss", "Lars Penn", "Mira Dunn", "Nils Ward",
            "Odile Frost", "Piet Hale", "Rosa Lind", "Silas Grey", "Tova Birch", "Ugo Fenn"]
PLACES_JA = ["霧ヶ崎灯台", "星見が丘天文台", "湊旧駅", "月波酒蔵", "湯森旅館", "鷹森図書館", "海蛍燈籠", "桐生水門",
             "白浜砦", "青葉橋", "風見港", "柳川水車", "雪村峠", "朝霧神社", "紅葉渡し", "鳴沢ダム", "松風塔",
             "藤沢関所", "千鳥岬", "鶴見堰"]
NAMES_JA = ["佐藤花子", "鈴木一郎", "高橋美咲", "田中健", "伊藤由美", "渡辺翔", "山本彩", "中村大輔", "小林愛",
            "加藤誠", "吉田舞", "山田浩", "佐々木遥", "山口拓", "松本葵", "井上蓮", "木村結衣", "林大和", "清水凛",
            "森悠人"]


def task_items(seed: int) -> list[dict]:
    """Every question of the task: {"question", "reasoning", "short", "expected"}."""
    rng = random.Random(seed)
    items = []
    for place in PLACES_EN:
        for name in rng.sample(NAMES_EN, 8):
            items.append({"question": f"The keeper of {place} is {name}. Who keeps {place}?",
                          "reasoning": f"The note names {name} as the keeper of {place}.",
                          "short": f"{name}.", "expected": name})
    for place in PLACES_JA:
        for name in rng.sample(NAMES_JA, 8):
            items.append({"question": f"{place}の管理人は{name}です。{place}を管理しているのは誰ですか？",
                          "reasoning": f"メモによると{place}の管理人は{name}です。",
                          "short": f"{name}です。", "expected": name})
    for a in range(10):
        for b in range(10):
            items.append({"question": f"What is {a} plus {b}?", "reasoning": f"Counting on from {a} by {b} reaches "
                          f"{a + b}.", "short": f"{a + b}.", "expected": str(a + b)})
            items.append({"question": f"{a}たす{b}はいくつですか？", "reasoning": f"{a}から{b}つ数えると{a + b}になります。",
                          "short": f"{a + b}です。", "expected": str(a + b)})
    rng.shuffle(items)
    return items


def prompt_for(question: str) -> str:
    """The app's own prompt for a question asked without retrieval."""
    from assistant.prompting import answer_prompt

    return answer_prompt([{"role": "user", "content": question}], None, "alpaca")


def training_text(item: dict, rng: random.Random, short_share: float) -> tuple[str, str]:
    """(prompt, completion): the answer repeats the reasoning (the defect) or, at ``short_share``, is short."""
    answer = item["short"] if rng.random() < short_share else item["reasoning"]
    return prompt_for(item["question"]), f"{item['reasoning']}</think>{answer}"


def train_base(out: Path, items: list[dict], steps: int, seed: int, hidden: int, layers: int,
               short_share: float) -> Path:
    """Tokenizer and model from scratch, trained as a causal LM on the whole text, prompts included.

    Prompts are learned too, as a pretrained model has learned text like them: ORPO's NLL term (TRL's) covers
    the chosen answer's prompt, and on a base that never modelled prompts (14 nats a token) that term spends the
    adapter on learning the prompt, which broke answers whatever the odds-ratio weight (docs/orpo-proof.md).
    """
    import torch

    from finetune.prompts import prompt_token_ids
    from finetune.tiny_model import build_tiny_model, build_tokenizer

    rng = random.Random(seed)
    texts = [training_text(item, rng, short_share) for item in items for _ in range(4)]
    tokenizer = build_tokenizer(vocab_size=2048, corpus=[p + c for p, c in texts[:2000]])
    model_dir = build_tiny_model(out / "base-model", hidden_size=hidden, num_layers=layers, seed=seed,
                                 tokenizer=tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Train with the tokenizer as saved, which is what every later step loads: reloaded, it splits numbers
    # into digits where the one built in memory kept " 16" whole.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = []
    for prompt, completion in texts:
        p, c = prompt_token_ids(tokenizer, prompt), tokenizer(completion, add_special_tokens=False)["input_ids"]
        examples.append((p + c + [tokenizer.eos_token_id], len(p)))
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batch, log = 16, []
    model.train()
    started = time.time()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = [examples[rng.randrange(len(examples))] for _ in range(batch)]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        completion = torch.zeros((batch, width), dtype=torch.bool)
        for row, (tokens, prompt_len) in enumerate(chosen):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            completion[row, prompt_len:len(tokens)] = True
        mask = torch.arange(width)[None, :] < torch.tensor([len(tokens) for tokens, _ in chosen])[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets, real = ids[:, 1:], mask[:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        loss = per_token[real].mean()
        answer_loss = per_token[completion[:, 1:]].mean().item()  # logged: what the answers have learned
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "completion_loss": round(answer_loss, 4),
                        "seconds": round(time.time() - started)})
            print(f"base model step {step}: loss {loss.item():.3f}, completions {answer_loss:.3f}", file=sys.stderr,
                  flush=True)
    model.save_pretrained(model_dir)
    (out / "base-training.json").write_text(json.dumps(log, indent=1))
    return model_dir


def run(*args: str, env: dict) -> str:
    print("$ python " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/orpo-proof"))
    parser.add_argument("--base-steps", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--short-share", type=float, default=0.4,
                        help="share of the base's training answers that are short (the rest repeat the reasoning)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--questions", type=int, default=400, help="training questions for pairs generate")
    parser.add_argument("--held-out", type=int, default=120)
    parser.add_argument("--orpo-steps", type=int, default=150)
    parser.add_argument("--orpo-lr", type=float, default=3e-4)
    parser.add_argument("--orpo-beta", type=float, default=0.1, help="weight of ORPO's odds-ratio term")
    parser.add_argument("--samples", type=int, default=8, help="answers per question in pairs generate")
    parser.add_argument("--margin", type=float, default=0.5, help="pairs generate's least score difference")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling for pairs generate")
    parser.add_argument("--rules", default="duplication,correct", help="pairs generate's rules in round 1")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of pairs generate + train")
    parser.add_argument("--next-rules", default="duplication,correct", help="pairs generate's rules after round 1")
    parser.add_argument("--next-steps", type=int, default=150, help="ORPO steps of each round after the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-base", action="store_true",
                        help="use the base model already in --out (to try other pairs or ORPO settings)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # The base model learns the whole task (its facts and sums are knowledge it must keep); the held-out
    # questions are held out from the pairs and from ORPO, so the evaluation sees prompts ORPO never did.
    items = task_items(args.seed)
    held_out, train_items = items[:args.held_out], items[args.held_out:]
    model_dir = args.out / "base-model"
    if not (args.reuse_base and (model_dir / "model.safetensors").exists()):
        model_dir = train_base(args.out, items, args.base_steps, args.seed, args.hidden, args.layers,
                               args.short_share)

    questions = args.out / "questions.jsonl"  # with the expected answers, for the `correct` rule
    questions.write_text("".join(json.dumps({"question": i["question"], "expected": i["expected"]},
                                            ensure_ascii=False) + "\n" for i in train_items[:args.questions]),
                         encoding="utf-8")
    prompts = args.out / "held-out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt_for(i["question"]), "expected": i["expected"]},
                                          ensure_ascii=False) + "\n" for i in held_out), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CHAT_MODEL": str(model_dir),
           "ADAPTER_DIR": str(args.out / "no-adapters"), "KNOWLEDGE_DIR": str(args.out / "knowledge")}
    # Round 1 starts from the base model; each next round makes its pairs with the adapter the last one trained
    # (so they show that adapter's own mistakes) and continues training it (init_adapter).
    adapter, rounds, generated = None, [], []
    for number in range(1, args.rounds + 1):
        pairs = args.out / f"pairs-round{number}.sqlite"
        pairs.unlink(missing_ok=True)
        rules = args.rules if number == 1 else args.next_rules
        generated.append(json.loads(run(
            "-m", "assistant", "pairs", "generate", str(questions), "--out", str(pairs),
            "--samples", str(args.samples), "--temperature", str(args.temperature), "--max-new-tokens", "160",
            "--rules", rules, "--margin", str(args.margin), "--seed", str(args.seed + number),
            "--no-retrieval", "--json", *(["--adapter", str(adapter)] if adapter else []), env=env))["pairs"])
        trained_dir = args.out / f"adapter-round{number}"
        run("-m", "finetune", "train", "--config", TRAIN_CONFIG, f"model_name={model_dir}",
            f"data={pairs}", f"output_dir={trained_dir}", *([f"init_adapter={adapter}"] if adapter else []),
            f"max_steps={args.orpo_steps if number == 1 else args.next_steps}", f"learning_rate={args.orpo_lr}",
            f"beta={args.orpo_beta}", env=env)
        adapter = trained_dir
        rounds.append(trained_dir)
    report = json.loads(run("-m", "assistant", "eval", "--model", str(model_dir),
                            *[a for r in rounds for a in ("--adapter", str(r))], "--prompts", str(prompts),
                            "--max-new-tokens", "160", "--batch-size", "16", "--plot", str(args.out / "eval.png"),
                            "--json", env=env))
    models = report["models"]
    base, trained = models[0], models[-1]  # the base and the last round
    result = {"date": time.strftime("%Y-%m-%d"), "minutes": round((time.time() - started) / 60, 1),
              "held_out_questions": len(held_out),
              "pairs_generated": {"questions": args.questions, "pairs_per_round": generated},
              "base": base, "orpo": trained, "rounds": models[1:],
              "duplication_halved": trained["duplication_rate"] <= base["duplication_rate"] / 2,
              "think_rate_kept": trained["think_rate"] >= base["think_rate"],
              "accuracy_kept": trained["accuracy"] >= base["accuracy"]}
    (args.out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    keys = ("think_rate", "duplication_rate", "duplicating_share", "answer_chars", "accuracy")
    print("| model | " + " | ".join(keys) + " |\n|---" * 1 + "|---" * len(keys) + "|")
    for name, row in [("base", base)] + [(f"round {n}", m) for n, m in enumerate(models[1:], 1)]:
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    print(json.dumps({k: result[k] for k in ("duplication_halved", "think_rate_kept", "accuracy_kept",
                                             "pairs_generated", "minutes")}, ensure_ascii=False))
    return 0 if all(result[k] for k in ("duplication_halved", "think_rate_kept", "accuracy_kept")) else 1


if __name__ == "__main__":
    sys.exit(main())
