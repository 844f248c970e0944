"""python -m assistant serve|ask|verify|eval|pairs generate|run: the app, answers without a browser, and the
learning loop's steps that run the model (evaluation, generated pairs, a training run's job)."""

from __future__ import annotations

import argparse
import json
import sys

import logs
from assistant.chat import Assistant
from assistant.learning.commands import add_commands
from assistant.quotes import QuoteCheck
from engine.runtime import import_unsloth_if_used
from errors import UserError
from settings import Settings


def main(argv: list[str] | None = None) -> int:
    logs.configure()
    parser = argparse.ArgumentParser(prog="python -m assistant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the web app")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="serve on a non-loopback address without APP_AUTH logins (anyone who reaches it may use it)")
    ask = commands.add_parser("ask", help="answer one question")
    ask.add_argument("question")
    ask.add_argument("--no-retrieval", action="store_true", help="answer without searching the knowledge store")
    ask.add_argument("--json", action="store_true")
    verify = commands.add_parser("verify", help="debate whether a claim or attributed quote is valid")
    verify.add_argument("claim")
    verify.add_argument("--json", action="store_true")
    add_commands(commands)
    args = parser.parse_args(argv)

    try:
        if hasattr(args, "handler"):  # eval, pairs generate, run
            return args.handler(args)
        settings = Settings.from_env()
        import_unsloth_if_used(settings)  # before the store's encoder brings in transformers
        if args.command == "serve":
            from assistant.ui.app import serve as serve_app

            return serve_app(settings, args.host, args.port, args.insecure_no_auth)
        assistant = Assistant(settings)
        if args.command == "ask":
            return run_ask(assistant, args)
        return run_verify(assistant, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_ask(assistant: Assistant, args) -> int:
    answer = assistant.ask(args.question, use_retrieval=not args.no_retrieval)
    if args.json:
        print(json.dumps(answer.to_dict(), ensure_ascii=False, indent=2))
        return 0
    if answer.reasoning:
        print("Thinking:\n  " + answer.reasoning.replace("\n", "\n  ") + "\n")
    print(answer.answer or "(no answer after the reasoning)")
    for check in answer.support:
        if not check.supported:
            print(f"\nunsupported: {check.sentence}\n  ({check.note})")
    if answer.passages and not answer.citations:
        print(f"\nThe answer cites none of the {len(answer.passages)} passages it was shown.")
    for citation in answer.citations:
        print(f"\n{citation.label}\n  " + citation.text[:300].replace("\n", "\n  "))
    print(f"\n(model {answer.model}, adapter {answer.adapter or 'none'})")
    return 0


def run_verify(assistant: Assistant, args) -> int:
    from assistant.verify import verify

    result = verify(assistant, args.claim)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 0
    print(f"Claim: {result.claim}\nVerdict: {result.verdict} (confidence {result.confidence:.2f})")
    if result.reason:
        print(f"Why: {result.reason}")
    if result.quote is not None:
        print_quote(result.quote)
    print(f"\nCase for:\n{result.case_for}\n\nCase against:\n{result.case_against}")
    cited = {c.number for c in result.citations}
    if result.evidence and not cited:
        print("\nThe verdict cites none of the evidence.")
    for citation in result.evidence:
        mark = " (cited by the verdict)" if citation.number in cited else ""
        print(f"\n{citation.label}{mark}\n  " + citation.text[:300].replace("\n", "\n  "))
    return 0


def print_quote(check: QuoteCheck) -> None:
    """The quote's two answers: are the words in the documents, and is the attribution supported."""
    quote, match = check.quote, check.match
    print(f"\nQuote: \"{quote.text}\" (speaker: {quote.speaker or 'not named'})")
    if match is None:
        print("Words: not found in any document")
    else:
        where = match.source + (f", page {match.page}" if match.page is not None else "")
        print(f"Words: {'found word for word' if match.exact else 'found with differences'} in {where} "
              "(evidence [1])")
        if not match.exact:
            print(f"  the document has: \"{match.words}\"")
        for d in match.differences:
            print(f"  {d.change}: quoted \"{d.quoted}\", document \"{d.document}\"")
    print(f"Attribution: {check.attribution}")


if __name__ == "__main__":
    sys.exit(main())
