"""Many chats at once through gradio_client: all answered, the line bounded by QUEUE_SIZE, overflow turned away."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.utils import QueueError

from tests.assistant_fixtures import app_settings, get_json, running_app, wait_for_model, write_notes

CHATS = 20
QUEUE_SIZE = 32


class QueueWatcher:
    """Polls the app's queue length (GET /gradio_api/queue/status) until stopped; keeps every reading."""

    def __init__(self, url: str):
        self.url, self.sizes, self._done = url, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._done.is_set():
            self.sizes.append(get_json(f"{self.url}/gradio_api/queue/status")["queue_size"])
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def ask(url: str, n: int) -> list[dict]:
    chat, _ = Client(url, verbose=False).predict(f"Question {n}: who keeps the lighthouse?", 0.0, 8, True,
                                                 api_name="/chat")
    return chat


@pytest.mark.slow
def test_twenty_concurrent_chats_are_all_answered_and_the_queue_stays_bounded(
        tmp_path, minilm_path, embedder, tiny_model_dir, app_adapter_dir):
    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir, max_new_tokens=8,
                            queue_size=QUEUE_SIZE, gpu_concurrency=2)
    with running_app(settings, embedder, documents=[write_notes(tmp_path / "docs")]) as url:
        assert wait_for_model(url)["model_status"] == "ready"
        with QueueWatcher(url) as watcher, ThreadPoolExecutor(CHATS) as pool:
            chats = list(pool.map(lambda n: ask(url, n), range(CHATS)))
    for n, chat in enumerate(chats):
        texts = ["".join(p["text"] for p in m["content"]) for m in chat]
        assert texts[0] == f"Question {n}: who keeps the lighthouse?"
        assert any(f"answered by {tiny_model_dir.name}" in t for t in texts), texts
        assert not any("Cannot answer" in t for t in texts)
    assert watcher.sizes and max(watcher.sizes) <= QUEUE_SIZE


class GatedRuntime:
    """A stand-in model that holds each generation until the test opens the gate: the line then stays put."""

    model_name, adapter, prompt_format = "gated-runtime", None, "alpaca"

    def __init__(self):
        self.gate, self.started = threading.Event(), threading.Event()

    def render_chat(self, messages):
        return ""

    def stream(self, prompt, params, stop=None):
        self.started.set()
        self.gate.wait(60)
        yield "done</think>ok"


def test_a_request_beyond_a_full_queue_is_turned_away_cleanly(tmp_path, minilm_path, embedder):
    settings = app_settings(tmp_path, minilm_path, "gated", tmp_path / "adapters", queue_size=1,
                            gpu_concurrency=1)
    runtime = GatedRuntime()
    with running_app(settings, embedder, runtime=runtime) as url:
        client = Client(url, verbose=False)
        running = client.submit("first", 0.0, 8, False, api_name="/chat")
        assert runtime.started.wait(30)  # the first generation holds the one slot
        waiting = client.submit("second", 0.0, 8, False, api_name="/chat")
        deadline = time.monotonic() + 30
        while get_json(f"{url}/gradio_api/queue/status")["queue_size"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(QueueError, match="Queue is full"):
            client.submit("third", 0.0, 8, False, api_name="/chat").result(timeout=30)
        runtime.gate.set()
        answers = [running.result(timeout=60), waiting.result(timeout=60)]
    for chat, _ in answers:
        assert "ok" in "".join(p["text"] for p in chat[-1]["content"])
