"""Citations that mean what they say: only cited passages are citations, and each citing sentence is checked."""

from __future__ import annotations

import pytest

from assistant.chat import Assistant
from assistant.citation_support import citation_support, cited_numbers, cited_sentences
from assistant.turns import ChatTurn
from assistant.ui.chat import UNCITED, turn_messages
from assistant.verify import verify
from engine.runtime import GenerationParams
from tests.assistant_fixtures import ScriptedRuntime

PUMP = "The Borealis pump moves 40 litres per minute and ships from Tromsø."
LAMP = "The Aurora lamp costs 40 crowns and was designed in Bergen."
SHORT = GenerationParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture
def two_documents(store, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pump.txt").write_text(PUMP, encoding="utf-8")
    (tmp_path / "docs" / "lamp.txt").write_text(LAMP, encoding="utf-8")
    assert store.add([tmp_path / "docs"]).ok
    return store


def ask(settings, store, output: str):
    assistant = Assistant(settings, runtime=ScriptedRuntime(output), store=store)
    return assistant.ask("How much does the pump move, and the lamp?", SHORT)


def number_of(answer, name: str) -> int:
    return next(p.number for p in answer.passages if p.source.endswith(name))


def test_only_the_passages_the_answer_cites_are_citations(settings, two_documents):
    probe = ask(settings, two_documents, "</think>x")
    pump = number_of(probe, "pump.txt")
    answer = ask(settings, two_documents, f"</think>It moves 40 litres per minute [{pump}].")
    out = answer.to_dict()
    assert [c["source"] for c in out["citations"]] == [p.source for p in answer.passages if p.number == pump]
    assert [c["number"] for c in out["passages"]] == [p.number for p in answer.passages if p.number != pump]
    assert out["citations"][0]["number"] == pump


def test_an_answer_that_cites_nothing_has_no_citations_and_says_so(settings, two_documents):
    answer = ask(settings, two_documents, "</think>I cannot tell from what I know.")
    out = answer.to_dict()
    assert out["citations"] == [] and len(out["passages"]) == 2
    turn = ChatTurn("q")
    turn.record(answer, stopped=False)
    shown = [m.content for m in turn_messages(turn, 0)]
    assert any(UNCITED in text for text in shown)
    titles = [(m.metadata or {}).get("title", "") for m in turn_messages(turn, 0)]
    assert "Retrieved, not cited (2 passages)" in titles and not any(t.startswith("Sources") for t in titles)


def test_citation_marks_in_every_form_are_read():
    assert cited_numbers("A [1]. B [2][3]. C [4, 5]. D [3]、E［6］。F [x] [7a]") == [1, 2, 3, 4, 5, 6]


def test_a_sentence_is_supported_by_its_passage_and_a_changed_figure_is_not():
    passages = {1: PUMP, 2: LAMP}
    checks = citation_support("The Borealis pump moves 40 litres per minute [1]. It moves 90 litres per minute [1]. "
                              "The lamp was designed in Bergen [2]. The pump was designed in Bergen [1].", passages)
    assert [c.supported for c in checks] == [True, False, True, False]
    assert "90" in checks[1].missing and "90" in checks[1].note
    assert checks[0].score == 1.0 and checks[3].score < checks[2].score


def test_a_citation_of_a_passage_that_does_not_exist_is_unsupported():
    [check] = citation_support("The pump moves 40 litres [7].", {1: PUMP})
    assert not check.supported and check.score == 0.0 and "[7]" in check.note


def test_japanese_sentences_are_checked_by_characters():
    passage = "ボレアリス・ポンプは毎分40リットルを送り、トロムソから出荷される。"
    checks = citation_support("ポンプは毎分40リットルを送る[1]。このポンプは大阪で作られた[1]。", {1: passage})
    assert [c.supported for c in checks] == [True, False]


def test_a_citation_mark_after_the_full_stop_belongs_to_its_sentence():
    assert cited_sentences("The pump moves 40 litres. [1] Nothing else.") == ["The pump moves 40 litres. [1]"]


def test_the_chat_marks_a_sentence_its_passage_does_not_support(settings, two_documents):
    probe = ask(settings, two_documents, "</think>x")
    pump = number_of(probe, "pump.txt")
    answer = ask(settings, two_documents,
                 f"</think>It moves 40 litres per minute [{pump}]. It was built in 1990 [{pump}].")
    assert [s.supported for s in answer.support] == [True, False]
    assert answer.to_dict()["support"][1]["missing"] == ["built", "1990"]
    turn = ChatTurn("q")
    turn.record(answer, stopped=False)
    body = [m.content for m in turn_messages(turn, 0) if "1990" in str(m.content)][0]
    assert body.count("⚠️") == 1 and body.index("⚠️") > body.index("1990") and "40 litres" in body


def test_verification_always_carries_its_numbered_evidence(settings, two_documents):
    runtime = ScriptedRuntime("</think>For [1].", "</think>Against.", "</think>I cannot decide.")
    result = verify(Assistant(settings, runtime=runtime, store=two_documents), "The pump moves 40 litres.")
    out = result.to_dict()
    assert out["verdict"] == "not enough evidence" and out["citations"] == []
    assert [e["number"] for e in out["evidence"]] == [1, 2]
    assert {e["source"].rsplit("/", 1)[-1] for e in out["evidence"]} == {"pump.txt", "lamp.txt"}
