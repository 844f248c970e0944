"""Feedback through the running app's API (gradio_client): votes, try again + pick, edits, corrected verdicts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client

from finetune.data import prepare_data
from finetune.pairs_store import PairsStore
from tests.assistant_fixtures import tiny_app_running


@pytest.fixture(scope="module")
def feedback_app(tmp_path_factory, minilm_path, embedder, tiny_model_dir, app_adapter_dir) -> Iterator[tuple]:
    """The app's URL and its pairs store."""
    with tiny_app_running(tmp_path_factory.mktemp("feedback-app"), minilm_path, embedder, tiny_model_dir,
                          app_adapter_dir) as (url, settings):
        yield url, settings.pairs_db


def pairs_in(db: Path) -> list:
    return PairsStore(db).pairs() if db.exists() else []


def test_a_down_vote_waits_until_try_again_gives_an_answer_voted_up(feedback_app):
    url, db = feedback_app
    before = len(pairs_in(db))
    client = Client(url, verbose=False)
    client.predict("Who keeps the lighthouse?", 0.0, 12, True, api_name="/chat")
    assert "becomes a training pair when a better answer" in client.predict(0, False, api_name="/vote")
    assert len(pairs_in(db)) == before and PairsStore(db).unpaired_down_votes() >= 1
    chat, earlier, new = client.predict(0, 1.0, 12, api_name="/try_again")  # sampled, so it differs
    assert earlier.startswith("### Earlier answer 1") and new.startswith("### New answer")
    titles = [(m.get("metadata") or {}).get("title", "") for m in chat]
    assert "Earlier answer 1 (before “Try again”)" in titles
    assert "1 new training pair" in client.predict(0, True, api_name="/vote")
    [vote] = pairs_in(db)[: len(pairs_in(db)) - before]
    assert vote.origin == "vote" and vote.chosen.prompt == vote.rejected.prompt
    assert vote.to_trl()["chosen"] != vote.to_trl()["rejected"]
    assert vote.chosen.question == "Who keeps the lighthouse?" and "Ada Lovelock" in vote.chosen.input
    assert vote.chosen.adapter == "chat-smoke" and vote.chosen.prompt.endswith("<think>")


def test_try_again_then_a_pick_is_a_pair(feedback_app):
    url, db = feedback_app
    before = len(pairs_in(db))
    client = Client(url, verbose=False)
    client.predict("What colour is the lighthouse?", 0.0, 12, True, api_name="/chat")
    client.predict(0, 1.0, 12, api_name="/try_again")
    assert "training pair" in client.predict(0, "earlier", api_name="/pick")
    [pick] = pairs_in(db)[: len(pairs_in(db)) - before]
    assert pick.origin == "pick" and pick.chosen.question == "What colour is the lighthouse?"
    assert "Already saved" in client.predict(0, "earlier", api_name="/pick")  # stored once
    assert len(pairs_in(db)) == before + 1


def test_a_pick_against_an_up_vote_on_the_same_two_answers_replaces_its_pair_and_says_so(feedback_app):
    url, db = feedback_app
    before = len(pairs_in(db))
    client = Client(url, verbose=False)
    client.predict("Where is Port Wren?", 0.0, 12, True, api_name="/chat")
    client.predict(0, False, api_name="/vote")
    client.predict(0, 1.0, 12, api_name="/try_again")
    assert "1 new training pair" in client.predict(0, True, api_name="/vote")
    status = client.predict(0, "earlier", api_name="/pick")  # the person changes their mind
    assert "replaces the earlier pair" in status
    [pair] = pairs_in(db)[: len(pairs_in(db)) - before]
    assert pair.origin == "pick" and len(pairs_in(db)) == before + 1
    assert "Undone: your pick of the earlier answer" in client.predict(api_name="/undo_feedback")
    [pair] = pairs_in(db)[: len(pairs_in(db)) - before]
    assert pair.origin == "vote"  # the vote's pair is back
    client.predict(api_name="/undo_feedback")
    assert len(pairs_in(db)) == before


def test_an_edit_and_a_corrected_verdict_are_pairs_that_train(feedback_app, tiny_tokenizer):
    url, db = feedback_app
    client = Client(url, verbose=False)
    client.predict("Who keeps the lighthouse?", 0.0, 12, True, api_name="/chat")
    status = client.predict(-1, "The notes name the keeper.", "Ada Lovelock keeps it [1].", api_name="/edit_answer")
    assert "chosen over the model's" in status
    edit = pairs_in(db)[0]
    assert (edit.origin, edit.chosen.model, edit.chosen.answer) == ("edit", None, "Ada Lovelock keeps it [1].")
    *_, result = client.predict("The lighthouse is red and white.", api_name="/verify")
    status = client.predict("supported", api_name="/correct_verdict")
    assert "training pair for the judge" in status and result["verdict"] == "not enough evidence"
    judge = pairs_in(db)[0]
    assert '"verdict": "supported"' in judge.chosen.answer and "Case for:" in judge.chosen.prompt
    # The store, and the app's export, read back as training data.
    exported = client.predict(api_name="/export_pairs_trl")
    for source in (db, exported):
        prepared = prepare_data(source, tiny_tokenizer)
        assert len(prepared.pairs) == len(pairs_in(db)) and not prepared.rejected
    summary, rows = client.predict(api_name="/list_pairs")
    assert f"**{len(pairs_in(db))} pairs**" in summary and rows["data"][0][1] == "edit"
    client.predict(rows["data"][0][0], api_name="/delete_pair")
    assert len(pairs_in(db)) == len(rows["data"]) - 1


def test_with_logins_on_a_pair_records_who_made_it(tmp_path, minilm_path, embedder, tiny_model_dir, app_adapter_dir):
    from tests.assistant_fixtures import app_settings, running_app, wait_for_model, write_notes

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir)
    with running_app(settings, embedder, auth=[("ann", "s3cret")], documents=[write_notes(tmp_path / "docs")]) as url:
        assert wait_for_model(url)["model_status"] == "ready"
        client = Client(url, auth=("ann", "s3cret"), verbose=False)
        client.predict("Who keeps the lighthouse?", 0.0, 12, True, api_name="/chat")
        client.predict(-1, "The notes say so.", "Ada Lovelock [1].", api_name="/edit_answer")
    [pair] = pairs_in(settings.pairs_db)
    assert pair.user == "ann" and pair.origin == "edit"


def test_a_refused_action_logs_one_line_not_a_traceback(feedback_app, capfd, caplog):
    url, _ = feedback_app
    client = Client(url, verbose=False)
    client.predict("Who keeps the lighthouse?", 0.0, 12, True, api_name="/chat")
    capfd.readouterr()
    with pytest.raises(Exception, match="only one answer to this question"):
        client.predict(0, "new", api_name="/pick")
    [refused] = [r for r in caplog.records if r.name == "assistant.ui.errors"]
    assert refused.getMessage().startswith("refused: There is only one answer to this question")
    assert "Traceback" not in capfd.readouterr().err
