"""Files in, text out: one loader per format, each checking that the file is what its name says.

A loader turns a file's bytes into a ``Document`` (text per page, plus warnings about parts it had to leave
out) or raises ``LoadError`` with a reason a person can act on. Nothing here touches the store, and nothing
here bounds time or memory: the store runs loaders in a separate process for that (``knowledge.reader``).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import charset_normalizer

from settings import Settings


class LoadError(Exception):
    """A file that cannot be turned into text; the message says why and what to do."""


@dataclass
class Section:
    text: str
    page: int | None = None  # 1-based page number, for formats that have pages


@dataclass
class Document:
    path: Path
    kind: str
    sections: list[Section]
    title: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(s.text for s in self.sections)


_MAGIC = [
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (e.g. DOCX, XLSX)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x7fELF", "an executable"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file (DOC, XLS)"),
    (b"SQLite format 3", "an SQLite database"),
]


def sniff(head: bytes) -> str | None:
    """What the first bytes of a file say it is, or None for no known binary signature."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return None


def decode_text(data: bytes) -> tuple[str, list[str]]:
    """Bytes to (text, warnings): BOMs first (UTF-8, UTF-16), then strict UTF-8, then detection (e.g.
    Shift_JIS, UTF-16 without a BOM); mostly-UTF-8 text with a few broken bytes keeps the rest."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):].decode("utf-8", errors="replace"), []
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), []
        except UnicodeDecodeError as e:
            raise LoadError(f"starts with a UTF-16 byte-order mark but is not valid UTF-16 ({e.reason})") from None
    what = sniff(data[:16])
    if what:
        raise LoadError(f"the name says text but the content is {what}; rename it or convert it to text")
    warnings = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(data) - e.start <= 3:  # a multi-byte character cut off at the end: keep the rest
            text = data[: e.start].decode("utf-8")
        else:
            text = _utf16_without_bom(data)
            if text is None:
                best = charset_normalizer.from_bytes(data).best()
                text = str(best) if best is not None else None
            if text is None or _control_ratio(text) > 0.05:
                lossy = data.decode("utf-8", errors="replace")
                replaced = lossy.count("\ufffd")
                if replaced <= 0.01 * len(lossy):
                    text = lossy
                    warnings.append(f"{replaced} places that are not valid UTF-8 replaced with U+FFFD")
                elif text is None:
                    raise LoadError("cannot tell its text encoding; save it as UTF-8 and add it again") from None
    if text and _control_ratio(text) > 0.05:
        raise LoadError("looks like binary data, not text; check the file or its extension")
    return text, warnings


def _utf16_without_bom(data: bytes) -> str | None:
    """Text saved as UTF-16 without a byte-order mark: mostly-Latin text has a zero byte in every other place."""
    sample = data[:4096]
    if len(sample) < 4:
        return None
    for zeros_at, encoding in ((1, "utf-16-le"), (0, "utf-16-be")):
        if sample[zeros_at::2].count(0) > 0.4 * len(sample) / 2 and sample[1 - zeros_at::2].count(0) == 0:
            try:
                return data[: len(data) // 2 * 2].decode(encoding)
            except UnicodeDecodeError:
                return None
    return None


def _control_ratio(text: str) -> float:
    sample = text[:20000]
    bad = sum(1 for c in sample if ord(c) < 32 and c not in "\n\r\t\f")
    return bad / len(sample)


def load_text(path: Path, data: bytes) -> Document:
    text, warnings = decode_text(data)
    heading = re.search(r"^# +(.+)$", text, re.MULTILINE) if path.suffix.lower() in (".md", ".markdown") else None
    return Document(path, "text", [Section(text)], title=heading.group(1).strip() if heading else path.name,
                    warnings=warnings)


def load_html(path: Path, data: bytes) -> Document:
    from bs4 import BeautifulSoup

    text, warnings = decode_text(data)
    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else path.name
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    text = "\n".join(line for line in lines if line)
    return Document(path, "html", [Section(text)], title=title or path.name, warnings=warnings)


def load_pdf(path: Path, data: bytes) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    head = data[:1024]
    if b"%PDF-" not in head:
        raise LoadError(f"the name says PDF but the content is {sniff(head) or 'not a PDF'}")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except Exception:  # noqa: BLE001 - pypdf raises several kinds here
                opened = 0
            if not opened:
                raise LoadError("the PDF is encrypted with a password; save a decrypted copy (e.g. `qpdf --decrypt`)")
        sections, warnings = [], []
        for number, page in enumerate(reader.pages, start=1):
            try:
                text = page.extract_text() or ""
            except Exception as e:  # noqa: BLE001 - one bad page must not cost the others
                warnings.append(f"page {number}: text could not be extracted ({e})")
                continue
            if text.strip():
                sections.append(Section(text, page=number))
    except LoadError:
        raise
    except (PdfReadError, OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"the PDF is damaged or truncated ({e}); re-export or repair it") from None
    if not sections and not warnings:
        raise LoadError("the PDF has no extractable text (scanned pages need OCR first)")
    title = (reader.metadata.title if reader.metadata and reader.metadata.title else "") or path.name
    return Document(path, "pdf", sections, title=str(title), warnings=warnings)


def load_docx(path: Path, data: bytes) -> Document:
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from lxml.etree import XMLSyntaxError

    if not data.startswith(b"PK\x03\x04"):
        raise LoadError(f"the name says DOCX but the content is {sniff(data[:16]) or 'not a ZIP-based DOCX'}")
    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, PackageNotFoundError, XMLSyntaxError, KeyError, ValueError, EOFError) as e:
        raise LoadError(f"the DOCX is damaged or truncated ({e}); re-save it from a word processor") from None
    parts = [p.text for p in document.paragraphs if p.text.strip()]
    for table in document.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells]
            if any(cells):
                parts.append(" | ".join(cells))
    title = document.core_properties.title or path.name
    return Document(path, "docx", [Section("\n".join(parts))], title=title)


def load_csv(path: Path, data: bytes) -> Document:
    text, warnings = decode_text(data)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    # The csv module refuses fields over 128 KB; a field can be as long as the file, which is bounded already.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        rows = list(csv.reader(io.StringIO(text), dialect))
    except csv.Error as e:
        raise LoadError(f"the CSV cannot be parsed ({e}); check its quoting") from None
    if not rows:
        return Document(path, "csv", [Section("")], title=path.name)
    header, lines = rows[0], []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            warnings.append(f"row {number}: {len(row)} fields where the header has {len(header)}; kept as is")
        names = header + [f"column {i + 1}" for i in range(len(header), len(row))]
        lines.append("; ".join(f"{n}: {v}" for n, v in zip(names, row, strict=False) if v.strip()))
    return Document(path, "csv", [Section("\n".join(lines))], title=path.name, warnings=warnings)


def _flatten(value, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            out += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            return [f"{prefix}: {', '.join(map(str, value))}"] if value else []
        out = []
        for item in value:
            out += _flatten(item, prefix)
            out.append("")  # records of a list stay apart
        return out
    if value is None or value == "":
        return []
    return [f"{prefix}: {value}" if prefix else str(value)]


def _record_text(record) -> str:
    return re.sub(r"\n{3,}", "\n\n", "\n".join(_flatten(record))).strip()


_TOO_DEEP = (f"nested more deeply than about {sys.getrecursionlimit()} levels, more than Python's JSON "
             "reader follows")


def load_json(path: Path, data: bytes) -> Document:
    try:
        text, warnings = decode_text(data)
        return Document(path, "json", [Section(_record_text(json.loads(text)))], title=path.name,
                        warnings=warnings)
    except json.JSONDecodeError as e:
        raise LoadError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise LoadError(f"the JSON is {_TOO_DEEP}; flatten it") from None


def load_jsonl(path: Path, data: bytes) -> Document:
    text, warnings = decode_text(data)
    records, bad_lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(_record_text(json.loads(line)))
        except json.JSONDecodeError as e:
            bad_lines.append(f"line {number}: invalid JSON ({e.msg}); left out")
        except RecursionError:
            bad_lines.append(f"line {number}: {_TOO_DEEP}; left out")
    if not records and bad_lines:
        raise LoadError(f"no line is valid JSON ({bad_lines[0]})")
    return Document(path, "jsonl", [Section("\n\n".join(records))], title=path.name, warnings=warnings + bad_lines)


LOADERS = {
    ".txt": load_text, ".text": load_text, ".md": load_text, ".markdown": load_text,
    ".html": load_html, ".htm": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
    ".csv": load_csv,
    ".json": load_json,
    ".jsonl": load_jsonl, ".ndjson": load_jsonl,
}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(document: Document) -> None:
    """Lone surrogates (e.g. JSON's "\\ud800") are no characters: neither the encoder nor Chroma takes them."""
    found = 0
    for section in document.sections:
        section.text, count = _LONE_SURROGATE.subn("\ufffd", section.text)
        found += count
    document.title = _LONE_SURROGATE.sub("\ufffd", document.title)
    if found:
        document.warnings.append(f"{found} invalid characters (lone UTF-16 surrogates) replaced with U+FFFD")


ZIP_BASED = (".docx",)  # formats that are ZIP archives: their expanded size is checked before they are opened


def check_unzipped_size(data: bytes, limit_mb: float) -> None:
    """Refuse a ZIP archive whose entries expand to more than ``limit_mb`` (a zip bomb), from its directory."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            expanded = sum(item.file_size for item in archive.infolist())
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise LoadError(f"the ZIP archive inside is damaged or truncated ({e}); re-save the file") from None
    if expanded > limit_mb * 1024 * 1024:
        raise LoadError(f"it expands to {expanded / 1048576:.1f} MB, over the {limit_mb:g} MB limit for "
                        "unpacked files (a zip bomb?); raise MAX_UNZIPPED_MB if it is genuine")


def load_file(path: Path, data: bytes | None = None,
              max_unzipped_mb: float = Settings.max_unzipped_mb) -> Document:
    """Load one file by its extension; raises LoadError for anything a person has to fix.

    ``data`` is the file's content when the caller has read it already (the store reads it once, to hash
    it, and parses those very bytes).
    """
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise LoadError(f"unsupported file type {path.suffix or '(none)'}; supported: {', '.join(sorted(LOADERS))}")
    try:
        if data is None:
            data = path.read_bytes()
    except PermissionError:
        raise LoadError("permission denied; make the file readable") from None
    except IsADirectoryError:
        raise LoadError("is a directory") from None
    if path.suffix.lower() in ZIP_BASED and data.startswith(b"PK\x03\x04"):
        check_unzipped_size(data, max_unzipped_mb)
    document = loader(path, data)
    _replace_lone_surrogates(document)
    if not any(s.text.strip() for s in document.sections):
        raise LoadError("no text found: the file is empty")
    return document
