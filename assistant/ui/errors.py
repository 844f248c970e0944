"""What the page refuses, and why: a person's mistake is shown to them and logged as one line, no traceback.

Gradio prints the traceback of every error an event raises unless told not to; for a refusal (no pairs to train
on, a conversation deleted in another tab) that buried the server log in tracebacks of nothing wrong.
"""

from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger(__name__)


class Refusal(gr.Error):
    def __init__(self, message: str):
        super().__init__(message, print_exception=False)
        log.warning("refused: %s", message)
