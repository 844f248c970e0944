"""The pairs store: votes, picks and edits become pairs; exports are TRL data; crashes lose nothing stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from finetune.adapters import ADAPTER_CONFIG, read_training_info
from finetune.data import prepare_data
from finetune.pairs_store import (
    Completion,
    PairsStore,
    PairsStoreError,
    export_rows,
    source_names,
    write_export,
)
from finetune.prompts import THINK_OPEN, alpaca_prompt

ROOT = Path(__file__).resolve().parents[1]


def completion(answer: str, question: str = "How fast is the pump?", model: str | None = "tiny") -> Completion:
    passages = '<passage number="1" source="/docs/pump.txt">\nThe pump moves 40 litres.\n</passage>'
    return Completion(prompt=alpaca_prompt(question, passages) + THINK_OPEN, reasoning="I read [1].",
                      answer=answer, instruction=question, input=passages, model=model, adapter="orpo-1")


@pytest.fixture
def pairs(tmp_path) -> PairsStore:
    return PairsStore(tmp_path / "pairs.sqlite")


def test_a_down_vote_waits_until_a_better_answer_to_the_same_prompt_arrives(pairs):
    bad = pairs.add_answer(completion("I read [1]. The pump moves 40 litres."), user="ann")
    assert pairs.vote(bad, good=False, user="ann").made == () and pairs.unpaired_down_votes() == 1
    other_prompt = pairs.add_answer(completion("Yes.", question="Another question?"))
    assert pairs.vote(other_prompt, good=True).made == ()  # another prompt: no pair
    good = pairs.add_answer(completion("40 litres a minute [1]."))
    [made] = pairs.vote(good, good=True, user="ann").made
    [pair] = pairs.pairs()
    assert pair.id == made and pair.origin == "vote" and pair.user == "ann"
    assert (pair.chosen.answer, pair.rejected.answer) == ("40 litres a minute [1].", "I read [1]. The pump moves 40 litres.")
    assert pair.chosen.adapter == "orpo-1" and pairs.unpaired_down_votes() == 0


def test_a_pick_or_an_edit_is_a_pair_and_a_person_wrote_the_edit(pairs):
    first, second = pairs.add_answer(completion("A [1].")), pairs.add_answer(completion("B [1]."))
    pairs.add_pair(second, first, "pick", user="bob")
    edited = pairs.add_answer(completion("C, written by hand [1].", model=None))
    pairs.add_pair(edited, second, "edit", user="bob")
    newest, oldest = pairs.pairs()
    assert (newest.origin, newest.chosen.model, newest.chosen.answer) == ("edit", None, "C, written by hand [1].")
    assert (oldest.origin, oldest.chosen.answer, oldest.rejected.answer) == ("pick", "B [1].", "A [1].")
    assert pairs.count() == 2


def test_answers_to_different_prompts_cannot_pair(pairs):
    one = pairs.add_answer(completion("A."))
    two = pairs.add_answer(completion("B.", question="Something else?"))
    with pytest.raises(PairsStoreError, match="different prompts"):
        pairs.add_pair(one, two, "pick")
    assert pairs.count() == 0


def test_a_pair_is_stored_once_and_the_opposite_choice_replaces_it(pairs):
    first, second = pairs.add_answer(completion("A [1].")), pairs.add_answer(completion("B [1]."))
    made = pairs.add_pair(second, first, "pick")
    assert pairs.add_pair(second, first, "pick").made == ()  # the same choice again stores nothing
    flipped = pairs.add_pair(first, second, "pick")
    [pair] = pairs.pairs()
    assert (pair.chosen.answer, pair.rejected.answer) == ("A [1].", "B [1].")
    assert [r.id for r in flipped.replaced_pairs] == [made.pair]


def test_a_pick_after_an_up_vote_on_the_same_two_answers_replaces_the_votes_pair(pairs):
    earlier, new = pairs.add_answer(completion("A [1].")), pairs.add_answer(completion("B [1]."))
    pairs.vote(earlier, good=False)
    assert len(pairs.vote(new, good=True).made) == 1
    pick = pairs.add_pair(earlier, new, "pick")  # "the earlier answer was better" after all
    [pair] = pairs.pairs()
    assert (pair.origin, pair.chosen.answer) == ("pick", "A [1].") and len(pick.replaced_pairs) == 1


def test_a_changed_vote_replaces_the_earlier_one_and_its_pairs(pairs):
    bad, other = pairs.add_answer(completion("A [1].")), pairs.add_answer(completion("B [1]."))
    pairs.vote(bad, good=False, user="ann")
    pairs.vote(other, good=True, user="ann")
    assert [(p.chosen.answer, p.rejected.answer) for p in pairs.pairs()] == [("B [1].", "A [1].")]
    changed = pairs.vote(other, good=False, user="ann")  # ann changes her mind about B
    assert pairs.pairs() == [] and len(changed.replaced_pairs) == 1 and len(changed.replaced_votes) == 1
    assert pairs.unpaired_down_votes() == 2


def test_undo_takes_back_a_write_and_puts_back_what_it_replaced(pairs):
    first, second = pairs.add_answer(completion("A [1].")), pairs.add_answer(completion("B [1]."))
    pairs.vote(first, good=False)
    voted = pairs.vote(second, good=True)
    before = pairs.pairs()
    flipped = pairs.add_pair(first, second, "pick")
    pairs.undo(flipped)
    assert pairs.pairs() == before  # the vote's pair is back, with its id and time
    pairs.undo(voted)
    assert pairs.pairs() == [] and pairs.unpaired_down_votes() == 1
    changed = pairs.vote(first, good=True)  # the down vote replaced ...
    pairs.undo(changed)  # ... and put back
    assert pairs.unpaired_down_votes() == 1


def test_deleting_a_bad_pair_keeps_the_rest(pairs):
    answers = [pairs.add_answer(completion(f"Answer {i}.")) for i in range(3)]
    keep, drop = pairs.add_pair(answers[0], answers[1], "pick").pair, pairs.add_pair(answers[2], answers[1], "pick").pair
    pairs.delete_pair(drop)
    assert [p.id for p in pairs.pairs()] == [keep]
    with pytest.raises(PairsStoreError, match="no pair"):
        pairs.delete_pair(drop)


def test_exports_are_trl_preference_rows_and_the_recipes_columns(pairs, tmp_path, tiny_tokenizer):
    bad, good = pairs.add_answer(completion("I read [1].")), pairs.add_answer(completion("40 litres [1]."))
    pairs.add_pair(good, bad, "pick")
    [trl] = export_rows(pairs, "trl")
    assert trl["prompt"].endswith("### Response:\n<think>")
    # Sources by file name: a shared export does not show the server's folders, unless asked to.
    assert 'source="pump.txt"' in trl["prompt"] and "/docs/" not in trl["prompt"]
    assert 'source="/docs/pump.txt"' in export_rows(pairs, "trl", source_paths=True)[0]["prompt"]
    assert trl["chosen"] == "I read [1].</think>40 litres [1]." and trl["rejected"] == "I read [1].</think>I read [1]."
    [recipe] = export_rows(pairs, "recipe")
    assert recipe == {"instruction": "How fast is the pump?", "input": source_names(completion("").input),
                      "reasoning(CHOSEN)": "I read [1].", "output(CHOSEN)": "40 litres [1].",
                      "reasoning(REJECTED)": "I read [1].", "output(REJECTED)": "I read [1]."}
    # Both exports, and the store itself, read back as the same training pair.
    for layout in ("trl", "recipe"):
        assert write_export(pairs, layout, tmp_path / f"{layout}.jsonl") == 1
    prepared = [prepare_data(source, tiny_tokenizer) for source in
                (tmp_path / "trl.jsonl", tmp_path / "recipe.jsonl", pairs.path)]
    assert [p.format for p in prepared] == ["trl", "seed", "trl"]
    assert len(prepared[0].pairs) == 1 and prepared[0].pairs[0] == replace(
        prepared[2].pairs[0], prompt=source_names(prepared[2].pairs[0].prompt))
    # The recipe's columns put <think> in the completion, the app's prompt ends with it: the same text.
    (trl_pair,), (seed_pair,) = prepared[0].pairs, prepared[1].pairs
    assert trl_pair.prompt + trl_pair.chosen == seed_pair.prompt + seed_pair.chosen
    assert trl_pair.prompt + trl_pair.rejected == seed_pair.prompt + seed_pair.rejected


def test_a_missing_store_is_a_clear_error(tmp_path, tiny_tokenizer):
    from errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path / "nothing.sqlite", tiny_tokenizer)


def test_a_file_that_is_not_a_store_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database at all " * 100)
    with pytest.raises(PairsStoreError, match="notes.sqlite is not a pairs store"):
        PairsStore(path)


WRITER = """
import sys
from finetune.pairs_store import Completion, PairsStore
from finetune.prompts import alpaca_prompt
store = PairsStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    prompt = alpaca_prompt(f"question {sys.argv[3]} {i}", "context " * 200) + "<think>"
    bad = store.add_answer(Completion(prompt, "r" * 500, "bad " * 100, model="m"))
    good = store.add_answer(Completion(prompt, "r" * 500, "good " * 100, model="m"))
    pair = store.add_pair(good, bad, "pick").pair
    print(pair, flush=True)
"""


def _writer(path: Path, count: int, tag: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(count), tag], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_kill_9_mid_write_loses_no_pair_already_stored(tmp_path):
    path = tmp_path / "pairs.sqlite"
    for _ in range(3):
        writer = _writer(path, 100_000, "kill")
        acknowledged = [writer.stdout.readline() for _ in range(20)]  # 20 pairs committed and reported
        time.sleep(0.05)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        store = PairsStore(path)
        stored = store.pairs()
        ids = {p.id for p in stored}
        assert {int(a) for a in acknowledged} <= ids  # every acknowledged pair is there
        assert all(p.chosen.answer == "good " * 100 and p.rejected.answer == "bad " * 100 for p in stored)
    assert store.count() >= 60


def test_two_processes_write_at_once_and_every_pair_is_kept(tmp_path):
    path = tmp_path / "pairs.sqlite"
    PairsStore(path)
    writers = [_writer(path, 40, tag) for tag in ("a", "b")]
    outputs = [w.communicate(timeout=120)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    assert PairsStore(path).count() == 80 == sum(len(o.split()) for o in outputs)


def test_the_cli_exports_and_counts(pairs, tmp_path):
    bad, good = pairs.add_answer(completion("I read [1].")), pairs.add_answer(completion("40 litres [1]."))
    pairs.add_pair(good, bad, "pick")
    out = tmp_path / "export.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "finetune", "pairs", "export", "--store", str(pairs.path),
                          "--layout", "recipe", "--out", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["output(CHOSEN)"] == "40 litres [1]."
    listing = subprocess.run([sys.executable, "-m", "finetune", "pairs", "list", "--store", str(pairs.path), "--json"],
                             env=env, capture_output=True, text=True, check=True)
    [row] = json.loads(listing.stdout)
    assert row["origin"] == "pick" and row["chosen"]["answer"] == "40 litres [1]."


def test_the_cli_reads_the_store_pairs_db_names(pairs, tmp_path):
    # In the container PAIRS_DB is in the data volume; `pairs list` there must find it without --store.
    bad, good = pairs.add_answer(completion("I read [1].")), pairs.add_answer(completion("40 litres [1]."))
    pairs.add_pair(good, bad, "edit")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAIRS_DB": str(pairs.path)}
    listing = subprocess.run([sys.executable, "-m", "finetune", "pairs", "list", "--json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=True)
    assert [row["origin"] for row in json.loads(listing.stdout)] == ["edit"]


def test_training_reads_the_store_directly(pairs, tmp_path, tiny_model_dir):
    from finetune.train import train
    from tests.finetune_fixtures import tiny_config

    for i in range(2):
        bad = pairs.add_answer(completion("I read [1].", question=f"Question {i}?"))
        good = pairs.add_answer(completion("40 litres [1].", question=f"Question {i}?"))
        pairs.add_pair(good, bad, "pick")
    result = train(tiny_config(tiny_model_dir, pairs.path, tmp_path / "adapter", max_steps=1, save_steps=1000))
    assert result.global_step == 1 and (tmp_path / "adapter" / ADAPTER_CONFIG).exists()
    assert read_training_info(tmp_path / "adapter").prompt_format == "alpaca"


def test_pairs_prompted_with_the_chat_template_train_a_chat_format_adapter(pairs, tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True)
    answers = [pairs.add_answer(Completion(prompt, "r", text, prompt_format="chat")) for text in ("a", "b")]
    pairs.add_pair(answers[1], answers[0], "pick")
    assert prepare_data(pairs.path, tiny_tokenizer).prompt_format == "chat"
