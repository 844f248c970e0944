"""Shared fixtures of the app tests: the tiny chat model with a trained adapter, and the app on loopback.

The tiny model and its adapter are built once per session; each module starts its own app.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loopback import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ADAPTER_NAME = "chat-smoke"
NOTES = ("The lighthouse keeper of Port Wren is Ada Lovelock. She lights the lamp every evening at dusk. "
         "The lighthouse was painted red and white in 1912.")


@pytest.fixture(scope="session")
def app_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A folder of adapters holding one, `chat-smoke`, trained for a few ORPO steps on the tiny model.

    A few steps do not teach the random model to write "<think>…</think>answer" (that takes far longer than
    a test may on CPU), but they give a real adapter that the app loads and names in every answer.
    """
    from finetune.config import TrainConfig
    from finetune.train import train

    folder = tmp_path_factory.mktemp("app-adapters")
    rows = [{"instruction": f"Question {i}: where is the answer?", "input": "Some passage.",
             "chosen": "<think>I read the passages.</think>The answer is in [1].",
             "rejected": "<think>I did not read them.</think>I do not know."} for i in range(4)]
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    train(TrainConfig(model_name=str(tiny_model_dir), data=str(data), output_dir=str(folder / ADAPTER_NAME),
                      backend="hf", load_in_4bit=False, max_length=128, max_prompt_length=64,
                      gradient_checkpointing="false", lora_r=4, lora_alpha=8, per_device_train_batch_size=2,
                      gradient_accumulation_steps=1, learning_rate=1e-2, optim="adamw_torch",
                      precision="fp32", max_steps=2, save_steps=1000, logging_steps=1, data_format="chat"))
    data.unlink()
    return folder


def app_settings(base: Path, minilm_path: str, model_dir: Path, adapter_dir: Path, **changes):
    """Small, fast settings on temporary folders, ignoring the developer's environment."""
    from settings import Settings

    values = dict(knowledge_dir=base / "knowledge", embedding_model=minilm_path, chat_model=str(model_dir),
                  adapter_dir=adapter_dir, max_new_tokens=16, temperature=0.0, retrieval_k=2, chunk_size=300,
                  chunk_overlap=50, queue_size=32, gpu_concurrency=1, max_upload_mb=1.0, pairs_db=base / "pairs.sqlite")
    values.update(changes)
    return Settings.from_env(environ={}, **values)



def save_adapter(tiny_model_dir: Path, folder: Path, base_model: str, prompt_format: str = "alpaca",
                 seed: int = 1, target_modules: tuple[str, ...] = ("q_proj", "v_proj"), **info) -> Path:
    """A random LoRA adapter on the tiny model, written as training writes one: its config first, the weights,
    then training_info.json (with ``info`` in it) last."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.adapters import CONFIG_NAME, INFO_NAME

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text("model_name: tiny\n", encoding="utf-8")
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=list(target_modules), init_lora_weights=False))
    model.save_pretrained(folder)
    (folder / INFO_NAME).write_text(json.dumps({"base_model": base_model, "prompt_format": prompt_format, **info}))
    return folder


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    # Clients hold event streams open; a short graceful shutdown keeps teardown from waiting on them.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_for_model(url: str, timeout: float = 120) -> dict:
    """/health once the model has loaded (or failed to)."""
    deadline = time.monotonic() + timeout
    while True:
        health = get_json(f"{url}/health")
        if health["model_status"] != "loading" or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


@contextlib.contextmanager
def running_app(settings, embedder, runtime=None, auth=None, documents: list[Path] = ()) -> Iterator[str]:
    """The whole app (FastAPI + Gradio, as `serve` runs it) on loopback, with `documents` in its store."""
    from assistant.chat import Assistant
    from assistant.ui.app import create_server
    from knowledge import KnowledgeStore

    store = KnowledgeStore(settings, embedder=embedder)
    if documents:
        assert store.add(list(documents)).ok
    with serving(create_server(Assistant(settings, runtime=runtime, store=store), auth=auth)) as url:
        yield url


def write_notes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lighthouse-notes.txt"
    path.write_text(NOTES + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def tiny_app_running(base: Path, minilm_path: str, embedder, tiny_model_dir: Path, app_adapter_dir: Path
                     ) -> Iterator[tuple[str, object]]:
    """The app with the tiny model, the chat-smoke adapter and one document, model loaded: (URL, settings)."""
    settings = app_settings(base, minilm_path, tiny_model_dir, app_adapter_dir)
    with running_app(settings, embedder, documents=[write_notes(base / "docs")]) as url:
        assert wait_for_model(url)["model_status"] == "ready"
        yield url, settings


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory, minilm_path, embedder, tiny_model_dir, app_adapter_dir) -> Iterator[str]:
    """The URL of `tiny_app_running`, one app per test module."""
    with tiny_app_running(tmp_path_factory.mktemp("app"), minilm_path, embedder, tiny_model_dir,
                          app_adapter_dir) as (url, _):
        yield url


@pytest.fixture
def pump_store(store, tmp_path):
    """The test store holding one document, docs/pump.txt: the Borealis pump moves 40 litres per minute."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pump.txt").write_text("The Borealis pump moves 40 litres per minute.", encoding="utf-8")
    assert store.add([tmp_path / "docs"]).ok
    return store


class ScriptedRuntime:
    """Plays the model's part with fixed outputs, so the plumbing around them can be checked exactly."""

    model_name, adapter, prompt_format = "scripted", None, "alpaca"
    active_adapter = last_usage = decode_plan = None  # engine.runtime.ModelRuntime's other attributes

    def __init__(self, *outputs: str):
        self.outputs, self.prompts = list(outputs), []

    def render_chat(self, messages):
        raise AssertionError("alpaca only")

    def activate(self, adapter) -> None:
        self.adapter, self.active_adapter = (adapter.name if adapter else None), adapter

    def close(self) -> None:
        pass

    def stream(self, prompt, params, stop=None):
        self.prompts.append(prompt)
        yield from self.outputs[len(self.prompts) - 1]
