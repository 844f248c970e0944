"""Citation faithfulness: is each sentence that cites passage [n] backed by what passage n says?

We check it lexically, not with the model as a judge. A sentence's content words (the knowledge store's BM25
tokens: English words and codes, Japanese character bigrams) are looked up in the passages it cites, and its
score is the share found in the best of them; every number and code in it must be there too, since a changed
figure is the commonest way an answer misquotes its source while reusing the passage's words. Why not a judge
prompt: a second generation per sentence would multiply the wait for every answer, a small model judges
its own sentences poorly, and the result would change with sampling. Why not embedding similarity: its scale
differs per embedding model (E5's unrelated texts score above MiniLM's paraphrases), so one threshold cannot
serve both, and it barely notices a changed number. The lexical check is instant, the same for any model,
works for Japanese, and says which words the passage lacks.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from knowledge.chunking import sentence_spans
from knowledge.lexical import tokenize

SUPPORT_THRESHOLD = 0.6  # share of a sentence's content words its cited passage must hold
_CITATION = re.compile(r"[\[［](\d+(?:\s*[,，、]\s*\d+)*)[\]］]")
_LEADING_CITATIONS = re.compile(r"((?:\s*[\[［]\d+(?:\s*[,，、]\s*\d+)*[\]］])+)[\s.。]*")
_STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for from with as is are was were be been being it its this that "
    "these those there here which who whom whose what when where why how not no do does did has have had can "
    "could would should will shall may might must so than then also very such into about over per their they "
    "them he she his her we our you your i me my".split())


@dataclass
class SentenceSupport:
    sentence: str  # as the answer wrote it, citation marks included
    citations: list[int]  # the passage numbers it cites
    score: float  # 0..1, the share of its content words found in the best of those passages
    supported: bool
    missing: list[str] = field(default_factory=list)  # its words and numbers that passage lacks
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def cited_numbers(text: str) -> list[int]:
    """The passage numbers ``text`` cites, like [1], [2][3], [2, 3] or ［4］, in order of first mention."""
    numbers: list[int] = []
    for match in _CITATION.finditer(text):
        for digits in re.split(r"\s*[,，、]\s*", match.group(1)):
            if int(digits) not in numbers:
                numbers.append(int(digits))
    return numbers


def cited_sentences(answer: str) -> list[str]:
    """The answer's sentences that cite a passage; citation marks standing alone join the sentence before."""
    sentences: list[str] = []
    for start, end in sentence_spans(answer):
        text = answer[start:end]
        leading = _LEADING_CITATIONS.match(text)
        if leading and sentences:  # "... litres. [1] Next sentence.": the [1] belongs to the litres
            sentences[-1] += " " + leading.group(1).strip()
            text = text[leading.end():]
        if text.strip(" .。"):
            sentences.append(text)
    return [s for s in sentences if _CITATION.search(s)]


def _content_words(text: str) -> list[str]:
    words = []
    for token in tokenize(_CITATION.sub(" ", text)):
        if token in _STOPWORDS or (len(token) == 1 and token.isascii() and not token.isdigit()):
            continue
        if token not in words:
            words.append(token)
    return words


def _is_figure(word: str) -> bool:
    return any(c.isdigit() for c in word)


def sentence_support(sentence: str, passages: dict[int, str]) -> SentenceSupport:
    """How well ``sentence`` is supported by the passages it cites (``passages``: number -> text)."""
    numbers = cited_numbers(sentence)
    known = [n for n in numbers if n in passages]
    if not known:
        return SentenceSupport(sentence, numbers, 0.0, False,
                               note=f"cites {', '.join(f'[{n}]' for n in numbers)}, which no passage is")
    words = _content_words(sentence)
    best: tuple[float, list[str]] | None = None
    for number in known:
        vocabulary = set(tokenize(passages[number]))
        missing = [w for w in words if w not in vocabulary]
        score = 1.0 - len(missing) / len(words) if words else 1.0
        if best is None or score > best[0] or (score == best[0] and len(missing) < len(best[1])):
            best = (score, missing)
    score, missing = best
    figures = [w for w in missing if _is_figure(w)]
    supported = score >= SUPPORT_THRESHOLD and not figures
    note = "" if supported else (
        f"the cited passage does not hold {', '.join(figures)}" if figures
        else f"most of its words are not in the cited passage ({score:.0%} found)")
    return SentenceSupport(sentence, numbers, round(score, 3), supported, missing, note)


def citation_support(answer: str, passages: dict[int, str]) -> list[SentenceSupport]:
    """A support check for each sentence of ``answer`` that cites a passage."""
    return [sentence_support(sentence, passages) for sentence in cited_sentences(answer)]
