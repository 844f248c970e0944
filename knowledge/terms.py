"""What the lexical leg indexes: the terms of Japanese and English text, and a chunk's weighted terms.

Both sides, chunks and queries, go through ``tokenize``: NFKC (full-width letters and digits, half-width kana
folded), lower case, then per run of script:

- Japanese has no spaces, so a whitespace tokenizer makes a sentence one token that never matches. Japanese
  runs are cut into words by SudachiPy's morphological analyzer (its core dictionary ships on PyPI), each word
  in its dictionary form (燃え広がり -> 燃え広がる, およそ -> 凡そ), particles, auxiliaries and symbols left
  out. On the benchmark this beat overlapping character bigrams, and bigrams added beside the words gained
  nothing (``docs/retrieval-quality.md``).
- Latin words are stemmed (Snowball English: kits -> kit), so a question's "spring kit" finds "spring kits".
  A code such as ``ZX-4471-B`` is kept whole, unstemmed, and also split into its parts, so both
  ``zx-4471-b`` and ``4471`` find it.

This module is the hand-off between the store (which indexes chunks) and the index (which only counts
terms): change what a term is here, and bump ``TERMS_VERSION`` so that saved indexes are rebuilt.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import Counter
from functools import lru_cache

TERMS_VERSION = 2  # bump when tokenize or chunk_terms changes what a chunk's terms are
TITLE_WEIGHT = 2.0  # a title term counts this many times a body term (BM25F's field weight; benchmark-chosen)
# Okapi BM25's parameters for the index of these terms: k1 how soon a repeated term stops adding (0.9, lower
# than the textbook 1.2-1.5, chosen by the benchmark: a document's first chunk names its subject over and over
# and outranked the chunk that answers); b how much a long chunk is discounted.
BM25_K1 = 0.9
BM25_B = 0.75

_JA = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u30fc々〆ヶ"
_LETTER = rf"(?:(?![{_JA}])[^\W_])"
_TOKEN = re.compile(
    rf"{_LETTER}+(?:[-_./:]{_LETTER}+)*"  # words, numbers and codes
    rf"|[{_JA}]+"  # Japanese runs
)
_JAPANESE = re.compile(rf"[{_JA}]")
_CODE_SEPARATORS = re.compile(r"[-_./:]")
# Sudachi refuses inputs over about 49 KB; a run is analysed in pieces well under that.
_RUN_PIECE = 4000
# Parts of speech that carry no content: particles, auxiliary verbs, punctuation and symbols, blanks.
_SKIPPED_POS = frozenset({"助詞", "助動詞", "補助記号", "記号", "空白"})
_local = threading.local()  # a Sudachi tokenizer holds state while it works: one per thread


def has_japanese(text: str) -> bool:
    """Whether ``text`` holds any Japanese script (kana, kanji, the iteration and prolonged-sound marks)."""
    return _JAPANESE.search(text) is not None


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for match in _TOKEN.finditer(unicodedata.normalize("NFKC", text).lower()):
        token = match.group()
        if _JAPANESE.match(token):
            for i in range(0, len(token), _RUN_PIECE):
                tokens += _japanese_words(token[i:i + _RUN_PIECE])
        elif _CODE_SEPARATORS.search(token):
            tokens.append(token)
            tokens += [p for p in _CODE_SEPARATORS.split(token) if p]
        else:
            tokens.append(_stem(token))
    return tokens


def _japanese_words(run: str) -> list[str]:
    """The content words of a run of Japanese, in dictionary form (mode C: the longest units)."""
    from sudachipy import SplitMode

    return [m.normalized_form() for m in _sudachi().tokenize(run, SplitMode.C)
            if m.part_of_speech()[0] not in _SKIPPED_POS]


def _sudachi():
    tokenizer = getattr(_local, "sudachi", None)
    if tokenizer is None:
        from sudachipy import Dictionary

        tokenizer = _local.sudachi = Dictionary(dict="core").create()
    return tokenizer


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word) if word.isalpha() else word


@lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


def indexed_text(title: str, text: str) -> str:
    """What the vector leg embeds for a chunk: its document's title, then its text.

    Without the title only a document's first chunk carries the words that name what the document is
    about, so a question naming the subject ("who invented trellball?") ranks that first chunk above
    the one that answers it. Hits still return the chunk's own text.
    """
    return f"{title}\n{text}" if title else text


def chunk_terms(title: str, text: str) -> dict[str, float]:
    """A chunk's terms and their weighted counts, for the lexical index: its text's, plus its document title's
    counted ``TITLE_WEIGHT`` times (the title names the subject that every chunk of the document is about)."""
    counts: Counter[str] = Counter(tokenize(text))
    for term, n in Counter(tokenize(title)).items():
        counts[term] += TITLE_WEIGHT * n
    return {term: float(n) for term, n in counts.items()}
