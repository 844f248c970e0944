"""The recipe's seed data: its column names, read by ``finetune/data.py`` and written by the pairs store's export.

A row is an Alpaca prompt's two parts (``instruction``, ``input``) and, for each of the chosen and the rejected
completion, its reasoning and its answer (``output``).
"""

INSTRUCTION = "instruction"
INPUT = "input"
CHOSEN_OUTPUT = "output(CHOSEN)"
CHOSEN_REASONING = "reasoning(CHOSEN)"
REJECTED_OUTPUT = "output(REJECTED)"
REJECTED_REASONING = "reasoning(REJECTED)"
COLUMNS = (INSTRUCTION, INPUT, CHOSEN_OUTPUT, CHOSEN_REASONING, REJECTED_OUTPUT, REJECTED_REASONING)


def recipe_row(instruction: str, input: str, chosen_reasoning: str, chosen_output: str, rejected_reasoning: str,
               rejected_output: str) -> dict:
    """One row in the recipe's columns."""
    return {INSTRUCTION: instruction, INPUT: input, CHOSEN_REASONING: chosen_reasoning, CHOSEN_OUTPUT: chosen_output,
            REJECTED_REASONING: rejected_reasoning, REJECTED_OUTPUT: rejected_output}
