"""Where diagnostics go: every module logs to ``logging.getLogger(__name__)``; each entry point (the app and the
three command lines) calls ``configure()`` once, which sends them to stderr at ``LOG_LEVEL`` (default INFO).

The log lines a user of this project should not have to read are silenced here too: each entry of ``QUIET``
names a third-party logger and why its warnings say nothing here. The loggers are set before the libraries load
(a logger is looked up by name), so ``configure()`` runs first in every entry point.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(levelname)s %(name)s: %(message)s"
OURS = ("knowledge", "finetune", "engine", "assistant", "settings", "compat")

QUIET = {
    # On CPUs with AVX512-BF16, bitsandbytes looks for an optional kernel on the Hugging Face hub at import and
    # warns at every start when the `kernels` package is absent; its own CPU path answers without it.
    "bitsandbytes.backends.cpu.ops": "an optional hub kernel for 4-bit on CPU",
}


def configure() -> None:
    """Our diagnostics to stderr at LOG_LEVEL (DEBUG, INFO, WARNING, ERROR; default INFO); other libraries'
    at WARNING (their INFO lines, one per HTTP request and model file, say nothing to a user here)."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(stream=sys.stderr, format=FORMAT, level=logging.WARNING)
    for name in OURS:
        logging.getLogger(name).setLevel(level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO")
    quiet_third_party()


def quiet_third_party() -> None:
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
