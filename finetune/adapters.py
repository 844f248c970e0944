"""The adapter folder: what training hands to the app. Training writes it; the app lists and loads from it.

One adapter is one folder in ADAPTER_DIR (or ADAPTER_DIR itself) holding PEFT's ``adapter_config.json`` and
weights. ``python -m finetune train`` also writes ``train_config.yaml`` when it starts and ``training_info.json``
(``TrainingInfo``: base model, prompt format, steps, data report) as its last file, after the weights: a folder with the first
and not yet the second is a run still going, so it is listed as incomplete and never loaded. An optional
``eval.json`` (``python -m assistant eval ... --json > ADAPTER/eval.json``) gives the list its eval summary. A
run started from the app also holds ``run.json`` (``finetune/runs.py``), whose status says why a folder
without ``training_info.json`` is not an adapter yet: running, cancelled, failed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from errors import UserError
from finetune import runs
from finetune.evaluation import BASE_NAME
from finetune.output_dir import read_json, write_json

INFO_NAME = "training_info.json"
CONFIG_NAME = "train_config.yaml"
EVAL_NAME = "eval.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
# What a downloaded adapter holds: what loading it needs and what says how it was made (no checkpoints, no data).
ARCHIVED = (ADAPTER_CONFIG, *WEIGHT_NAMES, INFO_NAME, CONFIG_NAME, EVAL_NAME, "eval.png", "training_log.jsonl",
            "chat_template.jinja", "tokenizer_config.json")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterFolderError(UserError):
    """A rename, delete or download of an adapter folder cannot be done; the message says why."""


@dataclass(frozen=True)
class TrainingInfo:
    """``training_info.json``: how the adapter was made. ``finetune train`` writes it last, after the weights;
    the app reads it to list the adapter and to prompt it as it was trained."""

    base_model: str | None = None
    backend: str | None = None  # hf or unsloth
    prompt_format: str | None = None  # how the chat app must prompt the adapter: alpaca | chat
    global_step: int | None = None
    processes: int | None = None  # that trained together
    data_report: dict = field(default_factory=dict)  # ``PreparedData.report()`` of the training data


def write_training_info(folder: Path, info: TrainingInfo) -> None:
    write_json(Path(folder) / INFO_NAME, asdict(info))


def read_training_info(folder: Path) -> TrainingInfo | None:
    """The folder's training info (keys it does not know are left out); None when it has none."""
    data = read_json(Path(folder) / INFO_NAME)
    if not data:
        return None
    known = {f.name for f in fields(TrainingInfo)}
    return TrainingInfo(**{k: v for k, v in data.items() if k in known})


EVAL_KEYS = ("think_rate", "duplication_rate", "accuracy", "preference_accuracy")


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter as the app sees it. ``reason`` says why it cannot be used (None: it can)."""

    path: Path
    base_model: str | None
    prompt_format: str | None
    created: float  # when its files were written (seconds since the epoch)
    steps: int | None = None
    data_size: int | None = None  # preference pairs it was trained on
    eval_summary: str | None = None
    reason: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def usable(self) -> bool:
        return self.reason is None

    @property
    def version(self) -> tuple[str, float]:
        """Changes when the folder is trained again, so a loaded copy is known to be stale."""
        return str(self.path.resolve()), self.created

    @property
    def written(self) -> str:
        """When its files were written, as local time."""
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))

    def to_dict(self) -> dict:
        return {"name": self.name, "base_model": self.base_model, "prompt_format": self.prompt_format,
                "created": self.written, "steps": self.steps,
                "data_size": self.data_size, "eval": self.eval_summary, "usable": self.usable, "reason": self.reason}


def same_model(a: str, b: str) -> bool:
    """Two model names for the same model: one folder, or the same hub name's last part."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/").split("/")[-1].lower() == b.rstrip("/").split("/")[-1].lower()


def adapter_folders(adapter_dir: Path) -> list[Path]:
    """``adapter_dir`` itself when it is one adapter, else its subfolders that hold an adapter or a run."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        return []
    if (adapter_dir / ADAPTER_CONFIG).exists():
        return [adapter_dir]
    return sorted(p for p in adapter_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and any(
        (p / name).exists() for name in (ADAPTER_CONFIG, CONFIG_NAME, runs.RUN_NAME)))


def read_adapter(folder: Path, base_model: str) -> AdapterEntry:
    info, config = read_training_info(folder), read_json(folder / ADAPTER_CONFIG)
    made = info or TrainingInfo()
    base = made.base_model or config.get("base_model_name_or_path")
    files = [folder / n for n in (INFO_NAME, ADAPTER_CONFIG, *WEIGHT_NAMES) if (folder / n).exists()]
    created = max((f.stat().st_mtime for f in files), default=folder.stat().st_mtime)
    entry = AdapterEntry(folder, base, made.prompt_format, created, made.global_step,
                         (made.data_report or {}).get("ok"), eval_summary(folder / EVAL_NAME, folder.name))
    return replace(entry, reason=_unusable(folder, info, entry, base_model))


def _unusable(folder: Path, info: TrainingInfo | None, entry: AdapterEntry, base_model: str) -> str | None:
    # The record as written: a run whose job died unseen still reads as going here, so it is never loaded.
    run_status = read_json(runs.run_path(folder)).get("status")
    if not info and run_status in (runs.CANCELLED, runs.FAILED):
        return f"training {run_status}: resume the run in the Train tab, or delete the folder"
    if not info and (run_status or (folder / CONFIG_NAME).exists()):
        return f"incomplete: training is still writing it (no {INFO_NAME} yet)"
    if entry.base_model and not same_model(entry.base_model, base_model):
        return f"trained on {entry.base_model}, not on CHAT_MODEL={base_model}"
    missing = [n for n in (ADAPTER_CONFIG, " or ".join(WEIGHT_NAMES)) if not any(
        (folder / name).exists() for name in n.split(" or "))]
    return f"incomplete: no {' and no '.join(missing)}" if missing else None


def eval_summary(path: Path, name: str) -> str | None:
    """'think_rate 0.80 (base 0.20), ...' from a `finetune eval --json` report, when the folder has one."""
    models = read_json(path).get("models")
    if not isinstance(models, list):
        return None
    rows = {m.get("name"): m for m in models if isinstance(m, dict)}
    mine = rows.get(name) or next((m for n, m in rows.items() if n != BASE_NAME), None)
    if mine is None:
        return None
    base = rows.get(BASE_NAME, {})
    parts = []
    for key in EVAL_KEYS:
        if isinstance(mine.get(key), int | float):
            was = f" (base {base[key]:.2f})" if isinstance(base.get(key), int | float) else ""
            parts.append(f"{key} {mine[key]:.2f}{was}")
    return ", ".join(parts) or None


def list_adapters(adapter_dir: Path, base_model: str) -> list[AdapterEntry]:
    """Every adapter in ``adapter_dir``, newest first; those that cannot be used say why."""
    entries = [read_adapter(f, base_model) for f in adapter_folders(adapter_dir)]
    return sorted(entries, key=lambda e: e.created, reverse=True)


def newest_usable(adapter_dir: Path, base_model: str) -> AdapterEntry | None:
    """The newest complete adapter trained on ``base_model``."""
    return next((e for e in list_adapters(adapter_dir, base_model) if e.usable), None)


def adapter_folder(adapter_dir: Path, name: str) -> Path:
    """The folder of the adapter ``name`` in ``adapter_dir``: a subfolder, never a path outside it."""
    folder = Path(adapter_dir) / name
    if not NAME_PATTERN.fullmatch(name) or folder not in adapter_folders(adapter_dir) or folder == Path(adapter_dir):
        raise AdapterFolderError(f"no adapter {name!r} in {adapter_dir}; pick one from the list")
    return folder


def rename_adapter(adapter_dir: Path, name: str, new_name: str) -> Path:
    """Give an adapter folder a new name (what the app lists and answers under)."""
    folder = adapter_folder(adapter_dir, name)
    new_name = new_name.strip()
    if not NAME_PATTERN.fullmatch(new_name):
        raise AdapterFolderError(f"{new_name!r} cannot name an adapter: use letters, digits, '.', '_' and '-' "
                                 "(up to 64, starting with a letter or digit)")
    target = folder.with_name(new_name)
    if target.exists():
        raise AdapterFolderError(f"{new_name} is taken in {adapter_dir}; choose another name")
    folder.rename(target)
    return target


def delete_adapter(adapter_dir: Path, name: str) -> None:
    shutil.rmtree(adapter_folder(adapter_dir, name))


def archive_adapter(adapter_dir: Path, name: str, out_dir: Path) -> Path:
    """The adapter as one zip file in ``out_dir``: the files of ARCHIVED it has, under a folder of its name."""
    folder = adapter_folder(adapter_dir, name)
    files = [folder / n for n in ARCHIVED if (folder / n).is_file()]
    if not any(f.name == ADAPTER_CONFIG for f in files):
        raise AdapterFolderError(f"{name} holds no {ADAPTER_CONFIG} yet: nothing to download")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out = Path(out_dir) / f"{name}.zip"
    partial = out.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, f"{name}/{file.name}")
    os.replace(partial, out)
    return out
