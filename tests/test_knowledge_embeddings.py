"""Embedding settings: the prefixes E5 models were trained with, and the dtype chosen for this machine."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from knowledge.embeddings import default_prefixes, resolve_dtype


@pytest.mark.parametrize("model, prefixes", [
    ("intfloat/multilingual-e5-small", ("query: ", "passage: ")),
    ("/models/multilingual-e5-base", ("query: ", "passage: ")),
    ("sentence-transformers/all-MiniLM-L6-v2", ("", "")),
])
def test_e5_models_get_their_query_and_passage_prefixes(model, prefixes):
    assert default_prefixes(model) == prefixes


def test_dtype_names_map_to_torch_dtypes():
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16, torch.float16)


# -- backends: the model exported to ONNX Runtime / OpenVINO agrees with torch ------------------------------------

TEXTS = [
    "The Borealis pump moves forty litres of water per minute.",
    "Debian packages are installed with apt-get install. " * 40,  # past the model's 256 tokens: truncated
    "東京の気象庁は十二日に大雨警報を発表した。",
    "x",
]
# Least cosine to torch float32 per backend. int8 is looser: on 256 Debian chunks onnx-int8's cosine was 0.97 at
# the least and 0.99 on average (docs/benchmarks.md, "Embedding backends").
AGREEMENT = {"onnx": 0.999, "openvino": 0.99, "onnx-int8": 0.97, "openvino-int8": 0.97}


@pytest.fixture(scope="module")
def export_home(tmp_path_factory):
    """A fresh HF_HOME for this module, so the export itself is tested, not a file cached by an earlier run."""
    from huggingface_hub import constants

    home, before = tmp_path_factory.mktemp("hf-home"), constants.HF_HOME
    constants.HF_HOME = str(home)
    yield home
    constants.HF_HOME = before


@pytest.fixture(scope="module")
def torch_vectors(minilm_path):
    from knowledge.embeddings import Embedder
    from settings import Settings

    embedder = Embedder(Settings.from_env(embedding_model=minilm_path, embedding_backend="torch",
                                          embedding_dtype="float32"))
    return embedder.embed_passages(TEXTS)


@pytest.fixture(scope="module")
def exported_embedders(minilm_path, export_home):
    from knowledge.embeddings import Embedder
    from settings import Settings

    return {b: Embedder(Settings.from_env(embedding_model=minilm_path, embedding_backend=b)) for b in AGREEMENT}


@pytest.mark.slow  # the first of these exports the model (20-50 s on 2 shared cores)
@pytest.mark.parametrize("backend", AGREEMENT)
def test_exported_backend_agrees_with_torch(backend, exported_embedders, torch_vectors):
    vectors = exported_embedders[backend].embed_passages(TEXTS)
    assert vectors.shape == torch_vectors.shape and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    cosines = (vectors * torch_vectors).sum(axis=1)
    assert cosines.min() > AGREEMENT[backend], cosines


@pytest.mark.slow
def test_a_query_embeds_alone_as_within_a_batch(exported_embedders):
    embedder = exported_embedders["onnx"]
    alone = embedder.embed_query(TEXTS[0])
    assert np.dot(alone, embedder.embed_passages(TEXTS)[0]) > 0.9999  # padding in a batch must not leak


@pytest.mark.slow
def test_threads_embed_at_the_same_time_on_openvino(exported_embedders):
    # The app searches while an add embeds: an OpenVINO infer request runs one inference at a time.
    from concurrent.futures import ThreadPoolExecutor

    embedder = exported_embedders["openvino"]
    expected = embedder.embed_passages(TEXTS)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: embedder.embed_passages(TEXTS), range(16)))
    assert all(np.allclose(r, expected, atol=1e-6) for r in results)


@pytest.mark.slow
def test_the_export_is_written_once_and_reused(minilm_path, exported_embedders, export_home):
    from knowledge.embeddings import Embedder
    from knowledge.exported import FILES, export_folder
    from settings import Settings

    folder = export_folder(minilm_path)
    assert folder.is_relative_to(export_home)
    written = {name: (folder / name).stat().st_mtime_ns for name in FILES.values()}
    Embedder(Settings.from_env(embedding_model=minilm_path, embedding_backend="onnx-int8"))
    assert {name: (folder / name).stat().st_mtime_ns for name in FILES.values()} == written
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx-int8", "openvino-int8"])
def test_a_store_on_an_int8_backend_finds_the_right_passage(backend, tmp_path, minilm_path, exported_embedders):
    from knowledge import KnowledgeStore
    from settings import Settings

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pumps.txt").write_text("The Borealis pump moves forty litres of water per minute.")
    (docs / "picnic.txt").write_text("The annual picnic is held at Lake Varna in June.")
    (docs / "keeper.txt").write_text("The lighthouse keeper is Ingrid Holm.")
    settings = Settings.from_env(knowledge_dir=tmp_path / "store", embedding_model=minilm_path,
                                 embedding_backend=backend)
    store = KnowledgeStore(settings, embedder=exported_embedders[backend])
    assert not store.add([docs]).failed
    for query, name in {"how much water does the pump move": "pumps.txt", "where is the picnic": "picnic.txt",
                        "who looks after the lighthouse": "keeper.txt"}.items():
        assert store.search(query, k=1, mode="vector")[0].source.endswith(name), query


@pytest.mark.slow
def test_a_backend_that_cannot_run_says_to_use_torch(minilm_path, export_home, monkeypatch):
    import sys

    from knowledge.embeddings import Embedder, EmbeddingModelError
    from settings import Settings

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    with pytest.raises(EmbeddingModelError, match="EMBEDDING_BACKEND='openvino'.*Set EMBEDDING_BACKEND=torch"):
        Embedder(Settings.from_env(embedding_model=minilm_path, embedding_backend="openvino"))


def test_a_bad_backend_name_is_a_settings_error_naming_the_choices():
    from settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=r"EMBEDDING_BACKEND='tensorrt': use one of auto, torch, onnx, onnx-int8"):
        Settings.from_env({"EMBEDDING_BACKEND": "tensorrt"})


def test_auto_backend_is_torch_on_cuda_else_the_measured_cpu_backend():
    from knowledge.embeddings import AUTO_CPU_BACKEND, _cuda, resolve_backend

    assert resolve_backend("onnx") == "onnx"
    assert resolve_backend("auto") == ("torch" if _cuda() else AUTO_CPU_BACKEND)


@pytest.mark.slow
def test_the_openvino_int8_model_keeps_the_outlier_matmuls_in_float(minilm_path, exported_embedders):
    # The feed-forward output projections read the activations BERT-like encoders have outliers in: quantizing
    # them and attention's products lost vector-mode hit@5 on the benchmark (knowledge/exported.py).
    import openvino

    from knowledge.exported import FILES, export_folder

    model = openvino.Core().read_model(str(export_folder(minilm_path) / FILES["openvino-int8"]))
    inputs = {op.get_friendly_name(): [i.get_source_output().get_node().get_type_name() for i in op.inputs()]
              for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"}
    feed_forward_in = [v for k, v in inputs.items() if k.endswith("/intermediate/dense/MatMul")]
    feed_forward_out = [v for k, v in inputs.items() if re.search(r"/layer\.\d+/output/dense/MatMul$", k)]
    attention = [v for k, v in inputs.items() if re.search(r"/attention/self/MatMul(_1)?$", k)]
    assert len(feed_forward_in) == len(feed_forward_out) == 6 and len(attention) == 12
    assert all("FakeQuantize" in v for v in feed_forward_in)  # int8 activations
    assert not any("FakeQuantize" in v for v in feed_forward_out + attention)


def test_the_calibration_text_holds_both_languages():
    from knowledge.exported import calibration_texts
    from knowledge.terms import tokenize

    texts = calibration_texts()
    japanese = [t for t in texts if re.search(r"[\u3040-\u30ff]", t)]
    assert len(texts) >= 100 and len(japanese) >= 20
    assert not any(t.startswith("#") for t in texts) and all(tokenize(t) for t in texts)
