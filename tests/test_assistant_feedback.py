"""Feedback on answers and verdicts becomes pairs, with the prompt exactly as the model saw it."""

from __future__ import annotations

import json

import pytest

from assistant.chat import Assistant
from assistant.feedback import FeedbackStore, answer_completion
from assistant.verify import verify
from engine.runtime import GenerationParams
from finetune.pairs_store import PairsStore, PairsStoreError
from tests.assistant_fixtures import ScriptedRuntime

SHORT = GenerationParams(max_new_tokens=8, temperature=0.0)
REPEATING = "</think>The pump note says 40 litres. So the pump note says 40 litres [1]."
GOOD = "</think>40 litres a minute [1]."


@pytest.fixture
def feedback(tmp_path) -> FeedbackStore:
    return FeedbackStore(PairsStore(tmp_path / "pairs.sqlite"))


def test_try_again_answers_the_same_prompt_and_the_pick_is_a_pair(settings, pump_store, feedback):
    runtime = ScriptedRuntime(REPEATING, GOOD)
    assistant = Assistant(settings, runtime=runtime, store=pump_store)
    first = assistant.ask("How fast is the pump?", SHORT)
    *_, second = assistant.stream_again(first, SHORT)
    assert runtime.prompts[0] == runtime.prompts[1] == first.prompt.text == second.prompt.text
    assert second.passages == first.passages and second.citations  # the same passages, cited again
    feedback.pick(("t0-b", answer_completion(second)), ("t0-a", answer_completion(first)), user="ann")
    [pair] = feedback.store.pairs()
    assert (pair.origin, pair.user) == ("pick", "ann")
    assert pair.chosen.answer == "40 litres a minute [1]." and pair.rejected.answer.startswith("The pump note")
    assert pair.chosen.prompt == runtime.prompts[0] and pair.chosen.question == "How fast is the pump?"
    assert "The Borealis pump moves 40 litres" in pair.chosen.input and pair.chosen.model == "scripted"


def test_a_down_vote_then_an_up_vote_on_a_second_answer_pair_up(settings, pump_store, feedback):
    assistant = Assistant(settings, runtime=ScriptedRuntime(REPEATING, GOOD), store=pump_store)
    first = assistant.ask("How fast is the pump?", SHORT)
    *_, second = assistant.stream_again(first, SHORT)
    assert feedback.vote("t0-a", answer_completion(first), good=False).made == ()
    assert feedback.vote("t0-a", answer_completion(first), good=False).made == ()  # the same answer is stored once
    [made] = feedback.vote("t0-b", answer_completion(second), good=True).made
    [pair] = feedback.store.pairs()
    assert pair.id == made and pair.origin == "vote" and pair.rejected.answer.startswith("The pump note")
    assert len({p.chosen.prompt for p in feedback.store.pairs()}) == 1


def test_an_edit_keeps_the_persons_reasoning_and_answer_apart(settings, pump_store, feedback):
    assistant = Assistant(settings, runtime=ScriptedRuntime("I read it" + REPEATING), store=pump_store)
    answer = assistant.ask("How fast is the pump?", SHORT)
    feedback.edit(("t0-a", answer_completion(answer)), "The note gives the rate.", "40 litres a minute [1].", "bob")
    [pair] = feedback.store.pairs()
    assert (pair.origin, pair.chosen.model, pair.chosen.reasoning) == ("edit", None, "The note gives the rate.")
    assert pair.chosen.answer == "40 litres a minute [1]." and pair.rejected.reasoning == "I read it"
    assert pair.to_trl()["chosen"] == "The note gives the rate.</think>40 litres a minute [1]."
    again = feedback.edit(("t0-a", answer_completion(answer)), "The note gives the rate.", "40 litres a minute [1].")
    assert again.made == () and feedback.store.count() == 1  # the same text saved twice is one pair
    with pytest.raises(PairsStoreError, match="write the better answer"):
        feedback.edit(("t0-a", answer_completion(answer)), "r", "  ")


def test_a_corrected_verdict_is_a_pair_for_the_judges_prompt(settings, pump_store, feedback):
    judge_reply = '{"verdict": "refuted", "confidence": 0.9, "citations": [1], "reason": "misread"}'
    runtime = ScriptedRuntime("</think>For [1].", "</think>Against.", "The judge weighs it.</think>" + judge_reply)
    result = verify(Assistant(settings, runtime=runtime, store=pump_store), "The pump moves 40 litres a minute.")
    assert result.verdict == "refuted" and result.judge_prompt.text == runtime.prompts[2]
    feedback.correct_verdict("v0", result, "supported", user="cy")
    [pair] = feedback.store.pairs()
    assert pair.rejected.answer == judge_reply and pair.rejected.reasoning == "The judge weighs it."
    assert json.loads(pair.chosen.answer) == {"verdict": "supported", "confidence": 1.0, "citations": [1],
                                              "reason": "corrected by a person"}
    assert pair.chosen.prompt == runtime.prompts[2] and "Case for:" in pair.chosen.prompt
    with pytest.raises(PairsStoreError, match="already is"):
        feedback.correct_verdict("v0", result, "refuted")


def test_a_corrected_verdict_on_a_quote_answers_the_attribution_as_the_prompt_asks(settings, pump_store, feedback):
    judge_reply = '{"verdict": "supported", "confidence": 0.9, "citations": [1], "attribution": "refuted"}'
    runtime = ScriptedRuntime("</think>For [1].", "</think>Against.", "</think>" + judge_reply)
    result = verify(Assistant(settings, runtime=runtime, store=pump_store),
                    'The engineer said "The Borealis pump moves 40 litres per minute."')
    feedback.correct_verdict("v0", result, "refuted")
    [pair] = feedback.store.pairs()
    assert json.loads(pair.chosen.answer) == {"verdict": "refuted", "confidence": 1.0, "citations": [1],
                                              "attribution": "refuted", "reason": "corrected by a person"}
