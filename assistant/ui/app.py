"""The web app: chat, debate verification, the knowledge store, pairs, training and adapters, on Gradio in
FastAPI.

    python -m assistant serve                      # http://127.0.0.1:7860, this machine only
    APP_AUTH=me:secret python -m assistant serve --host 0.0.0.0

Model requests wait in Gradio's queue: GPU_CONCURRENCY of them run at once, at most QUEUE_SIZE wait, and
the rest are turned away ("queue is full"). GET /health answers JSON for container health checks, outside the
login; the API docs (/docs, /redoc, /openapi.json) are behind it, like the page.

Temporary files are bounded: Gradio deletes the uploads and served files of its cache once they are a day old
(checking hourly) and all of them at shutdown; the chat's exports, one per session, go at shutdown too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sys

import gradio as gr
import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from starlette.routing import Mount

from assistant.chat import Assistant
from assistant.conversations import ConversationStore
from assistant.feedback import FeedbackStore
from assistant.model_loader import LOADING, ModelLoader
from assistant.training import TrainingControl
from assistant.ui.adapters import AdaptersTab
from assistant.ui.chat import ChatTab
from assistant.ui.conversations import ConversationsPanel
from assistant.ui.feedback import ChatFeedback, VerdictCorrection
from assistant.ui.knowledge import KnowledgeTab
from assistant.ui.pairs import PairsTab
from assistant.ui.train import TrainTab
from assistant.ui.verify import VerifyTab
from compat import gradio_api_prefix, is_gradio_app
from errors import UserError
from finetune.pairs_store import PairsStore
from knowledge import StoreError
from settings import Settings

logger = logging.getLogger(__name__)

TITLE = "Assistant"
# Gradio's cache: every hour, delete the uploads and served files that are more than a day old.
DELETE_CACHE = (3600, 86400)
CSS = """
#model-status { font-size: 0.9em; }
#verdict h2 { margin-top: 0; }
"""


def build_app(assistant: Assistant) -> gr.Blocks:
    """The Gradio page, queued; the model starts loading in the background now."""
    return _build(assistant)[0]


def _build(assistant: Assistant) -> tuple[gr.Blocks, ModelLoader, KnowledgeTab, ChatTab]:
    settings = assistant.settings
    store, store_error = None, None
    try:
        store = assistant.store  # opened once here, so a broken store is reported at start, not per request
    except UserError as e:
        store_error = str(e)
        logger.error("the knowledge store is unavailable: %s", e)
    loader = ModelLoader(assistant).start()
    assistant.adapters.start_following()  # looks only once the model has loaded
    conversations, conversations_error = None, None
    try:
        conversations = ConversationStore(settings.conversations_db)
    except UserError as e:
        conversations_error = str(e)
        logger.error("conversations are not saved: %s", e)
    chat, verify, knowledge = ChatTab(assistant, loader, conversations), VerifyTab(assistant, loader), \
        KnowledgeTab(store, settings, store_error)
    sidebar = ConversationsPanel(chat, conversations, conversations_error)
    feedback, feedback_error = None, None
    try:
        feedback = FeedbackStore(PairsStore(settings.pairs_db))
    except UserError as e:
        feedback_error = str(e)
        logger.error("the pairs store is unavailable, so feedback is not saved: %s", e)
    pairs = PairsTab(feedback, chat.exports.folder, feedback_error, settings.export_source_paths)

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {TITLE}\nAnswers from a reasoning model, cited from your documents.")
        status = gr.Markdown(loader.status_markdown(), elem_id="model-status")
        sidebar.build_sidebar()
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat.build(settings, sidebar.remembered)
                sidebar.wire(demo)
                ChatFeedback(chat, feedback, feedback_error).build(chat.chatbot, chat.turns, chat.temperature,
                                                                   chat.max_new_tokens)
            with gr.Tab("Verify a claim", id="verify", elem_id="tab-verify"):
                verify.build(settings)
                VerdictCorrection(verify, feedback, feedback_error).build()
            with gr.Tab("Knowledge", id="knowledge", elem_id="tab-knowledge"):
                knowledge.build(settings, demo)
            with gr.Tab("Pairs", id="pairs", elem_id="tab-pairs") as pairs_tab:
                pairs.build(pairs_tab)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                TrainTab(TrainingControl(loader), loader).build(demo, status)
            with gr.Tab("Adapters", id="adapters", elem_id="tab-adapters"):
                AdaptersTab(assistant.adapters, loader).build(demo, status)
        # Poll the model's status until loading ends; outside the queue, so polls never take a place in line.
        # The timer starts on every page, whatever the state was when the page was built: the status text above
        # is read before it, so a model that finished loading in between left the page showing "loading" with
        # only the load event below to correct it. The first tick after loading stops the timer.
        # The token slider's end follows the loaded model's context.
        timer = gr.Timer(2.0, active=True)
        timer.tick(lambda: (loader.status_markdown(), gr.Timer(active=loader.state == LOADING),
                            gr.Slider(maximum=loader.context_length())), None,
                   [status, timer, chat.max_new_tokens], queue=False, api_visibility="private")
        demo.load(lambda: (loader.status_markdown(), gr.Slider(maximum=loader.context_length())), None,
                  [status, chat.max_new_tokens], queue=False, api_visibility="private")
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return demo, loader, knowledge, chat


def create_server(assistant: Assistant, auth: list[tuple[str, str]] | None = None) -> FastAPI:
    """FastAPI with GET /health, the API docs, and the Gradio page at /. `app.state.exports` holds the chat's
    exports, whose folder goes when the server shuts down."""
    demo, loader, knowledge, chat = _build(assistant)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        assistant.adapters.stop()
        chat.exports.close()

    app = FastAPI(title=TITLE, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.exports = chat.exports
    logged_in = [Depends(_login_check(app))]

    @app.get("/openapi.json", include_in_schema=False, dependencies=logged_in)
    def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=logged_in)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{TITLE} API")

    @app.get("/redoc", include_in_schema=False, dependencies=logged_in)
    def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{TITLE} API")

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


def _login_check(app: FastAPI):
    """A dependency that lets a request through when the Gradio app mounted on `app` would: it asks that app's
    GET /gradio_api/login_check with the request's cookies, so both agree on who is logged in."""

    async def check(request: Request) -> None:
        gradio_app = next(route.app for route in app.routes if isinstance(route, Mount) and is_gradio_app(route.app))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gradio_app), base_url="http://app") as ask:
            answer = await ask.get(f"{gradio_api_prefix()}/login_check", headers={"cookie": request.headers.get("cookie", "")})
        if answer.status_code != 200:
            raise HTTPException(status_code=401, detail="Not authenticated: log in on the app's page first.")

    return check


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
        logger.warning("serving on %s without logins (--insecure-no-auth)", host)
    import uvicorn

    app = create_server(Assistant(settings), auth=logins or None)
    logger.info("serving on http://%s:%s (logins %s); health check at /health", host, port,
                "required" if logins else "off")
    # Browsers hold event streams open: without a bound, a stop (SIGTERM, `docker compose down`) waits for them
    # until the container engine kills the app.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    return 0
