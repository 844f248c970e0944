"""Saved conversations: per person, reopened, renamed, deleted; the store and the page (in Chromium) after a
reload, including an answer the reload cut off."""

from __future__ import annotations

import shutil

import pytest

from assistant.conversations import ConversationError, ConversationStore, default_title
from assistant.turns import ChatTurn, EarlierAnswer
from assistant.ui.conversations import reopened


def turn(question: str, done: bool = True) -> ChatTurn:
    return ChatTurn(question, answer="An answer.", done=done)


def test_each_person_sees_and_changes_only_their_own_conversations(tmp_path):
    store = ConversationStore(tmp_path / "conversations.sqlite")
    first = turn("Who keeps the lighthouse?")
    first.earlier = [EarlierAnswer("k0", answer="An earlier answer.")]
    store.save("c1", "ann", [first])
    store.save("c2", "bob", [turn("What colour is it?")])
    store.save("c1", "bob", [turn("Overwritten?")])  # another person's id changes nothing
    assert [(s.id, s.title, s.questions) for s in store.list("ann")] == [("c1", "Who keeps the lighthouse?", 1)]
    assert store.load("c1", "ann") == [first]  # the turn comes back whole, its earlier answers too
    with pytest.raises(ConversationError, match="not there"):
        store.load("c1", "bob")
    with pytest.raises(ConversationError):
        store.delete("c1", "bob")
    store.rename("c1", "ann", "  The keeper  ")
    store.save("c1", "ann", [turn("Who keeps the lighthouse?"), turn("Since when?")])  # the name stays
    [ann] = store.list("ann")
    assert (ann.title, ann.questions) == ("The keeper", 2)
    store.delete("c1", "ann")
    assert store.list("ann") == [] and [s.id for s in store.list("bob")] == ["c2"]


def test_a_turn_saved_before_a_field_existed_reads_back_with_its_default():
    old = {"question": "Q?", "answer": "A.", "done": True, "key": "k", "earlier": [{"key": "e", "answer": "B."}],
           "a_field_from_the_future": 1}
    turn = ChatTurn.from_dict(old)
    assert (turn.question, turn.translations, turn.earlier[0].answer, turn.earlier[0].reasoning) == ("Q?", [], "B.", "")


def test_a_conversation_is_titled_by_its_first_question_and_a_cut_off_answer_is_marked():
    assert default_title([turn("A question " * 20)]).endswith("…") and len(default_title([turn("x " * 100)])) <= 80
    cut = reopened([turn("Done?"), turn("Cut?", done=False)])
    assert [t.cut_off for t in cut] == [False, True] and all(t.done for t in cut)


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium: apt-get install -y chromium")
def test_conversations_last_through_a_reload_and_are_listed_to_reopen_rename_and_delete(
        tmp_path, minilm_path, embedder, tiny_model_dir, app_adapter_dir):
    from playwright.sync_api import expect, sync_playwright

    from tests.assistant_fixtures import app_settings, running_app, wait_for_model
    from tests.test_assistant_browser import CHROMIUM_ARGS, TIMEOUT_MS, ask

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir, max_new_tokens=3000)
    with running_app(settings, embedder) as url, sync_playwright() as playwright:
        assert wait_for_model(url)["model_status"] == "ready"
        expect.set_options(timeout=TIMEOUT_MS)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.goto(url)
        listing, chat = page.locator("#conversation-list"), page.locator("#chatbot")
        page.locator("#max-new-tokens input[type=number]").fill("16")
        page.locator("#max-new-tokens input[type=number]").press("Enter")
        ask(page, "Who keeps the lighthouse?")
        expect(chat).to_contain_text("No passages: the knowledge store is empty")  # this app has no documents
        expect(listing).to_contain_text("Who keeps the lighthouse?")
        page.reload()  # the conversation is still there
        expect(chat).to_contain_text("Who keeps the lighthouse?")
        expect(chat).to_contain_text("answered by")
        page.locator("#new-chat").click()
        expect(chat).not_to_contain_text("Who keeps the lighthouse?")
        page.locator("#max-new-tokens input[type=number]").fill("16")
        page.locator("#max-new-tokens input[type=number]").press("Enter")
        ask(page, "What colour is the lighthouse?")
        expect(listing).to_contain_text("What colour is the lighthouse?")
        listing.get_by_text("Who keeps the lighthouse?").click()  # reopen the first
        expect(chat).to_contain_text("Who keeps the lighthouse?")
        expect(chat).not_to_contain_text("What colour is the lighthouse?")
        page.locator("#conversation-title textarea").fill("The keeper")
        page.locator("#conversation-rename").click()
        expect(listing).to_contain_text("The keeper")
        page.locator("#conversation-delete").click()
        expect(listing).not_to_contain_text("The keeper")
        expect(listing).to_contain_text("What colour is the lighthouse?")
        expect(chat).not_to_contain_text("Who keeps the lighthouse?")

        # A long answer, the page reloaded while it streams: reopened, it is marked as cut off, not lost.
        page.locator("#retrieval input").uncheck()
        page.locator("#max-new-tokens input[type=number]").fill("3000")
        page.locator("#max-new-tokens input[type=number]").press("Enter")
        page.locator("#question textarea").fill("Go on for a long time")
        page.keyboard.press("Enter")
        # Reload once some reasoning has streamed (Gradio marks a thought's title busy while it has no content).
        expect(chat.locator('.title[aria-busy="false"]', has_text="Thinking").first).to_be_visible()
        page.reload()
        expect(chat).to_contain_text("Go on for a long time")
        expect(chat).to_contain_text("cut off: the page was closed or reloaded")
        browser.close()
    store = ConversationStore(settings.conversations_db)
    [cut] = [s for s in store.list(None) if s.title == "Go on for a long time"]
    assert store.load(cut.id, None)[0].reasoning  # what it had written is kept
