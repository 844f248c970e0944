"""`assistant pairs generate`: preference pairs without a person, from questions alone.

The questions come from a file, or the model drafts them from passages drawn at random from the knowledge store
(``draft_questions``).

For each question the current model answers several times (sampled, retrieval on), each answer is scored by
rules the user picks, and the best and worst become a pair when the best is clearly better (their scores
differ by at least ``margin``). The rules are the habits ORPO is meant to teach (``finetune.metrics``):

- ``duplication``: the answer repeats its reasoning (penalty: the duplication, 0..1);
- ``think``: the reasoning block is missing or never closed (penalty 1);
- ``citation``: passages were retrieved and the answer cites none of them (penalty 1);
- ``length``: the answer is shorter or longer than the range given (penalty 1);
- ``correct``: the question came with an expected answer and the answer does not hold it (penalty 1). A
  model that a first round of ORPO made terse may cut answers short; with this rule the next round's pairs
  teach it that a short wrong answer is worse than a long right one.

Pairs go to the pairs store (origin "generated") or to a JSONL file of TRL rows. A run can be stopped and
started again: questions that already have a pair there from the same model and adapter are skipped, so a
second round with a newly trained adapter (``--adapter``) adds pairs of its own for the same questions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from assistant.chat import Assistant
from assistant.prompting import answer_parts, build_prompt, quote_passages
from engine.runtime import GenerationParams
from errors import DataError
from finetune.data import read_json_rows
from finetune.metrics import CompletionScore, score_completion, split_completion
from finetune.pairs_store import Completion, PairsStore, is_pairs_store
from finetune.prompts import THINK_CLOSE

RULES = ("duplication", "think", "citation", "length", "correct")


@dataclass
class PairGenerationConfig:
    samples: int = 4  # answers per question; the best and the worst of them make the pair
    temperature: float = 0.8  # sampling, so that the answers differ
    max_new_tokens: int = 1024
    rules: tuple[str, ...] = ("duplication", "think")
    min_answer_chars: int = 1  # the `length` rule's range
    max_answer_chars: int = 2000
    margin: float = 0.5  # the best answer's score must beat the worst's by this much
    retrieval: bool = True
    questions_per_batch: int = 8  # answered together: samples x this many sequences in one generate call
    # The samples of a question continue one sampled reasoning and differ in their answers only, so a pair
    # teaches what follows </think> and leaves the reasoning alone (with the duplication rule: a rejected
    # answer that repeats the reasoning no longer drags the reasoning's own words down with it).
    shared_reasoning: bool = False

    def __post_init__(self):
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            raise DataError(f"unknown rule(s) {', '.join(unknown)}; choose from {', '.join(RULES)}")
        if self.samples < 2:
            raise DataError("--samples must be at least 2: a pair needs two answers")


@dataclass
class GenerationReport:
    pairs: int = 0
    skipped: int = 0  # already had a generated pair (a resumed run)
    no_clear_winner: list[str] = field(default_factory=list)  # questions whose answers scored too alike

    def to_dict(self) -> dict:
        return {"pairs": self.pairs, "skipped": self.skipped, "no_clear_winner": self.no_clear_winner}


def penalty(score: CompletionScore, config: PairGenerationConfig) -> float:
    """How badly an answer breaks the chosen rules; 0 is a clean answer."""
    total = 0.0
    if "duplication" in config.rules:
        total += score.duplication
    if "think" in config.rules and not score.think_closed:
        total += 1.0
    if "citation" in config.rules and score.cites is False:
        total += 1.0
    if "length" in config.rules and not config.min_answer_chars <= score.answer_chars <= config.max_answer_chars:
        total += 1.0
    if "correct" in config.rules and score.correct is False:
        total += 1.0
    return total


@dataclass(frozen=True)
class Question:
    text: str
    expected: str | None = None  # the right answer, for the ``correct`` rule


def read_questions(path: str | Path) -> list[Question]:
    """Questions from a text file (one per line) or JSONL/JSON rows with a "question" (or "prompt") field and
    an optional "expected" answer."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        questions = []
        for row in read_json_rows(path, "questions"):
            row = row if isinstance(row, dict) else {"question": row}
            text = str(row.get("question") or row.get("prompt") or "").strip()
            expected = row.get("expected")
            if text:
                questions.append(Question(text, None if expected is None else str(expected)))
    elif path.is_file():
        questions = [Question(line.strip()) for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
    else:
        raise DataError(f"{path} does not exist; give a file of questions, one per line")
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions


DRAFT_RULES = ("Write one question that the passage below answers, as a user of these documents would ask it. "
               "Reply with the question only, on one line.")


def draft_questions(assistant: Assistant, count: int, config: PairGenerationConfig, seed: int = 0) -> list[str]:
    """Questions the model drafts from ``count`` passages drawn at random from the knowledge store.

    A draft that is not one line ending in a question mark is left out, so the result may be shorter.
    """
    runtime = assistant.runtime
    passages = assistant.store.sample(count, seed)
    prompts = [build_prompt(DRAFT_RULES, quote_passages([hit]), runtime.prompt_format, runtime.render_chat)
               for hit in passages]
    drafts = sample_answers(assistant, prompts, PairGenerationConfig(
        samples=2, temperature=config.temperature, max_new_tokens=config.max_new_tokens, rules=config.rules))
    questions = []
    for prompt, texts in zip(prompts, drafts, strict=True):
        for text in texts:
            line = split_completion(prompt, text)[1].strip().splitlines()[:1]
            if line and line[0].rstrip().endswith(("?", "？")) and line[0] not in questions:
                questions.append(line[0].strip())
                break
    return questions


class _JsonlSink:
    """Generated pairs as TRL rows (plus the question and who answered, for resuming) appended to a JSONL file."""

    def __init__(self, path: Path, model: str, adapter: str | None):
        self.path = path
        self.done = set()
        if path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    row = json.loads(line) if line.strip() else {}
                except ValueError:
                    raise DataError(f"{path} line {number} is not JSON; repair or delete that line to resume "
                                    "into this file, or write to another file") from None
                if row.get("model") == model and row.get("adapter") == adapter:
                    self.done.add(row.get("question"))

    def add(self, chosen: Completion, rejected: Completion) -> None:
        row = {"prompt": chosen.prompt, "chosen": chosen.text, "rejected": rejected.text, "question": chosen.question,
               "model": chosen.model, "adapter": chosen.adapter}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class _StoreSink:
    def __init__(self, path: Path, model: str, adapter: str | None):
        self.store = PairsStore(path)
        self.done = self.store.questions_with_pairs("generated", model, adapter)

    def add(self, chosen: Completion, rejected: Completion) -> None:
        self.store.add_pair(self.store.add_answer(chosen), self.store.add_answer(rejected), "generated")


def sample_answers(assistant: Assistant, prompts: list[str], config: PairGenerationConfig,
                   samples: int | None = None) -> list[list[str]]:
    """``samples`` (by default ``config.samples``) completions of each prompt: all in one batch when the model
    runs in this process (a GPU answers many sequences at once for little more than the time of one), else one
    at a time."""
    runtime = assistant.runtime
    samples = samples or config.samples
    params = GenerationParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    if hasattr(runtime, "complete"):
        batch = [p for p in prompts for _ in range(samples)]
        texts = runtime.complete(batch, params, batch_size=len(batch))
        return [texts[i:i + samples] for i in range(0, len(texts), samples)]
    return [["".join(runtime.stream(p, params)) for _ in range(samples)] for p in prompts]


def sample_after_one_reasoning(assistant: Assistant, prompts: list[str], config: PairGenerationConfig
                               ) -> list[list[str]]:
    """``config.samples`` completions of each prompt that share one sampled reasoning and differ in their
    answers only. A prompt whose sampled reasoning never closes keeps that one completion (no pair)."""
    heads = [texts[0] for texts in sample_answers(assistant, prompts, config, samples=1)]
    closed = [i for i, head in enumerate(heads) if THINK_CLOSE in head]
    for i in closed:
        heads[i] = heads[i][:heads[i].index(THINK_CLOSE) + len(THINK_CLOSE)]
    answers = sample_answers(assistant, [prompts[i] + heads[i] for i in closed], config)
    completions = [[head] for head in heads]
    for i, texts in zip(closed, answers, strict=True):
        completions[i] = [heads[i] + text for text in texts]
    return completions


def generate_pairs(assistant: Assistant, questions: Iterable[Question | str], out: str | Path,
                   config: PairGenerationConfig | None = None,
                   progress: Callable[[str], None] | None = None) -> GenerationReport:
    """Answer each question ``config.samples`` times and keep clear best/worst pairs in ``out``.

    A question given as a plain string has no expected answer.

    Questions are answered ``config.questions_per_batch`` at a time; each batch's pairs are stored when it
    ends, so a stopped run loses at most one batch of work.
    """
    config = config or PairGenerationConfig()
    out = Path(out)
    runtime = assistant.runtime
    sink = (_StoreSink if is_pairs_store(out) else _JsonlSink)(out, runtime.model_name, runtime.adapter)
    report = GenerationReport()
    todo = []
    for question in questions:
        question = Question(question) if isinstance(question, str) else question
        if question.text in sink.done:
            report.skipped += 1
            if progress:
                progress(question.text)
        else:
            todo.append(question)
    for i in range(0, len(todo), config.questions_per_batch):
        _answer_batch(assistant, todo[i:i + config.questions_per_batch], sink, config, report, progress)
    return report


def _answer_batch(assistant: Assistant, questions: list[Question], sink, config: PairGenerationConfig,
                  report: GenerationReport, progress: Callable[[str], None] | None) -> None:
    runtime = assistant.runtime
    prompts = []
    for question in questions:
        hits = assistant.retrieve(question.text) if config.retrieval else None
        instruction, context = answer_parts([{"role": "user", "content": question.text}], hits)
        prompts.append((build_prompt(instruction, context, runtime.prompt_format, runtime.render_chat),
                        instruction, context))
    sample = sample_after_one_reasoning if config.shared_reasoning else sample_answers
    for question, (prompt, instruction, context), texts in zip(
            questions, prompts, sample(assistant, [p[0] for p in prompts], config), strict=True):
        scored = []
        for text in texts:
            reasoning, answer, closed = split_completion(prompt, text)
            scored.append((penalty(score_completion(prompt, text, question.expected), config), Completion(
                prompt, reasoning, answer, instruction, context, runtime.prompt_format, runtime.model_name,
                runtime.adapter, question.text, thinking_closed=closed)))
        scored.sort(key=lambda item: item[0])
        (best, chosen), (worst, rejected) = scored[0], scored[-1]
        if worst - best >= config.margin:
            sink.add(chosen, rejected)
            sink.done.add(question.text)
            report.pairs += 1
        else:
            report.no_clear_winner.append(question.text)
        if progress:
            progress(question.text)
