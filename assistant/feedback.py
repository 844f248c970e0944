"""What people say about answers becomes preference data in the pairs store (``finetune/pairs_store.py``).

- a thumbs up or down on a chat answer is a vote (a down vote pairs up once a better answer arrives);
- "try again" gives a second answer to the same prompt, and the one the person picks is chosen over the other;
- an edit is the person's own reasoning and answer, chosen over the model's;
- a corrected verdict is the judge's reply with the right verdict, chosen over the judge's own.

An answer is written to the store once, the first time someone judges it; ``FeedbackStore`` remembers its id,
and each session's feedback, newest last, so that the last can be undone.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from assistant.chat import Answer, PromptRecord
from assistant.verify import VERDICTS, Verification
from finetune.pairs_store import Change, Completion, PairsStore, PairsStoreError

HISTORY = 50  # feedback actions kept per session for undo


def completion(prompt: PromptRecord, reasoning: str, answer: str, thinking_closed: bool, model: str | None,
               adapter: str | None) -> Completion:
    return Completion(prompt.text, reasoning, answer, prompt.instruction, prompt.input, prompt.format, model,
                      adapter, prompt.question, thinking_closed)


def answer_completion(answer: Answer) -> Completion:
    return completion(answer.prompt, answer.reasoning, answer.answer, answer.thinking_done, answer.model,
                      answer.adapter)


@dataclass(frozen=True)
class Saved:
    """One feedback action as the session made it: what it was, in words, and what it changed in the store."""

    what: str
    change: Change
    key: str | None = None  # the app's key of the answer it was about


class FeedbackStore:
    """The pairs store as the app writes to it; answers are keyed by the app's own ids for them."""

    def __init__(self, store: PairsStore):
        self.store = store
        self._ids: dict[str, int] = {}  # the app's answer key -> answer id in the store
        self._history: dict[str, list[Saved]] = {}  # a session's feedback, newest last
        self._lock = threading.Lock()

    def remember(self, session: str, saved: Saved) -> None:
        with self._lock:
            history = self._history.setdefault(session, [])
            history.append(saved)
            del history[:-HISTORY]

    def last(self, session: str) -> Saved | None:
        with self._lock:
            history = self._history.get(session)
            return history[-1] if history else None

    def undo(self, session: str) -> str:
        """Take back the session's last feedback; returns what it was."""
        with self._lock:
            history = self._history.get(session)
            if not history:
                raise PairsStoreError("nothing to undo: no feedback from this page since it was opened")
            saved = history.pop()
        self.store.undo(saved.change)
        return saved.what

    def answer_id(self, key: str, answer: Completion, user: str | None = None) -> int:
        """The store's id for the answer the app knows as ``key``, recording it the first time."""
        with self._lock:
            if key not in self._ids:
                if not answer.prompt:
                    raise PairsStoreError("this answer has no recorded prompt (an error or a stopped answer?); "
                                          "only answers the model finished can be judged")
                self._ids[key] = self.store.add_answer(answer, user)
            return self._ids[key]

    def vote(self, key: str, answer: Completion, good: bool, user: str | None = None) -> Change:
        """A thumbs up or down; the change names the pairs it completed."""
        return self.store.vote(self.answer_id(key, answer, user), good, user)

    def pick(self, chosen: tuple[str, Completion], rejected: tuple[str, Completion], user: str | None = None
             ) -> Change:
        """The person picked ``chosen`` over ``rejected`` (two answers to one prompt)."""
        return self.store.add_pair(self.answer_id(*chosen, user), self.answer_id(*rejected, user), "pick", user)

    def edit(self, original: tuple[str, Completion], reasoning: str, answer: str, user: str | None = None
             ) -> Change:
        """The person's own reasoning and answer, chosen over the model's answer (the same text saved twice is
        one answer, so one pair)."""
        key, model_answer = original
        if not answer.strip():
            raise PairsStoreError("write the better answer first (the reasoning may stay as it was)")
        written = Completion(model_answer.prompt, reasoning.strip(), answer.strip(), model_answer.instruction,
                             model_answer.input, model_answer.prompt_format, None, None, model_answer.question)
        if (written.reasoning, written.answer) == (model_answer.reasoning, model_answer.answer):
            raise PairsStoreError("the edit is the same as the model's answer; change it before saving")
        written_key = f"{key}:edit:{hash((written.reasoning, written.answer))}"
        return self.store.add_pair(self.answer_id(written_key, written, user), self.answer_id(key, model_answer, user),
                                   "edit", user)

    def correct_verdict(self, key: str, result: Verification, verdict: str, user: str | None = None) -> Change:
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
        return self.store.add_pair(self.answer_id(f"{key}:verdict:{verdict}", corrected, user),
                                   self.answer_id(key, judged, user), "edit", user)
