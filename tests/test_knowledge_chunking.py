"""Chunks end at paragraph and sentence ends in English and Japanese, stay within size, overlap by whole sentences."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge.chunking import chunk_document, chunk_text, sentence_spans
from knowledge.loaders import Document, Section

JA_SENTENCES = [f"第{i}条の規定により、委員会は毎年{i}回の会合を開催しなければならない。" for i in range(1, 30)]
EN_SENTENCES = [f"Rule {i} says the committee meets {i} times a year. " for i in range(1, 30)]


def texts(text, size, overlap):
    return [text[s:e] for s, e in chunk_text(text, size, overlap)]


def test_japanese_splits_at_sentence_ends_without_spaces():
    text = "".join(JA_SENTENCES)
    assert [text[s:e] for s, e in sentence_spans(text)] == JA_SENTENCES


def test_english_splits_at_full_stops_followed_by_space_not_inside_numbers():
    text = "Version 2.5 is out. It costs $3.50! Really? Yes."
    assert [text[s:e] for s, e in sentence_spans(text)] == ["Version 2.5 is out.", "It costs $3.50!", "Really?", "Yes."]


@pytest.mark.parametrize("sentences", [JA_SENTENCES, EN_SENTENCES])
def test_chunks_are_whole_sentences_within_size(sentences):
    text = "".join(sentences)
    chunks = texts(text, size=200, overlap=60)
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(chunk) <= 200
        assert chunk.strip() in text
        assert chunk.strip().startswith(("第", "Rule")) and chunk.strip().endswith(("。", "."))


@pytest.mark.parametrize("sentences", [JA_SENTENCES, EN_SENTENCES])
def test_consecutive_chunks_overlap_by_whole_sentences_and_cover_everything(sentences):
    text = "".join(sentences)
    chunks = texts(text, size=200, overlap=80)
    for before, after in zip(chunks, chunks[1:], strict=False):
        first_of_next = after.split("。")[0] if "。" in after else after.split(". ")[0]
        assert first_of_next in before  # the next chunk starts with a sentence of the previous one
    for sentence in sentences:
        assert any(sentence.strip() in chunk for chunk in chunks)


def test_sentence_longer_than_size_is_cut_into_pieces():
    text = "あ" * 450 + "。短い文。"
    chunks = texts(text, size=200, overlap=20)
    assert all(len(c) <= 200 for c in chunks)
    assert "".join(c[20:] if i else c for i, c in enumerate(chunks[:3])).startswith("あ" * 440)


def test_line_breaks_end_sentences():
    assert texts("heading without stop\nbody line one\nbody line two", size=20, overlap=0) == [
        "heading without stop", "body line one", "body line two"]


def test_overlap_must_be_smaller_than_size():
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("text", 100, 100)


def test_document_chunks_keep_page_position_and_hash():
    document = Document(Path("x.pdf"), "pdf", [Section("Page one text.", page=1), Section("Page two text.", page=2)])
    chunks = chunk_document(document, size=100, overlap=10)
    assert [(c.page, c.position, c.start, c.text) for c in chunks] == [
        (1, 0, 0, "Page one text."), (2, 1, 0, "Page two text.")]
    assert chunks[0].content_hash != chunks[1].content_hash and len(chunks[0].content_hash) == 16


def test_a_short_last_chunk_is_filled_backwards_to_full_size():
    text = "".join(EN_SENTENCES[:9])  # 8 sentences fill one 400-character chunk; the 9th would stand alone
    chunks = texts(text, size=400, overlap=0)
    assert len(chunks) == 2
    assert chunks[-1].endswith(EN_SENTENCES[8].strip()) and len(chunks[-1]) > 300


@pytest.mark.parametrize("sentences", [JA_SENTENCES, EN_SENTENCES])
def test_chunks_end_at_paragraph_breaks_and_the_next_starts_with_the_next_paragraph(sentences):
    paragraphs = ["".join(sentences[0:3]), "".join(sentences[3:5]), "".join(sentences[5:8])]
    text = "\n\n".join(p.strip() for p in paragraphs)
    size = len(paragraphs[0]) + len(paragraphs[1]) // 2  # the first chunk could take half the second paragraph
    chunks = texts(text, size=size, overlap=size // 3)
    assert chunks[0] == paragraphs[0].strip()
    assert chunks[1].startswith(paragraphs[1].strip())  # no sentence of the first paragraph repeated


def test_a_chunk_prefers_a_line_break_to_a_sentence_end_but_stays_at_least_half_full():
    line = "One fact. Another fact. A third fact."
    text = "\n".join([line] * 6)
    chunks = texts(text, size=100, overlap=0)
    assert all(c.endswith(line) and len(c) >= 50 for c in chunks)
