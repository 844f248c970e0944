"""The web app: chat, debate verification and the knowledge store, on Gradio mounted in FastAPI.

    python -m assistant serve                      # http://127.0.0.1:7860, this machine only
    APP_AUTH=me:secret python -m assistant serve --host 0.0.0.0

Model requests wait in Gradio's queue: GPU_CONCURRENCY of them run at once, at most QUEUE_SIZE wait, and
the rest are turned away ("queue is full"). GET /health answers JSON for container health checks.
"""

from __future__ import annotations

import ipaddress
import sys

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from assistant.chat import Assistant
from assistant.ui_chat import ChatTab
from assistant.ui_knowledge import KnowledgeTab
from assistant.ui_model import LOADING, ModelLoader
from assistant.ui_verify import VerifyTab
from errors import UserError
from knowledge import StoreError
from settings import Settings

TITLE = "Assistant"
CSS = """
#model-status { font-size: 0.9em; }
#verdict h2 { margin-top: 0; }
"""


def build_app(assistant: Assistant) -> gr.Blocks:
    """The Gradio page, queued; the model starts loading in the background now."""
    return _build(assistant)[0]


def _build(assistant: Assistant) -> tuple[gr.Blocks, ModelLoader, KnowledgeTab]:
    settings = assistant.settings
    store, store_error = None, None
    try:
        store = assistant.store  # opened once here, so a broken store is reported at start, not per request
    except UserError as e:
        store_error = str(e)
        print(f"error: the knowledge store is unavailable: {e}", file=sys.stderr, flush=True)
    loader = ModelLoader(assistant).start()
    chat, verify, knowledge = ChatTab(assistant, loader), VerifyTab(assistant, loader), \
        KnowledgeTab(store, settings, store_error)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nAnswers from a reasoning model, cited from your documents.")
        status = gr.Markdown(loader.status_markdown(), elem_id="model-status")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat.build(settings)
            with gr.Tab("Verify a claim", id="verify", elem_id="tab-verify"):
                verify.build(settings)
            with gr.Tab("Knowledge", id="knowledge", elem_id="tab-knowledge"):
                knowledge.build(settings, demo)
        # Poll the model's status until loading ends; outside the queue, so polls never take a place in line.
        timer = gr.Timer(2.0, active=loader.state == LOADING)
        timer.tick(lambda: (loader.status_markdown(), gr.Timer(active=loader.state == LOADING)), None,
                   [status, timer], queue=False, api_visibility="private")
        demo.load(loader.status_markdown, None, status, queue=False, api_visibility="private")
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return demo, loader, knowledge


def create_server(assistant: Assistant, auth: list[tuple[str, str]] | None = None) -> FastAPI:
    """FastAPI with GET /health, and the Gradio page at /."""
    demo, loader, knowledge = _build(assistant)
    app = FastAPI(title=TITLE)

    @app.get("/health")
    def health():
        # The store opened at build time (None, with its error, when it could not be opened).
        try:
            if knowledge.store is None:
                raise StoreError(knowledge.store_error)
            documents = len(knowledge.store.documents())
        except UserError as e:
            return JSONResponse({"status": "error", "error": str(e), **loader.describe()}, status_code=503)
        return {"status": "ok", **loader.describe(), "documents": documents}

    return gr.mount_gradio_app(app, demo, path="/", auth=auth or None, ssr_mode=False, css=CSS,
                               footer_links=["api", "gradio"])


def parse_auth(spec: str | None) -> list[tuple[str, str]]:
    """APP_AUTH "user:pass,user2:pass2" as [(user, pass), ...] (Settings has checked its form)."""
    return [tuple(item.strip().split(":", 1)) for item in (spec or "").split(",") if item.strip()]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, logins: list, insecure_no_auth: bool) -> str | None:
    """Why serving on `host` is refused, or None when it may go ahead."""
    if is_loopback(host) or logins or insecure_no_auth:
        return None
    return (f"refusing to serve on {host} without logins: anyone who can reach this address could read your "
            "documents and use the model. Set APP_AUTH=user:password (pairs separated by commas), or serve on "
            "127.0.0.1 (the default), or pass --insecure-no-auth if something in front of the app already "
            "controls access.")


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 7860, insecure_no_auth: bool = False) -> int:
    """Run the app until interrupted; non-zero when it refuses to start."""
    logins = parse_auth(settings.app_auth)
    refusal = bind_refusal(host, logins, insecure_no_auth)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if not is_loopback(host) and not logins:
        print(f"warning: serving on {host} without logins (--insecure-no-auth)", file=sys.stderr)
    import uvicorn

    app = create_server(Assistant(settings), auth=logins or None)
    print(f"Serving on http://{host}:{port} (logins {'required' if logins else 'off'}); "
          f"health check at /health", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
