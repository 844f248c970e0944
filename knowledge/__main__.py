"""python -m knowledge add|search|list|remove: the knowledge store from the command line."""

from __future__ import annotations

import argparse
import json
import sys

import logs
from errors import UserError
from knowledge.store import KnowledgeStore
from settings import Settings


def main(argv: list[str] | None = None) -> int:
    logs.configure()
    parser = argparse.ArgumentParser(prog="python -m knowledge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add files and folders (recursively)")
    add.add_argument("paths", nargs="+")
    add.add_argument("--json", action="store_true", help="print the report as JSON")
    search = commands.add_parser("search", help="the best passages for a query")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="how many passages (default 5)")
    search.add_argument("--source", help="only passages of this document")
    search.add_argument("--mode", choices=["hybrid", "vector", "lexical"], default="hybrid")
    search.add_argument("--json", action="store_true")
    listing = commands.add_parser("list", help="documents in the store, with chunk counts")
    listing.add_argument("--json", action="store_true")
    remove = commands.add_parser("remove", help="delete a document's chunks")
    remove.add_argument("source")
    args = parser.parse_args(argv)

    try:
        store = KnowledgeStore(Settings.from_env())
        return COMMANDS[args.command](store, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_add(store: KnowledgeStore, args) -> int:
    if args.json:
        report = store.add(args.paths)
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
        return 0 if report.ok else 1
    from tqdm import tqdm

    with tqdm(unit="file", file=sys.stderr) as bar:

        def advance(_source: str, total: int) -> None:
            bar.total = total
            bar.update()

        report = store.add(args.paths, progress=advance)
    for item in report.added:
        print(f"added    {item['source']} ({item['chunks']} chunks)")
        for warning in item.get("warnings", []):
            print(f"         warning: {warning}")
    for item in report.skipped:
        print(f"skipped  {item['source']}: {item['reason']}")
    for item in report.failed:
        print(f"FAILED   {item['source']}: {item['error']}")
    print(f"{len(report.added)} added, {len(report.skipped)} skipped, {len(report.failed)} failed")
    return 0 if report.ok else 1


def run_search(store: KnowledgeStore, args) -> int:
    hits = store.search(args.query, k=args.k, where={"source": args.source} if args.source else None,
                        mode=args.mode)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return 0
    for number, hit in enumerate(hits, start=1):
        page = f", page {hit.page}" if hit.page is not None else ""
        print(f"[{number}] {hit.source}{page}  (score {hit.score:.4f})")
        print("    " + hit.text.replace("\n", "\n    "))
    if not hits:
        print("no passages found", file=sys.stderr)
    return 0


def run_list(store: KnowledgeStore, args) -> int:
    docs = store.documents()
    if args.json:
        print(json.dumps([d.to_dict() for d in docs], ensure_ascii=False, indent=2))
        return 0
    for doc in docs:
        print(f"{doc.chunks:6d}  {doc.source}")
    print(f"{len(docs)} documents, {sum(d.chunks for d in docs)} chunks")
    return 0


def run_remove(store: KnowledgeStore, args) -> int:
    count = store.remove(args.source)
    print(f"removed {args.source} ({count} chunks)")
    return 0


COMMANDS = {"add": run_add, "search": run_search, "list": run_list, "remove": run_remove}

if __name__ == "__main__":
    sys.exit(main())
