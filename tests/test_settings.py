"""Settings come from defaults, then the environment, then overrides; the README documents every one."""

from __future__ import annotations

from pathlib import Path

import pytest

from settings import Settings, SettingsError, settings_table

ROOT = Path(__file__).resolve().parents[1]


def test_environment_overrides_defaults_with_types():
    s = Settings.from_env({"KNOWLEDGE_DIR": "/tmp/k", "CHUNK_SIZE": "300", "MAX_FILE_MB": "1.5", "CHROMA_HOST": "db"})
    assert (s.knowledge_dir, s.chunk_size, s.max_file_mb, s.chroma_host) == (Path("/tmp/k"), 300, 1.5, "db")
    assert Settings.from_env({}).chroma_host is None


def test_keyword_overrides_win_over_environment():
    assert Settings.from_env({"CHUNK_SIZE": "300"}, chunk_size=900).chunk_size == 900


def test_bad_value_names_the_variable():
    with pytest.raises(SettingsError, match="CHUNK_SIZE='big' is not a valid int"):
        Settings.from_env({"CHUNK_SIZE": "big"})


def test_chunk_overlap_must_be_below_chunk_size_and_both_are_named():
    with pytest.raises(SettingsError, match="CHUNK_OVERLAP=500 .* smaller than CHUNK_SIZE=400"):
        Settings.from_env({"CHUNK_OVERLAP": "500", "CHUNK_SIZE": "400"})
    with pytest.raises(SettingsError, match="CHUNK_OVERLAP=-1"):
        Settings.from_env({"CHUNK_OVERLAP": "-1"})


@pytest.mark.parametrize("variable, value, accepted", [
    ("MODEL_BACKEND", "vllm", "local, openai"),
    ("LOCAL_ENGINE", "llama.cpp", "auto, unsloth, transformers"),
    ("PROMPT_FORMAT", "chatml", "auto, alpaca, chat"),
    ("EMBEDDING_DTYPE", "int4", "auto, float32, bfloat16, float16"),
])
def test_enumerated_settings_accept_only_their_choices(variable, value, accepted):
    with pytest.raises(SettingsError, match=f"{variable}='{value}': use one of {accepted}"):
        Settings.from_env({variable: value})


@pytest.mark.parametrize("variable", ["CHUNK_SIZE", "EMBEDDING_BATCH_SIZE", "RETRIEVAL_K", "MAX_NEW_TOKENS",
                                      "CONTEXT_LENGTH", "GPU_CONCURRENCY", "QUEUE_SIZE", "MAX_FILE_MB",
                                      "MAX_UPLOAD_MB"])
def test_sizes_and_counts_must_be_positive(variable):
    with pytest.raises(SettingsError, match=f"{variable}=0"):
        Settings.from_env({variable: "0", "CHUNK_OVERLAP": "0"})


@pytest.mark.parametrize("name", ["ab", "my docs", "-notes", "notes-", "a..b", "1.2.3.4", "x" * 501, "日本語"])
def test_collection_names_follow_chromas_rule(name):
    with pytest.raises(SettingsError, match="KNOWLEDGE_COLLECTION="):
        Settings.from_env({"KNOWLEDGE_COLLECTION": name})


def test_good_collection_names_and_ports_pass():
    s = Settings.from_env({"KNOWLEDGE_COLLECTION": "team_notes.v2-" + "x" * 480, "CHROMA_PORT": "65535"})
    assert s.chroma_port == 65535


@pytest.mark.parametrize("variable, value", [("CHROMA_PORT", "0"), ("CHROMA_PORT", "70000"),
                                             ("TEMPERATURE", "-0.1")])
def test_port_and_temperature_ranges(variable, value):
    with pytest.raises(SettingsError, match=f"{variable}="):
        Settings.from_env({variable: value})


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"MODEL_BACKEND": "vllm", "QUEUE_SIZE": "0"})
    assert "MODEL_BACKEND" in str(raised.value) and "QUEUE_SIZE" in str(raised.value)


def test_readme_documents_every_setting():
    assert settings_table() in (ROOT / "README.md").read_text(encoding="utf-8")
