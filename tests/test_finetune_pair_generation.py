"""`pairs generate`: answers sampled per question, scored by rules, clear best/worst kept as pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.chat import Assistant
from assistant.learning.pair_generation import PairGenerationConfig, Question, generate_pairs, read_questions
from errors import DataError
from finetune.data import prepare_data
from finetune.pairs_store import PairsStore

ROOT = Path(__file__).resolve().parents[1]
REASONING = "The pump note says it moves forty litres per minute, so the answer is forty litres."


class CyclingRuntime:
    """Plays the model: answers each prompt with the given outputs in turn, so each sample differs."""

    model_name, adapter, prompt_format = "scripted", "orpo-0", "alpaca"

    def __init__(self, *outputs: str):
        self.outputs, self.calls, self.prompts = outputs, 0, []

    def render_chat(self, messages):
        raise AssertionError("alpaca only")

    def stream(self, prompt, params, stop=None):
        self.prompts.append(prompt)
        self.calls += 1
        yield self.outputs[(self.calls - 1) % len(self.outputs)]


def test_the_answer_that_repeats_its_reasoning_is_rejected(settings, pump_store, tmp_path):
    runtime = CyclingRuntime(f"{REASONING}</think>{REASONING}", f"{REASONING}</think>Forty litres a minute [1].")
    assistant = Assistant(settings, runtime=runtime, store=pump_store)
    out = tmp_path / "pairs.sqlite"
    report = generate_pairs(assistant, ["How fast is the pump?"], out, PairGenerationConfig(samples=2))
    assert report.pairs == 1 and report.no_clear_winner == []
    [pair] = PairsStore(out).pairs()
    assert pair.origin == "generated" and pair.chosen.answer == "Forty litres a minute [1]."
    assert pair.rejected.answer == REASONING and pair.chosen.question == "How fast is the pump?"
    # The prompt is the one the model saw, passages included, and its parts are kept for the recipe's columns.
    assert pair.chosen.prompt == runtime.prompts[0] and "Borealis pump" in pair.chosen.input
    assert pair.chosen.prompt.endswith("<think>") and pair.chosen.adapter == "orpo-0"


def test_answers_that_score_alike_make_no_pair(settings, pump_store, tmp_path):
    runtime = CyclingRuntime(f"{REASONING}</think>Forty [1].", f"{REASONING}</think>About forty [1].")
    report = generate_pairs(Assistant(settings, runtime=runtime, store=pump_store), ["How fast?"],
                            tmp_path / "pairs.sqlite", PairGenerationConfig(samples=2))
    assert (report.pairs, report.no_clear_winner) == (0, ["How fast?"])


def test_the_citation_and_think_rules(settings, pump_store, tmp_path):
    runtime = CyclingRuntime(f"{REASONING}</think>Forty litres.", "still thinking and never closing",
                             f"{REASONING}</think>Forty litres [1].")
    config = PairGenerationConfig(samples=3, rules=("citation", "think"))
    generate_pairs(Assistant(settings, runtime=runtime, store=pump_store), ["How fast?"], tmp_path / "p.jsonl", config)
    [row] = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert row["chosen"].endswith("</think>Forty litres [1].")
    assert row["rejected"] == "still thinking and never closing"  # exactly what the model wrote: no </think>


def test_a_second_run_skips_the_questions_done_and_the_output_trains(settings, pump_store, tmp_path, tiny_tokenizer):
    outputs = (f"{REASONING}</think>{REASONING}", f"{REASONING}</think>Forty litres [1].")
    for out in (tmp_path / "pairs.sqlite", tmp_path / "pairs.jsonl"):
        first = generate_pairs(Assistant(settings, runtime=CyclingRuntime(*outputs), store=pump_store),
                               ["One?", "Two?"], out, PairGenerationConfig(samples=2))
        runtime = CyclingRuntime(*outputs)
        again = generate_pairs(Assistant(settings, runtime=runtime, store=pump_store), ["One?", "Two?", "Three?"],
                               out, PairGenerationConfig(samples=2))
        assert (first.pairs, again.pairs, again.skipped, runtime.calls) == (2, 1, 2, 2)
        prepared = prepare_data(out, tiny_tokenizer)
        assert len(prepared.pairs) == 3 and not prepared.rejected
        # The next round, with the adapter the last one trained, makes pairs of its own for the same questions.
        runtime = CyclingRuntime(*outputs)
        runtime.adapter = "orpo-1"
        next_round = generate_pairs(Assistant(settings, runtime=runtime, store=pump_store), ["One?", "Two?"], out,
                                    PairGenerationConfig(samples=2))
        assert (next_round.pairs, next_round.skipped) == (2, 0)


def test_a_broken_line_in_a_jsonl_output_is_named_before_any_work(settings, pump_store, tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text('{"question": "One?"}\n{"question": \n', encoding="utf-8")
    runtime = CyclingRuntime(f"{REASONING}</think>Forty [1].")
    with pytest.raises(DataError, match="line 2"):
        generate_pairs(Assistant(settings, runtime=runtime, store=pump_store), ["Two?"], out)
    assert runtime.calls == 0 and out.read_text(encoding="utf-8").count("\n") == 2


def test_unknown_rules_and_a_single_sample_are_refused():
    with pytest.raises(DataError, match="unknown rule"):
        PairGenerationConfig(rules=("politeness",))
    with pytest.raises(DataError, match="at least 2"):
        PairGenerationConfig(samples=1)


def test_questions_come_from_text_or_jsonl(tmp_path):
    (tmp_path / "q.txt").write_text("First?\n\n  Second?\n", encoding="utf-8")
    (tmp_path / "q.jsonl").write_text('{"question": "Third?", "expected": 12}\n{"prompt": "Fourth?"}\n',
                                      encoding="utf-8")
    assert read_questions(tmp_path / "q.txt") == [Question("First?"), Question("Second?")]
    assert read_questions(tmp_path / "q.jsonl") == [Question("Third?", "12"), Question("Fourth?")]


def test_the_correct_rule_rejects_a_short_wrong_answer(settings, pump_store, tmp_path):
    # A model made terse by a first round cuts "12" to "1": to the duplication rule both answers are clean.
    runtime = CyclingRuntime("4 plus 8 makes 12.</think>1.", "4 plus 8 makes 12.</think>12.")
    question = Question("What is 4 plus 8?", "12")
    for rules, pairs in ((("duplication",), 0), (("duplication", "correct"), 1)):
        out = tmp_path / f"{'-'.join(rules)}.jsonl"
        report = generate_pairs(Assistant(settings, runtime=runtime, store=pump_store), [question], out,
                                PairGenerationConfig(samples=2, rules=rules))
        assert report.pairs == pairs
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["chosen"].endswith("</think>12.") and row["rejected"].endswith("</think>1.")


def test_the_cli_runs_on_the_tiny_model(tmp_path, tiny_model_dir, minilm_path):
    (tmp_path / "questions.txt").write_text("How fast is the pump?\nWho keeps the lighthouse?\n", encoding="utf-8")
    env = pairs_cli_env(tmp_path, tiny_model_dir, minilm_path)
    run = subprocess.run([sys.executable, "-m", "assistant", "pairs", "generate", str(tmp_path / "questions.txt"),
                          "--out", str(tmp_path / "pairs.sqlite"), "--samples", "3", "--max-new-tokens", "12",
                          "--rules", "length", "--min-chars", "1", "--margin", "1", "--json"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    # The random model rarely closes its reasoning, so most answers are empty: a pair only where one is not.
    assert report["pairs"] + len(report["no_clear_winner"]) == 2
    assert PairsStore(tmp_path / "pairs.sqlite").count() == report["pairs"]


def pairs_cli_env(tmp_path: Path, tiny_model_dir: Path, minilm_path: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CHAT_MODEL": str(tiny_model_dir), "EMBEDDING_MODEL": minilm_path,
            "KNOWLEDGE_DIR": str(tmp_path / "knowledge"), "ADAPTER_DIR": str(tmp_path / "adapters")}


def test_the_cli_answers_with_the_adapter_it_is_given(tmp_path, tiny_model_dir, minilm_path):
    from tests.assistant_fixtures import save_adapter

    adapter = save_adapter(tiny_model_dir, tmp_path / "round-1", str(tiny_model_dir))
    (tmp_path / "questions.txt").write_text("How fast is the pump?\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "assistant", "pairs", "generate", str(tmp_path / "questions.txt"),
                          "--out", str(tmp_path / "pairs.sqlite"), "--samples", "2", "--max-new-tokens", "4",
                          "--rules", "length", "--margin", "0", "--no-retrieval", "--adapter", str(adapter)],
                         env=pairs_cli_env(tmp_path, tiny_model_dir, minilm_path), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    [pair] = PairsStore(tmp_path / "pairs.sqlite").pairs()
    assert pair.chosen.adapter == pair.rejected.adapter == "round-1"


def test_the_correct_rule_without_expected_answers_says_what_to_give(tmp_path, capsys):
    from assistant.__main__ import main

    (tmp_path / "q.txt").write_text("What is 4 plus 8?\n", encoding="utf-8")
    assert main(["pairs", "generate", str(tmp_path / "q.txt"), "--rules", "correct"]) == 2
    assert '"expected"' in capsys.readouterr().err


def test_the_model_drafts_questions_from_passages_of_the_store(settings, pump_store):
    from assistant.learning.pair_generation import draft_questions

    runtime = CyclingRuntime("I read it.</think>How fast does the Borealis pump move?\nMore text.",
                             "</think>Not a question.")
    questions = draft_questions(Assistant(settings, runtime=runtime, store=pump_store), 3, PairGenerationConfig())
    assert questions == ["How fast does the Borealis pump move?"]
    assert "The Borealis pump moves 40 litres per minute." in runtime.prompts[0]
    assert "Write one question" in runtime.prompts[0]


def test_passages_are_sampled_from_current_documents_only(store, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a", "b", "c"):
        (docs / f"{name}.txt").write_text(f"Document {name} says something about {name}.", encoding="utf-8")
    assert store.add([docs]).ok
    (docs / "a.txt").write_text("Document a now says something new.", encoding="utf-8")
    assert store.add([docs]).ok
    texts = sorted(hit.text for hit in store.sample(10, seed=1))
    assert texts == ["Document a now says something new.", "Document b says something about b.",
                     "Document c says something about c."]
    assert len(store.sample(2, seed=1)) == 2 and store.sample(2, seed=1) == store.sample(2, seed=1)


def test_without_questions_or_passages_the_cli_says_what_to_give(capsys):
    from assistant.__main__ import main

    assert main(["pairs", "generate"]) == 2
    assert "--from-store N" in capsys.readouterr().err


def test_with_a_shared_reasoning_the_pair_differs_in_its_answer_only(settings, pump_store, tmp_path):
    runtime = CyclingRuntime(f"{REASONING}</think>an answer that is not kept", "Forty litres a minute [1].",
                             REASONING)
    config = PairGenerationConfig(samples=2, shared_reasoning=True)
    report = generate_pairs(Assistant(settings, runtime=runtime, store=pump_store), ["How fast?"],
                            tmp_path / "pairs.sqlite", config)
    assert report.pairs == 1 and runtime.calls == 3  # one reasoning, then two answers after it
    assert runtime.prompts[1] == runtime.prompts[2] == runtime.prompts[0] + REASONING + "</think>"
    [pair] = PairsStore(tmp_path / "pairs.sqlite").pairs()
    assert pair.chosen.reasoning == pair.rejected.reasoning == REASONING
    assert (pair.chosen.answer, pair.rejected.answer) == ("Forty litres a minute [1].", REASONING)
