"""Quote look-up: attributed quotes found word for word, altered or not at all, in a haystack of 10k and 100k chunks.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.quote_lookup [--chunks 10000 100000] [--out FILE.md]

The quote set (``data/quotes/quotes.jsonl``): claims in English and Japanese, each labelled *genuine* (the
words as a fictional document of ``data/quotes/documents/`` has them, and its speaker), *altered* (a word
changed, added or dropped), *misattributed* (the document's exact words, given to someone else) or *absent*
(in no document), with the look-up's expected answer: "exact", "altered" or "not found". Each claim goes
through ``parse_quote`` and ``KnowledgeStore.find_phrase``, as ``verify`` runs them.

The haystack: the quote documents, Debian's English and Japanese manuals and FAQ (HTML; `apt-get install
debian-reference-en debian-reference-ja debian-faq debian-faq-ja`) and, up to the chunk count, filler copies
of the manuals' text with a copy number on each line (as ``benchmarks.ingest_speed`` builds its corpus). The
look-up never reads vectors, so the store is built with a stand-in encoder (random 8-dimensional vectors)
instead of embedding 100k chunks for an hour.

A case is right when the answer is the expected one and, when found, in the expected document; for a
misattributed quote the located passage must also name the speaker the document gives. Look-up time is per
claim with the lexical index already built (it is built once per store revision, on the first search or
look-up; that time is reported apart).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "quotes"
LABELS = ("genuine", "altered", "misattributed", "absent")


@dataclass
class Case:
    id: str
    lang: str
    label: str
    claim: str
    expect: str  # "exact", "altered" or "not found"
    source: str | None  # the document that holds the words
    speaker_in_document: str | None  # for a misattributed quote: who the document says spoke them


def load_cases(path: Path = DATA / "quotes.jsonl") -> list[Case]:
    return [Case(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class RandomVectors:
    """A stand-in encoder: the look-up under test reads only the lexical index and the chunks' text."""

    def __init__(self, dim: int = 8):
        self.rng, self.dim = np.random.default_rng(0), dim

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        return self.rng.standard_normal((len(texts), self.dim)).astype(np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_passages([text])[0]


def write_filler(folder: Path, chunks_wanted: int, size: int, overlap: int, start_copy: int) -> tuple[int, int]:
    """Copies of the manuals, a copy number on each line, until about ``chunks_wanted`` chunks; (chunks, next copy)."""
    from benchmarks.ingest_speed import base_documents
    from knowledge.chunking import chunk_document
    from knowledge.loaders import Document, Section

    documents, written, copy = base_documents(), 0, start_copy
    while written < chunks_wanted:
        for document in documents:
            text = "\n".join(f"{copy} {line}" for line in document.text.splitlines())
            written += len(chunk_document(Document(document.path, "text", [Section(text)]), size, overlap))
            (folder / f"{copy:04d}-{document.path.parent.name}-{document.path.stem}.txt").write_text(text)
            if written >= chunks_wanted:
                break
        copy += 1
    return written, copy


def outcome(store, case: Case) -> tuple[str, bool, float]:
    """(answer, right, seconds) for one claim."""
    from assistant.quotes import parse_quote

    start = time.perf_counter()
    quote = parse_quote(case.claim)
    match = store.find_phrase(quote.text) if quote else None
    seconds = time.perf_counter() - start
    answer = "not found" if match is None else ("exact" if match.exact else "altered")
    right = answer == case.expect
    if match is not None:
        right = right and Path(match.source).name == case.source
        if case.speaker_in_document:
            right = right and case.speaker_in_document in match.passage
    return answer, right, seconds


def measure(store, cases: list[Case], rounds: int) -> dict:
    start = time.perf_counter()
    store.find_phrase("index warm-up")  # builds the lexical index for this revision
    index_s = time.perf_counter() - start
    times, answers = [], {}
    for _ in range(rounds):
        for case in cases:
            answer, right, seconds = outcome(store, case)
            answers[case.id] = (answer, right)
            times.append(seconds)
    by_label = {label: [answers[c.id][1] for c in cases if c.label == label] for label in LABELS}
    by_lang = {lang: [answers[c.id][1] for c in cases if c.lang == lang] for lang in ("en", "ja")}
    return {"chunks": store.chunks.count(), "index_s": index_s, "answers": answers,
            "right": sum(r for _, r in answers.values()), "cases": len(cases),
            "by_label": {k: (sum(v), len(v)) for k, v in by_label.items()},
            "by_lang": {k: (sum(v), len(v)) for k, v in by_lang.items()},
            "p50_ms": statistics.median(times) * 1000, "p95_ms": float(np.percentile(times, 95)) * 1000,
            "max_ms": max(times) * 1000}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quote_lookup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3, help="times each claim is looked up (default 3)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    from benchmarks.haystack import haystack_files
    from benchmarks.retrieval_quality import machine
    from knowledge import KnowledgeStore
    from settings import Settings

    cases = load_cases()
    rows = []
    with tempfile.TemporaryDirectory(prefix="quote-bench-") as tmp:
        tmp = Path(tmp)
        settings = Settings.from_env(knowledge_dir=tmp / "store", embedding_model="none-quote-benchmark")
        store = KnowledgeStore(settings, embedder=RandomVectors())
        report = store.add([DATA / "documents", *haystack_files(tmp / "haystack")])
        assert not report.failed, report.failed[:3]
        filler, copy = tmp / "filler", 0
        filler.mkdir()
        for target in sorted(args.chunks):
            missing = target - store.chunks.count()
            if missing > 0:
                start = time.perf_counter()
                _, copy = write_filler(filler, missing, settings.chunk_size, settings.chunk_overlap, copy)
                report = store.add([filler])
                assert not report.failed, report.failed[:3]
                print(f"  filled to {store.chunks.count():,} chunks in {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
            result = measure(store, cases, args.rounds)
            wrong = [f"{k}: {a}" for k, (a, r) in result["answers"].items() if not r]
            print(f"  {result['chunks']:,} chunks: {result['right']}/{result['cases']} right, look-up p50 "
                  f"{result['p50_ms']:.1f} ms; wrong: {wrong or 'none'}", file=sys.stderr, flush=True)
            rows.append((result, wrong))

    command = "python -m benchmarks.quote_lookup" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    counts = {label: sum(c.label == label for c in cases) for label in LABELS}
    lines = [
        "# Quote look-up in the bilingual haystack", "",
        f"- command: `{command}`", f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- quotes: {len(cases)} ({', '.join(f'{v} {k}' for k, v in counts.items())}; "
        f"{sum(c.lang == 'en' for c in cases)} English, {sum(c.lang == 'ja' for c in cases)} Japanese)", "",
        "| chunks | right | genuine | altered | misattributed | absent | en | ja | index build s | "
        "look-up p50 / p95 / max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result, _ in rows:
        cells = [f"{r}/{n}" for r, n in (*result["by_label"].values(), *result["by_lang"].values())]
        lines.append(f"| {result['chunks']:,} | {result['right']}/{result['cases']} | " + " | ".join(cells)
                     + f" | {result['index_s']:.1f} | {result['p50_ms']:.1f} / {result['p95_ms']:.1f} / "
                     f"{result['max_ms']:.1f} |")
    for result, wrong in rows:
        if wrong:
            lines.append(f"\nWrong at {result['chunks']:,} chunks: " + "; ".join(wrong))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
