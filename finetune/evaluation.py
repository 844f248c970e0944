"""The evaluation's data and scores: did training help? The base model and each adapter, side by side.

    python -m assistant eval --model BASE --adapter data/adapters/orpo-1 --prompts heldout.jsonl --pairs pairs.jsonl
    python -m assistant eval --completions outputs.jsonl          # score given completions, no model

This module reads the prompts and completions, scores them and writes the report; running the models (the base
loaded as the app serves it, then each adapter on it) is ``assistant/learning/evaluation.py``. For each model: answers to the held-out prompts (greedy by default), scored by ``finetune.metrics`` (think
rate, duplication of the reasoning in the answer, answer length, citation rate, accuracy when the prompts carry
an expected answer); and on held-out pairs, how often the model finds the chosen completion likelier than the
rejected one (``preference_accuracy``) and by how much (``margin``: the mean difference of the two
completions' average per-token log-probabilities, the quantity ORPO's odds ratio is built on).

Prompts file (JSONL or JSON list): each row is ``{"prompt"}`` (the exact prompt, e.g. from the pairs store)
or ``{"instruction", "input"}`` (the recipe's Alpaca template, opened with <think>); an optional
``"expected"`` answer is graded. Completions file: rows of
``{"completion", "prompt"?, "expected"?, "model"?}``; rows are summarized per ``model`` name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from errors import DataError
from finetune import recipe
from finetune.data import PreferencePair, read_json_rows
from finetune.metrics import CompletionScore, score_completion, summarize
from finetune.prompts import THINK_OPEN, alpaca_prompt, prompt_token_ids

BASE_NAME = "base"


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    expected: str | None = None


@dataclass
class ModelReport:
    name: str
    summary: dict
    preference_accuracy: float | None = None
    margin: float | None = None
    completions: list[dict] = field(default_factory=list)  # each completion with its scores

    def to_dict(self, with_completions: bool = False) -> dict:
        out = {"name": self.name, **self.summary, "preference_accuracy": self.preference_accuracy,
               "margin": self.margin}
        if with_completions:
            out["completions"] = self.completions
        return out


# ---------------------------------------------------------------- reading

def load_prompts(path: str | Path) -> list[EvalPrompt]:
    prompts = []
    for number, row in enumerate(read_json_rows(path, "prompts or completions"), start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number} is not an object")
        expected = None if row.get("expected") is None else str(row["expected"])
        if isinstance(row.get("prompt"), str):
            prompts.append(EvalPrompt(row["prompt"], expected))
        elif isinstance(row.get(recipe.INSTRUCTION), str):
            prompt = alpaca_prompt(row[recipe.INSTRUCTION], row.get(recipe.INPUT) or "") + THINK_OPEN
            prompts.append(EvalPrompt(prompt, expected))
        else:
            raise DataError(f"{path} row {number} has neither \"prompt\" nor \"instruction\"")
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def score_completions_file(path: str | Path) -> list[ModelReport]:
    """Reports per ``model`` name of the rows (one report, "completions", when rows name none)."""
    grouped: dict[str, list[tuple[dict, CompletionScore]]] = {}
    for number, row in enumerate(read_json_rows(path, "prompts or completions"), start=1):
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
            raise DataError(f"{path} row {number} has no \"completion\" text")
        score = score_completion(row.get("prompt") or "", row["completion"], row.get("expected"))
        grouped.setdefault(str(row.get("model") or "completions"), []).append((row, score))
    return [ModelReport(name, summarize([s for _, s in items]),
                        completions=[{**row, **score.to_dict()} for row, score in items])
            for name, items in grouped.items()]


# ---------------------------------------------------------------- preference, with a model

def completion_logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """Mean log-probability per completion token given the prompt (ORPO's length-normalised log P(y|x))."""
    import torch

    prompt_ids = prompt_token_ids(tokenizer, prompt)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not completion_ids:
        return 0.0
    ids = torch.tensor([prompt_ids + completion_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float().log_softmax(-1)
    return logps.gather(1, ids[0, len(prompt_ids):, None]).mean().item()


def preference(model, tokenizer, pairs: list[PreferencePair]) -> tuple[float, float]:
    """(share of pairs whose chosen completion is likelier, mean margin of average log-probabilities)."""
    model.eval()
    margins = [completion_logprob(model, tokenizer, p.prompt, p.chosen)
               - completion_logprob(model, tokenizer, p.prompt, p.rejected) for p in pairs]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


# ---------------------------------------------------------------- reporting

COLUMNS = ("think_rate", "duplication_rate", "duplicating_share", "answer_chars", "citation_rate", "accuracy",
           "preference_accuracy", "margin")


def report_json(reports: list[ModelReport], with_completions: bool = False) -> dict:
    """The evaluation as `assistant eval --json` prints it and a training run saves it (eval.json):
    ``{"models": [{"name", "think_rate", ...}, ...]}``."""
    return {"models": [r.to_dict(with_completions=with_completions) for r in reports]}


def markdown_table(reports: list[ModelReport]) -> str:
    def cell(value) -> str:
        if value is None:
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    rows = ["| model | completions | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for report in reports:
        values = report.to_dict()
        rows.append(f"| {report.name} | {values.get('completions', 0)} | "
                    + " | ".join(cell(values.get(c)) for c in COLUMNS) + " |")
    return "\n".join(rows)


def plot(reports: list[ModelReport], path: str | Path) -> Path:
    """A bar chart of the rates (0..1) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in ("think_rate", "duplication_rate", "citation_rate", "accuracy", "preference_accuracy")
               if any(r.to_dict().get(c) is not None for r in reports)]
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 3.6))
    width = 0.8 / max(len(reports), 1)
    for i, report in enumerate(reports):
        values = [report.to_dict().get(m) or 0.0 for m in metrics]
        ax.bar([x + i * width for x in range(len(metrics))], values, width, label=report.name)
    ax.set_xticks([x + width * (len(reports) - 1) / 2 for x in range(len(metrics))], metrics, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
