"""Training runs: one folder each in ADAPTER_DIR, which becomes the adapter the run trains.

This is the hand-off between whoever starts a run (the app's Train tab) and the job that carries it out
(``python -m assistant run DIR``, in a process of its own: split the data, train, evaluate; the job lives in
``assistant/learning/run_job.py`` because its evaluation runs the model as the app serves it). All they share
is in the folder, so a run outlives the page that started it and the app itself:

- ``run.json``: what the run is (its data, held-out share, base config and overrides) and where it stands:
  ``status`` (starting, running, done, failed, cancelled), the job's ``pid``, ``error``, times, and
  ``chat_unloaded`` when the app unloaded its chat model to make room;
- ``data/``: the files the run trains on (copied in when it starts), and the job's split of them
  (``train.jsonl``, ``held-out-pairs.jsonl``);
- what ``finetune train`` writes there (its config, checkpoints, ``training_log.jsonl``, the adapter,
  ``training_info.json`` last) and the evaluation after it (``eval.json``, ``eval.png``);
- ``job.log``: the job's console.

A cancelled run keeps its last checkpoint and no ``training_info.json``, so the app does not take it for a
finished adapter; resuming continues from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from errors import DataError, UserError
from finetune.output_dir import latest_checkpoint, read_json, write_json

log = logging.getLogger(__name__)

RUN_NAME = "run.json"
JOB_LOG = "job.log"
# The job: ``python -m assistant run FOLDER [--resume]``, started with this project as its working folder.
JOB_COMMAND = ("-m", "assistant", "run")
# RunRecord.status: where a run stands.
STARTING, RUNNING, DONE, FAILED, CANCELLED = "starting", "running", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)
# RunRecord.phase: what a running job is doing.
PREPARING, TRAINING, EVALUATING = "preparing", "training", "evaluating"
EVAL_PLOT = "eval.png"
MIN_HELD_OUT = 3  # with a held-out share above 0, at least this many pairs are evaluated where the data allows


class RunError(UserError):
    """A run cannot be started, cancelled or resumed; the message says why and what to do."""


@dataclass
class RunSpec:
    """What to train: the data, the share held out for evaluation, the base config and the form's overrides."""

    model_name: str  # the base model: the app's CHAT_MODEL, so the adapter fits the model it serves
    config: str  # a YAML file of finetune/configs/
    sources: list[str] = field(default_factory=list)  # files or pairs stores, as `finetune prepare` reads them
    held_out_share: float = 0.1  # of the pairs, kept out of training for the evaluation after it
    overrides: dict = field(default_factory=dict)  # e.g. {"max_steps": 30, "learning_rate": 5e-6}
    eval_max_new_tokens: int = 512


@dataclass
class RunRecord:
    name: str
    spec: RunSpec
    status: str = STARTING
    pid: int | None = None
    created: float = field(default_factory=time.time)
    ended: float | None = None
    error: str | None = None
    chat_unloaded: bool = False
    phase: str | None = None  # while running: preparing, training, evaluating
    pairs: int | None = None  # usable pairs in the data, once the job has split it
    held_out: int | None = None  # of them, kept out of training for the evaluation
    eval_note: str | None = None  # why the run has no evaluation, when it has none

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        spec = RunSpec(**data["spec"])
        return cls(**{**data, "spec": spec})


def run_path(folder: Path) -> Path:
    return Path(folder) / RUN_NAME


def read_run(folder: Path) -> RunRecord | None:
    """The folder's run record, with a run whose job died unseen marked failed; None when it has none."""
    data = read_json(run_path(folder))
    try:
        record = RunRecord.from_dict(data) if data else None
    except (KeyError, TypeError):
        return None
    if record and record.status in (STARTING, RUNNING) and record.pid and not _alive(record.pid):
        record.status, record.ended = FAILED, record.ended or time.time()
        record.error = record.error or f"the job (pid {record.pid}) ended without a word; see {JOB_LOG}"
    return record


def write_run(folder: Path, record: RunRecord) -> None:
    write_json(run_path(folder), record.to_dict())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A finished child of this process stays a zombie until it is reaped: it counts as ended.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def list_runs(adapter_dir: Path) -> list[RunRecord]:
    """Every run in ``adapter_dir``, newest first."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        return []
    runs = [r for p in adapter_dir.iterdir() if p.is_dir() and (r := read_run(p))]
    return sorted(runs, key=lambda r: r.created, reverse=True)


def active_run(adapter_dir: Path) -> RunRecord | None:
    return next((r for r in list_runs(adapter_dir) if r.status not in ENDED), None)


def create_run(adapter_dir: Path, spec: RunSpec) -> Path:
    """A new run folder with the data copied in and the record written; refused while another run is going."""
    going = active_run(adapter_dir)
    if going is not None:
        raise RunError(f"a training run is going ({going.name}, {going.status}); wait for it or cancel it first")
    if not spec.sources:
        raise RunError("no data: choose the collected pairs, upload files of pairs, or both")
    if not 0 <= spec.held_out_share < 1:
        raise RunError(f"the held-out share must be at least 0 and below 1, not {spec.held_out_share}")
    name = time.strftime("run-%Y%m%d-%H%M%S")
    folder = Path(adapter_dir) / name
    while folder.exists():
        name = f"{name}x"
        folder = Path(adapter_dir) / name
    (folder / "data").mkdir(parents=True)
    copied = []
    for source in spec.sources:
        source = Path(source)
        if not source.exists():
            shutil.rmtree(folder)
            raise RunError(f"{source.name} is not there any more; upload it again")
        target = folder / "data" / f"{len(copied)}-{source.name}"
        (shutil.copytree if source.is_dir() else _copy_file)(source, target)
        copied.append(str(target))
    spec = RunSpec(**{**asdict(spec), "sources": copied})
    write_run(folder, RunRecord(name, spec))
    return folder


def _copy_file(source: Path, target: Path) -> None:
    if source.suffix == ".sqlite":
        import sqlite3

        # The store may be written while it is copied: SQLite's backup copies one consistent state of it.
        with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
            src.backup(dst)
    else:
        shutil.copyfile(source, target)


def launch(folder: Path, resume: bool = False) -> subprocess.Popen:
    """Start the job for ``folder`` in a process (and process group) of its own; it outlives the app."""
    folder = Path(folder)
    command = [sys.executable, *JOB_COMMAND, str(folder), *(["--resume"] if resume else [])]
    with (folder / JOB_LOG).open("ab") as log:
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    # The pid at once, so a job that dies before it writes its own record is seen to have ended.
    record = read_run(folder)
    if record is not None and record.pid is None:
        record.pid = job.pid
        write_run(folder, record)
    return job


def cancel(folder: Path) -> None:
    """Ask the job to stop: it saves a checkpoint at the end of the step it is in and marks the run cancelled."""
    record = read_run(folder)
    if record is None or record.status in ENDED:
        raise RunError(f"{Path(folder).name} is not running")
    if record.pid is None:
        raise RunError(f"{record.name} has not started yet; cancel it again in a moment")
    try:
        os.killpg(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def resume(folder: Path) -> subprocess.Popen:
    """Continue a cancelled or failed run from its newest checkpoint."""
    folder = Path(folder)
    record = read_run(folder)
    if record is None:
        raise RunError(f"{folder.name} is not a training run")
    going = active_run(folder.parent)
    if going is not None:
        raise RunError(f"a training run is going ({going.name}); wait for it or cancel it first")
    if record.status not in (CANCELLED, FAILED):
        raise RunError(f"{record.name} is {record.status}: only a cancelled or failed run can be resumed")
    if latest_checkpoint(folder) is None:
        raise RunError(f"{record.name} has no checkpoint to resume from; start a new run instead")
    record.status, record.error, record.ended, record.pid = STARTING, None, None, None
    write_run(folder, record)
    return launch(folder, resume=True)


# ---------------------------------------------------------------- the job's data


def held_out_count(pairs: int, share: float) -> int:
    """Pairs kept out of training: ``share`` of them, but at least MIN_HELD_OUT (a tenth of four pairs is none)
    while as many are left to train on; none when ``share`` is 0."""
    if share <= 0:
        return 0
    return max(round(pairs * share), min(MIN_HELD_OUT, pairs // 2))


def eval_note(pairs: int, held: int, share: float) -> str | None:
    """Why a run with ``held`` of ``pairs`` held out is not evaluated (None: it is)."""
    if held:
        return None
    if share <= 0:
        return "no evaluation: the held-out share is 0"
    return f"no evaluation: {pairs} pair{'s are' if pairs != 1 else ' is'} too few to hold any out (at least 2 needed)"


def train_file(folder: Path) -> Path:
    """The pairs the job trains on, written when it splits the data."""
    return Path(folder) / "data" / "train.jsonl"


def held_out_file(folder: Path) -> Path:
    """The pairs the job holds out for the evaluation (an empty file when none)."""
    return Path(folder) / "data" / "held-out-pairs.jsonl"


def split_data(folder: Path, spec: RunSpec, tokenizer, seed: int) -> tuple[Path, list]:
    """Every source prepared, shuffled, and split: (the training file, the held-out pairs)."""
    from finetune.data import prepare_data, write_jsonl

    pairs, problems = [], []
    for source in spec.sources:
        prepared = prepare_data(source, tokenizer)
        pairs += prepared.pairs
        problems += [f"{Path(source).name}: {r.reason}" for r in prepared.rejected]
    if problems:
        log.warning("%d rows left out:\n%s", len(problems), "\n".join(problems[:20]))
    random.Random(seed).shuffle(pairs)
    held = held_out_count(len(pairs), spec.held_out_share)
    if len(pairs) - held < 1:
        raise DataError(f"{len(pairs)} usable pairs: too few to train on with {held} held out; collect more")
    training = train_file(folder)
    write_jsonl(pairs[held:], training)
    write_jsonl(pairs[:held], held_out_file(folder))
    return training, pairs[:held]
