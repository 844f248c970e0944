"""Adapters and hot swap: the list of ADAPTER_DIR, choosing an adapter or the base without a restart, following
the newest, the choice kept across restarts, vLLM's runtime LoRA API, and the Adapters tab through its API."""

from __future__ import annotations

import json
import shutil
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gradio_client import Client

from assistant.chat import Assistant
from engine.adapter_switch import CHOICE_NAME, AdapterError
from engine.runtime import GenerationParams
from finetune.adapters import ADAPTER_CONFIG, EVAL_NAME, INFO_NAME, list_adapters, newest_usable
from settings import Settings
from tests.assistant_fixtures import (
    ADAPTER_NAME,
    app_settings,
    get_json,
    running_app,
    save_adapter,
    wait_for_model,
)

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)
QUESTION = "Who keeps the lighthouse?"


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir) -> Path:
    """One adapter, `first`, trained (as far as its files say) on the tiny model."""
    folder = tmp_path / "adapters"
    save_adapter(tiny_model_dir, folder / "first", str(tiny_model_dir), global_step=40,
                 data_report={"ok": 12, "rejected": []})
    return folder


def swap_settings(tiny_model_dir, adapter_dir, **changes) -> Settings:
    return Settings.from_env(environ={}, chat_model=str(tiny_model_dir), adapter_dir=adapter_dir, **changes)


def ask(assistant: Assistant):
    return assistant.ask(QUESTION, GREEDY, use_retrieval=False)


def said(answer) -> str:
    return answer.reasoning + answer.answer


@pytest.fixture
def base_text(tiny_model_dir, tmp_path) -> str:
    """What the base model says greedily to QUESTION, from a runtime that never saw an adapter."""
    return said(ask(Assistant(swap_settings(tiny_model_dir, tmp_path / "no-adapters"))))


# -- the list ---------------------------------------------------------------------------------------------


def test_the_list_gives_base_date_data_steps_and_eval_and_says_why_an_adapter_cannot_be_used(adapter_dir,
                                                                                           tiny_model_dir):
    (adapter_dir / "first" / EVAL_NAME).write_text(json.dumps({"models": [
        {"name": "base", "think_rate": 0.25, "duplication_rate": 0.5},
        {"name": "first", "think_rate": 0.75, "duplication_rate": 0.125}]}))
    save_adapter(tiny_model_dir, adapter_dir / "other-base", "someone/other-model")
    running = adapter_dir / "still-training"
    save_adapter(tiny_model_dir, running, str(tiny_model_dir))
    (running / INFO_NAME).unlink()  # training writes it last
    entries = {e.name: e for e in list_adapters(adapter_dir, str(tiny_model_dir))}
    first = entries["first"]
    assert (first.base_model, first.steps, first.data_size, first.usable) == (str(tiny_model_dir), 40, 12, True)
    assert first.eval_summary == "think_rate 0.75 (base 0.25), duplication_rate 0.12 (base 0.50)"
    assert first.to_dict()["created"][:2] == "20"
    assert entries["other-base"].reason == f"trained on someone/other-model, not on CHAT_MODEL={tiny_model_dir}"
    assert entries["still-training"].reason.startswith("incomplete: training is still writing it")
    assert newest_usable(adapter_dir, str(tiny_model_dir)).name == "first"


def test_an_adapter_for_another_base_cannot_be_chosen_and_says_why(adapter_dir, tiny_model_dir):
    save_adapter(tiny_model_dir, adapter_dir / "other-base", "someone/other-model")
    assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir))
    assert assistant.runtime.adapter == "first"
    with pytest.raises(AdapterError, match="other-base cannot be used: trained on someone/other-model"):
        assistant.adapters.use_adapter("other-base")
    assert assistant.runtime.adapter == "first"


# -- swapping in the running process -----------------------------------------------------------------------


def test_swapping_to_the_base_and_back_changes_the_next_answer_and_records_it(adapter_dir, tiny_model_dir,
                                                                              base_text):
    assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir))
    with_adapter = ask(assistant)
    assistant.adapters.use_base()
    on_base = ask(assistant)
    assistant.adapters.use_adapter("first")
    again = ask(assistant)
    assert (with_adapter.adapter, on_base.adapter, again.adapter) == ("first", None, "first")
    assert said(on_base) == base_text != said(with_adapter) == said(again)


def test_a_request_in_flight_finishes_on_the_adapter_it_started_with(adapter_dir, tiny_model_dir, base_text):
    """The request is held just before its generation starts (its prompt built, its adapter recorded) while a
    swap is asked for: the swap waits for it."""
    assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir))
    runtime = assistant.runtime
    assistant.adapters.use_base()
    started, release, stream = threading.Event(), threading.Event(), runtime.stream

    def held(*args, **kwargs):
        started.set()
        release.wait(60)
        yield from stream(*args, **kwargs)

    runtime.stream = held
    answers = []
    asking = threading.Thread(target=lambda: answers.append(ask(assistant)))
    asking.start()
    assert started.wait(60)
    swapping = threading.Thread(target=assistant.adapters.use_adapter, args=("first",))
    swapping.start()
    while not assistant.adapters.gate.exclusive_waiting and swapping.is_alive():  # until the swap waits (or is done)
        time.sleep(0.01)
    in_use_meanwhile = runtime.adapter
    release.set()
    asking.join(60)
    swapping.join(60)
    assert in_use_meanwhile is None
    assert answers[0].adapter is None and said(answers[0]) == base_text
    assert ask(assistant).adapter == "first"


def test_the_choice_survives_a_restart(adapter_dir, tiny_model_dir):
    settings = swap_settings(tiny_model_dir, adapter_dir)
    save_adapter(tiny_model_dir, adapter_dir / "second", str(tiny_model_dir), seed=2)
    first_run = Assistant(settings)
    assert first_run.runtime.adapter == "second"  # the newest
    first_run.adapters.use_adapter("first")
    assert Assistant(settings).runtime.adapter == "first"
    first_run.adapters.use_base()
    restarted = Assistant(settings)
    assert restarted.runtime.adapter is None and restarted.adapters.choice.mode == "base"
    assert json.loads((adapter_dir / CHOICE_NAME).read_text()) == {"mode": "base", "adapter": None}


def test_following_swaps_in_a_newer_adapter_and_pinning_stops_it(adapter_dir, tiny_model_dir):
    assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir))
    assert assistant.runtime.adapter == "first"
    save_adapter(tiny_model_dir, adapter_dir / "second", str(tiny_model_dir), seed=2)
    assistant.adapters.poll()
    assert ask(assistant).adapter == "second"
    assistant.adapters.use_adapter("first")
    save_adapter(tiny_model_dir, adapter_dir / "third", str(tiny_model_dir), seed=3)
    assistant.adapters.poll()
    assert ask(assistant).adapter == "first"  # pinned
    assistant.adapters.follow_newest()
    assert ask(assistant).adapter == "third"


def test_following_waits_for_a_training_run_to_finish_writing(adapter_dir, tiny_model_dir):
    assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir))
    running = save_adapter(tiny_model_dir, adapter_dir / "running", str(tiny_model_dir), seed=2)
    info = (running / INFO_NAME).read_text()
    (running / INFO_NAME).unlink()
    assistant.runtime  # noqa: B018 - loads the model
    assistant.adapters.poll()
    assert assistant.runtime.adapter == "first"
    (running / INFO_NAME).write_text(info)
    assistant.adapters.poll()
    assert assistant.runtime.adapter == "running"


def test_only_the_adapter_in_use_and_the_one_before_stay_loaded(adapter_dir, tiny_model_dir):
    assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir))
    assert assistant.runtime.adapter == "first"
    for seed, name in enumerate(("second", "third"), start=2):
        save_adapter(tiny_model_dir, adapter_dir / name, str(tiny_model_dir), seed=seed)
    for name in ("second", "third", "first"):
        assistant.adapters.use_adapter(name)
    assert len(assistant.runtime.model.peft_config) == 2


# -- an OpenAI-compatible server with vLLM's runtime LoRA API -------------------------------------------------


class _LoraServer(BaseHTTPRequestHandler):
    """Stands in for vLLM started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: it answers the
    runtime LoRA endpoints and streams a completion, and records every call."""

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append((self.path, body))
        if self.path != "/v1/completions":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"Success")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ["I read it.", "</think>", f"Answered by {body['model']}."]:
            self.wfile.write(f"data: {json.dumps({'choices': [{'text': piece}]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_with_an_openai_server_a_swap_loads_the_lora_and_requests_name_it(adapter_dir, tiny_model_dir):
    """vLLM cannot run here (no GPU), so a stand-in server checks the calls of vLLM's runtime LoRA API."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LoraServer)
    server.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir, model_backend="openai",
                                            openai_base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                            openai_model="r1-base"))
        assistant.runtime  # noqa: B018 - attaches the runtime to the adapter switch
        assistant.adapters.use_adapter("first")
        with_lora = assistant.ask(QUESTION, GREEDY, use_retrieval=False)
        assistant.adapters.use_base()
        on_base = assistant.ask(QUESTION, GREEDY, use_retrieval=False)
    finally:
        server.shutdown()
    paths = [path for path, _ in server.calls]
    assert paths == ["/v1/load_lora_adapter", "/v1/completions", "/v1/unload_lora_adapter", "/v1/completions"]
    assert server.calls[0][1] == {"lora_name": "first", "lora_path": str((adapter_dir / "first").resolve())}
    assert server.calls[2][1] == {"lora_name": "first"}
    assert [server.calls[i][1]["model"] for i in (1, 3)] == ["first", "r1-base"]
    assert (with_lora.adapter, with_lora.answer) == ("first", "Answered by first.")
    assert (on_base.adapter, on_base.answer) == (None, "Answered by r1-base.")


def test_with_an_openai_server_the_saved_choice_is_loaded_at_start(adapter_dir, tiny_model_dir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LoraServer)
    server.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = swap_settings(tiny_model_dir, adapter_dir, model_backend="openai", openai_model="r1-base",
                             openai_base_url=f"http://127.0.0.1:{server.server_port}/v1")
    try:
        (adapter_dir / CHOICE_NAME).write_text(json.dumps({"mode": "pinned", "adapter": "first"}))
        answer = Assistant(settings).ask(QUESTION, GREEDY, use_retrieval=False)
    finally:
        server.shutdown()
    assert [path for path, _ in server.calls] == ["/v1/load_lora_adapter", "/v1/completions"]
    assert (answer.adapter, answer.answer) == ("first", "Answered by first.")


# -- the app ------------------------------------------------------------------------------------------------


def test_the_adapters_tab_lists_swaps_and_follows_an_adapter_trained_outside_the_app(
        tmp_path, minilm_path, embedder, tiny_model_dir, app_adapter_dir):
    from finetune.config import TrainConfig
    from finetune.train import train

    adapters = tmp_path / "adapters"
    shutil.copytree(app_adapter_dir, adapters)
    save_adapter(tiny_model_dir, adapters / "other-base", "someone/other-model")
    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, adapters, adapter_poll_s=0.2)
    with running_app(settings, embedder) as url:
        assert wait_for_model(url)["adapter"] == ADAPTER_NAME
        client = Client(url, verbose=False)
        _, _, _, listed = client.predict(api_name="/list_adapters")
        *_, base_state, _, _ = client.predict(api_name="/use_base_model")
        on_base = get_json(f"{url}/health")["adapter"]
        *_, pinned_state, note, status = client.predict(ADAPTER_NAME, api_name="/use_adapter")
        pinned = get_json(f"{url}/health")["adapter"]
        client.predict(api_name="/follow_newest")
        rows = [{"instruction": f"Question {i}?", "input": "", "chosen": "<think>r</think>a",
                 "rejected": "<think>r</think>b"} for i in range(2)]
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        train(TrainConfig(model_name=str(tiny_model_dir), data=str(tmp_path / "pairs.jsonl"),
                          output_dir=str(adapters / "outside"), backend="hf", load_in_4bit=False, max_length=64,
                          max_prompt_length=32, gradient_checkpointing="false", lora_r=4, lora_alpha=8,
                          per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2,
                          optim="adamw_torch", precision="fp32", max_steps=1, save_steps=1000, logging_steps=1))
        deadline = time.monotonic() + 60
        while get_json(f"{url}/health")["adapter"] != "outside" and time.monotonic() < deadline:
            time.sleep(0.2)
        followed = get_json(f"{url}/health")["adapter"]
        _, table, _, final = client.predict(api_name="/list_adapters")
        # Name, delete and download: never the adapter answering.
        *_, renamed, note_renamed, _ = client.predict("other-base", "other-v2", api_name="/rename_adapter")
        with pytest.raises(Exception, match="outside is the adapter answering"):
            client.predict("outside", api_name="/delete_adapter")
        with pytest.raises(Exception, match="cannot name an adapter"):
            client.predict("other-v2", "../escape", api_name="/rename_adapter")
        *_, after_delete, _, _ = client.predict("other-v2", api_name="/delete_adapter")
        zipped = client.predict(ADAPTER_NAME, api_name="/download_adapter")
    assert "Renamed other-base to other-v2." == note_renamed
    assert "other-v2" in [a["name"] for a in renamed["adapters"]] and not (adapters / "other-base").exists()
    assert sorted(a["name"] for a in after_delete["adapters"]) == sorted([ADAPTER_NAME, "outside"])
    with zipfile.ZipFile(zipped) as archive:
        names = archive.namelist()
    assert f"{ADAPTER_NAME}/{ADAPTER_CONFIG}" in names and f"{ADAPTER_NAME}/adapter_model.safetensors" in names
    assert all(n.startswith(f"{ADAPTER_NAME}/") for n in names)
    by_name = {a["name"]: a for a in listed["adapters"]}
    assert listed["active"] == ADAPTER_NAME and listed["mode"] == "follow"
    assert (by_name[ADAPTER_NAME]["steps"], by_name[ADAPTER_NAME]["data_size"]) == (2, 4)
    assert not by_name["other-base"]["usable"] and "someone/other-model" in by_name["other-base"]["reason"]
    assert (base_state["active"], base_state["mode"], on_base) == (None, "base", None)
    assert (pinned_state["active"], pinned_state["mode"], pinned) == (ADAPTER_NAME, "pinned", ADAPTER_NAME)
    assert f"Now answering with {ADAPTER_NAME}" in note and f"adapter {ADAPTER_NAME}" in status
    assert followed == "outside" and final["active"] == "outside" and final["mode"] == "follow"
    status_of = {row[0]: row[-1] for row in table["data"]}
    assert status_of["outside"] == "in use" and status_of["other-base"].startswith("not usable: trained on")


def test_a_verification_runs_its_three_generations_on_one_adapter(adapter_dir, tiny_model_dir, pump_store):
    """A swap asked for after the case for has been argued waits until the judge has spoken."""
    from assistant.verify import stream_verification

    assistant = Assistant(swap_settings(tiny_model_dir, adapter_dir, retrieval_k=1), store=pump_store)
    runtime = assistant.runtime
    assistant.adapters.use_base()
    adapters_used, stream = [], runtime.stream

    def recording(*args, **kwargs):
        adapters_used.append(runtime.adapter)
        yield from stream(*args, **kwargs)

    runtime.stream = recording
    swapping = None
    for result in stream_verification(assistant, "The pump moves 40 litres.", GenerationParams(8, 0.0)):
        if result.stage == "against" and swapping is None:  # the case for is done: ask for a swap now
            swapping = threading.Thread(target=assistant.adapters.use_adapter, args=("first",))
            swapping.start()
            while not assistant.adapters.gate.exclusive_waiting and swapping.is_alive():
                time.sleep(0.01)
    swapping.join(60)
    assert adapters_used == [None, None, None] and result.adapter is None
    assert runtime.adapter == "first"  # and then the swap happened
