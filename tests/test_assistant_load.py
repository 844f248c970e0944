"""Many chats at once through gradio_client: all answered; the line fills up to QUEUE_SIZE and no further, the
overflow turned away."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client
from gradio_client.utils import QueueError

from tests.assistant_fixtures import app_settings, get_json, running_app, wait_for_model, write_notes

CHATS = 20
QUEUE_SIZE = 4


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
def test_twenty_concurrent_chats_are_all_answered_each_to_its_own_question(
        tmp_path, minilm_path, embedder, tiny_model_dir, app_adapter_dir):
    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, app_adapter_dir, max_new_tokens=8,
                            queue_size=CHATS, gpu_concurrency=2)
    with running_app(settings, embedder, documents=[write_notes(tmp_path / "docs")]) as url:
        assert wait_for_model(url)["model_status"] == "ready"
        with ThreadPoolExecutor(CHATS) as pool:
            chats = list(pool.map(lambda n: ask(url, n), range(CHATS)))
    for n, chat in enumerate(chats):
        texts = ["".join(p["text"] for p in m["content"]) for m in chat]
        assert texts[0] == f"Question {n}: who keeps the lighthouse?"
        assert any(f"answered by {tiny_model_dir.name}" in t for t in texts), texts
        assert not any("Cannot answer" in t for t in texts)


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


def test_the_line_fills_to_queue_size_and_no_further_while_the_overflow_is_turned_away(
        tmp_path, minilm_path, embedder):
    """One chat holds the model; CHATS more arrive at once: QUEUE_SIZE of them wait, the rest are turned away."""
    settings = app_settings(tmp_path, minilm_path, "gated", tmp_path / "adapters", queue_size=QUEUE_SIZE,
                            gpu_concurrency=1)
    runtime = GatedRuntime()
    with running_app(settings, embedder, runtime=runtime) as url:
        running = Client(url, verbose=False).submit("first", 0.0, 8, False, api_name="/chat")
        assert runtime.started.wait(30)  # the first generation holds the one slot until the gate opens
        with QueueWatcher(url) as watcher, ThreadPoolExecutor(CHATS) as pool:
            jobs = list(pool.map(lambda n: Client(url, verbose=False).submit(f"q{n}", 0.0, 8, False,
                                                                              api_name="/chat"), range(CHATS)))
            # Open the gate only once every chat has had its answer from the line: a place, or "queue is full".
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (sum(map(turned_away, jobs)) < CHATS - QUEUE_SIZE or
                                                   get_json(f"{url}/gradio_api/queue/status")["queue_size"]
                                                   < QUEUE_SIZE):
                time.sleep(0.1)
            time.sleep(0.3)  # a last look for the watcher
            runtime.gate.set()
            refused = [job for job in jobs if turned_away(job)]
            answered = [job.result(timeout=60)[0] for job in jobs if job not in refused]
        first, _ = running.result(timeout=60)
    assert len(refused) == CHATS - QUEUE_SIZE
    assert all("Queue is full" in str(job.exception()) for job in refused)
    assert len(answered) == QUEUE_SIZE
    assert all("ok" in "".join(p["text"] for p in chat[-1]["content"]) for chat in [first, *answered])
    assert max(watcher.sizes) == QUEUE_SIZE  # the line filled ...
    assert all(size <= QUEUE_SIZE for size in watcher.sizes)  # ... and never grew past QUEUE_SIZE


def turned_away(job) -> bool:
    return job.done() and isinstance(job.exception(), QueueError)
