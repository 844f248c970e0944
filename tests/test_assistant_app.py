"""The app: serving rules, uploads, rendering, and its API through gradio_client against the running app."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client, handle_file

from assistant.chat import Assistant
from assistant.model_loader import ModelLoader
from assistant.turns import ChatTurn
from assistant.ui import app as app_module
from assistant.ui.app import bind_refusal, parse_auth, serve
from assistant.ui.chat import (
    NO_ANSWER,
    THINKING,
    THINKING_OPEN_ENDED,
    ChatTab,
    ConversationExports,
    conversation_export,
    turn_messages,
)
from assistant.ui.knowledge import NOT_UPLOADED, safe_upload_name, save_uploads
from assistant.ui.verify import NO_CASE
from engine.runtime import TINY_MODEL_HINT, GenerationParams
from settings import Settings, SettingsError
from tests.assistant_fixtures import (
    ADAPTER_NAME,
    NOTES,
    app_settings,
    get_json,
    running_app,
    wait_for_model,
    write_notes,
)

# -- serving rules --------------------------------------------------------------------------------------


def test_serve_refuses_a_public_address_without_logins(capsys):
    code = serve(Settings.from_env(environ={}), host="0.0.0.0", port=1)
    assert code != 0
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0" in err and "APP_AUTH" in err


def test_serve_starts_on_a_public_address_with_app_auth_logins(monkeypatch):
    started = {}
    monkeypatch.setattr(app_module, "create_server", lambda assistant, auth=None: ("app", auth))
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: started.update(app=app, host=host, port=port))
    settings = Settings.from_env(environ={}, app_auth="alice:s3cret,bob:hunter2")
    assert serve(settings, host="0.0.0.0", port=8123) == 0
    assert started == {"app": ("app", [("alice", "s3cret"), ("bob", "hunter2")]), "host": "0.0.0.0", "port": 8123}


def test_loopback_needs_no_logins_and_insecure_flag_overrides():
    assert bind_refusal("127.0.0.1", [], False) is None
    assert bind_refusal("localhost", [], False) is None
    assert bind_refusal("::1", [], False) is None
    assert bind_refusal("0.0.0.0", [], True) is None
    assert bind_refusal("192.168.1.5", [], False) is not None


def test_malformed_app_auth_is_refused_with_a_message_that_says_the_format():
    for spec in ("alice", "alice:", "alice:pw,:pw2"):
        with pytest.raises(SettingsError, match="APP_AUTH has a malformed login .*user:password"):
            Settings.from_env({"APP_AUTH": spec})
    assert parse_auth(Settings.from_env({"APP_AUTH": "alice:pw, bob:a:b"}).app_auth) == [("alice", "pw"),
                                                                                            ("bob", "a:b")]


# -- uploads --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "passwd"), ("/etc/shadow", "shadow"), ("..\\..\\boot.ini", "boot.ini"),
    ("..", "upload"), (".bashrc", "bashrc"), ("report 2024 (final).pdf", "report 2024 _final_.pdf"),
    ("議事録.txt", "議事録.txt")])
def test_upload_names_are_reduced_to_a_safe_base_name(name, expected):
    assert safe_upload_name(name) == expected


def test_an_upload_named_with_a_path_lands_inside_the_uploads_folder(tmp_path):
    temp = tmp_path / "gradio-temp-file"
    temp.write_text("secret", encoding="utf-8")
    uploads = tmp_path / "knowledge" / "uploads"
    saved, refused = save_uploads([(temp, "../../etc/passwd"), (temp, "/abs/notes.txt")], uploads, max_mb=1,
                                  uploaded_to=[tmp_path])
    assert refused == []
    assert [p.parent for p in saved] == [uploads.resolve()] * 2
    assert sorted(p.name for p in uploads.iterdir()) == ["notes.txt", "passwd"]
    assert not (tmp_path / "etc").exists()


def test_a_file_outside_the_upload_folders_is_refused_by_name_even_through_a_link(tmp_path):
    upload_folder, elsewhere = tmp_path / "gradio", tmp_path / "elsewhere"
    upload_folder.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("secret", encoding="utf-8")
    (upload_folder / "link.txt").symlink_to(elsewhere / "secret.txt")
    (upload_folder / "notes.txt").write_text("notes", encoding="utf-8")
    files = [(elsewhere / "secret.txt", "secret.txt"), (upload_folder / "link.txt", "link.txt"),
             (upload_folder / "missing.txt", "missing.txt"), (upload_folder / "notes.txt", "notes.txt")]
    saved, refused = save_uploads(files, tmp_path / "uploads", max_mb=1, uploaded_to=[upload_folder])
    assert [p.name for p in saved] == ["notes.txt"]
    assert [(r["source"], r["reason"]) for r in refused] == [(name, NOT_UPLOADED) for name in
                                                             ("secret.txt", "link.txt", "missing.txt")]
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["notes.txt"]


def test_a_file_already_in_the_uploads_folder_is_added_again_in_place(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "notes.txt").write_text("notes", encoding="utf-8")
    saved, refused = save_uploads([(uploads / "notes.txt", "notes.txt")], uploads, max_mb=1, uploaded_to=[])
    assert (saved, refused) == ([(uploads / "notes.txt").resolve()], [])
    assert (uploads / "notes.txt").read_text(encoding="utf-8") == "notes"


# -- rendering ------------------------------------------------------------------------------------------


def finished_turn(**changes) -> ChatTurn:
    turn = ChatTurn.asked("Who keeps the lighthouse?", GenerationParams(64, 0.0), retrieval=True)
    return replace(turn, done=True, model="/models/tiny-model", adapter="chat-smoke", seconds=1.0, citations=[
        {"number": 1, "source": "/k/uploads/notes.txt", "page": 3, "text": "Ada keeps it.",
         "label": "[1] notes.txt, page 3"}], **changes)


def test_closed_thinking_is_a_collapsed_block_apart_from_the_answer():
    messages = turn_messages(finished_turn(reasoning="I read [1].", answer="Ada Lovelock [1].",
                                           thinking_done=True), 0)
    thinking = messages[1]
    assert thinking.metadata["title"] == THINKING and thinking.metadata["status"] == "done"
    assert thinking.content == "I read [1]."
    assert messages[2].content.startswith("Ada Lovelock [1].")
    assert "answered by tiny-model + adapter chat-smoke" in messages[2].content


def test_thinking_never_closed_is_shown_as_such_with_no_answer():
    messages = turn_messages(finished_turn(reasoning="hmm hmm", answer="", thinking_done=False), 0)
    assert messages[1].metadata["title"] == THINKING_OPEN_ENDED and messages[1].metadata["status"] == "done"
    assert messages[2].content.startswith(NO_ANSWER)


def test_thinking_is_pending_while_the_model_still_thinks():
    turn = replace(ChatTurn.asked("q", GenerationParams(64, 0.0), retrieval=True), reasoning="so far")
    messages = turn_messages(turn, 0)
    assert messages[1].metadata["status"] == "pending" and len(messages) == 2


def test_citations_name_source_and_page_and_hold_the_passage():
    messages = turn_messages(finished_turn(answer="Ada [1].", thinking_done=True), 0)
    sources, citation = messages[-2], messages[-1]
    assert sources.metadata["title"] == "Sources (1 passage)"
    assert citation.metadata == {"title": "[1] notes.txt, page 3", "parent_id": sources.metadata["id"],
                                 "status": "done"}
    assert citation.content == "Ada keeps it."


def test_export_keeps_reasoning_citations_model_and_adapter_of_each_answer():
    exported = conversation_export([finished_turn(reasoning="r", answer="Ada [1].", thinking_done=True)])
    user, answer = exported["messages"]
    assert user == {"role": "user", "content": "Who keeps the lighthouse?"}
    assert answer["adapter"] == "chat-smoke" and answer["model"] == "tiny-model"  # the folder's name, not its path
    assert answer["reasoning"] == "r" and answer["citations"][0]["page"] == 3
    assert answer["citations"][0]["source"] == "notes.txt"  # the file's name, not the server's folders
    assert json.loads(json.dumps(exported)) == exported
    with_paths = conversation_export([finished_turn(answer="Ada [1].")], source_paths=True)
    assert with_paths["messages"][1]["citations"][0]["source"] == "/k/uploads/notes.txt"


def test_each_session_has_one_export_file_rewritten_after_each_turn():
    exports = ConversationExports()
    first, second = finished_turn(answer="Ada."), finished_turn(question="And the colour?", answer="Red.")
    after_one = exports.write([first], session="s1")
    after_two = exports.write([first, second], session="s1")
    other = exports.write([finished_turn(answer="Tom.")], session="s2")
    files = sorted(exports.folder.rglob("*.json"))
    asked = [m["content"] for m in json.loads(Path(after_two).read_text(encoding="utf-8"))["messages"]
             if m["role"] == "user"]
    exports.close()
    assert after_one == after_two and sorted([Path(after_two), Path(other)]) == files
    assert asked == ["Who keeps the lighthouse?", "And the colour?"]
    assert not exports.folder.exists()


# -- the running app, through its API -------------------------------------------------------------------


def contents(message: dict) -> str:
    return "".join(part.get("text", "") for part in message["content"])


def test_health_answers_json_with_model_adapter_and_document_count(tiny_app, tiny_model_dir):
    health = get_json(f"{tiny_app}/health")
    documents = Client(tiny_app, verbose=False).predict(api_name="/list_documents")
    assert health["status"] == "ok" and health["model_status"] == "ready"
    assert health["model"] == tiny_model_dir.name  # the local folder by its name: its path stays on the server
    assert health["adapter"] == ADAPTER_NAME
    assert health["documents"] == len(documents) >= 1


def test_chat_endpoint_streams_then_returns_an_answer_with_thinking_and_citations(tiny_app):
    client = Client(tiny_app, verbose=False)
    job = client.submit("Who keeps the lighthouse?", 0.0, 16, True, api_name="/chat")
    updates = list(job)
    chat, cleared_box = job.result()
    assert len(updates) >= 2  # the question at once, then the answer as it grows
    assert contents(updates[0][0][0]) == "Who keeps the lighthouse?"
    assert cleared_box == ""
    titles = [m["metadata"].get("title", "") for m in chat]
    assert titles[1].startswith("Thinking")
    assert "[1] lighthouse-notes.txt" in titles
    passage = next(m for m in chat if m["metadata"].get("title") == "[1] lighthouse-notes.txt")
    assert contents(passage) == NOTES
    assert f"adapter {ADAPTER_NAME}" in contents(next(m for m in chat if not m["metadata"] and m["role"] ==
                                                      "assistant"))


def test_chat_keeps_the_history_of_a_session(tiny_app):
    client = Client(tiny_app, verbose=False)
    client.predict("First question?", 0.0, 8, True, api_name="/chat")
    chat, _ = client.predict("And a second one?", 0.0, 8, False, api_name="/chat")
    asked = [contents(m) for m in chat if m["role"] == "user"]
    assert asked == ["First question?", "And a second one?"]
    last_answer = [m for m in chat if m["role"] == "assistant" and not m["metadata"]][-1]
    assert "without retrieval" in contents(last_answer)
    assert not any(m["metadata"].get("title", "").startswith("Sources") for m in chat[-3:])


def test_verify_endpoint_returns_a_verdict_with_both_cases(tiny_app):
    stage, quote, evidence, case_for, case_against, verdict, result = Client(tiny_app, verbose=False).predict(
        "The lighthouse is red and white.", api_name="/verify")
    # The tiny random model writes no parseable judgement: the verdict falls back and says why.
    assert (result["verdict"], result["confidence"]) == ("not enough evidence", 0.0)
    assert "falling back" in result["reason"] and result["adapter"] == ADAPTER_NAME
    assert [e["source"].rsplit("/", 1)[-1] for e in result["evidence"]] == ["lighthouse-notes.txt"]
    assert "[1] lighthouse-notes.txt" in evidence and result["evidence"][0]["text"] == NOTES
    # Each column shows the case the model wrote, or says plainly that it wrote none.
    for shown, written in ((case_for, result["for"]), (case_against, result["against"])):
        assert shown == (written or NO_CASE)
    assert verdict.startswith("## Verdict: not enough evidence") and "falling back" in verdict
    assert quote == "" and result["quote"] is None  # the claim quotes no one


def test_verify_shows_a_quoted_claims_words_marked_in_their_passage(tiny_app):
    _, quote, evidence, *_, result = Client(tiny_app, verbose=False).predict(
        'Ada Lovelock said "She lights the lamp every night at dusk."', api_name="/verify")
    assert result["quote"]["words"] == "altered" and result["quote"]["speaker"] == "Ada Lovelock"
    assert "<mark>She lights the lamp every </mark><del>night</del><ins>evening</ins><mark> at dusk</mark>" in quote
    assert evidence.startswith("<details><summary>[1] lighthouse-notes.txt")


def test_oversized_upload_is_refused_by_name_while_the_others_are_added(tiny_app, tmp_path):
    small = tmp_path / "harbour.md"
    small.write_text("# Harbour\nThe harbour master is Tom Quay.\n", encoding="utf-8")
    big = tmp_path / "huge-log.txt"
    big.write_text("x" * int(1.5 * 1024 * 1024), encoding="utf-8")  # the app's limit is 1 MB
    client = Client(tiny_app, verbose=False)
    report, table, _, _ = client.predict([handle_file(str(small)), handle_file(str(big))], api_name="/add_documents")
    assert "**added** `harbour.md`" in report
    assert "**failed** `huge-log.txt`" in report and "over the 1 MB upload limit" in report
    sources = [d["source"] for d in client.predict(api_name="/list_documents")]
    assert any(s.endswith("/uploads/harbour.md") for s in sources)
    assert not any("huge-log" in s for s in sources)


def call_raw(url: str, api_name: str, data: list) -> list:
    """One call of a Gradio endpoint as any HTTP client can make it, without gradio_client's checks."""
    with httpx.Client(base_url=url, timeout=60) as http:
        event = http.post(f"/gradio_api/call/{api_name}", json={"data": data}).raise_for_status().json()
        stream = http.get(f"/gradio_api/call/{api_name}/{event['event_id']}").raise_for_status().text
    lines = stream.splitlines()
    assert "event: complete" in lines, stream
    return json.loads(lines[lines.index("event: complete") + 1].removeprefix("data: "))


def upload_raw(url: str, path) -> str:
    """Upload a file the way the page does; the path Gradio gives it in its upload folder."""
    with open(path, "rb") as f:
        response = httpx.post(f"{url}/gradio_api/upload", files=[("files", (path.name, f))], timeout=60)
    return response.raise_for_status().json()[0]


def file_data(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def test_a_server_path_sent_as_an_upload_is_refused_by_name_and_never_searchable(tiny_app, tmp_path):
    secret = tmp_path / "server-secret.txt"
    secret.write_text("The vault code word is ZEPHYRQUILL.\n", encoding="utf-8")
    good = tmp_path / "tide-table.md"
    good.write_text("# Tides\nHigh tide at Port Wren is at noon.\n", encoding="utf-8")
    report, *_ = call_raw(tiny_app, "add_documents", [[file_data(secret), file_data(upload_raw(tiny_app, good))]])
    client = Client(tiny_app, verbose=False)
    hits = client.predict("ZEPHYRQUILL vault code word", 5, "lexical", api_name="/search")
    sources = [d["source"] for d in client.predict(api_name="/list_documents")]
    assert "**failed** `server-secret.txt`: not a file uploaded to this app" in report
    assert "**added** `tide-table.md`" in report
    assert "ZEPHYRQUILL" not in hits
    assert not any("server-secret" in s for s in sources) and any(s.endswith("/uploads/tide-table.md") for s in sources)


def test_unsupported_upload_is_reported_like_the_cli(tiny_app, tmp_path):
    odd = tmp_path / "archive.xyz"
    odd.write_bytes(b"\x00\x01")
    report, *_ = Client(tiny_app, verbose=False).predict([handle_file(str(odd))], api_name="/add_documents")
    assert "**failed** `archive.xyz`: unsupported file type .xyz; supported: " in report


def test_stop_ends_the_generation_early(tiny_model_dir, app_adapter_dir, minilm_path, embedder, tmp_path):
    from knowledge import KnowledgeStore

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir)
    assistant = Assistant(settings, store=KnowledgeStore(settings, embedder=embedder))
    loader = ModelLoader(assistant).start()
    tab, request = ChatTab(assistant, loader), SimpleNamespace(session_hash="s1")
    question, limit = "Go on for a long time", 400

    def tokens(reasoning: str, answer: str) -> int:
        return len(assistant.runtime.tokenizer(reasoning + answer, add_special_tokens=False)["input_ids"])

    full = assistant.ask(question, GenerationParams(limit, 0.0), use_retrieval=False)
    assert tokens(full.reasoning, full.answer) > limit / 2  # greedy: this prompt runs on without an end token
    turns, at_stop = None, None
    for _, turns, *_ in tab.respond(question, [], 0.0, limit, False, request=request):
        if turns[-1].reasoning and at_stop is None:
            at_stop = tokens(turns[-1].reasoning, turns[-1].answer)  # what the page showed at the click
            tab.stop(request)
    assert turns[-1].done and turns[-1].stopped and "*(stopped)*" in turn_messages(turns[-1], 0)[-1].content
    assert tokens(turns[-1].reasoning, turns[-1].answer) - at_stop < limit / 4


# -- an app whose model cannot load; an app with logins ---------------------------------------------------


def test_app_without_a_model_starts_says_why_and_keeps_the_knowledge_tab(tmp_path, minilm_path, embedder):
    settings = app_settings(tmp_path, minilm_path, "no-such-org/no-such-model", tmp_path / "adapters")
    with running_app(settings, embedder, documents=[write_notes(tmp_path / "docs")]) as url:
        health = wait_for_model(url)
        client = Client(url, verbose=False)
        chat, _ = client.predict("Hello?", 0.0, 8, True, api_name="/chat")
        documents = client.predict(api_name="/list_documents")
        hits = client.predict("lighthouse keeper", 2, "hybrid", api_name="/search")
        page = urllib.request.urlopen(url, timeout=30).read().decode()
    assert health["status"] == "ok" and health["model_status"] == "unavailable" and health["adapter"] is None
    assert health["model"] == "no-such-org/no-such-model"  # a hub name as is
    assert "Cannot answer" in contents(chat[-1]) and TINY_MODEL_HINT.splitlines()[1].strip() in contents(chat[-1])
    assert "Traceback" not in contents(chat[-1])
    assert len(documents) == 1 and "lighthouse-notes.txt" in hits
    assert "The chat model is unavailable" in page and "no-such-org/no-such-model" in contents(chat[-1])


def test_app_with_logins_turns_away_clients_without_them(tmp_path, minilm_path, embedder, tiny_model_dir,
                                                         app_adapter_dir):
    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir)
    with running_app(settings, embedder, auth=[("alice", "s3cret")]) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/gradio_api/queue/status", timeout=30)
        documents = Client(url, auth=("alice", "s3cret"), verbose=False).predict(api_name="/list_documents")
        with pytest.raises(ValueError, match=f"^Could not login to {url}/"):  # not a refused connection
            Client(url, auth=("alice", "wrong"), verbose=False)
        wrong, right = (httpx.post(f"{url}/login/", data={"username": "alice", "password": password}, timeout=30)
                        for password in ("wrong", "s3cret"))
    assert refused.value.code == 401
    assert documents == []
    assert (wrong.status_code, wrong.json()) == (400, {"detail": "Incorrect credentials."})
    assert (right.status_code, right.json()) == (200, {"success": True})


API_DOCS = ("/docs", "/redoc", "/openapi.json")


def test_with_logins_the_api_docs_need_a_login_and_health_does_not(tmp_path, minilm_path, embedder):
    settings = app_settings(tmp_path, minilm_path, "no-such-org/no-such-model", tmp_path / "adapters")
    with running_app(settings, embedder, auth=[("alice", "s3cret")]) as url:
        anonymous = {path: httpx.get(url + path, timeout=30).status_code for path in API_DOCS}
        health = httpx.get(f"{url}/health", timeout=30)
        with httpx.Client(base_url=url, timeout=30) as browser:
            browser.post("/login/", data={"username": "alice", "password": "s3cret"}).raise_for_status()
            logged_in = {path: browser.get(path) for path in API_DOCS}
    assert anonymous == dict.fromkeys(API_DOCS, 401)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert {path: r.status_code for path, r in logged_in.items()} == dict.fromkeys(API_DOCS, 200)
    assert "/health" in logged_in["/openapi.json"].json()["paths"]
    assert "swagger-ui" in logged_in["/docs"].text


def test_a_stopped_app_leaves_no_upload_in_gradios_cache(tmp_path, minilm_path, embedder):
    settings = app_settings(tmp_path, minilm_path, "no-such-org/no-such-model", tmp_path / "adapters")
    with running_app(settings, embedder) as url:
        cached = Path(upload_raw(url, write_notes(tmp_path / "docs")))
        assert cached.is_file()
    assert not cached.exists()


def test_a_stopped_app_removes_its_conversation_exports(tmp_path, minilm_path, embedder):
    from assistant.ui.app import create_server
    from knowledge import KnowledgeStore
    from tests.assistant_fixtures import serving

    settings = app_settings(tmp_path, minilm_path, "no-such-org/no-such-model", tmp_path / "adapters")
    server = create_server(Assistant(settings, store=KnowledgeStore(settings, embedder=embedder)))
    exports = server.state.exports
    with serving(server):
        exported = Path(exports.write([finished_turn(answer="Ada.")], session="s1"))
        assert exported.is_file() and exported.is_relative_to(exports.folder)
    assert not exports.folder.exists()


def test_page_comes_up_while_the_model_is_still_loading(tmp_path, minilm_path, embedder):
    """The model loads in a background thread: /health answers before the (slow) model is ready."""
    gate = threading.Event()

    class SlowAssistant(Assistant):
        @property
        def runtime(self):
            gate.wait(30)
            return super().runtime

    from assistant.ui.app import create_server
    from knowledge import KnowledgeStore
    from tests.assistant_fixtures import serving

    settings = app_settings(tmp_path, minilm_path, "no-such-org/no-such-model", tmp_path / "adapters")
    assistant = SlowAssistant(settings, store=KnowledgeStore(settings, embedder=embedder))
    with serving(create_server(assistant)) as url:
        loading = get_json(f"{url}/health")
        gate.set()
        loaded = wait_for_model(url)
    assert loading["model_status"] == "loading" and loading["documents"] == 0
    assert loaded["model_status"] == "unavailable"
