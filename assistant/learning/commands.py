"""The learning loop's commands of ``python -m assistant``: eval, pairs generate, run (a training run's job).

Each parses its arguments here and calls the Python API of ``assistant/learning/``; ``assistant/__main__.py``
adds them to its parser and catches user errors at the edge.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from errors import DataError

log = logging.getLogger(__name__)


def run_job(args: argparse.Namespace) -> int:
    from assistant.learning.run_job import execute

    return execute(Path(args.folder), resume=args.resume)


def run_eval(args: argparse.Namespace) -> int:
    from finetune import evaluation

    if args.completions:
        reports = evaluation.score_completions_file(args.completions)
    else:
        if not args.prompts:
            raise DataError("give --prompts FILE (held-out prompts) or --completions FILE (completions to score)")
        from assistant.learning.evaluation import evaluate
        from engine.batch_generate import GenerationConfig
        from settings import Settings

        model = args.model or Settings.from_env().chat_model
        pairs = []
        if args.pairs:
            from finetune.data import prepare_data
            from finetune.hf_backend import load_tokenizer

            pairs = prepare_data(args.pairs, load_tokenizer(model)).pairs
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  samples=args.samples, batch_size=args.batch_size)
        reports = evaluate(model, args.adapter, evaluation.load_prompts(args.prompts), pairs, config,
                           engine=args.engine)
    if args.plot:
        evaluation.plot(reports, args.plot)
    if args.json:
        print(json.dumps(evaluation.report_json(reports, with_completions=bool(args.completions)),
                         ensure_ascii=False, indent=2))
    else:
        print(evaluation.markdown_table(reports))
        if args.plot:
            print(f"\nchart written to {args.plot}")
    return 0


def run_pairs_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from assistant.chat import Assistant
    from assistant.learning.pair_generation import PairGenerationConfig, generate_pairs, read_questions
    from engine.runtime import import_unsloth_if_used
    from finetune.adapters import read_adapter
    from settings import Settings

    settings = Settings.from_env()
    import_unsloth_if_used(settings)
    out = args.out or str(settings.pairs_db)
    config = PairGenerationConfig(samples=args.samples, temperature=args.temperature,
                                  max_new_tokens=args.max_new_tokens, rules=tuple(args.rules.split(",")),
                                  min_answer_chars=args.min_chars, max_answer_chars=args.max_chars,
                                  margin=args.margin, retrieval=not args.no_retrieval,
                                  questions_per_batch=args.batch, shared_reasoning=args.shared_reasoning)
    if not args.questions and not args.from_store:
        raise DataError("give a file of questions, or --from-store N to have the model draft N from your documents")
    assistant = Assistant(settings)
    questions = read_questions(args.questions) if args.questions else []
    if "correct" in config.rules and not any(q.expected is not None for q in questions):
        raise DataError('the correct rule needs expected answers: give questions as JSONL rows with '
                        '"question" and "expected"')
    if args.adapter:
        adapter = read_adapter(Path(args.adapter), settings.chat_model)
        if not adapter.usable:
            raise DataError(f"cannot answer with the adapter {args.adapter}: {adapter.reason}")
        assistant.runtime.activate(adapter)
    if args.from_store:
        from assistant.learning.pair_generation import draft_questions

        drafted = draft_questions(assistant, args.from_store, config)
        log.info("drafted %d questions from %d passages of the knowledge store", len(drafted), args.from_store)
        questions += drafted
    if args.seed is not None:  # the same samples on the same machine, run after run
        import torch

        torch.manual_seed(args.seed)
    with tqdm(total=len(questions), unit="question", file=sys.stderr) as bar:
        report = generate_pairs(assistant, questions, out, config, progress=lambda _: bar.update())
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(f"{report.pairs} pairs written to {out}; {report.skipped} questions already had one; "
              f"{len(report.no_clear_winner)} without a clear winner")
    return 0


def add_commands(commands) -> None:
    """Add eval, pairs generate and run to ``commands`` (an argparse subparsers object)."""
    e = commands.add_parser("eval", help="base model and adapters side by side on held-out prompts and pairs")
    e.add_argument("--model", help="base model (default: CHAT_MODEL)")
    e.add_argument("--adapter", action="append", default=[], help="an adapter folder; repeat for several")
    e.add_argument("--prompts", help="held-out prompts (JSONL: prompt, or instruction + input; optional expected)")
    e.add_argument("--pairs", help="held-out preference pairs, in any format `finetune prepare` reads")
    e.add_argument("--completions", help="score these completions instead (JSONL: completion, prompt?, model?)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    e.add_argument("--samples", type=int, default=1, help="answers per prompt")
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--engine", choices=("auto", "unsloth", "transformers"),
                   help="how to run the model (default: LOCAL_ENGINE, as the app does)")
    e.add_argument("--plot", help="write a PNG chart here")
    e.add_argument("--json", action="store_true", help='print {"models": [...]} as JSON')
    e.set_defaults(handler=run_eval)

    q = commands.add_parser("pairs", help="preference pairs the model makes (list, export and delete stored ones "
                            "with python -m finetune pairs)")
    pairs = q.add_subparsers(dest="action", required=True)
    g = pairs.add_parser("generate", help="pairs from questions alone: sample answers, keep clear best/worst")
    g.add_argument("questions", nargs="?", help="questions: a text file (one per line) or JSONL with a question "
                   "field and optionally an expected answer")
    g.add_argument("--from-store", type=int, metavar="N",
                   help="also have the model draft questions from N passages drawn from the knowledge store")
    g.add_argument("--out", help="a pairs store (.sqlite) or a JSONL file (default: PAIRS_DB, data/pairs.sqlite)")
    g.add_argument("--samples", type=int, default=4, help="answers per question (default 4)")
    g.add_argument("--rules", default="duplication,think", help="comma-separated: duplication, think, citation, "
                   "length, correct (needs expected answers in the questions) (default duplication,think)")
    g.add_argument("--adapter", help="answer with this adapter folder (default: the base model), e.g. to make the "
                   "next round's pairs with the adapter the last round trained")
    g.add_argument("--margin", type=float, default=0.5, help="least score difference of a kept pair")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=None, help="seed the sampling (default: different samples each run)")
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--min-chars", type=int, default=1, help="the length rule's shortest answer")
    g.add_argument("--max-chars", type=int, default=2000, help="the length rule's longest answer")
    g.add_argument("--no-retrieval", action="store_true", help="answer without the knowledge store")
    g.add_argument("--batch", type=int, default=8, help="questions answered together (default 8)")
    g.add_argument("--shared-reasoning", action="store_true", help="sample one reasoning per question and "
                   "several answers after it, so a pair differs in its answer only")
    g.add_argument("--json", action="store_true")
    g.set_defaults(handler=run_pairs_generate)

    r = commands.add_parser("run", help="carry out a training run the app prepared in FOLDER: train, then "
                            "evaluate on its held-out pairs (the app's Train tab starts this)")
    r.add_argument("folder", help="the run's folder in ADAPTER_DIR (it holds run.json)")
    r.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    r.set_defaults(handler=run_job)
