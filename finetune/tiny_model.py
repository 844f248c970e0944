"""A tiny random-weight Qwen2 causal LM with a real, locally trained tokenizer, for tests and smoke runs.

It is saved in the standard layout (config.json, model.safetensors, tokenizer.json, ...), so every code path
that takes a model name also takes its folder. Its special tokens and chat template follow
DeepSeek-R1-Distill-Qwen's, so the chat-template path is exercised too.
"""

from __future__ import annotations

from pathlib import Path

from finetune.prompts import ALPACA_TEMPLATE, THINK_CLOSE, THINK_OPEN

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# DeepSeek-R1-Distill's template, shortened: assistant turns in the history lose their reasoning, and the
# generation prompt opens a think block.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

_SAMPLE = """The quick brown fox jumps over the lazy dog. A model thinks before it answers, and the answer
follows the reasoning. Question: what is two plus three? Reasoning: two and three make five. Answer: 5.
Passages are retrieved from the knowledge store and cited by their source. The adapter is trained with
odds-ratio preference optimization on pairs of chosen and rejected completions. Numbers 0 1 2 3 4 5 6 7 8 9
10 42 100 1000. Letters a b c d e f g h i j k l m n o p q r s t u v w x y z. Why? Because. How? Like this.
Tokyo is the capital of Japan. Paris is the capital of France. Water boils at 100 degrees Celsius.
東京は日本の首都です。答えは五です。
"""


def build_tokenizer(vocab_size: int = 1024, corpus: list[str] | None = None):
    """The tiny BPE tokenizer, trained on a built-in sample, or also on ``corpus`` (e.g. a synthetic task).

    Use it as saved and loaded again (``build_tiny_model`` saves it): transformers 5.17 loads it with numbers
    split into digits, where this object keeps " 16" whole, so the two give different ids for the same text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, USER, ASSISTANT]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _SAMPLE + ALPACA_TEMPLATE
    tokenizer.train_from_iterator([text] * 4 + text.split("\n") + list(corpus or []), trainer=trainer)
    # Like DeepSeek-R1's, the think tags are single tokens that decoding keeps.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    # Like DeepSeek-R1-Distill's (add_bos_token), encoding with special tokens puts BOS first: an
    # OpenAI-compatible server tokenizes /completions prompts that way.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      additional_special_tokens=[USER, ASSISTANT], model_max_length=4096)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     tokenizer=None) -> Path:
    """Write a random-weight Qwen2ForCausalLM and its tokenizer (by default ``build_tokenizer()``) to out_dir."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
