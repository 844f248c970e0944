import pytest

from finetune.config import ConfigError, TrainConfig, load_config


def test_recipe_file_reproduces_the_seed_recipe():
    config = load_config("finetune/configs/recipe-r1-qwen14b.yaml")
    assert (config.model_name, config.load_in_4bit, config.max_length, config.max_prompt_length) == (
        "unsloth/DeepSeek-R1-Distill-Qwen-14B", True, 4096, 2048)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.gradient_checkpointing, config.seed) == (
        16, 16, 0.0, "unsloth", 3407)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (config.beta, config.per_device_train_batch_size, config.gradient_accumulation_steps, config.optim,
            config.lr_scheduler_type, config.precision) == (0.1, 2, 4, "adamw_8bit", "linear", "auto")


def test_recipe_file_agrees_with_the_dataclass_defaults():
    recipe = load_config("finetune/configs/recipe-r1-qwen14b.yaml").to_dict()
    defaults = TrainConfig().to_dict()
    differing = {k for k in defaults if recipe[k] != defaults[k]}
    assert differing == {"data", "output_dir"}


def test_command_line_overrides_are_typed():
    config = load_config("finetune/configs/tiny-smoke.yaml", ["max_steps=3", "learning_rate=1e-4",
                                                             "target_modules=[q_proj, v_proj]"])
    assert (config.max_steps, config.learning_rate, config.target_modules) == (3, 1e-4, ["q_proj", "v_proj"])


def test_unknown_key_suggests_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(None, ["learning_rat=1e-4"])


def test_wrongly_typed_value_is_refused():
    with pytest.raises(ConfigError, match="max_steps must be int"):
        load_config(None, ["max_steps=many"])


def test_invalid_backend_is_refused():
    with pytest.raises(ConfigError, match="backend must be one of"):
        TrainConfig(backend="tpu")
