"""The question in the store's other language, written by the chat model, so a search finds passages in both.

Japanese and English passages share no words, so the lexical leg cannot match an English question to a
Japanese passage, and an English-only encoder cannot either. With ``QUERY_TRANSLATION=on`` the chat model
translates each question (English to Japanese, Japanese to English) before the search, and the search counts
the translation as it counts the question (``knowledge.query.Query.translations``). It costs one short
generation per question, thinking included, so it is off by default; a multilingual encoder (the default
``EMBEDDING_MODEL``) already bridges the languages in the vector leg.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from assistant.prompting import build_prompt, neutralize
from engine.runtime import GenerationParams
from knowledge.query import Query
from knowledge.terms import has_japanese

logger = logging.getLogger(__name__)

# Enough for an R1 model's short thought and a one-line translation; a translation cut off is not used.
TRANSLATION_TOKENS = 512

Generate = Callable[[str, GenerationParams], Iterator[tuple[str, str, bool]]]


def target_language(text: str) -> str:
    """The language to translate ``text`` into: English for a question with Japanese script, else Japanese."""
    return "English" if has_japanese(text) else "Japanese"


def translation_prompt(question: str, prompt_format: str, render_chat=None) -> str:
    instruction = (f"Translate the question in the input into {target_language(question)}. Do not answer it. "
                   "Write only the translation, on one line.")
    return build_prompt(instruction, neutralize(question), prompt_format, render_chat)


def translated(query: Query, generate: Generate, prompt_format: str, render_chat=None) -> Query:
    """``query`` with the chat model's translation of its question added; unchanged where the model wrote none
    (its thinking ran past ``TRANSLATION_TOKENS``, or it wrote an empty line or the question itself)."""
    if not query.text.strip():
        return query
    prompt = translation_prompt(query.text, prompt_format, render_chat)
    *_, (_, answer, done) = [("", "", False),
                             *generate(prompt, GenerationParams(max_new_tokens=TRANSLATION_TOKENS, temperature=0.0))]
    line = next((s.strip() for s in answer.splitlines() if s.strip()), "")
    if not done or not line or line == query.text.strip():
        logger.info("query translation: none used (%s)", "thinking did not end" if not done else "no translation")
        return query
    logger.info("query translation: %r -> %r", query.text, line)
    return Query(query.text, query.earlier, (*query.translations, line))
