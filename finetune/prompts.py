"""The one prompt format shared by training and the chat app.

A model learns the habits of the prompt it was trained on; the chat app builds its prompts with the same
functions so that those habits carry over.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)


def alpaca_prompt(instruction: str, input: str) -> str:
    """The recipe's prompt: the task in `instruction`, its context (e.g. retrieved passages) in `input`."""
    return ALPACA_TEMPLATE.format(instruction=instruction, input=input)


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids a prompt had in training: its own tokens, after one BOS token when the tokenizer has one.

    TRL's ORPO trainer tokenizes the prompt without special tokens and then puts BOS in front unless it is
    there already (a chat template writes it itself). Generation and evaluation must feed the model the
    same ids, or an Alpaca-prompted model meets a prompt start it never saw in training.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def format_completion(reasoning: str, answer: str) -> str:
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{answer}"


def split_reasoning(text: str, started_in_think: bool = False) -> tuple[str, str, bool]:
    """Split a model output into (reasoning, answer, closed).

    `closed` is False while the model is still thinking (no `</think>` yet). DeepSeek-R1 chat templates end
    the prompt with `<think>`, so the output itself may lack the opening tag: pass `started_in_think=True`
    when the prompt ended inside a think block, so that untagged text counts as reasoning.
    """
    head, opened, rest = text.partition(THINK_OPEN)
    if opened:
        text = rest
        started_in_think = True
    reasoning, closed_tag, answer = text.partition(THINK_CLOSE)
    if closed_tag:
        return reasoning.strip(), answer.strip(), True
    if started_in_think:
        return text.strip(), "", False
    return "", text.strip(), True
