"""Documents into overlapping chunks that end at paragraph and sentence boundaries, in English and Japanese.

Japanese has no spaces between words, so a splitter that breaks on whitespace cuts it mid-word or not at
all. Sentences here end at 。！？ (no space needed), at . ! ? followed by whitespace, and at line breaks.
Chunks are packed from whole sentences up to ``size`` characters. A chunk ends at the strongest break it can
reach once it is at least half full: between paragraphs (a blank line) before between lines, before between
sentences, so a chunk holds whole paragraphs where they fit. After a paragraph break the next chunk starts
afresh; otherwise it repeats whole sentences from the end of the previous one, up to ``overlap`` characters.
A short last chunk is filled backwards to full size. A sentence longer than ``size`` is cut into pieces of
``size`` characters (at a space when there is one near the end).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from knowledge.loaders import Document

_SENTENCE_END = re.compile(r"[。！？!?．]+[」』）)\"']*|[.!?]+[\"')\]]*(?=\s)|\n+")


@dataclass(frozen=True)
class Chunk:
    text: str
    position: int  # index of the chunk within its document
    start: int  # character offset within its page (or the whole text, for formats without pages)
    page: int | None = None

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, trailing whitespace excluded, empty sentences dropped."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def _cut_long(text: str, start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    pieces = []
    while end - start > size:
        cut = start + size
        space = text.rfind(" ", start + size // 2, cut)
        if space > start:
            cut = space
        pieces.append((start, cut))
        start = max(cut - overlap, start + 1)
        while start < end and text[start].isspace():
            start += 1
    pieces.append((start, end))
    return pieces


def _break_strength(text: str, end: int, next_start: int) -> int:
    """2 between paragraphs (a blank line), 1 between lines, 0 between sentences of one line."""
    newlines = text.count("\n", end, next_start)
    return 2 if newlines >= 2 else newlines


def chunk_text(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) offsets of the chunks of one text."""
    if overlap >= size:
        raise ValueError(f"chunk overlap ({overlap}) must be smaller than chunk size ({size})")
    spans = []
    for s, e in sentence_spans(text):
        spans += _cut_long(text, s, e, size, overlap) if e - s > size else [(s, e)]
    chunks, i = [], 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and spans[j][1] - spans[i][0] <= size:
            j += 1
        if j == len(spans):
            chunks.append((spans[i][0], spans[-1][1]))
            break
        # End at the strongest break between sentences i..j-1 that leaves the chunk at least half full.
        strength = _break_strength(text, spans[j - 1][1], spans[j][0])
        for c in range(j - 1, i, -1):
            if spans[c - 1][1] - spans[i][0] < size // 2 or strength == 2:
                break
            if (st := _break_strength(text, spans[c - 1][1], spans[c][0])) > strength:
                j, strength = c, st
        chunks.append((spans[i][0], spans[j - 1][1]))
        if strength == 2:  # a paragraph ends here: the next chunk starts with the next paragraph
            i = j
            continue
        # Start the next chunk with whole sentences from this one's end, within the overlap budget.
        k = j
        while k - 1 > i and spans[j - 1][1] - spans[k - 1][0] <= overlap and spans[j][1] - spans[k - 1][0] <= size:
            k -= 1
        i = k
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < size // 2:
        # A short tail chunk embeds as a near-empty vector that sits close to every query; fill it
        # backwards with whole sentences to full size instead.
        end, first = spans[-1][1], len(spans) - 1
        while first > 0 and end - spans[first - 1][0] <= size:
            first -= 1
        chunks[-1] = (spans[first][0], end)
        if chunks[-1][0] <= chunks[-2][0]:  # the filled tail now holds the chunk before it
            chunks.pop(-2)
    return chunks


def chunk_document(document: Document, size: int, overlap: int) -> list[Chunk]:
    chunks = []
    for section in document.sections:
        for start, end in chunk_text(section.text, size, overlap):
            chunks.append(Chunk(section.text[start:end], len(chunks), start, section.page))
    return chunks
