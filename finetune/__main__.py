"""python -m finetune prepare DATA | train --config FILE [key=value ...] | run FOLDER | eval ... | pairs ... |
tiny-model OUT_DIR"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from errors import UserError
from finetune.data import FORMATS, DataError
from logs import quiet_third_party


def _default_model() -> str:
    from settings import Settings

    return Settings.from_env().chat_model


def _default_pairs_db() -> str:
    from settings import Settings

    return str(Settings.from_env().pairs_db)


def _prepare(args: argparse.Namespace) -> int:
    from finetune.data import parse_columns, prepare_data, write_jsonl
    from finetune.hf_backend import load_tokenizer

    tokenizer = load_tokenizer(args.model, "--model") if args.model else load_tokenizer(_default_model(), "CHAT_MODEL")
    prepared = prepare_data(args.data, tokenizer, args.format, parse_columns(args.columns), args.max_length,
                            args.max_prompt_length, args.on_overlength, args.split)
    if args.out:
        write_jsonl(prepared.pairs, args.out)
    if args.json:
        print(json.dumps(prepared.report(), ensure_ascii=False))
    else:
        print(prepared.summary())
        if args.out:
            print(f"wrote {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from finetune.config import load_config
    from finetune.train import train

    result = train(load_config(args.config, args.overrides), resume=args.resume)
    print(f"adapter written to {result.output_dir} after {result.global_step} steps ({result.backend} backend)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from finetune.runs import execute

    return execute(Path(args.folder), resume=args.resume)


def _eval(args: argparse.Namespace) -> int:
    from finetune import evaluation

    if args.completions:
        reports = evaluation.score_completions_file(args.completions)
    else:
        if not args.prompts:
            raise DataError("give --prompts FILE (held-out prompts) or --completions FILE (completions to score)")
        model = args.model or _default_model()
        pairs = []
        if args.pairs:
            from finetune.data import prepare_data
            from finetune.hf_backend import load_tokenizer

            pairs = prepare_data(args.pairs, load_tokenizer(model)).pairs
        config = evaluation.GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                             samples=args.samples, batch_size=args.batch_size)
        reports = evaluation.evaluate(model, args.adapter, evaluation.load_prompts(args.prompts), pairs, config,
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


def _pairs(args: argparse.Namespace) -> int:
    from finetune.pairs_store import PairsStore, write_export

    store = PairsStore(args.store or _default_pairs_db())
    if args.action == "export":
        print(f"wrote {write_export(store, args.layout, args.out, args.source_paths)} pairs to {args.out}")
    elif args.action == "delete":
        for pair_id in args.ids:
            store.delete_pair(pair_id)
        print(f"deleted {len(args.ids)} pairs; {store.count()} left")
    elif args.json:
        print(json.dumps([p.to_dict() for p in store.pairs()], ensure_ascii=False, indent=2))
    else:
        for pair in store.pairs():
            print(f"{pair.id:6d}  {pair.origin:9s}  {(pair.chosen.question or pair.chosen.prompt)[:80]!r}")
        print(f"{store.count()} pairs, {store.unpaired_down_votes()} down votes waiting for a better answer")
    return 0


def _pairs_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from assistant.chat import Assistant
    from engine.runtime import import_unsloth_if_used
    from finetune.adapters import read_adapter
    from finetune.pair_generation import PairGenerationConfig, generate_pairs, read_questions
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
        from finetune.pair_generation import draft_questions

        drafted = draft_questions(assistant, args.from_store, config)
        print(f"drafted {len(drafted)} questions from {args.from_store} passages of the knowledge store",
              file=sys.stderr)
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


def _tiny_model(args: argparse.Namespace) -> int:
    from finetune.tiny_model import build_tiny_model

    print(f"tiny model written to {build_tiny_model(args.out_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = argparse.ArgumentParser(prog="python -m finetune", description="ORPO fine-tuning of a reasoning model.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="validate preference data and write prompt/chosen/rejected JSONL")
    p.add_argument("data", help="hub dataset name, JSON/JSONL/CSV/Parquet file, or folder of them")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: detect by columns)")
    p.add_argument("--model", help="model whose tokenizer gives EOS and token counts (default: CHAT_MODEL)")
    p.add_argument("--out", help="write the prepared pairs to this JSONL file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--columns", help="column renames TARGET=SOURCE,..., e.g. prompt=question,chosen=good")
    p.add_argument("--max-length", type=int, default=4096, help="context: prompt + completion tokens")
    p.add_argument("--max-prompt-length", type=int, default=2048, help="prompt tokens kept when too long")
    p.add_argument("--on-overlength", default="truncate", choices=("truncate", "drop"))
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.set_defaults(run=_prepare)

    t = commands.add_parser("train", help="train a LoRA adapter with ORPO")
    t.add_argument("--config", help="YAML config, e.g. finetune/configs/recipe-r1-qwen14b.yaml")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(run=_train)

    r = commands.add_parser("run", help="carry out a training run the app prepared in FOLDER: train, then "
                            "evaluate on its held-out pairs (the app's Train tab starts this)")
    r.add_argument("folder", help="the run's folder in ADAPTER_DIR (it holds run.json)")
    r.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    r.set_defaults(run=_run)

    e = commands.add_parser("eval", help="base model and adapters side by side on held-out prompts and pairs")
    e.add_argument("--model", help="base model (default: CHAT_MODEL)")
    e.add_argument("--adapter", action="append", default=[], help="an adapter folder; repeat for several")
    e.add_argument("--prompts", help="held-out prompts (JSONL: prompt, or instruction + input; optional expected)")
    e.add_argument("--pairs", help="held-out preference pairs, in any format `prepare` reads")
    e.add_argument("--completions", help="score these completions instead (JSONL: completion, prompt?, model?)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    e.add_argument("--samples", type=int, default=1, help="answers per prompt")
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--engine", choices=("auto", "unsloth", "transformers"),
                   help="how to run the model (default: LOCAL_ENGINE, as the app does)")
    e.add_argument("--plot", help="write a PNG chart here")
    e.add_argument("--json", action="store_true", help='print {"models": [...]} as JSON')
    e.set_defaults(run=_eval)

    q = commands.add_parser("pairs", help="preference pairs: generate them, or list, export and delete stored ones")
    pairs = q.add_subparsers(dest="action", required=True)
    store_help = "the SQLite pairs store (default: PAIRS_DB, data/pairs.sqlite)"
    for action, text in (("list", "list the stored pairs"), ("export", "write the pairs as JSONL"),
                         ("delete", "delete pairs by id")):
        a = pairs.add_parser(action, help=text)
        a.add_argument("--store", help=store_help)
        if action == "delete":
            a.add_argument("ids", nargs="+", type=int, help="pair ids (as `pairs list` shows them)")
        if action == "export":
            a.add_argument("--layout", choices=("trl", "recipe"), default="trl",
                           help="TRL's prompt/chosen/rejected (default) or the recipe's columns")
            a.add_argument("--out", default="pairs.jsonl", help="export file (JSONL)")
            a.add_argument("--source-paths", action="store_true",
                           help="name passages' sources by their full paths (default: file names only)")
        if action == "list":
            a.add_argument("--json", action="store_true", help="as JSON")
        a.set_defaults(run=_pairs)
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
    g.set_defaults(run=_pairs_generate)

    m = commands.add_parser("tiny-model", help="build a tiny random-weight model for tests and smoke runs")
    m.add_argument("out_dir")
    m.set_defaults(run=_tiny_model)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
