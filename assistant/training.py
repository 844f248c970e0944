"""Training runs from the app: start one (`finetune.runs`), make room for it, follow it, take the model back.

The run is a job in its own process; the app only starts it, reads its folder and signals it. When the run's
memory estimate (`finetune.memory`) does not fit beside the chat model, the model is unloaded first (answers
in flight finish; questions meanwhile are told why there is no answer) and loaded again when the run ends,
whichever way it ends, even after an app restart in between. The reloaded model follows the newest adapter
(or the pinned one), so a finished run answers the next question.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from assistant.model_loader import READY, ModelLoader
from finetune import runs
from finetune.adapters import EVAL_NAME
from finetune.config import load_config
from finetune.memory import training_memory_gib
from finetune.output_dir import read_json
from finetune.training_log import read_log

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WATCH_S = 1.0


@dataclass(frozen=True)
class RoomDecision:
    unload: bool
    why: str


def config_path(name: str | Path) -> Path:
    """A config as given, or relative to the project (the app may run from another folder)."""
    path = Path(name)
    return path if path.exists() or path.is_absolute() else ROOT / path


class TrainingControl:
    def __init__(self, loader: ModelLoader):
        self.loader = loader
        self.settings = loader.assistant.settings
        self.adapter_dir = Path(self.settings.adapter_dir)
        self._lock = threading.Lock()  # one start or resume at a time
        self._resume_watch()

    @staticmethod
    def cuda() -> bool:
        """Whether training would run on a CUDA GPU here."""
        import torch

        return torch.cuda.is_available()

    def room(self, spec: runs.RunSpec) -> RoomDecision:
        """Whether the chat model must be unloaded for ``spec``'s run, and why."""
        runtime = self.loader.runtime
        if runtime is None or not hasattr(runtime, "memory_gib"):
            return RoomDecision(False, "no model in this process to make room from")
        import torch

        cuda = self.cuda()
        cap = self.settings.train_memory_cap_gb
        if not cap and not cuda:
            return RoomDecision(False, "training on the CPU beside the chat model")
        config = load_config(config_path(spec.config), [f"{k}={v}" for k, v in spec.overrides.items()]
                             + [f"model_name={spec.model_name}"])
        need = training_memory_gib(config, cuda=cuda)
        if cap:
            free = cap - runtime.memory_gib()
            where = f"TRAIN_MEMORY_CAP_GB={cap:g} less {runtime.memory_gib():.1f} GiB of chat model"
        else:
            free = torch.cuda.mem_get_info()[0] / 2**30
            where = "free on the GPU"
        fits = need <= free
        return RoomDecision(not fits, f"the run needs about {need:.1f} GiB; {free:.1f} GiB {where}")

    def start(self, spec: runs.RunSpec) -> str:
        with self._lock:
            folder = runs.create_run(self.adapter_dir, spec)
            return self._launch(folder, resume=False)

    def resume(self, name: str) -> str:
        with self._lock:
            return self._launch(self.adapter_dir / name, resume=True)

    def _launch(self, folder: Path, resume: bool) -> str:
        record = runs.read_run(folder)
        decision = self.room(record.spec)
        if decision.unload:
            record.chat_unloaded = True
            runs.write_run(folder, record)
            self.loader.unload(f"a training run ({folder.name}) is using the memory: {decision.why}. The model comes "
                               "back when the run ends (cancel it in the Train tab to end it sooner).")
        try:
            runs.resume(folder) if resume else runs.launch(folder)
        except Exception:
            self._reload_after(folder, wait=False)
            raise
        self._reload_after(folder, wait=decision.unload)
        verb = "Resumed" if resume else "Started"
        return f"{verb} {folder.name}. " + (f"The chat model is unloaded for it ({decision.why})." if decision.unload
                                            else f"Chat keeps answering ({decision.why}).")

    def _reload_after(self, folder: Path, wait: bool) -> None:
        """Once the run in ``folder`` ends, load the chat model again (when it was unloaded for it)."""
        if not wait:
            self.loader.reload()
            return

        def watch() -> None:
            while (record := runs.read_run(folder)) is not None and record.status not in runs.ENDED:
                time.sleep(WATCH_S)
            log.info("training run %s ended; loading the chat model again", folder.name)
            self.loader.reload()

        threading.Thread(target=watch, name=f"watch-{folder.name}", daemon=True).start()

    def _resume_watch(self) -> None:
        """After an app restart: a run still going that had the model unloaded keeps it unloaded until it ends."""
        going = runs.active_run(self.adapter_dir)
        if going is None or not going.chat_unloaded:
            return

        def unload_then_watch() -> None:
            self.loader.wait()
            if self.loader.state == READY:
                self.loader.unload(f"a training run ({going.name}) started before the app restarted is using the "
                                   "memory; the model comes back when it ends.")
            self._reload_after(self.adapter_dir / going.name, wait=True)

        threading.Thread(target=unload_then_watch, name="watch-restart", daemon=True).start()

    def cancel(self) -> str:
        going = runs.active_run(self.adapter_dir)
        if going is None:
            raise runs.RunError("no training run is going")
        runs.cancel(self.adapter_dir / going.name)
        return f"Cancelling {going.name}: it stops after the step it is in and keeps a checkpoint."

    def progress(self, name: str | None = None) -> dict:
        """The run named (by default the going or newest one): its record, log, progress and evaluation."""
        records = runs.list_runs(self.adapter_dir)
        going = next((r for r in records if r.status not in runs.ENDED), None)
        record = next((r for r in records if r.name == name), None) if name else \
            (going or (records[0] if records else None))
        if record is None:
            return {"run": None, "runs": []}
        folder = self.adapter_dir / record.name
        log = read_log(folder)
        last = log[-1] if log else {}
        step, total = last.get("step", 0), last.get("max_steps") or record.spec.overrides.get("max_steps")
        eta = None
        recent = log[-10:]  # the pace now: a resumed run's log spans the pause
        if record.status == runs.RUNNING and len(recent) >= 2 and total and step < total:
            rate = (recent[-1]["time"] - recent[0]["time"]) / max(1, recent[-1]["step"] - recent[0]["step"])
            eta = round(rate * (total - step))
        return {"run": {**record.to_dict(), "folder": str(folder)}, "step": step, "max_steps": total,
                "eta_s": eta, "log": log, "eval": read_json(folder / EVAL_NAME).get("models"),
                "eval_plot": str(folder / runs.EVAL_PLOT) if (folder / runs.EVAL_PLOT).exists() else None,
                "runs": [{"name": r.name, "status": r.status, "error": r.error,
                          "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))} for r in records]}
