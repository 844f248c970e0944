"""Quoted words located in a text: exactly, or nearly, in English and Japanese, with what differs.

Both sides are compared as *units*: a word for Latin script (and other scripts with spaces), a character for
Japanese, after NFKC width folding, case folding and one apostrophe. Whitespace, line breaks, punctuation and
quote marks are not units, so a line break inside the words, full-width letters or curly quotes change
nothing; "exact" means the same words (characters) in the same order.

Near-exact: the stretch of the text with the fewest units changed, added or dropped against the quote
(an edit distance whose start and end in the text are free), accepted when at most ``NEAR_EXACT_SHARE`` of
the quote's units differ. The distance is computed a row per quote unit with numpy, so a 3,000-character
window costs a millisecond, not a Python loop per cell.

The store finds the few chunks worth reading through its lexical index (``LexicalIndex.containing``) and
joins each with its neighbours (``join_chunks``), so words split across two chunks or a PDF page are found.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

NEAR_EXACT_SHARE = 0.25  # at most this share of the quote's units may differ for a near-exact match
MIN_UNITS_FOR_NEAR = 3  # a quote of fewer units is found exactly or not at all
CONTEXT_CHARS = 400  # text kept on either side of the located words in the passage

_JA = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff々〆ヶ"
_UNIT = re.compile(rf"[{_JA}]|[^\W_{_JA}]+(?:'[^\W_{_JA}]+)*")
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "′": "'", "`": "'"})
_JOINING = {"\uff9e", "\uff9f"}  # half-width (han)dakuten: NFKC joins them with the kana before
_BREAK = re.compile(r"\n|[。！？]|[.!?](?=\s)")


class Unit(NamedTuple):  # a tuple: a look-up makes hundreds of thousands of them
    key: str  # the folded word or character that is compared
    start: int  # its span in the original text
    end: int


def units(text: str) -> list[Unit]:
    """The words (Latin and the like) and characters (Japanese) of ``text``, folded, with their spans."""
    folded, origin = _fold(text)
    out = []
    for m in _UNIT.finditer(folded):
        if origin is None:
            out.append(Unit(m.group(), m.start(), m.end()))
        else:
            out.append(Unit(m.group(), origin[m.start()][0], origin[m.end() - 1][1]))
    return out


def _fold(text: str) -> tuple[str, list[tuple[int, int]] | None]:
    """NFKC, casefold and one apostrophe, with the span in ``text`` of each folded character (None: its own)."""
    if unicodedata.is_normalized("NFKC", text):  # most text: fold it whole, character for character
        folded = text.casefold()
        if len(folded) == len(text):
            return folded.translate(_APOSTROPHES), None
    pieces, origin, i = [], [], 0
    while i < len(text):
        j = i + 1
        while j < len(text) and (text[j] in _JOINING or unicodedata.combining(text[j])):
            j += 1
        piece = unicodedata.normalize("NFKC", text[i:j]).casefold().translate(_APOSTROPHES)
        pieces.append(piece)
        origin += [(i, j)] * len(piece)
        i = j
    return "".join(pieces), origin


@dataclass
class Difference:
    """One place where the quote and the document disagree.

    ``change``: "changed" (the quote has other words here), "added" (words of the quote the document
    lacks), "dropped" (words of the document the quote leaves out). ``start``/``end``: the document's side
    in the passage (equal for added words: where they would go).
    """

    change: str
    quoted: str
    document: str
    start: int
    end: int

    def to_dict(self) -> dict:
        return {"change": self.change, "quoted": self.quoted, "document": self.document}


@dataclass
class Located:
    """Where the words lie in one text: ``text[start:end]``, with ``distance`` units differing."""

    start: int
    end: int
    distance: int
    differences: list[Difference] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.distance == 0


def allowed_distance(quote_units: int) -> int:
    if quote_units < MIN_UNITS_FOR_NEAR:
        return 0
    return max(1, int(NEAR_EXACT_SHARE * quote_units))


def locate(quote: str, text: str) -> Located | None:
    """The stretch of ``text`` closest to ``quote``, if it is exact or near-exact; else None."""
    q_units, t_units = units(quote), units(text)
    if not q_units or not t_units:
        return None
    codes: dict[str, int] = {}
    q = np.array([codes.setdefault(u.key, len(codes)) for u in q_units], dtype=np.int64)
    t = np.fromiter((codes.get(u.key, -1) for u in t_units), dtype=np.int64, count=len(t_units))
    distance, end = _best_end(q, t)
    if distance > allowed_distance(len(q)):
        return None
    # The start is the end of the same alignment run backwards over the text before ``end``.
    _, back = _best_end(q[::-1], t[:end][::-1], anchored=True)
    start = end - back
    span = t_units[start:end]
    located = Located(span[0].start, span[-1].end, distance)
    matcher = difflib.SequenceMatcher(None, [u.key for u in q_units], [u.key for u in span], autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        quoted = quote[q_units[i1].start:q_units[i2 - 1].end] if i2 > i1 else ""
        if j2 > j1:
            d_start, d_end = span[j1].start, span[j2 - 1].end
        else:
            d_start = d_end = span[j1].start if j1 < len(span) else span[-1].end
        change = {"replace": "changed", "delete": "added", "insert": "dropped"}[op]
        located.differences.append(Difference(change, quoted, text[d_start:d_end], d_start, d_end))
    return located


def _best_end(q: np.ndarray, t: np.ndarray, anchored: bool = False) -> tuple[int, int]:
    """(fewest edits, end in ``t``) of aligning all of ``q`` with a stretch of ``t`` ending there.

    The stretch may start anywhere, or only at the start of ``t`` when ``anchored``.
    """
    n = len(t)
    steps = np.arange(n + 1)
    row = steps.copy() if anchored else np.zeros(n + 1, dtype=np.int64)
    for i, code in enumerate(q, start=1):
        best = np.empty(n + 1, dtype=np.int64)
        best[0] = i
        best[1:] = np.minimum(row[:-1] + (t != code), row[1:] + 1)  # match/substitute, or skip a quote unit
        # Skipping text units inside the stretch: row[j] = min over k <= j of best[k] + (j - k).
        row = np.minimum.accumulate(best - steps) + steps
    end = int(np.argmin(row))
    return int(row[end]), end


def join_chunks(chunks: list[tuple[str, dict]]) -> tuple[str, list[tuple[int, dict]]]:
    """Neighbouring chunks of one document (in order) as one text, and where each begins in it.

    Chunks overlap by whole sentences; the overlap (known from each chunk's ``start`` on its page, and
    checked against the text) is kept once. Chunks of different pages, or that do not overlap, are joined
    by a line break, which the comparison ignores.
    """
    text, starts = "", []
    previous: tuple[str, dict] | None = None
    for chunk_text, meta in chunks:
        piece = chunk_text
        if previous is not None:
            prev_text, prev_meta = previous
            overlap = prev_meta.get("start", 0) + len(prev_text) - meta.get("start", 0)
            same_page = prev_meta.get("page") == meta.get("page")
            if same_page and 0 < overlap <= len(chunk_text) and prev_text.endswith(chunk_text[:overlap]):
                piece = chunk_text[overlap:]
                starts.append((len(text) - overlap, meta))
            else:
                text += "\n"
                starts.append((len(text), meta))
        else:
            starts.append((0, meta))
        text += piece
        previous = (chunk_text, meta)
    return text, starts


def passage_around(text: str, start: int, end: int, context: int = CONTEXT_CHARS) -> tuple[int, int]:
    """The span of the passage shown with located words: up to ``context`` characters either side, cut
    at a sentence or line break where there is one, else at a space."""
    low, high = max(0, start - context), min(len(text), end + context)
    if low > 0:
        found = _BREAK.search(text, low, start)
        if found:
            low = found.end()
        elif (space := text.find(" ", low, start)) >= 0:
            low = space + 1
    if high < len(text):
        ends = [m.end() for m in _BREAK.finditer(text, end, high)]
        if ends:
            high = ends[-1]
        elif (space := text.rfind(" ", end, high)) >= 0:
            high = space
    while low < start and text[low].isspace():
        low += 1
    while high > end and text[high - 1].isspace():
        high -= 1
    return low, high


@dataclass
class PhraseMatch:
    """Quoted words located in the store: the passage around them, and what differs from the quote."""

    source: str
    page: int | None
    chunk_id: str  # the chunk where the words begin
    passage: str  # the located words with the text around them
    start: int  # the located words are passage[start:end]
    end: int
    distance: int  # units changed, added or dropped
    differences: list[Difference]

    @property
    def exact(self) -> bool:
        return self.distance == 0

    @property
    def words(self) -> str:
        """The words as the document has them."""
        return self.passage[self.start:self.end]


def match_in(quote: str, text: str, starts: list[tuple[int, dict]], chunk_ids: list[str]) -> PhraseMatch | None:
    """``locate`` in a joined window of chunks, as a ``PhraseMatch`` that names the chunk the words begin in."""
    located = locate(quote, text)
    if located is None:
        return None
    which = max(i for i, (offset, _) in enumerate(starts) if offset <= located.start)
    meta = starts[which][1]
    low, high = passage_around(text, located.start, located.end)
    differences = [Difference(d.change, d.quoted, d.document, d.start - low, d.end - low)
                   for d in located.differences]
    return PhraseMatch(meta["source"], meta.get("page"), chunk_ids[which], text[low:high], located.start - low,
                       located.end - low, located.distance, differences)
