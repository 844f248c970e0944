"""What the lexical leg indexes: the terms of Japanese and English text, and a chunk's weighted terms.

Why not whitespace tokens: a Japanese sentence has no spaces, so it would be one token and never match.
Japanese runs (kanji, hiragana, katakana) become overlapping character bigrams, which need no dictionary
and match any word of two or more characters. Latin words and codes are lower-cased; a code such as
``ZX-4471-B`` is kept whole and also split into its parts, so both ``zx-4471-b`` and ``4471`` find it.

This module is the hand-off between the store (which indexes chunks) and the index (which only counts
terms): change what a term is here, and bump ``TERMS_VERSION`` so that saved indexes are rebuilt.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

TERMS_VERSION = 1  # bump when tokenize or chunk_terms changes what a chunk's terms are

_TOKEN = re.compile(
    r"[a-z0-9]+(?:[-_./:][a-z0-9]+)*"  # words, numbers and codes
    r"|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u30fc々〆ヶ]+"  # Japanese runs
)
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u30fc々〆ヶ]")


def tokenize(text: str) -> list[str]:
    tokens = []
    for match in _TOKEN.finditer(unicodedata.normalize("NFKC", text).lower()):
        token = match.group()
        if _JAPANESE.match(token):
            if len(token) == 1:
                tokens.append(token)
            else:
                tokens += [token[i : i + 2] for i in range(len(token) - 1)]
        else:
            tokens.append(token)
            parts = re.split(r"[-_./:]", token)
            if len(parts) > 1:
                tokens += [p for p in parts if p]
    return tokens


def indexed_text(title: str, text: str) -> str:
    """What both legs index for a chunk: its document's title, then its text.

    Without the title only a document's first chunk carries the words that name what the document is
    about, so a question naming the subject ("who invented trellball?") ranks that first chunk above
    the one that answers it, in BM25 and in the embedding alike. Hits still return the chunk's own text.
    """
    return f"{title}\n{text}" if title else text


def chunk_terms(title: str, text: str) -> dict[str, float]:
    """A chunk's terms and their weighted counts, for the lexical index."""
    return dict(Counter(tokenize(indexed_text(title, text))))
