"""The preference-pairs store: answers people judged, and the pairs made from them, in one SQLite file.

This is the hand-off between the app (which records answers, votes and pairs as people use it) and training
(``python -m finetune prepare|train data=data/pairs.sqlite`` reads it). Both sides import this module; the
file is the only thing they share.

- An *answer* is one completion of one prompt: the prompt exactly as the model saw it (question,
  conversation and passages in the one prompt format), its Alpaca parts (instruction and input, for the
  recipe's columns), the reasoning and the answer apart, the base model and adapter that wrote it (none when
  a person wrote it), who asked, and when.
- A *pair* is a chosen and a rejected answer to the same prompt.
- A *vote* is a thumbs up or down on an answer. A down vote with no better answer yet waits unpaired; when a
  better answer to the same prompt arrives (an up vote, a pick, an edit), the two become a pair.
- Nothing contradicts itself: a pair is stored once; a later opposite choice on the same two answers (a pick
  after a vote, a vote changed from up to down) replaces the earlier pair. Every write returns a ``Change``
  that says what it stored and replaced, and ``undo`` takes it back whole.

SQLite in WAL mode, one transaction per write: a crash loses at most the write in progress, and the app and
a training job may read and write at once (a writer waits up to ``BUSY_TIMEOUT_S`` for the other).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path, PurePosixPath

from errors import DataError
from finetune.prompts import THINK_CLOSE
from finetune.recipe import recipe_row

SCHEMA_VERSION = 1  # PRAGMA user_version: a later layout migrates or refuses by it
BUSY_TIMEOUT_S = 30.0
SUFFIXES = (".sqlite", ".sqlite3", ".db")
ORIGINS = ("vote", "pick", "edit", "generated")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    instruction TEXT NOT NULL,
    input TEXT NOT NULL,
    prompt_format TEXT NOT NULL,
    reasoning TEXT NOT NULL,
    answer TEXT NOT NULL,
    model TEXT,
    adapter TEXT,
    question TEXT NOT NULL,
    thinking_closed INTEGER NOT NULL,
    user TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_prompt ON answers (prompt);
CREATE TABLE IF NOT EXISTS votes (
    answer_id INTEGER NOT NULL REFERENCES answers (id) ON DELETE CASCADE,
    good INTEGER NOT NULL,
    user TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    chosen_id INTEGER NOT NULL REFERENCES answers (id),
    rejected_id INTEGER NOT NULL REFERENCES answers (id),
    origin TEXT NOT NULL,
    user TEXT,
    created_at REAL NOT NULL,
    UNIQUE (chosen_id, rejected_id)
);
"""


class PairsStoreError(DataError):
    """The store cannot do what was asked (no such answer, two different prompts, ...); the message says why."""


@dataclass(frozen=True)
class PairRecord:
    """A row of the pairs table: what ``undo`` puts back when it takes back the write that replaced it."""

    id: int
    chosen_id: int
    rejected_id: int
    origin: str
    user: str | None
    created_at: float


@dataclass(frozen=True)
class VoteRecord:
    rowid: int
    answer_id: int
    good: bool
    user: str | None
    created_at: float


@dataclass(frozen=True)
class Change:
    """What one write did: the vote it recorded, the pairs it made, and what it replaced (an earlier vote of the
    same person on the same answer; pairs that said the opposite). ``PairsStore.undo`` reverses it."""

    vote: int | None = None  # the new vote's rowid
    made: tuple[int, ...] = ()
    replaced_pairs: tuple[PairRecord, ...] = ()
    replaced_votes: tuple[VoteRecord, ...] = ()

    @property
    def pair(self) -> int | None:
        """The pair made, for writes that make at most one (a pick, an edit)."""
        return self.made[0] if self.made else None


@dataclass(frozen=True)
class Completion:
    """One answer to a prompt, as the model (or a person) wrote it."""

    prompt: str  # exactly as the model saw it, ending where the model starts writing
    reasoning: str
    answer: str
    instruction: str = ""  # the prompt's Alpaca parts, for the recipe's columns
    input: str = ""
    prompt_format: str = "alpaca"
    model: str | None = None  # None: written by a person
    adapter: str | None = None
    question: str = ""  # the user's last message, as asked: what a person reads when browsing pairs
    thinking_closed: bool = True  # False: the model stopped inside its reasoning, so there is no answer

    @property
    def text(self) -> str:
        """The completion as training sees it: reasoning, then the answer (the prompt opened <think>)."""
        return f"{self.reasoning}{THINK_CLOSE}{self.answer}" if self.thinking_closed else self.reasoning


@dataclass(frozen=True)
class StoredPair:
    id: int
    chosen: Completion
    rejected: Completion
    origin: str  # vote, pick, edit or generated
    user: str | None
    created_at: float

    def to_trl(self) -> dict:
        """TRL's standard preference row."""
        return {"prompt": self.chosen.prompt, "chosen": self.chosen.text, "rejected": self.rejected.text}

    def to_recipe(self) -> dict:
        """The recipe's columns (its seed data's schema)."""
        return recipe_row(self.chosen.instruction, self.chosen.input, self.chosen.reasoning, self.chosen.answer,
                          self.rejected.reasoning, self.rejected.answer)

    def to_dict(self) -> dict:
        return {"id": self.id, "chosen": asdict(self.chosen), "rejected": asdict(self.rejected),
                "origin": self.origin, "user": self.user,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at))}


# A Completion's fields are the answers table's columns of the same names.
ANSWER_COLUMNS = tuple(f.name for f in fields(Completion))


class PairsStore:
    """Answers, votes and pairs in the SQLite file at ``path`` (created with its folder when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect()
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise PairsStoreError(f"{self.path} has pairs store version {version}, this code reads "
                                          f"version {SCHEMA_VERSION}; upgrade think-rag or name another file")
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise PairsStoreError(f"{self.path} is not a pairs store ({e}); move it aside or name another file"
                                  ) from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=FULL")  # a pair acknowledged is a pair on disk
        db.row_factory = sqlite3.Row  # rows are read by column name
        return db

    def _write(self, work):
        """Run ``work(db)`` in one transaction; everything or nothing of it is stored."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        finally:
            db.close()

    # -- writing --------------------------------------------------------------------------------------

    def add_answer(self, completion: Completion, user: str | None = None) -> int:
        """Record one answer; returns its id."""
        def work(db):
            return db.execute(
                "INSERT INTO answers (prompt, instruction, input, prompt_format, reasoning, answer, model, adapter,"
                " question, thinking_closed, user, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (completion.prompt, completion.instruction, completion.input, completion.prompt_format,
                 completion.reasoning, completion.answer, completion.model, completion.adapter,
                 completion.question, int(completion.thinking_closed), user, time.time())).lastrowid
        return self._write(work)

    def add_pair(self, chosen_id: int, rejected_id: int, origin: str, user: str | None = None) -> Change:
        """Record that ``chosen_id`` is the better answer to the prompt both answered. Nothing is made when the
        pair is stored already; a stored pair saying the opposite is replaced."""
        if origin not in ORIGINS:
            raise PairsStoreError(f"origin {origin!r}: use one of {', '.join(ORIGINS)}")

        def work(db):
            made, replaced = self._insert_pair(db, chosen_id, rejected_id, origin, user)
            return Change(made=(made,) if made else (), replaced_pairs=replaced)
        return self._write(work)

    def vote(self, answer_id: int, good: bool, user: str | None = None) -> Change:
        """A thumbs up or down on an answer; the change says which pairs it completed (often none).

        A down vote pairs with every answer to the same prompt already voted up; an up vote pairs with every
        answer to that prompt voted down and not yet paired with a better one. The same person's earlier vote on
        this answer is replaced, with the pairs that vote made.
        """
        def work(db):
            prompt = self._prompt_of(db, answer_id)
            earlier = [VoteRecord(r["vote_id"], r["answer_id"], bool(r["good"]), r["user"], r["created_at"])
                       for r in db.execute("SELECT rowid AS vote_id, answer_id, good, user, created_at FROM votes "
                                           "WHERE answer_id = ? AND user IS ?", (answer_id, user))]
            replaced = []
            if earlier:
                db.execute("DELETE FROM votes WHERE answer_id = ? AND user IS ?", (answer_id, user))
            if earlier and earlier[-1].good != good:  # the pairs the earlier vote made now say the opposite
                side = "chosen_id" if earlier[-1].good else "rejected_id"
                replaced = self._pair_rows(db, f"origin = 'vote' AND {side} = ?", (answer_id,))
                db.executemany("DELETE FROM pairs WHERE id = ?", [(r.id,) for r in replaced])
            vote = db.execute("INSERT INTO votes (answer_id, good, user, created_at) VALUES (?, ?, ?, ?)",
                              (answer_id, int(good), user, time.time())).lastrowid
            others = [row[0] for row in db.execute(
                "SELECT DISTINCT a.id FROM answers a JOIN votes v ON v.answer_id = a.id "
                "WHERE a.prompt = ? AND a.id != ? AND v.good = ?", (prompt, answer_id, int(not good)))]
            made = []
            for other in others:
                chosen, rejected = (answer_id, other) if good else (other, answer_id)
                if good and db.execute("SELECT 1 FROM pairs WHERE rejected_id = ?", (rejected,)).fetchone():
                    continue  # that down vote already has its better answer
                pair, opposite = self._insert_pair(db, chosen, rejected, "vote", user)
                made += [pair] if pair else []
                replaced += opposite
            return Change(vote, tuple(made), tuple(replaced), tuple(earlier))
        return self._write(work)

    def undo(self, change: Change) -> None:
        """Take back what ``change`` wrote and put back what it replaced."""
        def work(db):
            db.executemany("DELETE FROM pairs WHERE id = ?", [(i,) for i in change.made])
            if change.vote is not None:
                db.execute("DELETE FROM votes WHERE rowid = ?", (change.vote,))
            db.executemany("INSERT OR IGNORE INTO votes (rowid, answer_id, good, user, created_at) "
                           "VALUES (?, ?, ?, ?, ?)", [astuple(v) for v in change.replaced_votes])
            db.executemany("INSERT OR IGNORE INTO pairs (id, chosen_id, rejected_id, origin, user, created_at) "
                           "VALUES (?, ?, ?, ?, ?, ?)", [astuple(p) for p in change.replaced_pairs])
        self._write(work)

    def _prompt_of(self, db, answer_id: int) -> str:
        row = db.execute("SELECT prompt FROM answers WHERE id = ?", (answer_id,)).fetchone()
        if row is None:
            raise PairsStoreError(f"no answer {answer_id} in {self.path}")
        return row[0]

    @staticmethod
    def _pair_rows(db, where: str, args: tuple) -> list[PairRecord]:
        return [PairRecord(**{name: row[name] for name in row.keys()}) for row in db.execute(
            f"SELECT id, chosen_id, rejected_id, origin, user, created_at FROM pairs WHERE {where}", args)]

    def _insert_pair(self, db, chosen_id: int, rejected_id: int, origin: str, user: str | None
                     ) -> tuple[int | None, tuple[PairRecord, ...]]:
        """(the new pair's id, or None when it is stored already; the opposite pair it replaced, if any)."""
        if chosen_id == rejected_id:
            raise PairsStoreError("an answer cannot be preferred to itself")
        if self._prompt_of(db, chosen_id) != self._prompt_of(db, rejected_id):
            raise PairsStoreError(f"answers {chosen_id} and {rejected_id} answer different prompts; a pair needs "
                                  "two answers to the same prompt")
        opposite = tuple(self._pair_rows(db, "chosen_id = ? AND rejected_id = ?", (rejected_id, chosen_id)))
        db.executemany("DELETE FROM pairs WHERE id = ?", [(p.id,) for p in opposite])
        cursor = db.execute("INSERT OR IGNORE INTO pairs (chosen_id, rejected_id, origin, user, created_at) "
                            "VALUES (?, ?, ?, ?, ?)", (chosen_id, rejected_id, origin, user, time.time()))
        return (cursor.lastrowid if cursor.rowcount else None), opposite

    def delete_pair(self, pair_id: int) -> None:
        """Drop a bad pair (its answers stay, so a later vote may pair them again)."""
        def work(db):
            if not db.execute("DELETE FROM pairs WHERE id = ?", (pair_id,)).rowcount:
                raise PairsStoreError(f"no pair {pair_id} in {self.path}")
        self._write(work)

    # -- reading --------------------------------------------------------------------------------------

    def _read(self, query: str, args: tuple = ()) -> list[sqlite3.Row]:
        db = self._connect()
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()

    def count(self) -> int:
        return self._read("SELECT COUNT(*) FROM pairs")[0][0]

    def pairs(self, limit: int | None = None, offset: int = 0) -> list[StoredPair]:
        """Pairs, newest first."""
        return self._pairs("ORDER BY p.id DESC LIMIT ? OFFSET ?", (-1 if limit is None else limit, offset))

    def pair(self, pair_id: int) -> StoredPair:
        found = self._pairs("WHERE p.id = ?", (pair_id,))
        if not found:
            raise PairsStoreError(f"no pair {pair_id} in {self.path} (deleted meanwhile?)")
        return found[0]

    def _pairs(self, tail: str, args: tuple) -> list[StoredPair]:
        answers = ", ".join(f"{side}.{name} AS {side}_{name}" for side in "cr" for name in ANSWER_COLUMNS)
        query = (f"SELECT p.id, p.origin, p.user, p.created_at, {answers} "
                 f"FROM pairs p JOIN answers c ON c.id = p.chosen_id JOIN answers r ON r.id = p.rejected_id {tail}")
        return [StoredPair(row["id"], _completion(row, "c"), _completion(row, "r"), row["origin"], row["user"],
                           row["created_at"]) for row in self._read(query, args)]

    def questions_with_pairs(self, origin: str, model: str, adapter: str | None) -> set[str]:
        """The questions that already have a pair of ``origin`` answered by ``model`` with ``adapter`` (what a
        resumed `pairs generate` skips; a round with a newly trained adapter makes pairs of its own)."""
        return {row[0] for row in self._read(
            "SELECT DISTINCT a.question FROM pairs p JOIN answers a ON a.id = p.chosen_id "
            "WHERE p.origin = ? AND a.model = ? AND a.adapter IS ?", (origin, model, adapter))}

    def unpaired_down_votes(self) -> int:
        """Answers voted down that still wait for a better answer to their prompt."""
        return self._read("SELECT COUNT(DISTINCT v.answer_id) FROM votes v WHERE v.good = 0 AND NOT EXISTS "
                          "(SELECT 1 FROM pairs p WHERE p.rejected_id = v.answer_id)")[0][0]


def _completion(row: sqlite3.Row, side: str) -> Completion:
    """The completion whose answers-table columns ``row`` holds as ``{side}_{name}``."""
    values = {name: row[f"{side}_{name}"] for name in ANSWER_COLUMNS}
    return Completion(**{**values, "thinking_closed": bool(values["thinking_closed"])})


def is_pairs_store(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


_SOURCE = re.compile(r'(<passage number="\d+" source=")([^"]*)(")')


def source_names(text: str) -> str:
    """``text`` with each passage's source (a path on the server) named by its file name alone."""
    return _SOURCE.sub(lambda m: f"{m.group(1)}{PurePosixPath(m.group(2)).name}{m.group(3)}", text)


def export_rows(store: PairsStore, layout: str, source_paths: bool = False) -> list[dict]:
    """Every pair as rows of ``layout``: "trl" (prompt/chosen/rejected) or "recipe" (the seed columns). The
    passages' sources are file names, not the server's paths, unless ``source_paths``."""
    if layout not in ("trl", "recipe"):
        raise PairsStoreError(f"export layout {layout!r}: use trl or recipe")
    rows = [pair.to_trl() if layout == "trl" else pair.to_recipe() for pair in reversed(store.pairs())]
    return rows if source_paths else [{k: source_names(v) for k, v in row.items()} for row in rows]


def write_export(store: PairsStore, layout: str, out: str | Path, source_paths: bool = False) -> int:
    """Write the export as JSONL; returns how many pairs."""
    rows = export_rows(store, layout, source_paths)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
