"""The ORPO proof (docs/orpo-proof.md), shortened: a small model given the recipe's defect, pairs made by
`pairs generate` with the duplication rule, ORPO, then `eval` on held-out questions."""

import json

import pytest

from benchmarks import orpo_proof


@pytest.mark.slow
def test_orpo_on_generated_pairs_halves_the_repeated_reasoning_and_keeps_the_reasoning(tmp_path):
    # A base this small answers few questions right, so the pairs are ranked by repetition alone.
    orpo_proof.main(["--out", str(tmp_path), "--hidden", "96", "--layers", "2", "--base-steps", "1000",
                     "--questions", "160", "--held-out", "48", "--rules", "duplication", "--rounds", "1",
                     "--orpo-steps", "100", "--orpo-lr", "2e-3", "--short-share", "0.25"])
    result = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    base, trained = result["base"], result["orpo"]

    assert base["duplication_rate"] > 0.5  # the defect: the base repeats its reasoning as its answer
    assert trained["duplication_rate"] <= base["duplication_rate"] / 2
    assert base["think_rate"] == 1.0
    # The reasoning is still there and closed, within the noise of a short run: before `pairs generate` was seeded,
    # one run in four left 2 of 48 answers open (0.958); the full proof holds the strict bar.
    assert trained["think_rate"] >= 0.9
