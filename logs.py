"""Log lines a user of this project should not have to read, silenced in one place for every command.

Each entry names a third-party logger and why its warnings say nothing here. The loggers are set before the
libraries load (a logger is looked up by name), so ``quiet_third_party()`` runs first in every entry point.
"""

from __future__ import annotations

import logging

QUIET = {
    # On CPUs with AVX512-BF16, bitsandbytes looks for an optional kernel on the Hugging Face hub at import and
    # warns at every start when the `kernels` package is absent; its own CPU path answers without it.
    "bitsandbytes.backends.cpu.ops": "an optional hub kernel for 4-bit on CPU",
}


def quiet_third_party() -> None:
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
