"""Saved conversations: each person's chats, kept beside the pairs store so that a reload or a restart loses none.

One SQLite file (``Settings.conversations_db``, WAL, one transaction per write). A conversation is a row: its
id, its owner (the login; None with logins off), a title (its first question until renamed), when it was started
and last changed, and its turns as JSON (``ChatTurn.to_dict()``). Every read and write names the
owner, so one person never sees or changes another's conversations.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from assistant.turns import ChatTurn
from errors import UserError

BUSY_TIMEOUT_S = 30.0
TITLE_CHARS = 80

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user TEXT,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    turns TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user, updated_at);
"""


class ConversationError(UserError):
    """A conversation cannot be read or changed (gone, another person's, a broken file); the message says why."""


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated_at: float
    questions: int


def new_conversation_id() -> str:
    return uuid.uuid4().hex


def default_title(turns: list[ChatTurn]) -> str:
    question = " ".join(turns[0].question.split()) if turns else "New chat"
    return question if len(question) <= TITLE_CHARS else question[:TITLE_CHARS - 1] + "…"


class ConversationStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect()
            try:
                db.executescript(_SCHEMA)
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise ConversationError(f"{self.path} is not a conversations store ({e}); move it aside") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _run(self, query: str, args: tuple = ()) -> sqlite3.Cursor:
        db = self._connect()
        try:
            return db.execute(query, args)
        finally:
            db.close()

    def save(self, conversation_id: str, user: str | None, turns: list[ChatTurn]) -> None:
        """Write the conversation's turns (a new conversation is titled by its first question)."""
        now = time.time()
        self._run("INSERT INTO conversations (id, user, title, created_at, updated_at, turns) VALUES (?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT (id) DO UPDATE SET turns = excluded.turns, updated_at = excluded.updated_at "
                  "WHERE conversations.user IS excluded.user",
                  (conversation_id, user, default_title(turns), now, now, json.dumps([turn.to_dict() for turn in turns], ensure_ascii=False)))

    def load(self, conversation_id: str, user: str | None) -> list[ChatTurn]:
        db = self._connect()
        try:
            row = db.execute("SELECT turns FROM conversations WHERE id = ? AND user IS ?",
                             (conversation_id, user)).fetchone()
        finally:
            db.close()
        if row is None:
            raise ConversationError("that conversation is not there any more (deleted, perhaps in another tab)")
        return [ChatTurn.from_dict(turn) for turn in json.loads(row[0])]

    def list(self, user: str | None) -> list[ConversationSummary]:
        """The person's conversations, the last changed first."""
        db = self._connect()
        try:
            rows = db.execute("SELECT id, title, updated_at, json_array_length(turns) FROM conversations "
                              "WHERE user IS ? ORDER BY updated_at DESC", (user,)).fetchall()
        finally:
            db.close()
        return [ConversationSummary(*row) for row in rows]

    def rename(self, conversation_id: str, user: str | None, title: str) -> None:
        title = " ".join(title.split())[:TITLE_CHARS]
        if not title:
            raise ConversationError("write the new name first")
        if not self._run("UPDATE conversations SET title = ? WHERE id = ? AND user IS ?",
                         (title, conversation_id, user)).rowcount:
            raise ConversationError("that conversation is not there any more")

    def delete(self, conversation_id: str, user: str | None) -> None:
        if not self._run("DELETE FROM conversations WHERE id = ? AND user IS ?", (conversation_id, user)).rowcount:
            raise ConversationError("that conversation is not there any more")
