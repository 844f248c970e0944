import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from errors import TrainingError
from finetune.__main__ import main
from finetune.adapters import read_training_info
from finetune.evaluation import completion_logprob
from finetune.output_dir import latest_checkpoint
from finetune.prompts import prompt_token_ids
from finetune.train import train
from finetune.training_log import LOGGED_KEYS, read_log
from tests.finetune_fixtures import repeat_task_rows, seed_row, tiny_config, write_jsonl


class RecordTrainingRows(TrainerCallback):
    """Keeps the rows as TRL's trainer tokenized them, to compare with what generation feeds the model."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.rows = list(train_dataloader.dataset)


@pytest.fixture(scope="module")
def training_rows():
    return RecordTrainingRows()


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory, training_rows):
    tmp = tmp_path_factory.mktemp("trained")
    data = write_jsonl(tmp / "seed.jsonl", [seed_row(i) for i in range(8)])
    config = tiny_config(tiny_model_dir, data, tmp / "out", max_steps=4, learning_rate=1e-2)
    return train(config, callbacks=[training_rows]), config


def test_prompt_token_ids_are_the_ids_the_trainer_trained_on(trained_run, training_rows, tiny_tokenizer):
    assert len(training_rows.rows) == 8
    for row in training_rows.rows:
        assert prompt_token_ids(tiny_tokenizer, row["prompt"]) == row["prompt_input_ids"]
        assert row["prompt_input_ids"].count(tiny_tokenizer.bos_token_id) == 1


def test_trained_adapter_loads_back_with_peft_and_changes_the_output(trained_run, tiny_model_dir):
    result, _ = trained_run
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, result.output_dir)(input_ids=ids).logits
    assert (before - after).abs().max() > 1e-3


def test_output_dir_holds_tokenizer_config_and_prompt_format(trained_run):
    result, config = trained_run
    out = result.output_dir
    assert AutoTokenizer.from_pretrained(out).eos_token == "<｜end▁of▁sentence｜>"
    assert "max_length: 256" in (out / "train_config.yaml").read_text()
    info = read_training_info(out)
    assert info.prompt_format == "alpaca" and info.global_step == 4 and info.data_report["ok"] == 8


def test_training_log_has_one_line_per_step_with_every_metric_and_a_plot(trained_run):
    result, _ = trained_run
    records = read_log(result.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(LOGGED_KEYS) <= set(records[0])
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 for r in records)
    assert (result.output_dir / "training_log.png").stat().st_size > 1000


def test_logged_loss_is_chosen_nll_plus_beta_times_odds_ratio_loss(tiny_model_dir, tmp_path):
    rows = [seed_row(0), seed_row(1)]
    config = tiny_config(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "out", max_steps=1,
                         beta=0.5)
    first = read_log(train(config).output_dir)[0]

    # Independently, from full logits of the untouched base model (LoRA starts as the identity).
    from finetune.data import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = prepare_data(tmp_path / "d.jsonl", tokenizer).pairs
    nll_sum, nll_tokens, or_losses = 0.0, 0, []
    for pair in pairs:
        ids = [tokenizer.bos_token_id] + tokenizer(pair.prompt + pair.chosen, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll_sum += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        nll_tokens += len(ids) - 1
        chosen = completion_logprob(model, tokenizer, pair.prompt, pair.chosen)
        rejected = completion_logprob(model, tokenizer, pair.prompt, pair.rejected)
        log_odds = (chosen - rejected) - (math.log1p(-math.exp(chosen)) - math.log1p(-math.exp(rejected)))
        or_losses.append(-math.log(1 / (1 + math.exp(-log_odds))))
    nll = nll_sum / nll_tokens
    or_loss = sum(or_losses) / len(or_losses)
    assert first["nll_loss"] == pytest.approx(nll, rel=1e-4)
    assert first["or_loss"] == pytest.approx(or_loss, rel=1e-4)
    assert first["loss"] == pytest.approx(nll + 0.5 * or_loss, rel=1e-4)


class _PoisonAfterSave(TrainerCallback):
    """Makes the LoRA weights NaN right after the checkpoint of `step` is written."""

    def __init__(self, model_holder: list, step: int):
        self.step = step

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_A" in name:
                        p.fill_(float("nan"))


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [seed_row(i) for i in range(8)])
    config = tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=6, save_steps=2)
    with pytest.raises(TrainingError, match="loss became nan at optimizer step 3"):
        train(config, callbacks=[_PoisonAfterSave([], step=2)])
    assert latest_checkpoint(tmp_path / "out").name == "checkpoint-2"
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


class _Killed(Exception):
    pass


class _KillAtLog(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and logs and "loss" in logs:
            raise _Killed


def test_killed_run_resumes_to_the_same_step_count_and_loss_curve(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [seed_row(i) for i in range(8)])
    whole = train(tiny_config(tiny_model_dir, data, tmp_path / "whole", max_steps=6, save_steps=2))
    config = tiny_config(tiny_model_dir, data, tmp_path / "killed", max_steps=6, save_steps=2)
    with pytest.raises(_Killed):
        train(config, callbacks=[_KillAtLog(step=5)])  # after checkpoint-4, before checkpoint-6
    resumed = train(config, resume=True)
    assert resumed.global_step == whole.global_step == 6
    expected = [r["loss"] for r in read_log(whole.output_dir)]
    got = [r["loss"] for r in read_log(resumed.output_dir)]
    assert [r["step"] for r in read_log(resumed.output_dir)] == [1, 2, 3, 4, 5, 6]
    assert got == pytest.approx(expected, rel=1e-5)


def test_resume_without_a_checkpoint_says_so(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [seed_row(0)])
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "out"), resume=True)


class _OutOfMemory(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.28 GiB")


def test_out_of_memory_names_the_knobs_to_turn(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [seed_row(0), seed_row(1)])
    with pytest.raises(TrainingError, match="per_device_train_batch_size.*max_length.*gradient_checkpointing"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "out"), callbacks=[_OutOfMemory()])


def test_train_cli_runs_the_smoke_config_with_overrides(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_task_rows(6, seed=1))
    code = main(["train", "--config", "finetune/configs/tiny-smoke.yaml", f"model_name={tiny_model_dir}",
                 f"data={data}", f"output_dir={tmp_path / 'out'}", "max_steps=2"])
    assert code == 0
    assert "after 2 steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_train_cli_reports_data_without_usable_pairs_plainly(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [seed_row(0, **{"output(CHOSEN)": None})])
    code = main(["train", "--config", "finetune/configs/tiny-smoke.yaml", f"model_name={tiny_model_dir}",
                 f"data={data}", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert "no usable pairs" in capsys.readouterr().err


def test_stock_trl_trainer_logs_a_nan_loss_as_exactly_zero(tiny_model_dir, tmp_path):
    """The finding behind the 0.0 loss seen on the H100 (docs/finetune.md): a NaN loss, here from completions
    truncated to nothing, is replaced in the log by the running mean of earlier losses, which starts at 0."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pairs = Dataset.from_list([{"prompt": "word " * 40, "chosen": "yes", "rejected": "no"}] * 4)
    args = ORPOConfig(output_dir=str(tmp_path), max_length=16, per_device_train_batch_size=2, max_steps=2,
                      logging_steps=1, bf16=False, gradient_checkpointing=False, learning_rate=1e-3,
                      remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no")
    trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in logs] == [0.0, 0.0]
    assert math.isnan(logs[0]["nll_loss"]) or math.isnan(logs[0]["log_odds_ratio"])


class _RecordLayerDtype(TrainerCallback):
    def __init__(self):
        self.dtypes = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = model.get_base_model().get_decoder().layers[0].mlp
        layer.register_forward_hook(lambda module, inputs, output: self.dtypes.append(output.dtype))


def test_lean_logprob_path_runs_the_decoder_under_the_trainers_mixed_precision(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [seed_row(0), seed_row(1)])
    recorder = _RecordLayerDtype()
    train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=1, precision="bf16"),
          callbacks=[recorder])
    assert recorder.dtypes and set(recorder.dtypes) == {torch.bfloat16}


def test_merged_16bit_model_answers_like_base_plus_adapter(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", repeat_task_rows(8, seed=3))
    result = train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=3, learning_rate=1e-2,
                               merge_16bit=True))
    merged_dir = result.output_dir / "merged-16bit"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(merged_dir).eos_token == "<｜end▁of▁sentence｜>"
    assert "float16" in (merged_dir / "config.json").read_text()  # saved in 16 bits
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.output_dir)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
        expected, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # 16-bit rounding of the merged weights
    assert (expected - base).abs().max() > 0.05  # and the adapter did change the model


def test_a_next_round_starts_from_the_adapter_it_names(trained_run, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    first, _ = trained_run
    data = write_jsonl(tmp_path / "round-2.jsonl", [seed_row(i) for i in range(8, 12)])
    weights = {}
    for name, init in (("continued", str(first.output_dir)), ("fresh", "")):
        # One step at learning rate 0: the weights are what training started from.
        out = train(tiny_config(tiny_model_dir, data, tmp_path / name, max_steps=1, learning_rate=0.0,
                                init_adapter=init)).output_dir
        weights[name] = load_file(out / "adapter_model.safetensors")
    before = load_file(first.output_dir / "adapter_model.safetensors")
    assert set(weights["continued"]) == set(before)
    assert all(torch.equal(weights["continued"][k], before[k]) for k in before)
    assert not all(torch.equal(weights["fresh"][k], before[k]) for k in before)


def test_a_next_round_with_another_rank_says_what_to_set(trained_run, tiny_model_dir, tmp_path):
    first, _ = trained_run
    data = write_jsonl(tmp_path / "round-2.jsonl", [seed_row(i) for i in range(4)])
    with pytest.raises(TrainingError, match="lora_r, lora_alpha and target_modules"):
        train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=1, lora_r=4,
                          init_adapter=str(first.output_dir)))
