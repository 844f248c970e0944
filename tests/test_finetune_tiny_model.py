from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_loads_through_auto_classes_and_is_small(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert sum(f.stat().st_size for f in tiny_model_dir.iterdir()) < 5 * 2**20


def test_tiny_tokenizer_keeps_think_tags_as_single_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "<think>two and three</think>5" + tokenizer.eos_token
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<think>")
    assert tokenizer.convert_tokens_to_ids("</think>") in ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_chat_template_opens_a_think_block(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == tokenizer.bos_token + "<｜User｜>hi<｜Assistant｜><think>\n"


def test_tiny_tokenizer_round_trips_japanese(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "東京は日本の首都です。"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
