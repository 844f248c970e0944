"""QUERY_TRANSLATION: the chat model's translation of the question joins the search, so an English question
finds a Japanese passage the offline English-only encoder and the English words cannot.

A model that translates cannot run here (no weights of one ship offline): ``ScriptedRuntime`` plays its part
with a fixed translation, and the tiny model checks the same path runs on a real model's output.
"""

from __future__ import annotations

import dataclasses

import pytest

from assistant.chat import Assistant
from assistant.query_translation import TRANSLATION_TOKENS, target_language, translated, translation_prompt
from assistant.turns import ChatTurn
from assistant.ui.chat import turn_messages
from engine.runtime import GenerationParams
from finetune.prompts import split_reasoning
from knowledge.query import Query
from tests.assistant_fixtures import ScriptedRuntime

QUESTION = "How many litres of water does the Borealis pump move per minute?"
TRANSLATION = "ボレアリスのポンプは一分間に何リットルの水を送りますか？"
SHORT = GenerationParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture
def bilingual_store(store, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ポンプ.txt").write_text("このポンプは一分間に四十リットルの水を送ります。", encoding="utf-8")
    (tmp_path / "docs" / "pump-care.txt").write_text(
        "Borealis pump care: how to clean the water pump and when to replace its seals.", encoding="utf-8")
    assert store.add([tmp_path / "docs"]).ok
    return store


def test_the_target_is_the_other_language():
    assert target_language(QUESTION) == "Japanese" and target_language(TRANSLATION) == "English"
    assert "into Japanese" in translation_prompt(QUESTION, "alpaca")


def test_the_translation_finds_the_passage_in_the_other_language(settings, bilingual_store):
    # Without it the English question reaches the English page about the pump, which does not answer it.
    assert bilingual_store.search(QUESTION, k=1)[0].source.endswith("pump-care.txt")
    runtime = ScriptedRuntime(f"The user asks in English.</think>{TRANSLATION}\n", "</think>Forty litres [1].")
    assistant = Assistant(dataclasses.replace(settings, query_translation=True), runtime=runtime,
                          store=bilingual_store)
    answer = assistant.ask(QUESTION, SHORT)
    assert "into Japanese" in runtime.prompts[0] and QUESTION in runtime.prompts[0]
    assert answer.translations == (TRANSLATION,)
    assert answer.passages[0].source.endswith("ポンプ.txt")
    assert answer.to_dict()["translations"] == [TRANSLATION]
    turn = ChatTurn.asked(QUESTION, SHORT, True)
    turn.record(answer, stopped=False)
    assert any(f"also searched as “{TRANSLATION}”" in m.content for m in turn_messages(turn, 0))


def test_off_by_default_no_translation_is_generated(settings, bilingual_store):
    runtime = ScriptedRuntime("</think>Forty litres.")
    answer = Assistant(settings, runtime=runtime, store=bilingual_store).ask(QUESTION, SHORT)
    assert len(runtime.prompts) == 1 and answer.translations == ()


@pytest.mark.parametrize("output", [
    "still thinking about how to say it",  # thinking never ended within the budget
    "</think>\n\n",  # ended, wrote nothing
    f"</think>{QUESTION}",  # repeated the question
])
def test_no_usable_translation_leaves_the_query_as_it_was(output):
    calls = []

    def generate(prompt, params):
        calls.append(params)
        yield "", "", False
        yield split_reasoning(output, started_in_think=True)

    query = Query(QUESTION, ("earlier question",))
    assert translated(query, generate, "alpaca") == query
    assert calls[0].max_new_tokens == TRANSLATION_TOKENS and calls[0].temperature == 0


def test_the_tiny_model_runs_the_same_path(settings, tiny_model_dir, tmp_path, bilingual_store):
    # Its words are noise; what counts is that a real runtime's output goes through and the answer comes.
    chat_settings = dataclasses.replace(settings, chat_model=str(tiny_model_dir), adapter_dir=tmp_path / "adapters",
                                        query_translation=True)
    assistant = Assistant(chat_settings, store=bilingual_store)
    answer = assistant.ask(QUESTION, SHORT)
    assert answer.done and answer.passages and len(answer.translations) <= 1


def test_a_translation_counts_as_the_question_and_the_earlier_turns_stay_below():
    query = Query("pump", ("lamp",), ("ポンプ",))
    terms = query.terms()
    assert terms["pump"] == terms["ポンプ"] == 1.0 and terms["lamp"] == pytest.approx(0.3)
