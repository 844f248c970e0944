"""The reranker: a cross-encoder over the fused candidates. No trained reranker ships offline, so these tests use
a real CrossEncoder built from the offline MiniLM's BERT weights with a fresh one-label head (saved once, so
its head is fixed): they check loading, the shape and determinism of the scores, and the order, not quality."""

from __future__ import annotations

import pytest

from errors import UserError
from knowledge.rerank import Reranker, RerankModelError
from settings import Settings

QUERY = "How do I install a package on Debian?"
PASSAGES = [
    "Use apt-get install followed by the package name to install a package and its dependencies.",
    "The Debian FAQ answers common questions about the distribution.",
    "猫は日本で人気のあるペットです。",
    "A kernel module can be loaded with modprobe.",
    "",
]


@pytest.fixture(scope="module")
def cross_encoder_folder(tmp_path_factory, minilm_path) -> str:
    import torch
    from sentence_transformers import CrossEncoder

    folder = tmp_path_factory.mktemp("cross-encoder")
    torch.manual_seed(0)  # the fresh head's weights: the same in every run
    CrossEncoder(minilm_path, num_labels=1, device="cpu").save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def reranker(cross_encoder_folder) -> Reranker:
    return Reranker(Settings.from_env(rerank_model=cross_encoder_folder))


def test_rerank_gives_one_score_per_passage(reranker):
    scores = reranker.rerank(QUERY, PASSAGES)
    assert len(scores) == len(PASSAGES) and all(isinstance(s, float) for s in scores)
    assert len(set(scores)) > 1  # a head that ignored its input would score every pair alike
    assert reranker.rerank(QUERY, []) == []


def test_scores_are_deterministic_across_loads(reranker, cross_encoder_folder):
    again = Reranker(Settings.from_env(rerank_model=cross_encoder_folder))
    assert again.rerank(QUERY, PASSAGES) == pytest.approx(reranker.rerank(QUERY, PASSAGES), abs=1e-6)
    assert reranker.rerank(QUERY, PASSAGES) == reranker.rerank(QUERY, PASSAGES)


def test_a_passage_scores_the_same_alone_or_among_others(reranker):
    alone = [reranker.rerank(QUERY, [p])[0] for p in PASSAGES[:3]]
    assert reranker.rerank(QUERY, PASSAGES[:3]) == pytest.approx(alone, abs=1e-2)  # padding must not leak


def test_order_sorts_passages_by_their_scores_best_first(reranker):
    scores = reranker.rerank(QUERY, PASSAGES)
    order = reranker.order(QUERY, PASSAGES)
    assert sorted(order) == list(range(len(PASSAGES)))
    assert [scores[i] for i in order] == sorted(scores, reverse=True)
    reversed_order = reranker.order(QUERY, PASSAGES[::-1])  # the order follows the passages, not positions
    assert [PASSAGES[::-1][i] for i in reversed_order] == [PASSAGES[i] for i in order]


def test_a_missing_model_folder_names_the_setting(tmp_path):
    with pytest.raises(RerankModelError, match="RERANK_MODEL") as caught:
        Reranker(Settings.from_env(rerank_model=str(tmp_path / "no-such-model")))
    assert isinstance(caught.value, UserError) and "no such folder" in str(caught.value)


def test_an_unknown_hub_name_offline_says_what_to_set():  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(RerankModelError, match="RERANK_MODEL='nobody/no-such-reranker'.*internet"):
        Reranker(Settings.from_env(rerank_model="nobody/no-such-reranker"))


def test_reranking_is_off_by_default_and_the_reranker_refuses_to_start_without_a_model():
    assert Settings.from_env({}).rerank_model is None and Settings.from_env({"RERANK_MODEL": ""}).rerank_model is None
    with pytest.raises(RerankModelError, match="RERANK_MODEL is unset"):
        Reranker(Settings.from_env({}))


def test_rerank_candidates_must_be_positive():
    from settings import SettingsError

    with pytest.raises(SettingsError, match="RERANK_CANDIDATES"):
        Settings.from_env({"RERANK_CANDIDATES": "0"})


def test_a_hybrid_search_returns_the_fused_candidates_in_the_rerankers_order(tmp_path, minilm_path,
                                                                             cross_encoder_folder):
    from knowledge import KnowledgeStore

    for i, text in enumerate(["Use apt-get install to install a Debian package.",
                              "Debian packages are installed with dpkg or apt.",
                              "A Debian package holds files and install scripts.",
                              "The Debian FAQ lists common questions."]):
        (tmp_path / f"doc{i}.txt").write_text(text)
    plain = KnowledgeStore(Settings.from_env(knowledge_dir=tmp_path / "store", embedding_model=minilm_path))
    plain.add([tmp_path])
    fused = plain.search(QUERY, k=4)
    reranked = KnowledgeStore(Settings.from_env(knowledge_dir=tmp_path / "store", embedding_model=minilm_path,
                                                rerank_model=cross_encoder_folder, rerank_candidates=4),
                              embedder=plain.embedder)
    hits = reranked.search(QUERY, k=2)
    scores = reranked.reranker.rerank(QUERY, [h.text for h in fused])
    best = sorted(range(len(fused)), key=lambda i: (-scores[i], i))[:2]
    assert best != [0, 1], "the reranker must disagree with the fusion for this test to show anything"
    assert [h.chunk_id for h in hits] == [fused[i].chunk_id for i in best]
    assert [h.score for h in hits] == pytest.approx([scores[i] for i in best])
    assert plain.reranker is None and plain.search(QUERY, k=2, mode="lexical")  # off unless RERANK_MODEL is set
