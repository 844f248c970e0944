"""One answer: retrieve passages for the conversation, prompt the model, stream reasoning and answer apart."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from assistant.citation_support import SentenceSupport, citation_support, cited_numbers
from assistant.prompting import answer_parts, build_prompt, retrieval_query
from assistant.query_translation import translated
from engine.adapter_switch import AdapterSwitch
from engine.runtime import GenerationParams, ModelRuntime, load_runtime
from errors import ModelUnavailable
from finetune.prompts import prompt_token_ids, split_reasoning
from knowledge import Hit, KnowledgeStore
from knowledge.query import Query
from settings import Settings


@dataclass
class Citation:
    number: int
    source: str
    page: int | None
    text: str

    def to_dict(self) -> dict:
        return {"number": self.number, "source": self.source, "page": self.page, "text": self.text}

    @property
    def label(self) -> str:
        name = self.source.rsplit("/", 1)[-1]
        return f"[{self.number}] {name}" + (f", page {self.page}" if self.page is not None else "")


@dataclass(frozen=True)
class PromptRecord:
    """The prompt an answer was generated from, exactly, with the parts it was built of."""

    text: str
    instruction: str = ""
    input: str = ""
    format: str = "alpaca"
    question: str = ""  # the user's message it answers


@dataclass
class Answer:
    """An answer as it streams: reasoning and answer so far, and what it stands on."""

    reasoning: str = ""
    answer: str = ""
    thinking_done: bool = False
    done: bool = False
    passages: list[Citation] = field(default_factory=list)  # every passage the model was shown
    support: list[SentenceSupport] = field(default_factory=list)  # each citing sentence's check, when done
    adapter: str | None = None
    model: str = ""
    prompt: PromptRecord = field(default_factory=lambda: PromptRecord(""))
    left_out: int = 0  # retrieved passages left out of the prompt to fit the model's context
    translations: tuple[str, ...] = ()  # the question as also searched for (QUERY_TRANSLATION)

    @property
    def citations(self) -> list[Citation]:
        """The passages the answer cites by number, and only those."""
        cited = set(cited_numbers(self.answer))
        return [p for p in self.passages if p.number in cited]

    @property
    def uncited(self) -> list[Citation]:
        """The passages the model was shown that the answer does not cite."""
        cited = set(cited_numbers(self.answer))
        return [p for p in self.passages if p.number not in cited]

    def check_citations(self) -> None:
        self.support = citation_support(self.answer, {p.number: p.text for p in self.passages})

    def to_dict(self) -> dict:
        return {"answer": self.answer, "reasoning": self.reasoning,
                "citations": [c.to_dict() for c in self.citations],
                "passages": [c.to_dict() for c in self.uncited],
                "support": [s.to_dict() for s in self.support], "adapter": self.adapter,
                "translations": list(self.translations)}


def fitted_prompt(messages: list[dict], hits: list[Hit] | None, runtime: ModelRuntime, params: GenerationParams
                  ) -> tuple[str, str, str, list[Hit] | None]:
    """(prompt, instruction, input, the passages kept): the lowest-ranked passages left out until the prompt
    leaves the answer its tokens (``max_new_tokens``, at most half the context). Runtimes that do not count
    tokens here (a server's) get every passage."""
    tokenizer, context_length = getattr(runtime, "tokenizer", None), getattr(runtime, "context_length", None)
    kept = hits
    while True:
        instruction, context = answer_parts(messages, kept)
        prompt = build_prompt(instruction, context, runtime.prompt_format, runtime.render_chat)
        if not kept or tokenizer is None or not context_length:
            return prompt, instruction, context, kept
        room = context_length - min(params.max_new_tokens, context_length // 2)
        if len(prompt_token_ids(tokenizer, prompt)) <= room:
            return prompt, instruction, context, kept
        kept = kept[:-1]


def as_citations(hits: list[Hit]) -> list[Citation]:
    return [Citation(n, h.source, h.page, h.text) for n, h in enumerate(hits, start=1)]


class Assistant:
    """The chat model over the knowledge store. The store and model load on first use.

    Each answer holds ``adapters.gate`` from reading which adapter answers until its generation ends, so a swap
    (``adapters``: choose, follow) happens between answers.
    """

    def __init__(self, settings: Settings | None = None, runtime: ModelRuntime | None = None,
                 store: KnowledgeStore | None = None):
        self.settings = settings or Settings.from_env()
        self._runtime, self._store = runtime, store
        self._runtime_lock, self._store_lock = threading.Lock(), threading.Lock()
        self.adapters = AdapterSwitch(self.settings)
        self.unloaded: str | None = None  # why the model is unloaded (a training run has its memory)

    @property
    def runtime(self) -> ModelRuntime:
        with self._runtime_lock:
            if self.unloaded:
                raise ModelUnavailable(self.unloaded)
            if self._runtime is None:
                self._runtime = load_runtime(self.settings)
            if self.adapters.runtime is None:
                self.adapters.attach(self._runtime)
        return self._runtime

    def unload(self, reason: str) -> None:
        """Free the model's memory after the answers in flight; until ``reload``, answers fail with ``reason``."""
        with self.adapters.gate.exclusive(), self._runtime_lock:
            runtime, self._runtime, self.unloaded = self._runtime, None, reason
            self.adapters.runtime = None
        if runtime is not None and hasattr(runtime, "close"):
            runtime.close()

    def reload(self) -> None:
        """Let the next use load the model again (``unload`` undone); the adapter choice applies as at start."""
        with self._runtime_lock:
            self.unloaded = None

    @property
    def store(self) -> KnowledgeStore:
        with self._store_lock:
            if self._store is None:
                self._store = KnowledgeStore(self.settings)
        return self._store

    def default_params(self) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.settings.max_new_tokens, temperature=self.settings.temperature)

    def retrieve(self, query: str | Query) -> list[Hit]:
        return self.store.search(query, k=self.settings.retrieval_k)

    def search_query(self, messages: list[dict]) -> Query:
        """What an answer to ``messages`` searches for: the last question, the earlier ones below it, and with
        QUERY_TRANSLATION the last one in the other language."""
        query = retrieval_query(messages)
        if self.settings.query_translation:
            runtime = self.runtime
            query = translated(query, self.generate, runtime.prompt_format, runtime.render_chat)
        return query

    def generate(self, prompt: str, params: GenerationParams | None = None,
                 stop: threading.Event | None = None, held: bool = False) -> Iterator[tuple[str, str, bool]]:
        """Stream (reasoning, answer, thinking_done) for a prompt that ends inside a think block.

        ``held``: the caller holds the model already (``model_held``), for several generations in a row."""
        if held:
            yield from self._generate(prompt, params, stop)
            return
        with self.adapters.gate.shared():
            yield from self._generate(prompt, params, stop)

    @contextlib.contextmanager
    def model_held(self) -> Iterator[ModelRuntime]:
        """The runtime, kept on the adapter it has now until the block ends (a swap waits): the generations of
        one result, such as a verification's three, all run on the adapter that result records."""
        runtime = self.runtime
        with self.adapters.gate.shared():
            yield runtime

    def _generate(self, prompt: str, params: GenerationParams | None, stop: threading.Event | None
                  ) -> Iterator[tuple[str, str, bool]]:
        text = ""
        for piece in self.runtime.stream(prompt, params or self.default_params(), stop):
            text += piece
            yield split_reasoning(text, started_in_think=True)

    def stream_answer(self, messages: list[dict], params: GenerationParams | None = None,
                      use_retrieval: bool = True, stop: threading.Event | None = None) -> Iterator[Answer]:
        """Answer the last user message of ``messages`` ({"role", "content"} dicts), streaming."""
        query = self.search_query(messages) if use_retrieval else None
        hits = self.retrieve(query) if query is not None else None
        runtime = self.runtime
        params = params or self.default_params()
        with self.adapters.gate.shared():
            prompt, instruction, context, kept = fitted_prompt(messages, hits, runtime, params)
            answer = Answer(passages=as_citations(kept or []), adapter=runtime.adapter, model=runtime.model_name,
                            prompt=PromptRecord(prompt, instruction, context, runtime.prompt_format,
                                                str(messages[-1]["content"])),
                            left_out=len(hits or []) - len(kept or []),
                            translations=query.translations if query is not None else ())
            yield from self._stream(answer, params, stop)

    def stream_again(self, previous: Answer, params: GenerationParams | None = None,
                     stop: threading.Event | None = None) -> Iterator[Answer]:
        """Another answer to exactly the prompt ``previous`` answered (same passages), to compare the two."""
        runtime = self.runtime
        with self.adapters.gate.shared():
            answer = Answer(passages=previous.passages, adapter=runtime.adapter, model=runtime.model_name,
                            prompt=previous.prompt, left_out=previous.left_out, translations=previous.translations)
            yield from self._stream(answer, params, stop)

    def _stream(self, answer: Answer, params: GenerationParams | None, stop: threading.Event | None
                ) -> Iterator[Answer]:
        yield answer
        prompt = answer.prompt.text
        for answer.reasoning, answer.answer, answer.thinking_done in self._generate(prompt, params, stop):
            yield answer
        answer.check_citations()
        answer.done = True
        yield answer

    def ask(self, question: str, params: GenerationParams | None = None, use_retrieval: bool = True) -> Answer:
        *_, answer = self.stream_answer([{"role": "user", "content": question}], params, use_retrieval)
        return answer
