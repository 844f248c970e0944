"""Attributed quotes: the words found in the documents word for word or altered, and the debate told where."""

from __future__ import annotations

import json

import numpy as np
import pytest

from assistant.chat import Assistant
from assistant.quotes import AttributedQuote, parse_quote
from assistant.ui.verify import quote_markdown
from assistant.verify import verify
from engine.runtime import GenerationParams
from knowledge import KnowledgeStore
from knowledge.records import source_key
from settings import Settings
from tests.assistant_fixtures import ScriptedRuntime
from tests.documents import write_pdf
from tests.test_knowledge_cli import chroma_server  # noqa: F401 - the fixture

SHORT = GenerationParams(max_new_tokens=8, temperature=0.0)
CHRONICLE = (
    "The Chronicle of Port Wren\n\n"
    "Captain Mirela Voss commanded the schooner Tern for thirty years. At the launch of the new pier she "
    "told the crowd: \"Courage is the quiet work of every day,\nnot the loud cry of one hour.\" The harbour "
    "master, Gregor Pike, answered with a line of his own: \"A harbour is only as safe as its weakest rope.\"\n\n"
    "The pier itself was built of larch from the northern valleys, floated down the river in the spring of that "
    "year. Forty men worked on it through the summer, and the town paid them in salt fish and silver. The "
    "lanterns along its length were lit for the first time on the night of the launch, and the schooner Tern "
    "was the first ship to tie up there. The old wooden jetty beside it was taken down in the autumn.\n"
)
KIROKU = (
    "ポート・レンの記録\n\n"
    "ミレラ・ヴォス船長は三十年間、帆船テルン号を指揮した。新しい桟橋の開通式で、彼女は集まった人々にこう語った。"
    "「勇気とは日々の静かな仕事であり、\n一時の大声ではない。」港長のグレゴール・パイクは"
    "「港の安全は、いちばん弱い綱で決まる」と答えた。\n"
)
VOSS_EN = "Courage is the quiet work of every day, not the loud cry of one hour."
VOSS_JA = "勇気とは日々の静かな仕事であり、一時の大声ではない。"


@pytest.fixture
def chronicles(store, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "chronicle.txt").write_text(CHRONICLE, encoding="utf-8")
    (folder / "kiroku.txt").write_text(KIROKU, encoding="utf-8")
    (folder / "weather.txt").write_text("Fog lies over Port Wren most mornings in October.", encoding="utf-8")
    assert store.add([folder]).ok
    return store


# -- the claim ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("claim, words, speaker", [
    ('Albert Einstein said "Imagination is more important than knowledge."',
     "Imagination is more important than knowledge.", "Albert Einstein"),
    ("Einstein once said: “Imagination is more important than knowledge.”",
     "Imagination is more important than knowledge.", "Einstein"),
    ('"Imagination is more important than knowledge" (Albert Einstein)',
     "Imagination is more important than knowledge", "Albert Einstein"),
    ("“Imagination is more important than knowledge.” — Albert Einstein",
     "Imagination is more important than knowledge.", "Albert Einstein"),
    ("Mirela Voss's motto was 'Fortune favours the patient'.", "Fortune favours the patient", "Mirela Voss"),
    ("Mirela Voss’s motto was ‘Fortune favours the patient’.", "Fortune favours the patient", "Mirela Voss"),
    ('According to Mirela Voss, "the sea keeps no promises".', "the sea keeps no promises", "Mirela Voss"),
    ('"The sea keeps no promises," said Mirela Voss.', "The sea keeps no promises", "Mirela Voss"),
    ('"Don\'t count your chickens" is Aesop\'s line.', "Don't count your chickens", "Aesop"),
    ("「勇気とは日々の静かな仕事である」は ミレラ・ヴォス の言葉である", "勇気とは日々の静かな仕事である", "ミレラ・ヴォス"),
    ("ミレラ・ヴォス は「勇気とは日々の静かな仕事である」と述べた", "勇気とは日々の静かな仕事である", "ミレラ・ヴォス"),
    ("坂本龍馬が『日本を今一度せんたくいたし申候』と言った。", "日本を今一度せんたくいたし申候", "坂本龍馬"),
    ("坂本龍馬の名言「日本を今一度せんたくいたし申候」", "日本を今一度せんたくいたし申候", "坂本龍馬"),
    ("「日本を今一度せんたくいたし申候」（坂本龍馬）", "日本を今一度せんたくいたし申候", "坂本龍馬"),
    ("「日本を今一度せんたくいたし申候」と坂本龍馬は書いた。", "日本を今一度せんたくいたし申候", "坂本龍馬"),
    ("坂本龍馬曰く、「日本を今一度せんたくいたし申候」", "日本を今一度せんたくいたし申候", "坂本龍馬"),
])
def test_the_quoted_words_and_the_claimed_speaker_are_read_apart(claim, words, speaker):
    assert parse_quote(claim) == AttributedQuote(words, speaker)


@pytest.mark.parametrize("claim", ["The budget is 4 million crowns.", 'The report says revenue "doubled" in 2023.',
                                   "予算は四百万クローネである。"])
def test_a_claim_that_quotes_nothing_or_one_word_is_no_quote(claim):
    assert parse_quote(claim) is None


def test_a_quote_without_a_named_speaker_is_still_a_quote():
    assert parse_quote('Is "the sea keeps no promises" a real saying?') == AttributedQuote(
        "the sea keeps no promises", None)


# -- the look-up ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("words, name", [(VOSS_EN, "chronicle.txt"), (VOSS_JA, "kiroku.txt")])
def test_a_genuine_quote_is_found_word_for_word_across_a_line_break(chronicles, words, name):
    match = chronicles.find_phrase(words)
    assert match is not None and match.exact and match.differences == []
    assert match.source.endswith(name) and "\n" in match.words  # the document breaks the line inside the words
    assert match.passage.index(match.words) == match.start
    assert "Mirela Voss" in match.passage or "ミレラ・ヴォス" in match.passage


def test_width_case_and_quote_marks_are_not_differences(chronicles):
    match = chronicles.find_phrase("ＣＯＵＲＡＧＥ ｉｓ ｔｈｅ ｑｕｉｅｔ ｗｏｒｋ of every day — not the loud cry of one hour")
    assert match is not None and match.exact
    assert chronicles.find_phrase("「港の安全は、いちばん弱い綱で決まる」").exact


@pytest.mark.parametrize("words, quoted, document", [
    ("Courage is the silent work of every day, not the loud cry of one hour.", "silent", "quiet"),
    ("勇気とは日々の地道な仕事であり、一時の大声ではない。", "地道", "静か"),
])
def test_a_changed_word_is_found_altered_with_that_word_in_the_differences(chronicles, words, quoted, document):
    match = chronicles.find_phrase(words)
    assert match is not None and not match.exact
    assert [d.to_dict() for d in match.differences] == [{"change": "changed", "quoted": quoted,
                                                        "document": document}]
    assert match.passage[match.differences[0].start:match.differences[0].end] == document


def test_dropped_and_added_words_are_named(chronicles):
    match = chronicles.find_phrase("Courage is the quiet work of every single day, not the cry of one hour")
    assert {(d.change, d.quoted, d.document) for d in match.differences} == {("added", "single", ""),
                                                                            ("dropped", "", "loud")}


@pytest.mark.parametrize("words", ["Patience is the anchor of every sailor who ever came home safely.",
                                   "忍耐こそが、無事に帰ったすべての船乗りの錨である。",
                                   "Courage is the loud work of every night, not the quiet cry of one year."])
def test_a_quote_in_no_document_is_not_found(chronicles, words):
    assert chronicles.find_phrase(words) is None


def test_words_split_across_a_pdf_page_break_are_found_on_the_page_they_begin(store, tmp_path):
    pdf = write_pdf(tmp_path / "logbook.pdf", ["Ada Lovelock wrote in the log: The lamp is a promise we keep",
                                               "to strangers at sea every night. Then the log ends."])
    assert store.add([pdf]).ok
    match = store.find_phrase("The lamp is a promise we keep to strangers at sea every night.")
    assert match is not None and match.exact and (match.source, match.page) == (str(pdf), 1)
    assert "Ada Lovelock" in match.passage and "the log ends" in match.passage


def test_words_split_across_two_chunks_are_found(tmp_path, minilm_path, embedder):
    settings = Settings.from_env(knowledge_dir=tmp_path / "store", embedding_model=minilm_path, chunk_size=120,
                                 chunk_overlap=20)
    store = KnowledgeStore(settings, embedder=embedder)
    text = ("The keeper's log, autumn.\n\nThe first storm came early. She wrote that the sea owes nothing\n\n"
            "to those who fear it, and that every lamp is a debt.\n\nThe log ends there.")
    (tmp_path / "log.txt").write_text(text, encoding="utf-8")
    assert store.add([tmp_path / "log.txt"]).ok and store.documents()[0].chunks > 1
    chunks = store.chunks.get(include=["documents"])["documents"]
    assert not any("owes nothing to those" in " ".join(c.split()) for c in chunks)  # no one chunk holds it
    match = store.find_phrase("the sea owes nothing to those who fear it")
    assert match is not None and match.exact
    # Read with the chunks on either side even when only the best chunk is a candidate.
    assert store.find_phrase("the sea owes nothing to those who fear it", candidates=1).exact


def test_only_the_current_version_of_a_document_counts(chronicles, tmp_path):
    source = str(tmp_path / "docs" / "chronicle.txt")
    # Chunks of another version of the file, as a crashed or half-done replace leaves them.
    chronicles.chunks.upsert(ids=[f"{source_key(source)}:dead:0"], embeddings=np.ones((1, 384), dtype=np.float32),
                             documents=["Gregor Pike said: the tide forgives no idle oar."],
                             metadatas=[{"source": source, "version": "dead", "position": 0, "start": 0}])
    chronicles.connection.bump_revision()
    assert chronicles.find_phrase("the tide forgives no idle oar") is None
    (tmp_path / "docs" / "chronicle.txt").write_text("The chronicle was lost in the fire of 1911.")
    chronicles.add([tmp_path / "docs"])
    assert chronicles.find_phrase(VOSS_EN) is None


def test_quotes_are_found_in_a_store_on_a_chroma_server(tmp_path, minilm_path, embedder, chroma_server):  # noqa: F811
    settings = Settings.from_env(knowledge_dir=tmp_path / "unused", embedding_model=minilm_path,
                                 chroma_host="127.0.0.1", chroma_port=chroma_server)
    store = KnowledgeStore(settings, embedder=embedder)
    (tmp_path / "chronicle.txt").write_text(CHRONICLE, encoding="utf-8")
    assert store.add([tmp_path / "chronicle.txt"]).ok
    assert store.find_phrase(VOSS_EN).exact


# -- the debate -----------------------------------------------------------------------------------------

def judge(verdict: str, attribution: str) -> ScriptedRuntime:
    reply = json.dumps({"verdict": verdict, "confidence": 0.9, "citations": [1], "attribution": attribution,
                        "reason": "the passage"})
    return ScriptedRuntime("</think>For [1].", "</think>Against [1].", "</think>" + reply)


def test_a_quote_the_documents_give_to_someone_else_puts_that_passage_first(settings, chronicles):
    runtime = judge("refuted", "refuted")
    claim = 'Gregor Pike said "Courage is the quiet work of every day, not the loud cry of one hour."'
    result = verify(Assistant(settings, runtime=runtime, store=chronicles), claim, SHORT)
    first = result.evidence[0]
    assert first.number == 1 and first.source.endswith("chronicle.txt") and "Captain Mirela Voss" in first.text
    assert first.text == result.quote.match.passage  # the located passage, not a retrieved chunk
    out = result.to_dict()["quote"]
    assert set(out) >= {"text", "speaker", "found", "exact", "source", "page", "passage", "differences",
                        "attribution"}
    assert (out["speaker"], out["found"], out["exact"], out["words"], out["attribution"]) == (
        "Gregor Pike", True, True, "exact", "refuted")
    assert result.verdict == "refuted"
    for prompt in runtime.prompts:  # both cases and the judge read passage 1 and what the look-up found
        passage_one = prompt[prompt.index('<passage number="1"'):prompt.index("</passage>")]
        assert "Captain Mirela Voss" in passage_one and "found these words word for word in passage [1]" in prompt
    assert '"attribution"' in runtime.prompts[2] and '"attribution"' not in runtime.prompts[0]


def test_a_quote_in_no_document_is_never_supported(settings, chronicles):
    runtime = judge("supported", "supported")
    claim = 'Mirela Voss said "Patience is the anchor of every sailor who ever came home safely."'
    result = verify(Assistant(settings, runtime=runtime, store=chronicles), claim, SHORT)
    out = result.to_dict()
    assert (out["quote"]["found"], out["quote"]["words"], out["quote"]["attribution"]) == (False, "not found",
                                                                                            "unknown")
    assert out["verdict"] == "not enough evidence" and "in no document" in out["reason"] and out["citations"] == []
    assert "did not find these words" in runtime.prompts[2]


def test_an_altered_quote_shows_the_judge_what_differs(settings, chronicles):
    runtime = judge("refuted", "supported")
    result = verify(Assistant(settings, runtime=runtime, store=chronicles),
                    "ミレラ・ヴォス は「勇気とは日々の地道な仕事であり、一時の大声ではない。」と述べた", SHORT)
    out = result.to_dict()["quote"]
    assert (out["found"], out["exact"], out["words"], out["speaker"]) == (True, False, "altered", "ミレラ・ヴォス")
    assert out["differences"] == [{"change": "changed", "quoted": "地道", "document": "静か"}]
    assert 'changed: quoted "地道", document "静か"' in runtime.prompts[2]


def test_an_unparseable_judgement_leaves_the_attribution_unknown(settings, chronicles):
    runtime = ScriptedRuntime("</think>For.", "</think>Against.", '</think>{"attribution": "supported"')
    result = verify(Assistant(settings, runtime=runtime, store=chronicles), f'Mirela Voss said "{VOSS_EN}"', SHORT)
    assert result.verdict == "not enough evidence" and result.quote.attribution == "unknown"


def test_a_claim_without_a_quote_is_judged_as_before(settings, chronicles):
    runtime = judge("supported", "supported")
    result = verify(Assistant(settings, runtime=runtime, store=chronicles), "Fog lies over Port Wren in October.",
                    SHORT)
    assert result.quote is None and result.to_dict()["quote"] is None and result.verdict == "supported"
    assert '"attribution"' not in runtime.prompts[2] and "A search of every document" not in runtime.prompts[2]


# -- what people see ------------------------------------------------------------------------------------

def test_the_quote_block_marks_the_words_and_each_difference_escaped(settings, store, tmp_path):
    (tmp_path / "page.txt").write_text('<b>Voss</b> said: "Courage is the quiet work of every day" & left.')
    store.add([tmp_path / "page.txt"])
    result = verify(Assistant(settings, runtime=judge("refuted", "supported"), store=store),
                    'Mirela Voss said "Courage is the silent work of every day"', SHORT)
    block = quote_markdown(result)
    assert "<mark>Courage is the </mark><del>silent</del><ins>quiet</ins><mark> work of every day</mark>" in block
    assert "&lt;b&gt;Voss&lt;/b&gt;" in block and "<b>" not in block and "&amp; left." in block
    assert "**Attribution:** supported" in block and "found with differences" in block


def test_verify_on_the_command_line_reports_the_quote(chronicles, settings, tiny_model_dir, tmp_path, monkeypatch,
                                                      capsys):
    from assistant.__main__ import main

    for name, value in {"KNOWLEDGE_DIR": str(settings.knowledge_dir), "EMBEDDING_MODEL": settings.embedding_model,
                        "CHAT_MODEL": str(tiny_model_dir), "ADAPTER_DIR": str(tmp_path / "adapters"),
                        "MAX_NEW_TOKENS": "4"}.items():
        monkeypatch.setenv(name, value)
    claim = "Gregor Pike said “Courage is the silent work of every day, not the loud cry of one hour.”"
    assert main(["verify", claim, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quote"]["words"] == "altered" and out["quote"]["source"].endswith("chronicle.txt")
    assert out["evidence"][0]["text"] == out["quote"]["passage"]
    assert main(["verify", claim]) == 0
    text = capsys.readouterr().out
    assert 'Quote: "Courage is the silent work' in text and "(speaker: Gregor Pike)" in text
    assert 'changed: quoted "silent", document "quiet"' in text and "Attribution: unknown" in text
