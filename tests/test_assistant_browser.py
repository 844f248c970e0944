"""The app in real headless Chromium (Debian's), driven by Playwright.

Screenshots go to a temporary folder, or to SCREENSHOTS_DIR when it is set: `make screenshots` refreshes the
docs' pictures in docs/screenshots/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.assistant_fixtures import (
    ADAPTER_NAME,
    NOTES,
    app_settings,
    get_json,
    running_app,
    serving,
    wait_for_model,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tiny_app):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.goto(tiny_app)
    expect(page.locator("#model-status")).to_contain_text(f"adapter {ADAPTER_NAME} — ready")
    yield page
    context.close()


@pytest.fixture(scope="session")
def screenshots_dir(tmp_path_factory) -> Path:
    """SCREENSHOTS_DIR when set, else a temporary folder: running the tests never rewrites the docs."""
    folder = Path(os.environ["SCREENSHOTS_DIR"]) if os.environ.get("SCREENSHOTS_DIR") else \
        tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def app_page(browser, settings, embedder, height: int, documents: list[Path] = ()) -> Iterator:
    """The whole app with ``settings`` on loopback (``running_app``), its model loaded, open in a new page."""
    from playwright.sync_api import expect

    with running_app(settings, embedder, documents=documents) as url:
        assert wait_for_model(url)["model_status"] == "ready"
        expect.set_options(timeout=TIMEOUT_MS)
        context = browser.new_context(viewport={"width": 1400, "height": height}, accept_downloads=True)
        page = context.new_page()
        page.goto(url)
        try:
            yield page, url
        finally:
            context.close()


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)


def choose_file(page, path: Path, box: str = "#upload", attempts: int = 3) -> None:
    """Put a file in an upload box and wait for its row, which names it when the upload has finished (Gradio
    writes the name's stem and extension as two spans, a space apart). Chromium under heavy CPU load now and
    then drops the first file chooser event, so the choice is retried until the row is there."""
    import re

    from playwright.sync_api import expect

    row = re.compile(re.escape(path.stem) + r"\s*" + re.escape(path.suffix))
    for attempt in range(attempts):
        page.locator(f"{box} input[type=file]").set_input_files(str(path))
        try:
            expect(page.locator(box)).to_contain_text(row, timeout=10_000)
            return
        except AssertionError:
            if attempt == attempts - 1:
                raise


def test_chat_streams_an_answer_with_a_thinking_block_citations_and_the_adapter(page, tiny_model_dir,
                                                                                screenshots_dir):
    from playwright.sync_api import expect

    # The token slider ends at the model's context (the tiny model's 4096 positions), not at CONTEXT_LENGTH.
    expect(page.locator("#max-new-tokens input[type=range]")).to_have_attribute("max", "4096")
    page.locator("#question textarea").fill("Who keeps the lighthouse?")
    page.keyboard.press("Enter")
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text(f"answered by {tiny_model_dir.name} + adapter {ADAPTER_NAME}")
    expect(chat.get_by_text("Thinking", exact=False).first).to_be_visible()

    export = page.locator("#export")
    expect(export).to_be_enabled()
    with page.expect_download() as download:
        export.click()
    exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    user, answer = exported["messages"]
    assert user["content"] == "Who keeps the lighthouse?" and answer["adapter"] == ADAPTER_NAME
    # The passage is a citation only if the answer cites it; else it is listed as retrieved, not cited.
    shown = answer["citations"] or answer["passages"]
    assert [c["text"] for c in shown] == [NOTES] and len(answer["citations"] + answer["passages"]) == 1
    chat.get_by_text("Sources (1 passage)" if answer["citations"] else "Retrieved, not cited (1 passage)").click()
    chat.get_by_text("[1] lighthouse-notes.txt").click()
    expect(chat.get_by_text(NOTES)).to_be_visible()
    chat.get_by_text("Thinking", exact=False).first.click()
    page.wait_for_timeout(600)  # let the blocks finish opening before the picture
    screenshot(page, screenshots_dir / "chat.png")
    # The random model may or may not close its reasoning; the page must show whichever happened.
    if answer["thinking_closed"]:
        expect(chat).to_contain_text(answer["answer"][:20])
    else:  # the prompt ends with <think>, so everything the model wrote is reasoning that never closed
        expect(chat.get_by_text("Thinking (never closed", exact=False)).to_be_visible()
        expect(chat).to_contain_text("No answer after the reasoning")


def test_new_chat_clears_the_conversation(page):
    from playwright.sync_api import expect

    page.locator("#question textarea").fill("Hello?")
    page.keyboard.press("Enter")
    expect(page.locator("#chatbot")).to_contain_text("answered by")
    page.locator("#new-chat").click()
    expect(page.locator("#chatbot")).not_to_contain_text("Hello?")
    expect(page.locator("#export")).to_be_disabled()


def test_two_turns_of_a_conversation_leave_one_export_file(browser, tmp_path, minilm_path, embedder, tiny_model_dir,
                                                          app_adapter_dir):
    from playwright.sync_api import expect

    from assistant.chat import Assistant
    from assistant.ui.app import create_server
    from knowledge import KnowledgeStore

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir)
    server = create_server(Assistant(settings, store=KnowledgeStore(settings, embedder=embedder)))
    exports = server.state.exports.folder
    questions = ["Who keeps the lighthouse?", "And what colour is it?"]
    with serving(server) as url:
        assert wait_for_model(url)["model_status"] == "ready"
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        for turn, question in enumerate(questions, start=1):
            page.locator("#question textarea").fill(question)
            page.keyboard.press("Enter")
            expect(page.locator("#chatbot").get_by_text("answered by", exact=False)).to_have_count(turn)
        deadline = time.monotonic() + 60  # the export is written just after the answer
        while time.monotonic() < deadline and questions[-1] not in "".join(
                p.read_text(encoding="utf-8") for p in exports.rglob("*.json")):
            time.sleep(0.2)
        files = list(exports.rglob("*.json"))
        exported = json.loads(files[0].read_text(encoding="utf-8"))
        context.close()
    assert len(files) == 1
    assert [m["content"] for m in exported["messages"] if m["role"] == "user"] == questions


def test_upload_a_file_see_it_listed_then_remove_it(page, tmp_path, screenshots_dir):
    from playwright.sync_api import expect

    upload = tmp_path / "harbour-notes.md"
    upload.write_text("# Harbour\nThe harbour master of Port Wren is Tom Quay.\n", encoding="utf-8")
    page.get_by_role("tab", name="Knowledge").click()
    expect(page.locator("#upload")).to_contain_text("Drop File Here")  # the tab has mounted its upload box
    choose_file(page, upload)
    page.locator("#add-documents").click()
    expect(page.locator("#add-report")).to_contain_text("added harbour-notes.md (1 chunks)")
    expect(page.locator("#documents")).to_contain_text("uploads/harbour-notes.md")
    page.locator("#search-query textarea").fill("harbour master")
    page.locator("#search").click()
    expect(page.locator("#search-results")).to_contain_text("harbour-notes.md")
    page.locator("#search-results summary").first.click()
    expect(page.locator("#search-results")).to_contain_text("# Harbour")  # the passage's heading, as written
    expect(page.locator("#search-results h1")).to_have_count(0)
    page.wait_for_timeout(300)
    screenshot(page, screenshots_dir / "knowledge.png")

    page.locator("#remove-choice input").click()
    page.get_by_role("option", name="harbour-notes.md", exact=False).click()
    page.locator("#remove").click()
    expect(page.locator("#remove-report")).to_contain_text("removed harbour-notes.md (1 chunks)")
    expect(page.locator("#documents")).not_to_contain_text("harbour-notes.md")
    expect(page.locator("#documents")).to_contain_text("lighthouse-notes.txt")


def test_verification_shows_evidence_both_cases_and_the_verdict(page, screenshots_dir):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Verify a claim").click()
    page.locator("#claim textarea").fill("The lighthouse is painted red and white.")
    page.locator("#verify").click()
    expect(page.locator("#verdict")).to_contain_text("Verdict:")
    expect(page.locator("#verdict")).to_contain_text("Confidence:")
    expect(page.locator("#verdict")).to_contain_text("Reason:")
    expect(page.locator("#evidence")).to_contain_text("[1] lighthouse-notes.txt")
    for case in ("#case-for", "#case-against"):
        expect(page.locator(case)).not_to_be_empty()
        assert page.locator(case).inner_text().strip()
    screenshot(page, screenshots_dir / "verify.png")


def test_a_quoted_claim_shows_its_words_marked_in_the_passage(page, screenshots_dir):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Verify a claim").click()
    page.locator("#claim textarea").fill('Ada Lovelock said "She lights the lamp every night at dusk."')
    page.locator("#verify").click()
    expect(page.locator("#verdict")).to_contain_text("Attribution:")
    # The words differ ("night" for "evening"): that leads, above whatever the judge made of the evidence.
    expect(page.locator("#verdict h2")).to_have_text("The quoted words differ from the document's")
    expect(page.locator("#verdict h3")).to_contain_text("Verdict:")
    # The marks are rendered as marks (the Markdown sanitizer keeps them), not shown as text.
    expect(page.locator("#quote blockquote mark").first).to_have_text("She lights the lamp every ")
    expect(page.locator("#quote blockquote del")).to_have_text("night")
    expect(page.locator("#quote blockquote ins").first).to_have_text("evening")
    screenshot(page, screenshots_dir / "verify-quote.png")


def ask(page, question: str, turn: int = 1) -> None:
    """Type a question, press Enter, and wait for its answer's model line (the ``turn``-th on the page)."""
    from playwright.sync_api import expect

    page.locator("#question textarea").fill(question)
    page.keyboard.press("Enter")
    expect(page.locator("#chatbot").get_by_text("answered by", exact=False)).to_have_count(turn)


def test_thumbs_down_try_again_and_a_pick_leave_pairs(browser, tmp_path, minilm_path, embedder, tiny_model_dir,
                                                      app_adapter_dir, screenshots_dir):
    from playwright.sync_api import expect

    from finetune.pairs_store import PairsStore
    from tests.assistant_fixtures import write_notes

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir, temperature=1.0)
    with app_page(browser, settings, embedder, 1400, [write_notes(tmp_path / "docs")]) as (page, _):
        ask(page, "Who keeps the lighthouse?")
        chat = page.locator("#chatbot")
        chat.get_by_label("Dislike").last.click()
        expect(page.locator("#feedback-status")).to_contain_text("Saved 👎")
        chat.get_by_label("Retry").last.click()
        expect(chat).to_contain_text("Earlier answer 1")
        # Both answers side by side, reasoning and answer each, before the pick.
        for side, title in (("#compare-earlier", "Earlier answer 1"), ("#compare-new", "New answer")):
            expect(page.locator(side)).to_contain_text(title)
            expect(page.locator(side)).to_contain_text("Reasoning")
        page.locator("#pick-row").scroll_into_view_if_needed()
        screenshot(page, screenshots_dir / "feedback.png")
        page.locator("#pick-new").focus()  # the pick is a button: reachable and pressed from the keyboard
        page.keyboard.press("Enter")
        expect(page.locator("#feedback-status")).to_contain_text("your pick is a training pair")
        expect(page.locator("#pick-row")).to_be_hidden()
        page.get_by_role("tab", name="Pairs").click()
        page.locator("#pairs-refresh").click()
        expect(page.locator("#pairs-summary")).to_contain_text("1 pair in")
        expect(page.locator("#pairs-table")).to_contain_text("Who keeps the lighthouse?")
        expect(page.locator("#export-trl")).to_be_enabled()
        with page.expect_download() as download:
            page.locator("#export-trl").click()
        [row] = [json.loads(line) for line in Path(download.value.path()).read_text(encoding="utf-8").splitlines()]
        assert set(row) == {"prompt", "chosen", "rejected"} and row["prompt"].endswith("<think>")
        [pair] = PairsStore(settings.pairs_db).pairs()
        assert pair.origin == "pick" and PairsStore(settings.pairs_db).unpaired_down_votes() == 0
        # One pair opens in full from its row, and is deleted from there.
        page.locator("#pairs-table").get_by_test_id("cell-0-2").click()
        for part in ("Pair 1 (pick)", "Chosen", "Rejected", "Reasoning"):
            expect(page.locator("#pair-full")).to_contain_text(part)
        expect(page.locator("#pair-id input")).to_have_value("1")
        page.wait_for_timeout(300)
        screenshot(page, screenshots_dir / "pairs.png")
        page.locator("#pair-delete").click()
        expect(page.locator("#pairs-note")).to_contain_text("Deleted pair 1.")
        expect(page.locator("#pairs-summary")).to_contain_text("0 pairs in")
    assert PairsStore(settings.pairs_db).pairs() == []


def test_a_thumb_up_after_try_again_closes_the_comparison_and_undo_takes_it_back(
        browser, tmp_path, minilm_path, embedder, tiny_model_dir, app_adapter_dir):
    """The defect: a 👍 on the new answer stored a pair, the pick row stayed, and "the earlier answer was better"
    then stored the opposite pair."""
    from playwright.sync_api import expect

    from finetune.pairs_store import PairsStore

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir, temperature=1.0)
    with app_page(browser, settings, embedder, 1100) as (page, _):
        ask(page, "Who keeps the lighthouse?")
        chat = page.locator("#chatbot")
        chat.get_by_label("Dislike").last.click()
        expect(page.locator("#feedback-status")).to_contain_text("Saved 👎")
        chat.get_by_label("Retry").last.click()
        expect(page.locator("#pick-row")).to_be_visible()
        chat.get_by_label("Like").last.click()
        expect(page.locator("#feedback-status")).to_contain_text("1 new training pair")
        expect(page.locator("#pick-row")).to_be_hidden()  # no second, opposite choice on the same two answers
        [pair] = PairsStore(settings.pairs_db).pairs()
        assert pair.origin == "vote"
        page.locator("#feedback-undo").click()
        expect(page.locator("#feedback-status")).to_contain_text("Undone: your 👍")
        assert PairsStore(settings.pairs_db).pairs() == []


def test_the_editor_saves_only_against_the_answer_it_was_opened_for(browser, tmp_path, minilm_path, embedder,
                                                                    tiny_model_dir, app_adapter_dir):
    """The defect: text written about one question was saved, after "New chat", against another."""
    from playwright.sync_api import expect

    from finetune.pairs_store import PairsStore

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir)
    with app_page(browser, settings, embedder, 1100) as (page, _):
        ask(page, "Who keeps the lighthouse?")
        page.locator("#edit-answer").get_by_text("Write a better answer").click()
        expect(page.locator("#edit-for")).to_contain_text("Who keeps the lighthouse?")
        page.locator("#edit-answer-text textarea").fill("Ada Lovelock keeps it.")
        page.locator("#new-chat").click()
        expect(page.locator("#edit-answer-text textarea")).to_have_value("")
        ask(page, "What did the 2019 audit find?")
        expect(page.locator("#edit-for")).to_contain_text("What did the 2019 audit find?")
        expect(page.locator("#edit-answer-text textarea")).to_have_value("")
        page.locator("#edit-answer-text textarea").fill("The notes say nothing about an audit.")
        page.locator("#edit-save").click()
        expect(page.locator("#feedback-status")).to_contain_text("Saved: your answer is a training pair")
    [pair] = PairsStore(settings.pairs_db).pairs()
    assert pair.chosen.question == "What did the 2019 audit find?"
    assert pair.chosen.answer == "The notes say nothing about an audit."


def test_the_adapters_tab_swaps_to_the_base_model_and_back(browser, tmp_path, minilm_path, embedder,
                                                           tiny_model_dir, app_adapter_dir, screenshots_dir):
    from playwright.sync_api import expect

    adapters = tmp_path / "adapters"
    shutil.copytree(app_adapter_dir, adapters)  # the choice is saved there; the shared folder stays as it was
    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, adapters)
    with app_page(browser, settings, embedder, 900) as (page, url):
        page.get_by_role("tab", name="Adapters").click()
        expect(page.locator("#adapters-table")).to_contain_text("in use")
        page.locator("#adapter-base").click()
        expect(page.locator("#model-status")).to_contain_text("adapter none — ready")
        expect(page.locator("#adapters-summary")).to_contain_text("In use: the base model (chosen)")
        page.locator("#adapter-picker input").click()
        page.get_by_role("option", name=ADAPTER_NAME).click()
        page.locator("#adapter-use").click()
        expect(page.locator("#adapters-note")).to_contain_text(f"Now answering with {ADAPTER_NAME}")
        expect(page.locator("#model-status")).to_contain_text(f"adapter {ADAPTER_NAME} — ready")
        screenshot(page, screenshots_dir / "adapters.png")
        assert get_json(f"{url}/health")["adapter"] == ADAPTER_NAME


def test_the_train_tab_starts_a_run_draws_its_curves_and_cancels_it(browser, tmp_path, minilm_path, embedder,
                                                                     tiny_model_dir, screenshots_dir):
    import re

    from playwright.sync_api import expect

    from tests.finetune_fixtures import repeat_task_rows, write_jsonl

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, tmp_path / "adapters",
                            train_config=Path("finetune/configs/tiny-smoke.yaml"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", repeat_task_rows(16, seed=3))
    with app_page(browser, settings, embedder, 1300) as (page, _):
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-use-pairs input").uncheck()  # nothing collected in this app yet: the file only
        choose_file(page, pairs, "#train-files")
        page.locator("#train-steps input").fill("200")
        page.locator("#train-check").click()
        expect(page.locator("#train-check-summary")).to_contain_text("16 usable pairs")
        expect(page.locator("#train-preview")).to_contain_text("rejected")
        page.locator("#train-start").click()
        expect(page.locator("#train-note")).to_contain_text("Started run-")
        progress = page.locator("#train-progress")
        expect(progress).to_contain_text(re.compile(r"Step [1-9]\d* of 200"))
        first = int(re.search(r"Step (\d+) of", progress.inner_text()).group(1))
        expect(progress).not_to_contain_text(f"Step {first} of 200")  # redrawn as the log grows
        expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
        screenshot(page, screenshots_dir / "train.png")
        page.locator("#train-cancel").click()
        expect(progress).to_contain_text("cancelled")
        expect(progress).to_contain_text("Resume continues it")


def test_the_train_tab_on_its_default_config_with_no_pairs_says_where_pairs_come_from(page):
    """The defects: the recipe's max_steps -1 filled Steps, whose minimum is 1, and Start failed on that field;
    with the pairs file there but empty, Start launched a job that failed seconds later."""
    import re

    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-config input")).to_have_value(re.compile(r"recipe-r1-qwen14b\.yaml$"))
    expect(page.locator("#train-steps input")).to_have_value("0")  # the recipe trains by epochs
    expect(page.locator("#train-epochs input")).to_have_value("1")
    page.locator("#train-start").click()
    toast = page.locator(".toast-body")
    expect(toast).to_contain_text("No pairs to train on: the pairs store holds 0 pairs")
    expect(toast).to_contain_text("Pairs come from the Chat tab")
    expect(toast).not_to_contain_text("less than minimum")
    expect(page.locator("#train-note")).not_to_contain_text("Started")
