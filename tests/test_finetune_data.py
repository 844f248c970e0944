import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from errors import DataError
from finetune.__main__ import main
from finetune.data import PreferencePair, load_rows, prepare_data, prepare_pairs
from tests.finetune_fixtures import seed_row, write_jsonl


def _prepare(rows, tokenizer, **kwargs):
    return prepare_pairs([(None, r) for r in rows], tokenizer, **kwargs)


def test_seed_row_becomes_the_recipes_prompt_and_completions_exactly(tiny_tokenizer):
    row = {"instruction": "What is 2+3?", "input": "Add them.", "output(CHOSEN)": "5",
           "reasoning(CHOSEN)": "2 and 3 make 5", "output(REJECTED)": "6", "reasoning(REJECTED)": "guess",
           "question": "dropped", "syslang": "en", "__index_level_0__": 7}
    prepared = _prepare([row], tiny_tokenizer)
    eos = "<｜end▁of▁sentence｜>"
    assert prepared.pairs == [PreferencePair(
        prompt="Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
               "What is 2+3?\n\n### Input:\nAdd them.\n\n### Response:\n",
        chosen="<think>2 and 3 make 5</think>5" + eos,
        rejected="<think>guess</think>6" + eos)]
    assert prepared.format == "seed" and prepared.prompt_format == "alpaca"


@pytest.mark.parametrize(("change", "reason"), [
    ({"output(CHOSEN)": None}, "'output(CHOSEN)' is null"),
    ({"reasoning(REJECTED)": "  "}, "'reasoning(REJECTED)' is empty"),
    ({"instruction": 42}, "'instruction' is int, expected text"),
    ({"output(REJECTED)": "1", "reasoning(REJECTED)": "0 and one make 1"}, "chosen equals rejected"),
])
def test_bad_seed_row_is_named_with_its_reason_and_good_rows_go_on(tiny_tokenizer, change, reason):
    prepared = _prepare([seed_row(0, **change), seed_row(1)], tiny_tokenizer)
    assert prepared.report()["rejected"] == [{"row": 0, "reason": reason}]
    assert len(prepared.pairs) == 1


def test_row_missing_a_column_is_rejected(tiny_tokenizer):
    row = seed_row(0)
    del row["reasoning(CHOSEN)"]
    prepared = _prepare([row, seed_row(1)], tiny_tokenizer)
    assert prepared.report()["rejected"] == [{"row": 0, "reason": "missing column 'reasoning(CHOSEN)'"}]


def test_duplicate_row_is_rejected_naming_the_first(tiny_tokenizer):
    prepared = _prepare([seed_row(0), seed_row(1), seed_row(0)], tiny_tokenizer)
    assert prepared.report()["rejected"] == [{"row": 2, "reason": "duplicate of row 0"}]


def test_empty_input_is_allowed(tiny_tokenizer):
    assert len(_prepare([seed_row(0, input="")], tiny_tokenizer).pairs) == 1


def test_overlong_pair_is_truncated_to_the_context_and_counted(tiny_tokenizer):
    long = seed_row(0, instruction="word " * 300, **{"reasoning(CHOSEN)": "step " * 300})
    prepared = _prepare([long, seed_row(1)], tiny_tokenizer, max_length=128, max_prompt_length=64)
    assert prepared.truncated == 1 and len(prepared.pairs) == 2
    pair = prepared.pairs[0]
    prompt_tokens = len(tiny_tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert prompt_tokens <= 64
    assert pair.prompt.endswith("### Response:\n")  # the prompt keeps its end
    for completion in (pair.chosen, pair.rejected):
        assert prompt_tokens + len(tiny_tokenizer(completion, add_special_tokens=False)["input_ids"]) <= 128
    assert pair.chosen.startswith("<think>step step")


def test_overlong_pair_is_dropped_when_configured(tiny_tokenizer):
    long = seed_row(0, instruction="word " * 300)
    prepared = _prepare([long, seed_row(1)], tiny_tokenizer, max_length=128, max_prompt_length=64,
                        on_overlength="drop")
    assert len(prepared.pairs) == 1
    assert "exceed max_length 128" in prepared.rejected[0].reason


def test_trl_standard_rows_get_eos(tiny_tokenizer):
    prepared = _prepare([{"prompt": "Q?", "chosen": "<think>r</think>yes", "rejected": "no"}], tiny_tokenizer)
    assert prepared.format == "trl"
    assert prepared.pairs[0].chosen == "<think>r</think>yes" + tiny_tokenizer.eos_token


def test_trl_conversational_rows_use_the_chat_template_and_keep_reasoning(tiny_tokenizer):
    row = {"prompt": [{"role": "user", "content": "Capital of Japan?"}],
           "chosen": [{"role": "assistant", "content": "<think>it is Tokyo</think>Tokyo"}],
           "rejected": [{"role": "assistant", "content": "<think>guess</think>Paris"}]}
    prepared = _prepare([row], tiny_tokenizer)
    pair = prepared.pairs[0]
    assert pair.prompt == tiny_tokenizer.bos_token + "<｜User｜>Capital of Japan?<｜Assistant｜><think>\n"
    # the template opened the think block, so the completion continues inside it
    assert pair.chosen == "it is Tokyo</think>Tokyo" + tiny_tokenizer.eos_token
    assert prepared.prompt_format == "chat"


def test_trl_conversational_row_with_a_string_prompt_is_rejected(tiny_tokenizer):
    row = {"prompt": "plain", "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    assert "expected a list of {role, content} messages" in _prepare([row], tiny_tokenizer).rejected[0].reason


def test_chat_app_pairs_use_the_alpaca_prompt_and_drop_metadata(tiny_tokenizer):
    row = {"instruction": "Q?", "input": "passage", "chosen": "<think>r</think>A", "rejected": "<think>r</think>B",
           "adapter": "v1", "created_at": "2026-01-01"}
    prepared = _prepare([row], tiny_tokenizer)
    assert prepared.format == "chat"
    assert prepared.pairs[0].prompt.endswith("### Instruction:\nQ?\n\n### Input:\npassage\n\n### Response:\n")


def test_column_mapping_renames_other_names(tiny_tokenizer):
    row = {"question": "Q?", "good": "yes", "bad": "no"}
    prepared = _prepare([row], tiny_tokenizer, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert prepared.pairs[0].prompt == "Q?"


def test_unknown_columns_say_which_formats_exist(tiny_tokenizer):
    with pytest.raises(DataError, match="match no known format"):
        _prepare([{"q": "a", "a": "b"}], tiny_tokenizer)


def test_folder_of_jsonl_csv_and_parquet_is_read_in_name_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [seed_row(0)])
    with (tmp_path / "b.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(seed_row(1)))
        writer.writeheader()
        writer.writerow(seed_row(1))
    pq.write_table(pa.Table.from_pylist([seed_row(2)]), tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps([seed_row(3)]))
    rows = load_rows(tmp_path)
    assert [f for f, _ in rows] == ["a.jsonl", "b.csv", "c.parquet", "d.json"]
    assert [r["instruction"] for _, r in rows] == [f"What is {i} plus one?" for i in range(4)]


def test_bad_row_in_a_folder_names_its_file(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [seed_row(0)])
    write_jsonl(tmp_path / "b.jsonl", [seed_row(1, input=None)])
    assert prepare_data(tmp_path, tiny_tokenizer).report()["rejected"] == [
        {"row": 1, "reason": "'input' is null", "file": "b.jsonl"}]


def test_unloadable_source_says_what_was_tried(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local file or folder"):
        prepare_data(str(tmp_path / "nothing-here"), tiny_tokenizer)


def test_prepare_cli_writes_pairs_and_prints_a_json_report(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "seed.jsonl", [seed_row(0), seed_row(1, **{"output(CHOSEN)": ""})])
    out = tmp_path / "pairs.jsonl"
    assert main(["prepare", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == 1
    assert report["rejected"] == [{"row": 1, "reason": "'output(CHOSEN)' is empty"}]
    assert set(json.loads(out.read_text().splitlines()[0])) == {"prompt", "chosen", "rejected"}


def test_prepare_cli_reports_an_unreadable_file_plainly(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["prepare", str(bad), "--model", str(tiny_model_dir)]) == 2
    assert "bad.jsonl line 1 is not valid JSON" in capsys.readouterr().err


def test_a_jsonl_line_that_is_not_json_is_a_rejected_row_and_the_rest_go_on(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [seed_row(0), seed_row(1)])
    first, second = path.read_text().splitlines()
    path.write_text("\n".join([first, '{"instruction": "cut off', "", second]) + "\n")
    prepared = prepare_data(path, tiny_tokenizer)
    assert len(prepared.pairs) == 2
    assert prepared.report()["rejected"] == [
        {"row": 1, "reason": "pairs.jsonl line 2 is not valid JSON (Unterminated string starting at); fix or remove it"}]


def test_a_jsonl_line_that_is_not_utf8_is_a_rejected_row_naming_its_file(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [seed_row(0)])
    path = write_jsonl(tmp_path / "b.jsonl", [seed_row(1)])
    path.write_bytes(b'{"instruction": "caf\xe9"}\n' + path.read_bytes())
    prepared = prepare_data(tmp_path, tiny_tokenizer)
    assert len(prepared.pairs) == 2
    assert prepared.report()["rejected"] == [
        {"row": 1, "reason": "b.jsonl line 1 is not valid UTF-8 (invalid continuation byte); fix or remove it",
         "file": "b.jsonl"}]
