"""One question of a conversation and the answer to it, as the chat holds it.

The chat tab draws its messages from these turns, feeds the model its history from them, and saves them with
the conversation; feedback finds the answer it judges in them; "try again" keeps the answer it replaces in
``earlier``. A saved conversation holds ``ChatTurn.to_dict()`` of each; ``from_dict`` reads one back, also one
saved before a field was added (it takes the field's default).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, fields

from assistant.chat import Answer, Citation
from engine.runtime import GenerationParams


def citation_dict(citation: Citation) -> dict:
    """A passage as a turn keeps it: ``Citation.to_dict()`` and the label the page shows."""
    return {**citation.to_dict(), "label": citation.label}


@dataclass
class EarlierAnswer:
    """An answer that "try again" replaced, kept to compare with the new one."""

    key: str
    reasoning: str = ""
    answer: str = ""
    thinking_done: bool = False
    model: str = ""
    adapter: str | None = None
    citations: list[dict] = field(default_factory=list)
    passages: list[dict] = field(default_factory=list)
    support: list[dict] = field(default_factory=list)


@dataclass
class ChatTurn:
    question: str
    retrieval: bool = True  # the store was searched for this answer
    params: dict = field(default_factory=dict)  # {"temperature", "max_new_tokens"} it was asked with
    # The answer shown, as it streams and once done (``key`` names it for feedback; a new one per "try again").
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    reasoning: str = ""
    answer: str = ""
    thinking_done: bool = False
    done: bool = False
    stopped: bool = False  # Stop was pressed
    cut_off: bool = False  # the page closed before it finished (found so when the conversation is reopened)
    error: str | None = None  # why there is no answer
    citations: list[dict] = field(default_factory=list)  # the passages it cites (``citation_dict``)
    passages: list[dict] = field(default_factory=list)  # the passages it was shown and does not cite
    support: list[dict] = field(default_factory=list)  # each citing sentence's check
    model: str = ""
    adapter: str | None = None
    translations: list[str] = field(default_factory=list)  # the question as also searched for
    left_out: int = 0  # retrieved passages left out to fit the context
    prompt: dict | None = None  # the PromptRecord it was generated from (asdict), once done
    started_at: float = field(default_factory=time.time)
    seconds: float | None = None  # how long it took, once done
    earlier: list[EarlierAnswer] = field(default_factory=list)  # answers "try again" replaced, oldest first
    picked: str | None = None  # "new" or "earlier", once the person picked the better of the last two

    @classmethod
    def asked(cls, question: str, params: GenerationParams, retrieval: bool) -> ChatTurn:
        return cls(question, retrieval, {"temperature": params.temperature, "max_new_tokens": params.max_new_tokens})

    def record(self, answer: Answer, stopped: bool) -> None:
        """Copy the answer so far; once it is done, also its prompt, what it cites and the checks."""
        self.reasoning, self.answer, self.thinking_done = answer.reasoning, answer.answer, answer.thinking_done
        self.model, self.adapter, self.translations = answer.model, answer.adapter, list(answer.translations)
        if answer.done:
            self.done, self.stopped, self.prompt, self.left_out = True, stopped, asdict(answer.prompt), answer.left_out
            self.citations = [citation_dict(c) for c in answer.citations]
            self.passages = [citation_dict(c) for c in answer.uncited]
            self.support = [check.to_dict() for check in answer.support]
        self.seconds = time.time() - self.started_at if answer.done else None

    def replace_answer(self) -> EarlierAnswer:
        """Keep the answer shown in ``earlier`` and clear it for another; returns the one kept."""
        kept = EarlierAnswer(**{f.name: getattr(self, f.name) for f in fields(EarlierAnswer)})
        self.earlier.append(kept)
        self.key, self.reasoning, self.answer, self.thinking_done, self.done = uuid.uuid4().hex, "", "", False, False
        self.picked, self.stopped, self.citations, self.passages, self.support = None, False, [], [], []
        self.started_at, self.seconds = time.time(), None
        return kept

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ChatTurn:
        known = {f.name for f in fields(cls)}
        turn = cls(**{k: v for k, v in data.items() if k in known and k != "earlier"})
        answer_fields = {f.name for f in fields(EarlierAnswer)}
        turn.earlier = [EarlierAnswer(**{k: v for k, v in e.items() if k in answer_fields})
                        for e in data.get("earlier") or []]
        return turn
