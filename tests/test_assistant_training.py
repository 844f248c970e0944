"""Training from the app (the Train tab's API): collect pairs, start a run, follow it, evaluate, answer with the
new adapter; cancel keeps a checkpoint that resume continues; runs outlive the app."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from finetune import runs
from finetune.training_log import read_log
from tests.assistant_fixtures import app_settings, get_json, running_app, wait_for_model, write_notes
from tests.finetune_fixtures import repeat_task_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = "finetune/configs/tiny-smoke.yaml"
QUESTION = "Who keeps the lighthouse?"


@pytest.fixture(scope="module")
def train_app(tmp_path_factory, minilm_path, embedder, tiny_model_dir) -> Iterator[tuple[str, Path]]:
    """The app on the tiny model with no adapter yet, its memory cap forcing the unload path: (URL, ADAPTER_DIR)."""
    base = tmp_path_factory.mktemp("train-app")
    settings = app_settings(base, minilm_path, tiny_model_dir, base / "adapters", train_config=Path(TINY_CONFIG),
                            train_memory_cap_gb=0.001, adapter_poll_s=0.5, max_new_tokens=12)
    with running_app(settings, embedder, documents=[write_notes(base / "docs")]) as url:
        assert wait_for_model(url)["model_status"] == "ready"
        yield url, settings.adapter_dir


def text(message: dict) -> str:
    return "".join(part.get("text", "") for part in message["content"])


def ask(url: str) -> list[dict]:
    """The chat after one question in a new session, greedy."""
    chat, _ = Client(url, verbose=False).predict(QUESTION, 0.0, 12, True, api_name="/chat")
    return chat


def answered_by(chat: list[dict]) -> str:
    return next(text(m) for m in chat if "answered by" in text(m))


def thinking(chat: list[dict]) -> str:
    """The reasoning the model wrote in a one-turn chat (the random tiny model rarely gets past it)."""
    return next(text(m) for m in chat if str((m.get("metadata") or {}).get("id", "")).startswith("think-"))


def start(client: Client, files: list[Path], steps: int, held_out: float, use_pairs: bool = False, epochs: float = 1):
    return client.predict(use_pairs, [handle_file(f) for f in files], held_out, TINY_CONFIG, steps, epochs, 2e-3,
                          0.1, 8, api_name="/start_training")


def held_out_pairs(folder: Path) -> list:
    from finetune.data import PreferencePair, read_json_rows

    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"])
            for r in read_json_rows(folder / "data" / "held-out-pairs.jsonl", "pairs")]


def wait_for_run(client: Client, until, timeout: float = 240) -> list[dict]:
    """The Train tab's state, polled until ``until(state)``; every state seen."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.predict(api_name="/training_progress")[6]
        seen.append(state)
        if until(state):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"the run did not get there in {timeout} s: {seen[-1]}")


def wait_for_health(url: str, until, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not until(health := get_json(f"{url}/health")) and time.monotonic() < deadline:
        time.sleep(0.2)
    return health


def test_a_run_from_the_tab_trains_evaluates_and_the_next_answer_uses_its_adapter(train_app, tmp_path):
    url, adapter_dir = train_app
    before = ask(url)
    collecting = Client(url, verbose=False)
    for question in ("Who keeps the lighthouse?", "What colour is the lighthouse?", "When was it painted?"):
        collecting.predict(question, 0.0, 12, True, api_name="/chat")
        assert "training pair" in collecting.predict(-1, "The notes say so.", "Ada Lovelock [1].",
                                                     api_name="/edit_answer")
    more = write_jsonl(tmp_path / "more-pairs.jsonl", repeat_task_rows(16, seed=1))

    *_, note, checked, _ = start(collecting, [more], steps=30, held_out=0.2, use_pairs=True)
    assert "17 usable pairs**: 14 to train on, 3 held out" in checked  # 2 of the file duplicate others
    assert "The chat model is unloaded for it" in note
    # While it runs: one run at a time, and a question gets a clear message instead of an answer.
    with pytest.raises(Exception, match="a training run is going"):
        start(collecting, [more], steps=30, held_out=0.2)
    refused = text(ask(url)[-1])
    assert "is using the memory" in refused and "comes back when the run ends" in refused

    seen = wait_for_run(collecting, lambda s: s["run"]["status"] in runs.ENDED, timeout=600)
    final = seen[-1]
    assert final["run"]["status"] == runs.DONE, final["run"]["error"]
    assert len({s["step"] for s in seen}) >= 2  # the progress moved while it was watched
    assert final["run"]["spec"]["held_out_share"] == 0.2 and len(final["run"]["spec"]["sources"]) == 2
    name = final["run"]["name"]
    assert [m["name"] for m in final["eval"]] == ["base", name]
    assert (final["run"]["pairs"], final["run"]["held_out"]) == (17, 3)
    assert "kernels-community" not in (adapter_dir / name / runs.JOB_LOG).read_text()  # no warning noise
    assert {m["completions"] for m in final["eval"]} == {len({p.prompt for p in held_out_pairs(adapter_dir / name)})}
    assert all(m["preference_accuracy"] is not None for m in final["eval"]) and final["eval_plot"]

    health = wait_for_health(url, lambda h: h["model_status"] == "ready" and h["adapter"] == name)
    assert (health["model_status"], health["adapter"]) == ("ready", name)
    after = ask(url)
    assert f"adapter {name}" in answered_by(after) and "adapter none" in answered_by(before)
    assert thinking(after) != thinking(before)


def test_cancel_keeps_a_checkpoint_that_resume_continues(train_app, tmp_path):
    url, adapter_dir = train_app
    client = Client(url, verbose=False)
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_task_rows(16, seed=2))
    start(client, [data], steps=60, held_out=0.0)
    running = wait_for_run(client, lambda s: s["step"] >= 2 or s["run"]["status"] in runs.ENDED)[-1]
    assert running["run"]["status"] == runs.RUNNING
    assert "Cancelling" in client.predict(api_name="/cancel_training")[-1]
    cancelled = wait_for_run(client, lambda s: s["run"]["status"] in runs.ENDED)[-1]
    name, folder = cancelled["run"]["name"], adapter_dir / cancelled["run"]["name"]
    assert cancelled["run"]["status"] == runs.CANCELLED and cancelled["step"] < 60
    assert list(folder.glob("checkpoint-*")), "a cancelled run keeps its last checkpoint"
    adapters = {a["name"]: a for a in client.predict(api_name="/list_adapters")[3]["adapters"]}
    assert not adapters[name]["usable"] and "training cancelled" in adapters[name]["reason"]
    assert wait_for_health(url, lambda h: h["model_status"] == "ready")["model_status"] == "ready"

    client.predict(name, api_name="/resume_training")
    done = wait_for_run(client, lambda s: s["run"]["status"] in runs.ENDED, timeout=600)[-1]
    assert done["run"]["status"] == runs.DONE, done["run"]["error"]
    steps = [r["step"] for r in read_log(folder)]
    assert steps[-1] == 60 and steps == sorted(set(steps))  # one run's log, continued, not restarted


def test_a_run_whose_job_died_unseen_reads_failed(tmp_path):
    folder = tmp_path / "run-x"
    folder.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    runs.write_run(folder, runs.RunRecord("run-x", runs.RunSpec("tiny", TINY_CONFIG), status=runs.RUNNING,
                                          pid=ended.pid))
    record = runs.read_run(folder)
    assert record.status == runs.FAILED and runs.JOB_LOG in record.error
    assert runs.active_run(tmp_path) is None  # so a new run may start


def test_the_memory_estimate_is_at_or_a_little_above_the_measured_peak_of_the_14b_recipe():
    from types import SimpleNamespace

    from finetune.config import TrainConfig
    from finetune.memory import training_memory_gib

    qwen_14b = SimpleNamespace(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                               head_dim=128, intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False)
    # Measured with Unsloth on an H200 (../shared/gpu notes): 14.5 GiB allocated by torch at 2048+2048 tokens,
    # batch 2, with the CUDA context (about a GiB) on top. The estimate may err high, not low.
    estimate = training_memory_gib(TrainConfig(per_device_train_batch_size=2, max_length=4096), qwen_14b)
    assert 14.5 + 0.5 <= estimate <= 14.5 * 1.15


def test_a_server_path_named_as_a_file_of_pairs_is_refused_by_name(train_app, tmp_path):
    import httpx

    url, adapter_dir = train_app
    server_file = write_jsonl(tmp_path / "server-pairs.jsonl", repeat_task_rows(4, seed=5))
    before = [r.name for r in runs.list_runs(adapter_dir)]
    data = [False, [{"path": str(server_file), "meta": {"_type": "gradio.FileData"}}], 0.0, TINY_CONFIG, 5, 1, 2e-3,
            0.1, 8]
    with httpx.Client(base_url=url, timeout=60) as http:  # as any HTTP client can call it, past gradio_client
        event = http.post("/gradio_api/call/start_training", json={"data": data}).raise_for_status().json()
        stream = http.get(f"/gradio_api/call/start_training/{event['event_id']}").raise_for_status().text
    assert "event: error" in stream and "server-pairs.jsonl: not a file uploaded to this app" in stream
    assert [r.name for r in runs.list_runs(adapter_dir)] == before
    # Only the configs offered: the dropdown refuses any other path a request names.
    with pytest.raises(Exception, match="not in the list of choices"):
        Client(url, verbose=False).predict(False, [handle_file(server_file)], 0.0, "/etc/hosts", 5, 1, 2e-3, 0.1, 8,
                                           api_name="/start_training")


def test_the_check_before_a_run_counts_previews_and_sizes_it_by_epochs(train_app, tmp_path):
    url, adapter_dir = train_app
    data = write_jsonl(tmp_path / "check-pairs.jsonl", [*repeat_task_rows(10, seed=6), {"prompt": "no answers"}])
    before = [r.name for r in runs.list_runs(adapter_dir)]
    summary, preview = Client(url, verbose=False).predict(
        False, [handle_file(data)], 0.1, TINY_CONFIG, 0, 2, 2e-3, 0.1, 8, api_name="/check_training_data")
    # 10 pairs, a tenth held out is 1, raised to 3 so that the evaluation scores a few; batch 2: 4 steps an epoch.
    assert "10 usable pairs**: 7 to train on, 3 held out" in summary and "1 row left out" in summary
    assert "2 epochs, 8 steps" in summary and "training context (256 tokens)" in summary
    assert len(preview["data"]) == 5 and [r.name for r in runs.list_runs(adapter_dir)] == before  # starts nothing


def test_start_with_no_pairs_is_refused_at_once_and_says_where_pairs_come_from(tmp_path, minilm_path, embedder,
                                                                                tiny_model_dir):
    from assistant.training import TrainingControl
    from assistant.ui.train import TrainTab
    from finetune.pairs_store import PairsStore

    settings = app_settings(tmp_path, minilm_path, tiny_model_dir, tmp_path / "adapters")
    PairsStore(settings.pairs_db)  # as the app leaves it at start: the file is there, with no pairs in it
    loader = SimpleNamespace(assistant=SimpleNamespace(settings=settings), runtime=None)
    tab = TrainTab(TrainingControl(loader), loader)
    with pytest.raises(gr.Error, match="the pairs store holds 0 pairs.*Pairs come from the Chat tab"):
        tab.start(True, [], 0.1, str(settings.train_config), 0, 1, 8e-6, 0.1, 16)
    assert runs.list_runs(settings.adapter_dir) == []


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "finetune" / "configs").glob("[!a]*.yaml")))
def test_every_shipped_config_fills_the_form_within_its_bounds(config):
    from assistant.ui.train import form_values

    steps, epochs, learning_rate, beta, rank = form_values(f"finetune/configs/{config}")
    assert steps >= 0 and epochs > 0 and learning_rate > 0 and beta > 0 and rank >= 1


def test_a_few_pairs_are_held_out_where_a_share_would_hold_none():
    assert [runs.held_out_count(n, 0.1) for n in (1, 2, 4, 10, 40)] == [0, 1, 2, 3, 4]
    assert runs.held_out_count(40, 0.0) == 0 and runs.eval_note(40, 0, 0.0) == "no evaluation: the held-out share is 0"
    assert "1 pairs are too few" not in runs.eval_note(1, 0, 0.1) and "too few" in runs.eval_note(1, 0, 0.1)


def test_the_rewards_chart_leaves_room_above_the_accuracy_line_and_steps_are_whole():
    import pandas as pd

    from assistant.ui.train import REWARD_SERIES, curves, reward_plot

    log = [{"step": s, "rewards/chosen": -0.6, "rewards/rejected": -0.7, "rewards/margins": 0.1,
            "rewards/accuracies": 1.0} for s in (1, 2)]
    plot = reward_plot(curves(log, REWARD_SERIES))
    low, high = plot.y_lim
    assert low < -0.7 and high > 1.0  # the line at 1.0 is drawn inside the frame, not on its edge
    assert reward_plot(pd.DataFrame(columns=["step", "value", "series"])).y_lim is None
