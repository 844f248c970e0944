"""What a completion does well or badly, measured without a model: the habits ORPO training is meant to change.

The recipe trains a reasoning model to stop repeating its ``<think>`` reasoning as its answer while keeping
the reasoning. So a completion is scored on: whether its reasoning block opens and closes, how much of its
answer repeats its reasoning, its answer's length, and (when the prompt holds numbered passages) whether the
answer cites one. ``finetune eval`` averages these per model; ``pairs generate`` uses them to rank answers.

Repetition is counted on character n-grams (after normalizing width, case and spaces), not words, so
Japanese (no spaces) counts the same as English. It is the smaller of two shares: of the answer's n-grams found
in the reasoning, and of the reasoning's n-grams found in the answer. An exact copy scores 1 and an unrelated
answer near 0; taking the smaller keeps a short conclusion that reuses the reasoning's last words ("Five
apples.") from counting as repetition, and a long answer that shares one phrase too.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass

from finetune.prompts import THINK_CLOSE, THINK_OPEN

NGRAM = 8  # characters; common English words and Japanese particles rarely make 8 in a row by chance
DUPLICATION_THRESHOLD = 0.5  # an answer that repeats more than this share of itself "repeats its reasoning"
_PASSAGE = re.compile(r'<passage number="(\d+)"')
_CITATION = re.compile(r"[\[［](\d+)(?:\s*[,，、]\s*\d+)*[\]］]")


@dataclass(frozen=True)
class CompletionScore:
    think_closed: bool  # the reasoning block opened (by the prompt or the completion) and closed
    duplication: float  # 0..1: how much of the reasoning the answer repeats
    answer_chars: int
    cites: bool | None  # the answer cites a passage the prompt holds; None when the prompt holds none
    correct: bool | None = None  # the expected answer is in the answer; None when none was given

    def to_dict(self) -> dict:
        return asdict(self)


def split_completion(prompt: str, completion: str) -> tuple[str, str, bool]:
    """(reasoning, answer, closed) of a completion, given the prompt it continues (which may open <think>)."""
    text = completion.lstrip()
    opened = prompt.rstrip().endswith(THINK_OPEN)
    if text.startswith(THINK_OPEN):
        text, opened = text[len(THINK_OPEN):], True
    if not opened:
        return "", completion.strip(), False
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    return (reasoning.strip(), answer.strip(), True) if closed else (reasoning.strip(), "", False)


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def _ngrams(text: str, n: int = NGRAM) -> list[str]:
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def _share_found(grams: list[str], other: set[str]) -> float:
    return sum(g in other for g in grams) / len(grams) if grams else 0.0


def duplication(reasoning: str, answer: str) -> float:
    """How much of the reasoning the answer repeats, 0 to 1 (see the module's docstring)."""
    answer_grams, reasoning_grams = _ngrams(_normalized(answer)), _ngrams(_normalized(reasoning))
    return min(_share_found(answer_grams, set(reasoning_grams)), _share_found(reasoning_grams, set(answer_grams)))


def cites_a_passage(prompt: str, answer: str) -> bool | None:
    """Whether the answer cites a passage number the prompt holds; None when the prompt holds no passages."""
    numbers = {int(n) for n in _PASSAGE.findall(prompt)}
    if not numbers:
        return None
    cited = {int(n) for group in _CITATION.finditer(answer) for n in re.findall(r"\d+", group.group(0))}
    return bool(cited & numbers)


def is_correct(answer: str, expected: str | None) -> bool | None:
    """Whether the expected answer appears in the answer, as a whole word or number ("5" is not in "15")."""
    if expected is None:
        return None
    pattern = r"(?<![0-9a-z])" + re.escape(_normalized(str(expected))) + r"(?![0-9a-z])"
    return re.search(pattern, _normalized(answer)) is not None


def score_completion(prompt: str, completion: str, expected: str | None = None) -> CompletionScore:
    reasoning, answer, closed = split_completion(prompt, completion)
    return CompletionScore(closed, round(duplication(reasoning, answer), 4), len(answer),
                           cites_a_passage(prompt, answer), is_correct(answer, expected))


def summarize(scores: list[CompletionScore]) -> dict:
    """Averages over completions: the rates ``finetune eval`` reports per model."""
    n = len(scores)
    if not n:
        return {"completions": 0}
    cited = [s.cites for s in scores if s.cites is not None]
    graded = [s.correct for s in scores if s.correct is not None]
    return {
        "completions": n,
        "think_rate": sum(s.think_closed for s in scores) / n,
        "duplication_rate": sum(s.duplication for s in scores) / n,
        "duplicating_share": sum(s.duplication > DUPLICATION_THRESHOLD for s in scores) / n,
        "answer_chars": sum(s.answer_chars for s in scores) / n,
        "citation_rate": sum(cited) / len(cited) if cited else None,
        "accuracy": sum(graded) / len(graded) if graded else None,
    }
