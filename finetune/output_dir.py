"""Files in a training output folder (an adapter's, a run's): JSON written whole, and the newest checkpoint.

Both sides of the folder use these, the trainer and run job that write it and the app that polls it, so a reader
never sees half a file and every side finds the same checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: Path) -> dict:
    """The file's JSON object; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all: a reader polling the folder never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, path)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The Trainer's newest ``checkpoint-N`` folder in ``output_dir``; None when it has none."""
    checkpoints = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)
