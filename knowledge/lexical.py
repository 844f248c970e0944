"""BM25 over chunks' terms (``knowledge.terms``), in immutable segments of numpy arrays.

A *segment* holds some documents' chunks (its rows) and, for each of its terms, the rows that hold it and
how often (weighted counts): sorted terms, then postings in term order, as a sparse matrix stored by column.
It is written once, as ``.npy`` files, and opened by memory map, so a process starts searching a million
chunks without reading them. A *snapshot* (``LexicalIndex``) is a list of segments plus which rows are
live: a removed document's rows are only marked dead until its segment is merged away.

BM25 is computed at query time from the raw counts, the live rows' lengths and document frequencies, as
Lucene does: adding a document changes every other chunk's BM25 weight (the average length, the idf),
so weights stored ahead of time would go stale; ``k1`` and ``b`` can change without a rebuild.
"""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knowledge.records import chunk_id
from knowledge.terms import BM25_B, BM25_K1, tokenize

__all__ = ["LexicalIndex", "Segment", "SegmentBuilder", "SegmentRow", "merge_segments", "tokenize", "write_segment"]

_BLOCK = 1024  # rows whose best score is taken together when picking the best rows
_ARRAYS = ("terms", "term_offsets", "indptr", "rows", "counts", "doc", "position", "page", "length")


@dataclass
class SegmentRow:
    """One chunk going into a segment: its document's index in the segment, and its terms."""

    doc: int
    position: int
    page: int | None
    terms: dict[str, float]


class Segment:
    """One immutable segment, opened by memory map from its folder."""

    def __init__(self, folder: Path):
        self.name = folder.name
        for name in _ARRAYS:  # plain arrays over the maps: slicing a np.memmap costs ~10 us more a time
            setattr(self, name, np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r")))
        self.docs: list[list[str]] = json.loads((folder / "docs.json").read_text(encoding="utf-8"))  # source, version
        # Each document's rows are consecutive: doc_start[d] .. doc_start[d + 1].
        self.doc_start = np.searchsorted(self.doc, np.arange(len(self.docs) + 1))
        self.n_rows = len(self.doc)
        self._offsets = self.term_offsets.tolist()
        self._blob = self.terms.tobytes()

    def column(self, term: str) -> int:
        """The term's column, or -1: a binary search over the sorted UTF-8 terms (byte order = code point order)."""
        key, offsets, blob = term.encode("utf-8"), self._offsets, self._blob
        lo, hi = 0, len(offsets) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if blob[offsets[mid]:offsets[mid + 1]] < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(offsets) - 1 and blob[offsets[lo]:offsets[lo + 1]] == key:
            return lo
        return -1

    def postings(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, weighted counts) of the rows holding ``term``."""
        j = self.column(term)
        if j < 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        return self.rows[self.indptr[j]:self.indptr[j + 1]], self.counts[self.indptr[j]:self.indptr[j + 1]]

    def all_terms(self) -> list[str]:
        offsets, blob = self._offsets, self._blob
        return [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


class SegmentBuilder:
    """A segment's rows as they arrive, held compactly until written: each chunk's terms become ids into the
    segment's vocabulary (int32) and weighted counts (float32), 8 bytes a posting where a dict of them costs
    about 100; so the memory of building a segment is bounded by its postings, not by Python objects.
    """

    def __init__(self):
        self.docs: list[list[str]] = []  # source, version
        self._vocab: dict[str, int] = {}  # term -> id, in order of first sight
        self._cols, self._counts = array("i"), array("f")  # postings, row after row
        self._widths, self._doc, self._position, self._page = array("i"), array("i"), array("i"), array("i")

    def __len__(self) -> int:
        """Rows so far."""
        return len(self._widths)

    def add_document(self, source: str, version: str, rows: Iterable[SegmentRow]) -> None:
        """A document's rows, in order (their ``doc`` is ignored: it is this document)."""
        doc = len(self.docs)
        self.docs.append([source, version])
        for row in rows:
            self.add_row(doc, row.position, row.page, row.terms)

    def add_row(self, doc: int, position: int, page: int | None, terms: dict[str, float]) -> None:
        vocab = self._vocab
        self._cols.extend([vocab.setdefault(t, len(vocab)) for t in terms])
        self._counts.extend(terms.values())
        self._widths.append(len(terms))
        self._doc.append(doc)
        self._position.append(position)
        self._page.append(-1 if page is None else page)

    def write(self, folder: Path) -> None:
        """Write the segment into the new ``folder``."""
        terms = sorted(self._vocab)
        remap = np.empty(len(terms), dtype=np.int32)
        remap[np.fromiter((self._vocab[t] for t in terms), dtype=np.int64, count=len(terms))] = np.arange(
            len(terms), dtype=np.int32)
        widths = np.frombuffer(self._widths, dtype=np.int32)
        _write_arrays(folder, self.docs, terms, remap[np.frombuffer(self._cols, dtype=np.int32)],
                      np.repeat(np.arange(len(widths), dtype=np.int32), widths),
                      np.frombuffer(self._counts, dtype=np.float32), np.frombuffer(self._doc, dtype=np.int32),
                      np.frombuffer(self._position, dtype=np.int32), np.frombuffer(self._page, dtype=np.int32))


def write_segment(folder: Path, docs: list[list[str]], rows: list[SegmentRow]) -> None:
    """Write a segment of ``rows`` (grouped by document, in ``docs`` order) into the new ``folder``."""
    builder = SegmentBuilder()
    builder.docs = [list(d) for d in docs]
    for row in rows:
        builder.add_row(row.doc, row.position, row.page, row.terms)
    builder.write(folder)


def merge_segments(folder: Path, parts: list[tuple[Segment, np.ndarray]]) -> None:
    """Write one segment of the live rows of ``parts`` (segment, its live mask): no text is read again.

    Holds the live postings of ``parts`` and one part's arrays at a time: bounded by what is merged.
    """
    terms_of = [segment.all_terms() for segment, _ in parts]
    union = sorted(set().union(*terms_of))  # code point order, as the segments' UTF-8 byte order
    column_of = {t: j for j, t in enumerate(union)}
    docs, all_cols, all_rows, all_counts, doc, position, page = [], [], [], [], [], [], []
    n_rows = 0
    for (segment, live), terms in zip(parts, terms_of, strict=True):
        live = np.asarray(live, dtype=bool)
        new_row = (np.cumsum(live) - 1 + n_rows).astype(np.int32)  # old row -> new row, for live rows
        seg_rows = np.asarray(segment.rows)
        keep = live[seg_rows]
        columns = np.fromiter((column_of[t] for t in terms), dtype=np.int32, count=len(terms))
        all_cols.append(np.repeat(columns, np.diff(segment.indptr))[keep])
        all_rows.append(new_row[seg_rows[keep]])
        all_counts.append(np.asarray(segment.counts)[keep])
        del seg_rows, keep
        live_docs = np.unique(np.asarray(segment.doc)[live])
        doc_map = np.full(len(segment.docs), -1, dtype=np.int32)
        doc_map[live_docs] = np.arange(len(docs), len(docs) + len(live_docs))
        docs += [segment.docs[d] for d in live_docs]
        doc.append(doc_map[np.asarray(segment.doc)[live]])
        position.append(np.asarray(segment.position)[live])
        page.append(np.asarray(segment.page)[live])
        n_rows += int(live.sum())
    del terms_of, column_of

    def joined(arrays, dtype):
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)

    _write_arrays(folder, docs, union, joined(all_cols, np.int32), joined(all_rows, np.int32),
                  joined(all_counts, np.float32), joined(doc, np.int32), joined(position, np.int32),
                  joined(page, np.int32))


def _write_arrays(folder, docs, terms, cols, rows, counts, doc, position, page) -> None:
    """Write postings given in any order as a segment: sorted by term, then row; one array at a time."""
    order = np.lexsort((rows, cols))  # by term, then by row
    encoded = [t.encode("utf-8") for t in terms]
    folder.mkdir(parents=True)

    def save(name: str, values: np.ndarray) -> None:
        _write_file(folder / f"{name}.npy", lambda f: np.save(f, values))

    save("length", np.bincount(rows, weights=counts, minlength=len(doc)).astype(np.float32))
    save("indptr", np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=len(terms)))]).astype(np.int64))
    save("rows", rows[order].astype(np.int32, copy=False))
    save("counts", counts[order].astype(np.float32, copy=False))
    del order
    save("terms", np.frombuffer(b"".join(encoded), dtype=np.uint8))
    save("term_offsets", np.concatenate([[0], np.cumsum([len(e) for e in encoded], dtype=np.int64)]).astype(np.int64))
    for name, values in (("doc", doc), ("position", position), ("page", page)):
        save(name, np.asarray(values, dtype=np.int32))
    _write_file(folder / "docs.json", lambda f: f.write(json.dumps(docs, ensure_ascii=False).encode("utf-8")))


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


class LexicalIndex:
    """Okapi BM25 over the live rows of some segments: a snapshot, never changed once made."""

    def __init__(self, segments: list[Segment], live: np.ndarray, k1: float = BM25_K1, b: float = BM25_B):
        self.segments, self.live, self.k1, self.b = segments, live, k1, b
        self.starts = np.cumsum([0] + [s.n_rows for s in segments])  # first row of each segment
        self.lengths = np.concatenate([s.length for s in segments]) if segments else np.zeros(0, np.float32)
        self.n_live = int(live.sum())
        # Weighted counts are sums of small binary fractions, so this sum is exact whatever the rows' order.
        self.mean_length = float(self.lengths[live].sum(dtype=np.float64)) / max(self.n_live, 1)
        # The dead rows, in all and of each segment (by its own rows): a search scores postings as they are and
        # zeroes these rows' scores at the end; a term's document frequency leaves out its dead postings.
        self._dead = np.flatnonzero(~live)
        self._dead_of = [self._dead[(self._dead >= self.starts[s]) & (self._dead < self.starts[s + 1])]
                         - self.starts[s] for s in range(len(segments))]
        # BM25's length norm of each row, k1 * (1 - b + b * length / mean length): fixed for a snapshot.
        self._norm = (np.float32(self.k1 * (1 - self.b))
                      + np.float32(self.k1 * self.b / max(self.mean_length, 1e-9)) * self.lengths)
        self.docs: dict[str, tuple[int, int]] = {}  # source -> (segment, document in it), live documents only
        for s, segment in enumerate(segments):
            first = live[self.starts[s] + segment.doc_start[:-1]] if len(segment.docs) else []
            for d, alive in enumerate(first):
                if alive:
                    self.docs[segment.docs[d][0]] = (s, d)

    def __len__(self) -> int:
        return self.n_live

    def version(self, source: str) -> str | None:
        if source not in self.docs:
            return None
        s, d = self.docs[source]
        return self.segments[s].docs[d][1]

    def document_rows(self, source: str) -> tuple[int, int]:
        s, d = self.docs[source]
        start = self.starts[s]
        return int(start + self.segments[s].doc_start[d]), int(start + self.segments[s].doc_start[d + 1])

    def chunk(self, row: int) -> tuple[str, str, int, int | None]:
        """(source, version, position, page) of a row."""
        s = int(np.searchsorted(self.starts, row, side="right")) - 1
        segment, local = self.segments[s], row - self.starts[s]
        source, version = segment.docs[segment.doc[local]]
        page = int(segment.page[local])
        return source, version, int(segment.position[local]), None if page < 0 else page

    def chunk_id(self, row: int) -> str:
        source, version, position, _ = self.chunk(row)
        return chunk_id(source, version, position)

    def rows_of(self, chunks: Iterable[tuple[str, str, int]]) -> np.ndarray:
        """A mask of the rows of (source, version, position) triples that are live here."""
        mask = np.zeros(len(self.live), dtype=bool)
        for source, version, position in chunks:
            if self.version(source) == version:
                start, end = self.document_rows(source)
                if 0 <= position < end - start:
                    mask[start + position] = True
        return mask

    def mask_of_sources(self, sources: Iterable[str]) -> np.ndarray:
        mask = np.zeros(len(self.live), dtype=bool)
        for source in sources:
            if source in self.docs:
                start, end = self.document_rows(source)
                mask[start:end] = True
        return mask

    def _postings(self, term: str) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], int]:
        """The postings of ``term``, segment by segment, as (segment, its own rows, weighted counts), dead rows
        included; and how many of them are live (the term's document frequency). Nothing is concatenated."""
        parts, doc_freq = [], 0
        for s, segment in enumerate(self.segments):
            rows, counts = segment.postings(term)
            if len(rows):
                parts.append((s, rows, counts))
                doc_freq += len(rows)
                dead = self._dead_of[s]
                if len(dead) > len(rows):
                    first, end = self.starts[s], self.starts[s + 1]
                    doc_freq -= len(rows) - int(np.count_nonzero(self.live[first:end][rows]))
                elif len(dead):  # postings are sorted by row: look the few dead rows up in them
                    at = np.searchsorted(rows, dead).clip(max=len(rows) - 1)
                    doc_freq -= int(np.count_nonzero(rows[at] == dead))
        return parts, doc_freq

    def _idf(self, doc_freq) -> np.ndarray:
        return np.log1p((self.n_live - doc_freq + 0.5) / (doc_freq + 0.5))

    def search(self, query: str | dict[str, float], n: int, allowed: np.ndarray | None = None) -> list[tuple[str, float]]:
        """The ``n`` best (chunk id, score) pairs with a score above zero; ``allowed`` masks rows.

        ``query`` is text, or its terms and their weights (``knowledge.query.Query.terms``).
        """
        if not self.n_live:
            return []
        scores = np.zeros(len(self.live), dtype=np.float32)
        # A query term that occurs twice counts twice, as in BM25's sum over query terms.
        terms = Counter(tokenize(query)) if isinstance(query, str) else query
        for term, times in terms.items():
            parts, doc_freq = self._postings(term)
            if not doc_freq:
                continue
            weight = np.float32(times * self._idf(doc_freq) * (self.k1 + 1))
            for s, rows, tf in parts:
                first, end = self.starts[s], self.starts[s + 1]
                scores[first:end][rows] += weight * tf / (tf + self._norm[first:end][rows])
        scores[self._dead] = 0.0
        if allowed is not None:
            scores[~allowed] = 0.0
        return [(self.chunk_id(row), score) for row, score in self._best(scores, n)]

    def containing(self, text: str, n: int) -> list[tuple[int, float]]:
        """The ``n`` chunks holding the largest share of ``text``'s distinct terms, as (row, share).

        Each term counts by its rarity (idf), so a chunk with the quote's rare words outranks one with its
        "the" and "of"; a term no chunk holds still counts in the whole, so the share says how much of the
        text a chunk could contain. Reads only the postings of those terms.
        """
        terms = set(tokenize(text))
        if not terms or not self.n_live:
            return []
        scores = np.zeros(len(self.live), dtype=np.float64)
        total = 0.0
        for term in terms:
            parts, doc_freq = self._postings(term)
            idf = float(self._idf(doc_freq))
            for s, rows, _ in parts:
                scores[self.starts[s]:self.starts[s + 1]][rows] += idf
            total += idf
        scores[self._dead] = 0.0
        return self._best(scores / total, n)

    def _best(self, scores: np.ndarray, n: int) -> list[tuple[int, float]]:
        """The ``n`` highest (row, score) pairs above zero, best first; equal scores by chunk id.

        The tie-break makes the order the same in every process, whatever order its segments' rows are in.
        """
        n = min(n, int(np.count_nonzero(scores > 0)))
        if n == 0:
            return []
        # The n-th largest of the blocks' maxima is at most the n-th largest score: only the rows at or above
        # it (few) are partitioned, not all of a million.
        blocks = len(scores) // _BLOCK
        if blocks > n:
            maxima = scores[:blocks * _BLOCK].reshape(blocks, _BLOCK).max(axis=1)
            candidates = np.flatnonzero(scores >= np.partition(maxima, blocks - n)[blocks - n])
        else:
            candidates = np.arange(len(scores))
        held = scores[candidates]
        threshold = np.partition(held, len(held) - n)[len(held) - n]
        candidates = candidates[held >= threshold]  # the n best, and every row tied with the n-th
        ranked = sorted((-float(scores[r]), self.chunk_id(int(r)), int(r)) for r in candidates)[:n]
        return [(row, -negative) for negative, _, row in ranked]
