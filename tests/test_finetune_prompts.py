from finetune.prompts import alpaca_prompt, format_completion, split_reasoning


def test_alpaca_prompt_matches_the_recipe_character_for_character():
    assert alpaca_prompt("Name the capital.", "Japan") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nName the capital.\n\n"
        "### Input:\nJapan\n\n### Response:\n")


def test_format_completion_wraps_reasoning_in_think_tags():
    assert format_completion("because", "Tokyo") == "<think>because</think>Tokyo"


def test_split_reasoning_separates_thinking_from_answer():
    assert split_reasoning("<think>because</think>\n\nTokyo") == ("because", "Tokyo", True)


def test_split_reasoning_without_opening_tag_from_r1_template():
    assert split_reasoning("the template opened it\n</think>\n\nTokyo") == ("the template opened it", "Tokyo", True)


def test_split_reasoning_while_still_thinking_is_not_closed():
    assert split_reasoning("<think>still going") == ("still going", "", False)


def test_split_reasoning_untagged_text_counts_as_reasoning_when_prompt_opened_think():
    assert split_reasoning("still going", started_in_think=True) == ("still going", "", False)


def test_split_reasoning_untagged_text_is_an_answer_by_default():
    assert split_reasoning("Tokyo") == ("", "Tokyo", True)
