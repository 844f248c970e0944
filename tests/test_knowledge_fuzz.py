"""Malformed files of every kind beside good ones: the good ones are always stored, every bad one is named.

Every loader's kind (.txt .md .html .pdf .docx .csv .json .jsonl) is broken in every way we know of:
truncated, the wrong type, deeply nested, huge fields, odd encodings, odd characters, flipped bytes. One test
puts every kind broken every way into one folder; a hypothesis test mixes them at random, with random cut
points, depths, sizes and positions. Either way `add` returns, and its report accounts for every file.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knowledge import KnowledgeStore
from tests.documents import pdf_bytes

KINDS = ["txt", "md", "html", "pdf", "docx", "csv", "json", "jsonl"]
SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"%PDF-1.7\n", b"PK\x03\x04", b"\x1f\x8b\x08", b"\x7fELF", b"GIF89a",
              b"\xd0\xcf\x11\xe0"]
ODD_CHARACTERS = ["\0", "\u202e", "\u200f", "\U0001f600", "\ufeff", "\u200d", "\\ud800", "\x1b[31m"]


def sentence(word: str) -> str:
    return f"The {word} crate holds brass lanterns."


def docx_bytes(paragraphs: list[str]) -> bytes:
    import docx

    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def good_bytes(kind: str, text: str) -> bytes:
    """A valid file of ``kind`` whose text holds ``text``."""
    if kind == "pdf":
        return pdf_bytes([text.encode("ascii", "replace").decode()])
    if kind == "docx":
        return docx_bytes([text])
    return {
        "txt": text, "md": f"# Crates\n\n{text}\n",
        "html": f"<html><head><title>Crates</title></head><body><p>{text}</p></body></html>",
        "csv": f"item,note\ncrate,{text}\n", "json": json.dumps({"note": text}, ensure_ascii=False),
        "jsonl": json.dumps({"note": text}, ensure_ascii=False) + "\n" + json.dumps({"n": 2}) + "\n",
    }[kind].encode("utf-8")


def nested(kind: str, depth: int) -> bytes:
    if kind in ("json", "jsonl"):
        return ("[" * depth + "]" * depth + "\n").encode()
    if kind == "html":
        return ("<div>" * depth + "deep" + "</div>" * depth).encode()
    if kind == "pdf":
        return b"%PDF-1.4\n1 0 obj\n" + b"[" * depth + b"]" * depth + b"\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
    if kind == "docx":
        return docx_with_body("<w:p>" * depth + "</w:p>" * depth)
    if kind == "csv":
        return ("a,b\n" + '"' * depth + "," + "x\n").encode()
    return ("> " * depth + "deep quote\n").encode()


def docx_with_body(body: str) -> bytes:
    import zipfile

    source, out = zipfile.ZipFile(io.BytesIO(docx_bytes(["x"]))), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "word/document.xml":
                data = ('<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/'
                        f'wordprocessingml/2006/main"><w:body>{body}</w:body></w:document>').encode()
            target.writestr(item, data)
    return out.getvalue()


def huge_field(kind: str, size: int) -> bytes:
    field = "lantern " * (size // 8)
    if kind == "csv":
        return f"item,note\ncrate,{field}\nbox,small\n".encode()
    if kind == "html":
        return f'<p title="{field}">text</p>'.encode()
    if kind in ("pdf", "docx"):
        return good_bytes(kind, field)
    if kind in ("json", "jsonl"):
        return json.dumps({"note": field}).encode()
    return field.encode()


def mutate(kind: str, how: str, seed: int) -> bytes:
    """A file of ``kind`` broken in the way ``how``; ``seed`` picks the cut point, depth, size or position."""
    rng = random.Random(seed)
    base = good_bytes(kind, sentence("broken"))
    if how == "truncated":
        return base[: rng.randrange(len(base))]
    if how == "wrong type":
        return rng.choice(SIGNATURES) + bytes(rng.randrange(256) for _ in range(rng.randrange(64, 512)))
    if how == "nested":
        return nested(kind, rng.choice([100, 1000, 5000, 20000]))
    if how == "huge field":
        return huge_field(kind, rng.randrange(130_000, 200_000))
    if how == "utf-16 without bom":
        return base.decode("latin-1").encode("utf-16-le")
    if how == "shift_jis":
        japanese = good_bytes(kind, "東京の倉庫には真鍮のランタンがある。")
        return japanese.decode("latin-1" if kind in ("pdf", "docx") else "utf-8").encode("shift_jis", "replace")
    if how == "invalid utf-8":
        at = rng.randrange(len(base) + 1)
        return base[:at] + bytes(rng.choice([0xff, 0xfe, 0xc3, 0x80, 0xed])) * rng.randrange(1, 8) + base[at:]
    if how == "odd characters":
        odd = "".join(rng.choice(ODD_CHARACTERS) for _ in range(rng.randrange(1, 12)))
        text = sentence("odd") + odd + "\u05e9\u05dc\u05d5\u05dd"
        if kind == "docx":  # python-docx refuses to write what XML cannot hold: write the XML by hand
            return docx_with_body(f"<w:p><w:r><w:t>{text}</w:t></w:r></w:p>")
        return good_bytes(kind, text)
    if how == "flipped bytes":
        data = bytearray(base)
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    raise ValueError(how)


MUTATIONS = ["truncated", "wrong type", "nested", "huge field", "utf-16 without bom", "shift_jis", "invalid utf-8",
             "odd characters", "flipped bytes"]


@pytest.fixture
def fuzz_store(settings, embedder) -> KnowledgeStore:
    """One store for a test's examples. Large chunks keep huge fields to a few chunks: the encoder reads only
    the first 256 tokens of each anyway."""
    return KnowledgeStore(settings.__class__.from_env(
        knowledge_dir=settings.knowledge_dir, embedding_model=settings.embedding_model, chunk_size=50_000,
        chunk_overlap=0), embedder=embedder)


def add_and_check(store: KnowledgeStore, folder: Path, good: dict[str, str], bad: dict[str, str]) -> None:
    """``good``: file name -> a word only its text has; ``bad``: file name -> how it was broken."""
    report = store.add([folder])
    named = [Path(item["source"]).name for item in report.added + report.failed + report.skipped]
    assert sorted(named) == sorted([*good, *bad]), "every file is in the report, once"
    added = {Path(item["source"]).name for item in report.added}
    failed = {Path(item["source"]).name: item["error"] for item in report.failed}
    assert set(good) <= added, {name: failed.get(name) for name in good}
    assert all(reason.strip() for reason in failed.values())
    assert not {name for name, how in bad.items() if how == "wrong type"} & added
    for name, word in good.items():
        hits = store.search(f"{word} crate", k=1, mode="lexical", where={"source": str(folder / name)})
        assert hits and word in hits[0].text, name


def test_every_kind_broken_every_way_beside_good_files(fuzz_store, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    good, bad = {}, {}
    for kind in KINDS:
        good[f"good.{kind}"] = f"zebra{kind}"
        (folder / f"good.{kind}").write_bytes(good_bytes(kind, sentence(f"zebra{kind}")))
        for number, how in enumerate(MUTATIONS):
            name = f"bad-{number}-{how.replace(' ', '-')}.{kind}"
            (folder / name).write_bytes(mutate(kind, how, seed=number))
            bad[name] = how
    add_and_check(fuzz_store, folder, good, bad)


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(broken=st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(MUTATIONS), st.integers(0, 2**32)),
                       min_size=1, max_size=4),
       good_kind=st.sampled_from(KINDS))
def test_random_broken_files_never_cost_the_good_ones(fuzz_store, tmp_path, broken, good_kind):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    word = f"okapi{folder.name[-6:].lower()}".replace("_", "")
    good = {f"good.{good_kind}": word, "good.txt": word}
    for name in good:
        (folder / name).write_bytes(good_bytes(Path(name).suffix[1:], sentence(word)))
    bad = {}
    for number, (kind, how, seed) in enumerate(broken):
        name = f"bad{number}.{kind}"
        (folder / name).write_bytes(mutate(kind, how, seed))
        bad[name] = how
    add_and_check(fuzz_store, folder, good, bad)
