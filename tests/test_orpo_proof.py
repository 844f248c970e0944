"""The ORPO proof (docs/orpo-proof.md), shortened, both ways: pairs made by `pairs generate`, and pairs given
by a scripted user through the running app's feedback and trained from its Train tab; then `eval` on held-out
questions. One small base model (the recipe's defect given on purpose) serves both."""

import json
import shutil

import pytest

from benchmarks import orpo_front_door, orpo_proof

# A base this small answers few questions right, so pairs are ranked, and answers judged, by repetition alone.
BASE = ["--hidden", "96", "--layers", "2", "--base-steps", "1000", "--held-out", "48", "--short-share", "0.25"]


@pytest.fixture(scope="module")
def proof_base(tmp_path_factory):
    """The small base model with the defect, trained once for both proofs."""
    from benchmarks.orpo_proof import task_items, train_base

    out = tmp_path_factory.mktemp("orpo-base")
    train_base(out, task_items(0), steps=1000, seed=0, hidden=96, layers=2, short_share=0.25)
    return out / "base-model"


def result_of(out) -> tuple[dict, dict]:
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    return result["base"], result["orpo"]


@pytest.mark.slow
def test_orpo_on_generated_pairs_halves_the_repeated_reasoning_and_keeps_the_reasoning(tmp_path, proof_base):
    shutil.copytree(proof_base, tmp_path / "base-model")
    orpo_proof.main(["--out", str(tmp_path), *BASE, "--reuse-base", "--questions", "160", "--rules", "duplication",
                     "--rounds", "1", "--orpo-steps", "100", "--orpo-lr", "2e-3"])
    base, trained = result_of(tmp_path)
    assert base["duplication_rate"] > 0.5  # the defect: the base repeats its reasoning as its answer
    assert trained["duplication_rate"] <= base["duplication_rate"] / 2
    assert base["think_rate"] == 1.0
    # The reasoning is still there and closed, within the noise of a short run: before `pairs generate` was seeded,
    # one run in four left 2 of 48 answers open (0.958); the full proof holds the strict bar.
    assert trained["think_rate"] >= 0.9


@pytest.mark.slow
def test_orpo_on_the_pairs_a_user_gave_through_the_app_halves_the_repeated_reasoning(tmp_path, proof_base):
    shutil.copytree(proof_base, tmp_path / "base-model")
    orpo_front_door.main(["--out", str(tmp_path), *BASE, "--reuse-base", "--questions", "60",
                          "--judge", "repetition", "--write-every", "2", "--orpo-steps", "60", "--orpo-lr", "2e-3",
                          "--port", "0"])
    result = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    base, trained = result_of(tmp_path)
    assert set(result["pairs"]) <= {"vote", "pick", "edit"} and sum(result["pairs"].values()) >= 10
    assert base["duplication_rate"] > 0.5
    assert trained["duplication_rate"] <= base["duplication_rate"] / 2
    assert trained["think_rate"] >= 0.9
