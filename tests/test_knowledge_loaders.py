"""Each format loads to the right text; each kind of bad file is refused with a reason."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from knowledge.loaders import LoadError, load_file
from tests.documents import write_docx, write_encrypted_pdf, write_jsonl, write_pdf

JA = "東京の気象庁は十二日に大雨警報を発表した。明日は晴れる見込みです。"


def test_utf8_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("plain English text\nand 日本語", encoding="utf-8")
    assert load_file(path).text == "plain English text\nand 日本語"


@pytest.mark.parametrize("encoding", ["shift_jis", "utf-16", "utf-8-sig", "euc_jp"])
def test_japanese_text_in_any_common_encoding(tmp_path, encoding):
    path = tmp_path / "ja.txt"
    path.write_bytes((JA * 3).encode(encoding))  # utf-16 writes a BOM
    assert load_file(path).text == JA * 3


def test_markdown_is_text(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Title\n\nSome *markdown*.", encoding="utf-8")
    document = load_file(path)
    assert "Some *markdown*." in document.text
    assert document.title == "Title"  # the first top-level heading; a file without one keeps its name


def test_html_keeps_text_and_title_and_drops_scripts(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html><head><title>My page</title><script>var x = 'hidden';</script></head>"
                    "<body><h1>Heading</h1><p>Body text 本文です。</p></body></html>", encoding="utf-8")
    document = load_file(path)
    assert document.title == "My page"
    assert "Body text 本文です。" in document.text and "Heading" in document.text
    assert "hidden" not in document.text


def test_pdf_keeps_page_numbers(tmp_path):
    document = load_file(write_pdf(tmp_path / "a.pdf", ["first page text", "second page text"]))
    assert [(s.page, s.text.strip()) for s in document.sections] == [(1, "first page text"), (2, "second page text")]


def test_docx_paragraphs_and_tables(tmp_path):
    path = write_docx(tmp_path / "a.docx", ["Paragraph one.", "段落二。"], table=[["name", "code"], ["pump", "ZX-1"]])
    text = load_file(path).text
    assert "Paragraph one." in text and "段落二。" in text and "pump | ZX-1" in text


def test_csv_rows_carry_their_headers(tmp_path):
    path = tmp_path / "parts.csv"
    path.write_text("part,price\nZX-1,100\nZX-2,250\n", encoding="utf-8")
    assert load_file(path).text == "part: ZX-1; price: 100\npart: ZX-2; price: 250"


def test_csv_in_shift_jis(tmp_path):
    path = tmp_path / "ja.csv"
    path.write_bytes("品名,価格\nポンプ,100\n".encode("shift_jis"))
    assert load_file(path).text == "品名: ポンプ; 価格: 100"


def test_json_is_flattened_to_key_value_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"pump": {"code": "ZX-1", "flow": 40}, "tags": ["a", "b"]}), encoding="utf-8")
    assert load_file(path).text == "pump.code: ZX-1\npump.flow: 40\ntags: a, b"


def test_jsonl_keeps_good_lines_and_names_the_bad_one(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"q": "one"}, {"q": "two"}])
    path.write_text(path.read_text() + '{"q": "broken\n{"q": "three"}\n', encoding="utf-8")
    document = load_file(path)
    assert document.text == "q: one\n\nq: two\n\nq: three"
    assert document.warnings == ["line 3: invalid JSON (Unterminated string starting at); left out"]


@pytest.mark.parametrize("name, content, reason", [
    ("empty.txt", b"", "empty"),
    ("blank.md", b"  \n\n ", "empty"),
    ("image.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "PNG image"),
    ("fake.pdf", b"just some text, not a pdf", "not a PDF"),
    ("fake.docx", b"%PDF-1.4 not a docx", "a PDF document"),
    ("bad.json", b'{"a": ', "invalid JSON at line 1"),
    ("noise.csv", bytes(range(1, 32)) * 50, "binary data"),
    ("archive.zip", b"PK\x03\x04", "unsupported file type .zip"),
])
def test_bad_file_is_refused_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LoadError, match=reason):
        load_file(path)


def test_encrypted_pdf_is_refused(tmp_path):
    path = write_encrypted_pdf(tmp_path / "locked.pdf", ["secret"])
    with pytest.raises(LoadError, match="encrypted"):
        load_file(path)


@pytest.mark.parametrize("name", ["cut.pdf", "cut.docx"])
def test_truncated_file_is_refused(tmp_path, name):
    whole = tmp_path / ("whole" + name[3:])
    if name.endswith(".pdf"):
        write_pdf(whole, ["some text on a page"] * 3)
    else:
        write_docx(whole, ["some paragraph"] * 20)
    path = tmp_path / name
    path.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    with pytest.raises(LoadError, match="damaged or truncated"):
        load_file(path)



def test_a_docx_with_broken_xml_is_refused_with_a_reason(tmp_path):
    path = write_docx(tmp_path / "a.docx", ["some paragraph"])
    rewritten = io.BytesIO()
    with zipfile.ZipFile(path) as whole, zipfile.ZipFile(rewritten, "w") as broken:
        for item in whole.infolist():
            broken.writestr(item, b"garbage<<" if item.filename == "_rels/.rels" else whole.read(item))
    path.write_bytes(rewritten.getvalue())
    with pytest.raises(LoadError, match="damaged"):
        load_file(path)


def test_a_zip_bomb_is_refused_before_it_is_opened(tmp_path):
    path = tmp_path / "bomb.docx"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("word/document.xml", b"\0" * (3 * 1024 * 1024))
    with pytest.raises(LoadError, match=r"expands to 3\.0 MB, over the 2 MB limit"):
        load_file(path, max_unzipped_mb=2)


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_deeply_nested_json_is_refused_with_a_reason(tmp_path, name):
    path = tmp_path / name
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(LoadError, match="nested more deeply than"):
        load_file(path)


def test_json_nested_just_under_the_limit_loads(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"a": ' * 200 + '"bottom"' + "}" * 200)
    assert load_file(path).text.endswith(": bottom")


def test_a_csv_field_over_128_kb_loads(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("name,notes\nlong," + "word " * 40_000 + "\nshort,fine\n")
    assert load_file(path).text.endswith("name: short; notes: fine")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_text_without_a_byte_order_mark(tmp_path, encoding):
    path = tmp_path / "windows.txt"
    path.write_bytes("Notes exported from an old tool: café, naïve.\n".encode(encoding))
    assert load_file(path).text == "Notes exported from an old tool: café, naïve.\n"


def test_utf8_text_with_a_few_broken_bytes_keeps_the_rest_and_says_so(tmp_path):
    path = tmp_path / "log.txt"  # no encoding fits it whole: before, the whole file was refused
    path.write_bytes((JA + "\n").encode() * 20 + b"\xff\xfe broken \xc3 here\n" + (JA + "\n").encode() * 20)
    document = load_file(path)
    assert document.text.count(JA) == 40 and "\ufffd\ufffd broken \ufffd here" in document.text
    assert document.warnings == ["3 places that are not valid UTF-8 replaced with U+FFFD"]
