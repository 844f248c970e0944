import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.data import prepare_pairs
from finetune.evaluation import preference
from finetune.train import train
from tests.finetune_fixtures import repeat_task_rows, tiny_config, write_jsonl


@pytest.mark.slow
def test_orpo_teaches_the_tiny_model_to_prefer_answers_that_do_not_repeat_the_reasoning(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    held_out = prepare_pairs([(None, r) for r in repeat_task_rows(40, seed=2)], tokenizer).pairs
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before, _ = preference(base, tokenizer, held_out)

    data = write_jsonl(tmp_path / "train.jsonl", repeat_task_rows(64, seed=1))
    config = tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=30, learning_rate=3e-3, lora_r=16,
                         lora_alpha=32, per_device_train_batch_size=8, save_steps=1000, logging_steps=10)
    trained = PeftModel.from_pretrained(base, train(config).output_dir)
    after, _ = preference(trained, tokenizer, held_out)
    assert before <= 0.6
    assert after >= 0.9
