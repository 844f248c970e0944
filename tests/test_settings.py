"""Settings come from defaults, then the environment, then overrides; the README documents every one."""

from __future__ import annotations

from pathlib import Path

import pytest

from settings import Settings, settings_table

ROOT = Path(__file__).resolve().parents[1]


def test_environment_overrides_defaults_with_types():
    s = Settings.from_env({"KNOWLEDGE_DIR": "/tmp/k", "CHUNK_SIZE": "300", "MAX_FILE_MB": "1.5", "CHROMA_HOST": "db"})
    assert (s.knowledge_dir, s.chunk_size, s.max_file_mb, s.chroma_host) == (Path("/tmp/k"), 300, 1.5, "db")
    assert Settings.from_env({}).chroma_host is None


def test_keyword_overrides_win_over_environment():
    assert Settings.from_env({"CHUNK_SIZE": "300"}, chunk_size=900).chunk_size == 900


def test_bad_value_names_the_variable():
    with pytest.raises(ValueError, match="CHUNK_SIZE='big' is not a valid int"):
        Settings.from_env({"CHUNK_SIZE": "big"})


def test_readme_documents_every_setting():
    assert settings_table() in (ROOT / "README.md").read_text(encoding="utf-8")
