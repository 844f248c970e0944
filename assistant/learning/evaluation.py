"""The evaluation's model half: the base model loaded as the app serves it, then each adapter on it, answering
the same held-out prompts and scored on the same pairs (``finetune/evaluation.py`` reads, scores and reports).

    python -m assistant eval --model BASE --adapter data/adapters/orpo-1 --prompts heldout.jsonl --pairs pairs.jsonl
"""

from __future__ import annotations

from pathlib import Path

from engine.batch_generate import GenerationConfig, generate
from errors import DataError
from finetune.adapters import ADAPTER_CONFIG
from finetune.data import PreferencePair
from finetune.evaluation import BASE_NAME, EvalPrompt, ModelReport, preference
from finetune.metrics import score_completion, summarize


def evaluate_model(model, tokenizer, name: str, prompts: list[EvalPrompt], pairs: list[PreferencePair],
                   config: GenerationConfig) -> ModelReport:
    texts = [p.prompt for p in prompts for _ in range(config.samples)]
    expected = [p.expected for p in prompts for _ in range(config.samples)]
    completions = generate(model, tokenizer, texts, config)
    scores = [score_completion(p, c, e) for p, c, e in zip(texts, completions, expected, strict=True)]
    report = ModelReport(name, summarize(scores), completions=[
        {"prompt": p, "completion": c, **s.to_dict()} for p, c, s in zip(texts, completions, scores, strict=True)])
    if pairs:
        report.preference_accuracy, report.margin = preference(model, tokenizer, pairs)
    return report


def load_base(model_name: str, engine: str | None = None):
    """The base model and tokenizer, loaded as the app serves it (``LocalRuntime``: LOCAL_ENGINE and
    LOAD_IN_4BIT from the environment, ``engine`` overriding the first), without its adapters."""
    from engine.adapter_switch import BASE, AdapterChoice
    from engine.runtime import LocalRuntime
    from settings import Settings

    overrides = {"local_engine": engine} if engine else {}
    runtime = LocalRuntime(Settings.from_env(chat_model=model_name, **overrides), choice=AdapterChoice(BASE))
    return runtime.model, runtime.tokenizer


def evaluate(model_name: str, adapters: list[str | Path], prompts: list[EvalPrompt],
             pairs: list[PreferencePair] | None = None, config: GenerationConfig | None = None,
             include_base: bool = True, engine: str | None = None, loaded: tuple | None = None
             ) -> list[ModelReport]:
    """The base model, then each adapter on it, on the same prompts and pairs (``loaded``: the base model and
    tokenizer already loaded by ``load_base``)."""
    from peft import PeftModel

    config = config or GenerationConfig()
    model, tokenizer = loaded or load_base(model_name, engine)
    reports = [evaluate_model(model, tokenizer, BASE_NAME, prompts, pairs or [], config)] if include_base else []
    for adapter in adapters:
        adapter = Path(adapter)
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise DataError(f"{adapter} is not an adapter folder (no {ADAPTER_CONFIG})")
        with_adapter = PeftModel.from_pretrained(model, str(adapter))
        with_adapter.eval()
        reports.append(evaluate_model(with_adapter, tokenizer, adapter.name, prompts, pairs or [], config))
        model = with_adapter.unload()  # the base again, for the next adapter
    return reports
