"""A training run's job: split the data, train (or resume), evaluate on the held-out share.

    python -m assistant run FOLDER [--resume]

The app's Train tab starts it in a process of its own (``finetune.runs.launch``) and follows it through the run
folder; everything the job says goes to the record (``run.json``) and its console (``job.log``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from errors import UserError
from finetune import runs
from finetune.adapters import EVAL_NAME, INFO_NAME
from finetune.output_dir import write_json

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """SIGTERM outside training: the job stops where it is."""


class _CancelOnSignal:
    """SIGTERM while training asks the Trainer to save a checkpoint and stop after the current step."""

    def __init__(self):
        self.requested, self.training = False, False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if not self.training:
            raise Cancelled

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class StopWhenAsked(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.requested:
                    control.should_save = control.should_training_stop = True

        return StopWhenAsked()


def execute(folder: Path, resume: bool = False) -> int:
    """The job: split the data, train (or resume), evaluate on the held-out share; the record says how it went."""
    from finetune.config import load_config
    from finetune.train import train

    folder = Path(folder)
    record = runs.read_run(folder)
    if record is None:
        raise runs.RunError(f"{folder} holds no {runs.RUN_NAME}; start runs from the app's Train tab")
    record.status, record.pid, record.error = runs.RUNNING, os.getpid(), None
    runs.write_run(folder, record)
    spec = record.spec
    stop = _CancelOnSignal()

    def enter(phase: str) -> None:
        record.phase = phase
        runs.write_run(folder, record)

    try:
        enter(runs.PREPARING)
        overrides = [f"{k}={v}" for k, v in spec.overrides.items()]
        config = load_config(spec.config, [*overrides, f"model_name={spec.model_name}", f"output_dir={folder}"])
        if resume:
            config.data = str(runs.train_file(folder))
        else:
            from finetune.hf_backend import load_tokenizer

            train_file, held_pairs = runs.split_data(folder, spec, load_tokenizer(spec.model_name), config.seed)
            config.data = str(train_file)
            record.held_out = len(held_pairs)
            with train_file.open(encoding="utf-8") as lines:
                record.pairs = len(held_pairs) + sum(1 for line in lines if line.strip())
            record.eval_note = runs.eval_note(record.pairs, record.held_out, spec.held_out_share)
        stop.training = True
        enter(runs.TRAINING)
        result = train(config, resume=resume, callbacks=[stop.callback()])
        stop.training = False
        if stop.requested:
            (folder / INFO_NAME).unlink(missing_ok=True)  # a stopped run is not a finished adapter
            raise Cancelled
        print(f"run {record.name}: {result.global_step} steps, adapter in {folder}", flush=True)
        held = _held_out_pairs(folder)
        if held:
            enter(runs.EVALUATING)
            try:
                _evaluate(folder, spec, held)
            except Cancelled:
                record.error = "the evaluation was cancelled; the adapter is complete"
        record.status = runs.DONE
    except Cancelled:
        record.status = runs.CANCELLED
        print(f"run {record.name}: cancelled; resume it from the Train tab or with --resume", flush=True)
    except UserError as e:
        record.status, record.error = runs.FAILED, str(e)
        log.error("%s", e)
    except Exception as e:  # noqa: BLE001 - the record must say the run failed, whatever failed it
        log.exception("run %s failed", record.name)
        record.status, record.error = runs.FAILED, f"{type(e).__name__}: {e} (the traceback is in {runs.JOB_LOG})"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    record.ended, record.phase = time.time(), None
    runs.write_run(folder, record)
    return 0 if record.status == runs.DONE else 1


def _held_out_pairs(folder: Path) -> list:
    from finetune.data import PreferencePair, read_json_rows

    held_file = runs.held_out_file(folder)
    if not held_file.stat().st_size:
        return []
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in read_json_rows(held_file, "pairs")]


def _evaluate(folder: Path, spec: runs.RunSpec, held: list) -> None:
    """Base against the new adapter on the held-out pairs: their prompts answered (greedy), and how often each
    model prefers the chosen answer. ``eval.json`` is what the adapters list summarizes."""
    from assistant.learning.evaluation import evaluate
    from engine.batch_generate import GenerationConfig
    from finetune.evaluation import EvalPrompt, plot, report_json

    prompts = list(dict.fromkeys(p.prompt for p in held))
    reports = evaluate(spec.model_name, [folder], [EvalPrompt(p) for p in prompts], held,
                       GenerationConfig(max_new_tokens=spec.eval_max_new_tokens))
    write_json(folder / EVAL_NAME, report_json(reports))
    plot(reports, folder / runs.EVAL_PLOT)
