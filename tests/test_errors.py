"""The user-error contract (errors.py): a mistake the user can make ends every command with `error: ...` on
stderr, naming the input and what to do, exit status 2, and never a traceback; the app shows the same message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from assistant.chat import Assistant
from engine.runtime import ModelUnavailable
from errors import DataError, TrainingError, UserError
from finetune.__main__ import main as finetune_main
from finetune.adapters import ADAPTER_CONFIG, INFO_NAME, list_adapters
from finetune.config import ConfigError
from knowledge.embeddings import EmbeddingModelError
from knowledge.store import StoreError
from settings import SettingsError
from tests.assistant_fixtures import app_settings
from tests.finetune_fixtures import seed_row, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY_SMOKE = str(ROOT / "finetune/configs/tiny-smoke.yaml")


def run_cli(package: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", package, *args], env=environ, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def assert_user_error(code: int, stdout: str, stderr: str, *named: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr
    assert stderr.startswith("error: ") or "\nerror: " in stderr, stderr
    for text in named:
        assert text in stderr, stderr


def test_every_user_error_class_derives_from_one_base():
    for cls in (StoreError, EmbeddingModelError, ModelUnavailable, DataError, ConfigError, TrainingError,
                SettingsError):
        assert issubclass(cls, UserError)
        assert not issubclass(cls, ValueError)  # a ValueError is a bug, and is not caught as a user error


# -- finetune -------------------------------------------------------------------------------------------------


def test_training_without_data_says_to_set_it_before_looking_for_the_model(capsys):
    code = finetune_main(["train", "--config", TINY_SMOKE, "model_name=/nonexistent/model"])
    assert_user_error(code, *capsys.readouterr(), "no data: set data=")


@pytest.mark.parametrize("model, named", [
    ("/nonexistent/model", ["model_name='/nonexistent/model'", "no such folder", "python -m finetune tiny-model"]),
    ("think-rag-tests/no-such-model", ["model_name='think-rag-tests/no-such-model'", "hub", "tiny-model"]),
])
def test_training_on_a_model_that_cannot_load_names_it(model, named, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [seed_row(0)])
    code = finetune_main(["train", "--config", TINY_SMOKE, f"model_name={model}", f"data={data}",
                          f"output_dir={tmp_path / 'out'}"])
    assert_user_error(code, *capsys.readouterr(), *named)
    assert not (tmp_path / "out").exists()


def test_prepare_with_a_model_that_cannot_load_names_the_option(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [seed_row(0)])
    code = finetune_main(["prepare", str(data), "--model", "/nonexistent/model"])
    assert_user_error(code, *capsys.readouterr(), "--model='/nonexistent/model'", "no such folder")


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model_name: [outputs/tiny-model\nbackend: hf\n", encoding="utf-8")
    code = finetune_main(["train", "--config", str(config)])
    assert_user_error(code, *capsys.readouterr(), f"{config} is not valid YAML", "line 2")


def test_an_override_that_is_not_yaml_is_named(capsys):
    code = finetune_main(["train", "--config", TINY_SMOKE, "target_modules=[q_proj"])
    assert_user_error(code, *capsys.readouterr(), "override 'target_modules=[q_proj'", "not valid YAML")


def test_four_bits_without_bitsandbytes_says_how_to_install_it_or_turn_it_off(monkeypatch):
    import sys

    from finetune.quantization import require_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # Python's mark of a module that cannot be imported
    with pytest.raises(ModelUnavailable, match=r"pip install '\.\[gpu\]'.*or set load_in_4bit=false"):
        require_bitsandbytes("load_in_4bit")


# -- settings, in every CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["knowledge", "list"], ["assistant", "ask", "hi"],
                                     ["finetune", "prepare", "pairs.jsonl"]])
def test_every_cli_stops_on_a_bad_setting_with_its_name(command, tmp_path):
    result = run_cli(*command, MODEL_BACKEND="gpu", KNOWLEDGE_DIR=str(tmp_path))
    assert_user_error(result.returncode, result.stdout, result.stderr, "MODEL_BACKEND='gpu'", "local, openai")


def test_chunk_overlap_not_below_chunk_size_is_refused_before_any_file(tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("The ferry leaves at noon.", encoding="utf-8")
    result = run_cli("knowledge", "add", str(note), KNOWLEDGE_DIR=str(tmp_path / "store"), CHUNK_OVERLAP="500",
                     CHUNK_SIZE="400")
    assert_user_error(result.returncode, result.stdout, result.stderr, "CHUNK_OVERLAP=500", "CHUNK_SIZE=400")
    assert not (tmp_path / "store").exists()


# -- assistant ------------------------------------------------------------------------------------------------


def test_ask_with_an_embedding_model_that_cannot_load_names_it(tmp_path, tiny_model_dir):
    result = run_cli("assistant", "ask", "hi", KNOWLEDGE_DIR=str(tmp_path / "store"), CHAT_MODEL=str(tiny_model_dir),
                     ADAPTER_DIR=str(tmp_path / "adapters"), EMBEDDING_MODEL="/nonexistent", MAX_NEW_TOKENS="4")
    assert_user_error(result.returncode, result.stdout, result.stderr, "EMBEDDING_MODEL='/nonexistent'",
                      "no such folder")


def test_ask_json_stays_json_when_an_adapter_of_another_model_is_skipped(tmp_path, tiny_model_dir):
    foreign = tmp_path / "adapters" / "for-another-model"
    foreign.mkdir(parents=True)
    (foreign / ADAPTER_CONFIG).write_text("{}", encoding="utf-8")
    (foreign / INFO_NAME).write_text(json.dumps({"base_model": "someone/other-model"}), encoding="utf-8")
    result = run_cli("assistant", "ask", "hi", "--json", "--no-retrieval", KNOWLEDGE_DIR=str(tmp_path / "store"),
                     CHAT_MODEL=str(tiny_model_dir), ADAPTER_DIR=str(tmp_path / "adapters"), MAX_NEW_TOKENS="4",
                     TEMPERATURE="0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["adapter"] is None
    [skipped] = list_adapters(tmp_path / "adapters", str(tiny_model_dir))
    assert not skipped.usable and "someone/other-model" in skipped.reason


def test_chat_and_verify_tabs_show_an_embedding_model_that_cannot_load(tmp_path, tiny_model_dir):
    from assistant.model_loader import ModelLoader
    from assistant.ui.chat import ChatTab
    from assistant.ui.verify import VerifyTab

    settings = app_settings(tmp_path, "/nonexistent", tiny_model_dir, tmp_path / "adapters")
    assistant = Assistant(settings)
    loader = ModelLoader(assistant).start()
    *_, (_, turns, *_) = ChatTab(assistant, loader).respond("Who keeps the lighthouse?", [], 0.0, 4, True,
                                                            request=SimpleNamespace(session_hash="s1"))
    assert "EMBEDDING_MODEL='/nonexistent'" in turns[-1].error and turns[-1].done
    assert "Turn off “Search my documents”" in turns[-1].error
    *_, last = VerifyTab(assistant, loader).run("The lighthouse is red.")
    assert "Cannot search the knowledge store" in last[0] and "EMBEDDING_MODEL='/nonexistent'" in last[0]
