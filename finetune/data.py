"""Preference pairs in, TRL's prompt/chosen/rejected strings out, with a report of every row left out.

Four input formats, detected by their columns:
- `seed`: the recipe's rows (`instruction`, `input`, `output(CHOSEN)`, `reasoning(CHOSEN)`, `output(REJECTED)`,
  `reasoning(REJECTED)`), turned into the Alpaca prompt and `<think>reasoning</think>answer` + EOS.
- `trl`: TRL's standard format (strings) or conversational format (message lists, rendered with the model's
  chat template).
- `chat`: `instruction`, `input`, and full completions `chosen`/`rejected`.
A pairs store (`finetune/pairs_store.py`, an SQLite file such as `data/pairs.sqlite`) is read as TRL rows.
Everything is converted here, once, so the trainer sees one format.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from errors import DataError
from finetune import recipe
from finetune.prompts import THINK_OPEN, alpaca_prompt, format_completion

FORMATS = ("auto", "seed", "trl", "chat")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

SEED_COLUMNS = recipe.COLUMNS
CHAT_COLUMNS = (recipe.INSTRUCTION, recipe.INPUT, "chosen", "rejected")
TRL_COLUMNS = ("prompt", "chosen", "rejected")
# Fields that may be empty strings (an Alpaca prompt without context is normal); all others must hold text.
MAY_BE_EMPTY = (recipe.INPUT,)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RejectedRow:
    row: int
    reason: str
    file: str | None = None


@dataclass(frozen=True)
class UnreadableLine:
    """A line of a JSONL file that is not a JSON value: it stands in the rows where it was, to be refused."""

    reason: str


@dataclass
class PreparedData:
    pairs: list[PreferencePair]
    rejected: list[RejectedRow] = field(default_factory=list)
    truncated: int = 0
    format: str = "seed"
    prompt_format: str = "alpaca"  # how the chat app must prompt a model trained on these pairs: alpaca | chat

    def report(self) -> dict[str, Any]:
        rejected = [{k: v for k, v in asdict(r).items() if v is not None} for r in self.rejected]
        return {"ok": len(self.pairs), "rejected": rejected, "truncated": self.truncated,
                "format": self.format, "prompt_format": self.prompt_format}

    def summary(self) -> str:
        lines = [f"{len(self.pairs)} pairs ready ({self.format} format), {self.truncated} truncated, "
                 f"{len(self.rejected)} rows left out"]
        for r in self.rejected:
            where = f"{r.file} row {r.row}" if r.file else f"row {r.row}"
            lines.append(f"  {where}: {r.reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------- loading

def load_rows(source: str | Path, split: str = "train") -> list[tuple[str | None, dict | UnreadableLine]]:
    """Rows of a local file, a folder of files, or a hub dataset, each with the file it came from."""
    path = Path(source)
    from finetune.pairs_store import PairsStore, is_pairs_store

    if is_pairs_store(path):
        if not path.is_file():
            raise DataError(f"{path} does not exist; the app creates the pairs store when it records a pair")
        # The pairs' prompt format travels with them: a model trained on chat-template prompts is prompted so.
        return [(None, {**pair.to_trl(), "prompt_format": pair.chosen.prompt_format})
                for pair in reversed(PairsStore(path).pairs())]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no {'/'.join(DATA_SUFFIXES)} files; point DATA at a file or a "
                            "folder of them")
        return [(f.name, row) for f in files for row in _read_file(f)]
    if path.suffix.lower() in DATA_SUFFIXES:
        if not path.exists():
            raise DataError(f"{path} does not exist; check the path")
        return [(None, row) for row in _read_file(path)]
    if path.exists():
        raise DataError(f"{path} is not a {'/'.join(DATA_SUFFIXES)} file")
    return [(None, row) for row in _load_hub_dataset(str(source), split)]


def read_json_rows(path: str | Path, what: str = "rows") -> list:
    """The rows of a JSON list file (.json) or a JSONL file (anything else); a broken line stops with its number.

    For small files a person writes by hand (held-out prompts, questions), where a bad line is a typo to fix,
    not a row to skip as ``prepare`` does with training data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a JSON or JSONL file of {what}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix it") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold a JSON list of {what}")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not valid JSON ({e.msg}); fix or remove it") from None
    return rows


def _read_file(path: Path) -> list[dict | UnreadableLine]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else data
            if not isinstance(data, list):
                raise DataError(f"{path} must hold a JSON list of rows (or one list under a key)")
            return data
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read as {suffix[1:].upper()}: {e}") from None


def _read_jsonl(path: Path) -> list[dict | UnreadableLine]:
    """Each line's value; a line that is not JSON (or not UTF-8) is left out by name, and the rest go on."""
    rows: list[dict | UnreadableLine] = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            rows.append(UnreadableLine(f"{path.name} line {n} is not valid UTF-8 ({e.reason}); fix or remove it"))
        except json.JSONDecodeError as e:
            rows.append(UnreadableLine(f"{path.name} line {n} is not valid JSON ({e.msg}); fix or remove it"))
        except RecursionError:
            rows.append(UnreadableLine(f"{path.name} line {n} is JSON nested too deeply to read; flatten it"))
    if rows and all(isinstance(row, UnreadableLine) for row in rows):
        raise DataError(f"no line of {path} can be read: {rows[0].reason}")
    return rows


def _load_hub_dataset(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:  # datasets raises many kinds: offline, unknown name, missing split
        raise DataError(f"cannot load {name!r}: it is not a local file or folder, and loading it as a hub "
                        f"dataset failed ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- formats

def detect_format(columns: Iterable[str]) -> str:
    cols = set(columns)
    if {recipe.CHOSEN_OUTPUT, recipe.REJECTED_OUTPUT} <= cols:
        return "seed"
    if {recipe.INSTRUCTION, "chosen", "rejected"} <= cols:
        return "chat"
    if {"chosen", "rejected"} <= cols:
        return "trl"
    raise DataError(
        f"the data's columns {sorted(cols)} match no known format. Expected seed {list(SEED_COLUMNS)}, "
        f"chat {list(CHAT_COLUMNS)} or trl {list(TRL_COLUMNS)}; rename columns with --columns "
        "prompt=COL,chosen=COL,rejected=COL")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_text(row: dict, name: str) -> str | None:
    """The reason a field is unusable, or None."""
    if name not in row:
        return f"missing column {name!r}"
    value = row[name]
    if value is None:
        return f"{name!r} is null"
    if not isinstance(value, str):
        return f"{name!r} is {type(value).__name__}, expected text"
    if not value.strip() and name not in MAY_BE_EMPTY:
        return f"{name!r} is empty"
    return None


def _check_messages(row: dict, name: str) -> str | None:
    if name not in row:
        return f"missing column {name!r}"
    value = row[name]
    if value is None:
        return f"{name!r} is null"
    if not _is_messages(value) or not value:
        return f"{name!r} is {type(value).__name__}, expected a list of {{role, content}} messages"
    if not any(isinstance(m["content"], str) and m["content"].strip() for m in value):
        return f"{name!r} has no message text"
    return None


def _with_eos(completion: str, eos: str) -> str:
    return completion if completion.endswith(eos) else completion + eos


def _convert_row(row: dict, fmt: str, tokenizer) -> tuple[PreferencePair | None, str | None, bool]:
    """(pair, reason it was refused, whether the prompt came from the chat template)."""
    eos = tokenizer.eos_token
    if fmt == "seed":
        for name in SEED_COLUMNS:
            if reason := _check_text(row, name):
                return None, reason, False
        prompt = alpaca_prompt(row[recipe.INSTRUCTION], row[recipe.INPUT])
        chosen = format_completion(row[recipe.CHOSEN_REASONING], row[recipe.CHOSEN_OUTPUT]) + eos
        rejected = format_completion(row[recipe.REJECTED_REASONING], row[recipe.REJECTED_OUTPUT]) + eos
        return PreferencePair(prompt, chosen, rejected), None, False
    if fmt == "chat":
        for name in CHAT_COLUMNS:
            if reason := _check_text(row, name):
                return None, reason, False
        prompt = alpaca_prompt(row[recipe.INSTRUCTION], row[recipe.INPUT])
        return PreferencePair(prompt, _with_eos(row["chosen"], eos), _with_eos(row["rejected"], eos)), None, False
    # trl: standard strings, or conversational message lists
    if _is_messages(row.get("chosen")) or _is_messages(row.get("prompt")):
        return _convert_conversational(row, tokenizer)
    for name in TRL_COLUMNS:
        if reason := _check_text(row, name):
            return None, reason, False
    from_template = row.get("prompt_format") == "chat"  # set by the pairs store
    return (PreferencePair(row["prompt"], _with_eos(row["chosen"], eos), _with_eos(row["rejected"], eos)), None,
            from_template)


def _convert_conversational(row: dict, tokenizer) -> tuple[PreferencePair | None, str | None, bool]:
    if "prompt" not in row:  # implicit prompt: the shared leading messages of chosen and rejected
        from trl.data_utils import extract_prompt

        for name in ("chosen", "rejected"):
            if reason := _check_messages(row, name):
                return None, reason, True
        row = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
    for name in TRL_COLUMNS:
        if reason := _check_messages(row, name):
            return None, reason, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("conversational pairs need a chat template, and this model's tokenizer has none; "
                        "use a chat model or give the pairs as prompt/chosen/rejected strings")
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)

    def completion(messages: list[dict]) -> str:
        # The assistant text itself, not the template's rendering of it: R1-style templates drop the
        # reasoning from assistant turns, which is exactly what we train on.
        text = "".join(m["content"] for m in messages if m["role"] == "assistant")
        if prompt.rstrip().endswith(THINK_OPEN) and text.lstrip().startswith(THINK_OPEN):
            text = text.lstrip()[len(THINK_OPEN):].lstrip("\n")
        return _with_eos(text, tokenizer.eos_token)

    return PreferencePair(prompt, completion(row["chosen"]), completion(row["rejected"])), None, True


# ---------------------------------------------------------------- lengths

def _token_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def _prompt_tokens(tokenizer, prompt: str, spans: list) -> int:
    # TRL puts a BOS token before the prompt when the tokenizer has one and the prompt lacks it.
    bos = tokenizer.bos_token
    return len(spans) + (1 if bos is not None and not prompt.startswith(bos) else 0)


def _fit(pair: PreferencePair, tokenizer, max_length: int, max_prompt_length: int,
         on_overlength: str) -> tuple[PreferencePair | None, str | None, bool]:
    """Apply the recipe's caps: when prompt + completion exceeds max_length, the prompt keeps its last
    max_prompt_length tokens and the completion its first (max_length - prompt) tokens."""
    p_spans = _token_spans(tokenizer, pair.prompt)
    c_spans = _token_spans(tokenizer, pair.chosen)
    r_spans = _token_spans(tokenizer, pair.rejected)
    n_prompt = _prompt_tokens(tokenizer, pair.prompt, p_spans)
    longest = max(len(c_spans), len(r_spans))
    if n_prompt + longest <= max_length:
        return pair, None, False
    if on_overlength == "drop":
        return None, (f"{n_prompt} prompt + {longest} completion tokens exceed max_length {max_length} "
                      f"(on_overlength=drop)"), False
    prompt = pair.prompt
    if n_prompt > max_prompt_length:
        keep = max_prompt_length - (n_prompt - len(p_spans))
        prompt = pair.prompt[p_spans[len(p_spans) - keep][0]:] if keep > 0 else ""
        n_prompt = max_prompt_length
    budget = max_length - n_prompt

    def cut(text: str, spans: list) -> str:
        return text if len(spans) <= budget else text[:spans[budget - 1][1]]

    return PreferencePair(prompt, cut(pair.chosen, c_spans), cut(pair.rejected, r_spans)), None, True


# ---------------------------------------------------------------- the whole pass

def prepare_pairs(
    rows: list[tuple[str | None, dict]],
    tokenizer,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    max_length: int = 4096,
    max_prompt_length: int = 2048,
    on_overlength: str = "truncate",
) -> PreparedData:
    """Convert and validate rows; good rows go on, each bad row is named with its reason."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if on_overlength not in ("truncate", "drop"):
        raise DataError(f"on_overlength must be 'truncate' or 'drop', not {on_overlength!r}")
    if not rows:
        raise DataError("the data holds no rows")
    if columns:
        # target <- source: rename source columns to the names the formats expect
        inverse = {src: dst for dst, src in columns.items()}
        rows = [(f, {inverse.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row)
                for f, row in rows]
    if fmt == "auto":
        seen: set[str] = set()
        for _, row in rows:
            if isinstance(row, dict):
                seen.update(row)
        fmt = detect_format(seen)

    prepared = PreparedData(pairs=[], format=fmt)
    first_seen: dict[PreferencePair, int] = {}
    used_chat_template = False
    for index, (file, row) in enumerate(rows):
        def refuse(reason: str) -> None:
            prepared.rejected.append(RejectedRow(row=index, reason=reason, file=file))  # noqa: B023

        if isinstance(row, UnreadableLine):
            refuse(row.reason)
            continue
        if not isinstance(row, dict):
            refuse(f"row is {type(row).__name__}, expected an object with named fields")
            continue
        pair, reason, from_template = _convert_row(row, fmt, tokenizer)
        used_chat_template |= from_template
        if pair is None:
            refuse(reason)
            continue
        if pair.chosen == pair.rejected:
            refuse("chosen equals rejected")
            continue
        if pair in first_seen:
            refuse(f"duplicate of row {first_seen[pair]}")
            continue
        first_seen[pair] = index
        fitted, reason, truncated = _fit(pair, tokenizer, max_length, max_prompt_length, on_overlength)
        if fitted is None:
            refuse(reason)
            continue
        prepared.truncated += truncated
        prepared.pairs.append(fitted)
    prepared.prompt_format = "chat" if used_chat_template else "alpaca"
    return prepared


def prepare_data(source: str | Path, tokenizer, fmt: str = "auto", columns: dict[str, str] | None = None,
                 max_length: int = 4096, max_prompt_length: int = 2048, on_overlength: str = "truncate",
                 split: str = "train") -> PreparedData:
    return prepare_pairs(load_rows(source, split), tokenizer, fmt, columns, max_length, max_prompt_length,
                         on_overlength)


def write_jsonl(pairs: Iterable[PreferencePair], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=question,chosen=good` -> {"prompt": "question", "chosen": "good"}."""
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        target, sep, source = item.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise DataError(f"bad column mapping {item!r}; write TARGET=SOURCE, e.g. prompt=question")
        mapping[target.strip()] = source.strip()
    return mapping
