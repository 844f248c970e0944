"""`assistant eval`: the habits ORPO should change, measured on completions and on models side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.learning.evaluation import evaluate
from engine.batch_generate import GenerationConfig
from finetune.evaluation import load_prompts, markdown_table, plot
from finetune.metrics import duplication, score_completion, summarize
from finetune.prompts import THINK_OPEN, alpaca_prompt

ROOT = Path(__file__).resolve().parents[1]
EN_REASONING = "Two apples and three apples make five apples, so the basket holds five apples in all."
JA_REASONING = "りんごが二つとみかんが三つあるので、果物は全部で五つになります。念のため数え直しました。"
PROMPT = alpaca_prompt("How many apples?", "") + THINK_OPEN


@pytest.mark.parametrize("reasoning, unrelated", [
    (EN_REASONING, "The ferry to Corran leaves at noon from the northern pier."),
    (JA_REASONING, "東京の気象庁は十二日に大雨警報を発表した。"),
])
def test_duplication_is_near_one_for_a_copy_and_near_zero_for_an_unrelated_answer(reasoning, unrelated):
    assert duplication(reasoning, reasoning) == 1.0
    assert duplication(reasoning, "  " + reasoning.upper() + " ") == 1.0  # case and spaces do not hide a copy
    assert duplication(reasoning, reasoning[: len(reasoning) // 2] + unrelated) == pytest.approx(0.5, abs=0.2)
    assert duplication(reasoning, unrelated) < 0.05
    assert duplication(reasoning, "5") == 0.0  # shorter than one n-gram: no repetition
    assert duplication(reasoning, reasoning[-12:]) < 0.2  # a short conclusion in the reasoning's last words


def test_a_missing_close_tag_lowers_the_think_rate():
    closed = score_completion(PROMPT, f"{EN_REASONING}</think>Five.")
    unclosed = score_completion(PROMPT, f"{EN_REASONING} and so on")
    no_think = score_completion(alpaca_prompt("How many?", ""), "Five apples.")
    assert (closed.think_closed, unclosed.think_closed, no_think.think_closed) == (True, False, False)
    assert summarize([closed, unclosed, no_think])["think_rate"] == pytest.approx(1 / 3)
    assert unclosed.answer_chars == 0 and no_think.answer_chars == len("Five apples.")


def test_citations_and_accuracy_are_graded_from_the_prompt_and_expected_answer():
    prompt = alpaca_prompt("q", '<passage number="1" source="a">x</passage>') + THINK_OPEN
    assert score_completion(prompt, "r</think>It is five [1].", expected="five").cites is True
    assert score_completion(prompt, "r</think>It is five [3].").cites is False  # no passage 3
    assert score_completion(PROMPT, "r</think>It is five.").cites is None  # the prompt holds no passages
    assert score_completion(PROMPT, "r</think>15 apples", expected="5").correct is False
    assert score_completion(PROMPT, "r</think>五つです", expected="五つ").correct is True


def test_the_cli_scores_given_completions_per_model(tmp_path):
    rows = [{"model": "before", "prompt": PROMPT, "completion": f"{EN_REASONING}</think>{EN_REASONING}"},
            {"model": "before", "prompt": PROMPT, "completion": f"{JA_REASONING}</think>{JA_REASONING}"},
            {"model": "after", "prompt": PROMPT, "completion": f"{EN_REASONING}</think>Five apples."},
            {"model": "after", "prompt": PROMPT, "completion": f"{JA_REASONING}</think>五つです。"}]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "assistant", "eval", "--completions", str(path), "--json",
                          "--plot", str(tmp_path / "chart.png")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    before, after = json.loads(run.stdout)["models"]
    assert (before["name"], after["name"]) == ("before", "after")
    assert before["duplication_rate"] == 1.0 and after["duplication_rate"] < 0.1
    assert before["think_rate"] == after["think_rate"] == 1.0
    assert [c["duplication"] for c in before["completions"]] == [1.0, 1.0]
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_the_old_finetune_eval_command_names_the_new_one(capsys):
    from finetune.__main__ import main

    assert main(["eval", "--completions", "completions.jsonl"]) == 2
    assert "python -m assistant eval" in capsys.readouterr().err


def test_eval_runs_the_base_and_each_adapter_side_by_side(tmp_path, tiny_model_dir, app_adapter_dir):
    from finetune.data import PreferencePair

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"instruction": f"Question {i}?", "input": "", "expected": "5"})
                                    + "\n" for i in range(3)), encoding="utf-8")
    prompts = load_prompts(prompts_file)
    pairs = [PreferencePair(p.prompt, "I read the passages.</think>The answer is in [1].",
                            "I did not read them.</think>I do not know.") for p in prompts]
    config = GenerationConfig(max_new_tokens=6, batch_size=2)
    base, adapted = evaluate(str(tiny_model_dir), [app_adapter_dir / "chat-smoke"], prompts, pairs, config)
    assert (base.name, adapted.name) == ("base", "chat-smoke")
    assert base.summary["completions"] == adapted.summary["completions"] == 3
    assert [c["completion"] for c in base.completions] != [c["completion"] for c in adapted.completions]
    # The adapter was trained on exactly these completions: it prefers the chosen one more than the base does.
    assert adapted.margin > base.margin
    table = markdown_table([base, adapted])
    assert table.splitlines()[2].startswith("| base | 3 |") and "chat-smoke" in table
    assert plot([base, adapted], tmp_path / "eval.png").stat().st_size > 1000


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_model_dir):
    from assistant.learning.evaluation import load_base
    from engine.batch_generate import generate

    model, tokenizer = load_base(str(tiny_model_dir))
    prompts = [alpaca_prompt("Short?", "") + THINK_OPEN, alpaca_prompt("A much longer question " * 5, "ctx") + THINK_OPEN]
    together = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=8, batch_size=2))
    alone = [generate(model, tokenizer, [p], GenerationConfig(max_new_tokens=8, batch_size=1))[0] for p in prompts]
    assert together == alone
