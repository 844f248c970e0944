"""The chat model, loaded in a background thread so that the page comes up at once.

A model that cannot be loaded (a UserError: ModelUnavailable, mostly) never stops the app: the loader keeps the message, prints
it once to the console, and the page shows it, while the knowledge tab keeps working.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from assistant.chat import Assistant
from engine.runtime import TINY_MODEL_HINT, ModelRuntime
from errors import UserError

logger = logging.getLogger(__name__)

LOADING, READY, UNAVAILABLE, UNLOADED = "loading", "ready", "unavailable", "unloaded"


def with_hint(message: str) -> str:
    """The message, with the tiny-model hint unless it already carries it."""
    return message if TINY_MODEL_HINT in message else f"{message}\n{TINY_MODEL_HINT}"


def short_model_name(name: str) -> str:
    """The last part of a hub name or folder: 'DeepSeek-R1-Distill-Qwen-14B', 'tiny-model'."""
    return Path(name.rstrip("/")).name or name


def public_model_name(name: str) -> str:
    """The model's name as clients may see it: a hub name as is, a local folder by its folder name only
    (its path says how the server's disk is laid out)."""
    path = Path(name).expanduser()
    return path.name if path.is_absolute() or path.exists() else name


class ModelLoader:
    def __init__(self, assistant: Assistant):
        self.assistant = assistant
        self.state = LOADING
        self.error: str | None = None
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)

    def start(self) -> ModelLoader:
        if not self._thread.is_alive() and self.state == LOADING:
            self._thread.start()
        return self

    def _load(self) -> None:
        try:
            self.assistant.runtime  # noqa: B018 - the property loads the model
        except UserError as e:
            self.error = with_hint(str(e))
            self.state = UNAVAILABLE
            logger.error("the chat model is unavailable; the app runs without it.\n%s", self.error)
        else:
            self.state = READY

    def unload(self, reason: str) -> None:
        """Free the model for a training run (after the answers in flight); questions get ``reason`` meanwhile."""
        self.wait()
        if self.state != READY:
            return
        self.assistant.unload(reason)
        self.state, self.error = UNLOADED, reason
        logger.info("%s", reason)

    def reload(self) -> None:
        """Load the model again after ``unload``, in the background as at start."""
        if self.state != UNLOADED:
            return
        self.assistant.reload()
        self.state, self.error = LOADING, None
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._thread.start()

    def wait(self) -> ModelRuntime | None:
        """The runtime once loading has ended; None when the model is unavailable."""
        self.start()
        self._thread.join()
        return self.assistant.runtime if self.state == READY else None

    @property
    def runtime(self) -> ModelRuntime | None:
        return self.assistant.runtime if self.state == READY else None

    def context_length(self) -> int:
        """Prompt and answer together, in tokens: the loaded model's, else CONTEXT_LENGTH."""
        settings = self.assistant.settings
        return getattr(self.runtime, "context_length", None) or settings.context_length

    def describe(self) -> dict:
        """What /health reports about the model."""
        runtime = self.runtime
        plan = getattr(runtime, "decode_plan", None)  # None for a model served over HTTP
        return {"model": public_model_name(runtime.model_name if runtime else self.assistant.settings.chat_model),
                "adapter": runtime.adapter if runtime else None, "model_status": self.state,
                "decode": plan.to_dict() if plan is not None else None}

    def status_markdown(self) -> str:
        if self.state == READY:
            runtime = self.runtime
            return (f"**Model:** {short_model_name(runtime.model_name)} + adapter "
                    f"{runtime.adapter or 'none'} — ready")
        if self.state == UNLOADED:
            return f"**Model:** unloaded: {self.error}"
        if self.state == LOADING:
            return f"**Model:** loading {short_model_name(self.assistant.settings.chat_model)}… (the knowledge tab " \
                   "works meanwhile; questions wait until it is loaded)"
        return ("**The chat model is unavailable**, so chat and verification cannot answer; the knowledge tab "
                f"still works.\n\n```\n{self.error}\n```")
