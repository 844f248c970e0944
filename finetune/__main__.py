"""python -m finetune prepare DATA | train --config FILE [key=value ...] | pairs list|export|delete |
tiny-model OUT_DIR

The commands that run the model as the app serves it (eval, pairs generate, a training run's job) are
``python -m assistant``'s: they use the assistant and the engine, which sit above this package."""

from __future__ import annotations

import argparse
import json
import sys

import logs
from errors import UserError
from finetune.data import FORMATS

# Commands that moved to `python -m assistant` (same arguments).
MOVED = {("eval",): "python -m assistant eval", ("run",): "python -m assistant run",
         ("pairs", "generate"): "python -m assistant pairs generate"}


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


def _tiny_model(args: argparse.Namespace) -> int:
    from finetune.tiny_model import build_tiny_model

    print(f"tiny model written to {build_tiny_model(args.out_dir)}")
    return 0


def moved_command(argv: list[str]) -> str | None:
    """The line that says where a command of ``argv`` went, when it moved to `python -m assistant`."""
    for words, command in MOVED.items():
        if tuple(argv[:len(words)]) == words:
            return f"`python -m finetune {' '.join(words)}` is now `{command}` (same arguments)"
    return None


def main(argv: list[str] | None = None) -> int:
    logs.configure()
    moved = moved_command(sys.argv[1:] if argv is None else argv)
    if moved:
        print(f"error: {moved}", file=sys.stderr)
        return 2
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

    q = commands.add_parser("pairs", help="stored preference pairs: list, export and delete them (generate them "
                            "with python -m assistant pairs generate)")
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
