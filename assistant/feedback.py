"""What people say about answers becomes preference data in the pairs store (``finetune/pairs_store.py``).

- a thumbs up or down on a chat answer is a vote (a down vote pairs up once a better answer arrives);
- "try again" gives a second answer to the same prompt, and the one the person picks is chosen over the other;
- an edit is the person's own reasoning and answer, chosen over the model's;
- a corrected verdict is the judge's reply with the right verdict, chosen over the judge's own.

An answer is written to the store once, the first time someone judges it; ``FeedbackStore`` remembers its id.
"""

from __future__ import annotations

import json
import threading

from assistant.chat import Answer, PromptRecord
from assistant.verify import VERDICTS, Verification
from finetune.pairs_store import Completion, PairsStore, PairsStoreError


def completion(prompt: PromptRecord, reasoning: str, answer: str, thinking_closed: bool, model: str | None,
               adapter: str | None) -> Completion:
    return Completion(prompt.text, reasoning, answer, prompt.instruction, prompt.input, prompt.format, model,
                      adapter, prompt.question, thinking_closed)


def answer_completion(answer: Answer) -> Completion:
    return completion(answer.prompt, answer.reasoning, answer.answer, answer.thinking_done, answer.model,
                      answer.adapter)


class FeedbackStore:
    """The pairs store as the app writes to it; answers are keyed by the app's own ids for them."""

    def __init__(self, store: PairsStore):
        self.store = store
        self._ids: dict[str, int] = {}  # the app's answer key -> answer id in the store
        self._lock = threading.Lock()

    def answer_id(self, key: str, answer: Completion, user: str | None = None) -> int:
        """The store's id for the answer the app knows as ``key``, recording it the first time."""
        with self._lock:
            if key not in self._ids:
                if not answer.prompt:
                    raise PairsStoreError("this answer has no recorded prompt (an error or a stopped answer?); "
                                          "only answers the model finished can be judged")
                self._ids[key] = self.store.add_answer(answer, user)
            return self._ids[key]

    def vote(self, key: str, answer: Completion, good: bool, user: str | None = None) -> list[int]:
        """A thumbs up or down; returns the pairs it completed."""
        return self.store.vote(self.answer_id(key, answer, user), good, user)

    def pick(self, chosen: tuple[str, Completion], rejected: tuple[str, Completion], user: str | None = None) -> int:
        """The person picked ``chosen`` over ``rejected`` (two answers to one prompt)."""
        return self.store.add_pair(self.answer_id(*chosen, user), self.answer_id(*rejected, user), "pick", user)

    def edit(self, original: tuple[str, Completion], reasoning: str, answer: str, user: str | None = None) -> int:
        """The person's own reasoning and answer, chosen over the model's answer."""
        key, model_answer = original
        if not answer.strip():
            raise PairsStoreError("write the better answer first (the reasoning may stay as it was)")
        written = Completion(model_answer.prompt, reasoning.strip(), answer.strip(), model_answer.instruction,
                             model_answer.input, model_answer.prompt_format, None, None, model_answer.question)
        if (written.reasoning, written.answer) == (model_answer.reasoning, model_answer.answer):
            raise PairsStoreError("the edit is the same as the model's answer; change it before saving")
        return self.store.add_pair(self.store.add_answer(written, user), self.answer_id(key, model_answer, user),
                                   "edit", user)

    def correct_verdict(self, key: str, result: Verification, verdict: str, user: str | None = None) -> int:
        """The judge's verdict was wrong and ``verdict`` is right: the corrected reply is chosen over the judge's."""
        if verdict not in VERDICTS:
            raise PairsStoreError(f"verdict {verdict!r}: choose one of {', '.join(VERDICTS)}")
        if verdict == result.verdict:
            raise PairsStoreError(f"the verdict already is {verdict!r}; pick the one it should have been")
        reasoning, reply, closed = result.judgement
        judged = completion(result.judge_prompt, reasoning, reply, closed, result.model, result.adapter)
        right = {"verdict": verdict, "confidence": 1.0, "citations": result.cited}
        if result.quote is not None:  # the quote's prompt asks for the attribution too; the person left it be
            right["attribution"] = result.quote.attribution
        right = json.dumps(right | {"reason": "corrected by a person"}, ensure_ascii=False)
        corrected = completion(result.judge_prompt, reasoning if closed else "", right, True, None, None)
        return self.store.add_pair(self.store.add_answer(corrected, user), self.answer_id(key, judged, user),
                                   "edit", user)
