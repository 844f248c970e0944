"""Text from documents shown as what it is, inside the page's Markdown: HTML escaped (so a ``>`` at a line's
start is an entity, not a quote), and a ``#`` that starts a line shown as written, so a passage's own heading
never renders larger than the app's title."""

from __future__ import annotations

import html
import re

_HEADING = re.compile(r"^(\s*)#", re.MULTILINE)


def passage_markdown(text: str) -> str:
    return _HEADING.sub(lambda m: f"{m.group(1)}\\#", html.escape(text, quote=False))
