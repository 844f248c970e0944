"""Attributed quotes in a claim: the quoted words and who the claim says spoke them, in English and Japanese.

``parse_quote`` finds the longest quoted stretch ("…", “…”, '…', ‘…’, «…», 「…」, 『…』) and reads the
speaker from the words around it: ``X said "…"``, ``"…" (X)``, ``"…" — X``, ``X's motto was '…'``,
``According to X, "…"``, ``「…」は X の言葉である``, ``X は「…」と述べた``, ``Xの名言「…」`` and the like. A quote
of a single word (a scare quote) is not a quote; a quote without a recognizable speaker is still looked up,
with no speaker. ``QuoteCheck`` is what verification reports about one: where the words were found, and
whether the documents give them to that speaker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from knowledge.phrases import PhraseMatch, units

ATTRIBUTIONS = ("supported", "refuted", "unknown")
MIN_QUOTE_UNITS = 2  # words (English) or characters (Japanese): one quoted word is emphasis, not a quote

_QUOTED = re.compile(
    r"“(?P<a>[^”]+)”|„(?P<b>[^“”]+)[“”]|«\s*(?P<c>[^»]+?)\s*»|「(?P<d>[^」]+)」|『(?P<e>[^』]+)』"
    r"|＂(?P<f>[^＂]+)＂|〝(?P<g>[^〟″]+)[〟″]|\"(?P<h>[^\"]+)\""
    r"|‘(?P<i>.+?)’(?!\w)|(?<!\w)'(?P<j>.+?)'(?!\w)"
)
_SAY = (r"(?:once\s+|famously\s+|reportedly\s+|allegedly\s+|actually\s+|really\s+)?"
        r"(?:said|says|wrote|writes|declared|remarked|stated|observed|noted|proclaimed|put\s+it|"
        r"(?:is|was)\s+quoted\s+as\s+saying|told\s+[\w\s]+?)")
_KIND = r"(?:famous\s+)?(?:motto|words|saying|maxim|line|quote|advice|slogan|creed)"
_JA_KIND = r"(?:名言|言葉|格言|座右の銘|口癖|発言|一言)"
_JA_SAY = r"(?:述べ|言っ|言い|語っ|書い|記し|残し|話し|説い|いっ)"
_BEFORE = [re.compile(p, re.IGNORECASE) for p in (
    rf"^(?:it\s+was\s+|as\s+)?(?P<s>.+?)\s+{_SAY}\s*[:,]?$",
    rf"^(?P<s>.+?)(?:'s|’s)\s+{_KIND}\s+(?:was|is|were|are)\s*[:,]?$",
    r"^(?:according\s+to|in\s+the\s+words\s+of|as\s+(?P<x>.+?)\s+put\s+it)\s*(?P<s>.*?)\s*,?$",
    r"^(?P<s>[^,:：]{1,60}?)\s*[:：]$",
    rf"^(?P<s>.+?)\s*の\s*{_JA_KIND}\s*(?:は|に|として|で)?\s*[、,:：]?$",
    r"^(?P<s>.+?)\s*(?:曰く|いわく)\s*[、,]?$",
    r"^(?P<s>.+?)\s*(?:は|が|も)\s*[、,]?$",
)]
_AFTER = [re.compile(p, re.IGNORECASE) for p in (
    r"^[(（]\s*(?P<s>[^)）]+?)\s*[)）]",
    r"^[—–―~〜-]+\s*(?P<s>.+?)\s*[.。]?$",
    r"^,?\s*(?:said|says|wrote|writes|declared|remarked)\s+(?P<s>.+?)\s*[.]?$",
    r"^(?:was|is)\s+(?:said|written|coined|spoken|uttered|first\s+said)\s+by\s+(?P<s>.+?)\s*[.]?$",
    rf"^(?:is|was)\s+(?P<s>.+?)(?:'s|’s)\s+{_KIND}\s*[.]?$",
    r"^,?\s*(?:according\s+to|by)\s+(?P<s>.+?)\s*[.]?$",
    rf"^(?:は|とは|というのは|という)\s*(?P<s>.+?)\s*の\s*{_JA_KIND}",
    rf"^と\s*(?P<s>.+?)\s*(?:は|が)\s*{_JA_SAY}",
)]


@dataclass(frozen=True)
class AttributedQuote:
    text: str  # the quoted words, as the claim writes them
    speaker: str | None  # who the claim says spoke them, if it says


def parse_quote(claim: str) -> AttributedQuote | None:
    """The quote in ``claim`` and its claimed speaker; None when the claim quotes nothing."""
    best = None
    for m in _QUOTED.finditer(claim):
        words = next(g for g in m.groups() if g is not None).strip().rstrip(",、")
        if len(units(words)) >= MIN_QUOTE_UNITS and (best is None or len(words) > len(best[0])):
            best = (words, m.start(), m.end())
    if best is None:
        return None
    words, start, end = best
    return AttributedQuote(words, _speaker(claim[:start].strip(), claim[end:].strip()))


def _speaker(before: str, after: str) -> str | None:
    for patterns, text in ((_AFTER, after), (_BEFORE, before)):
        if not text:
            continue
        for pattern in patterns:
            m = pattern.search(text)
            if m and (name := _clean(m.group("s") or (m.groupdict().get("x") or ""))):
                return name
    return None


def _clean(name: str) -> str:
    name = name.strip(" \t\n,、。:：\"'“”‘’「」『』")
    name = re.sub(r"^(?:the\s+words\s+of|by)\s+", "", name, flags=re.IGNORECASE)
    return name if 0 < len(name) <= 80 else ""


@dataclass
class QuoteCheck:
    """What verification found about an attributed quote: the words' place in the documents, and who said them.

    ``words``: "exact", "altered" (near-exact: a few words changed, added or dropped) or "not found".
    ``attribution``: "supported", "refuted" or "unknown", from the judge; never "supported" when the words
    are in no document.
    """

    quote: AttributedQuote
    match: PhraseMatch | None = None
    attribution: str = "unknown"
    notes: list[str] = field(default_factory=list)

    @property
    def words(self) -> str:
        if self.match is None:
            return "not found"
        return "exact" if self.match.exact else "altered"

    def to_dict(self) -> dict:
        m = self.match
        return {"text": self.quote.text, "speaker": self.quote.speaker, "found": m is not None,
                "exact": m is not None and m.exact, "words": self.words,
                "source": m.source if m else None, "page": m.page if m else None,
                "passage": m.passage if m else None, "located": m.words if m else None,
                "differences": [d.to_dict() for d in m.differences] if m else [],
                "attribution": self.attribution}
