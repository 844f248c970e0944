"""Training from the app on a GPU: the app's model serving answers while the Train tab's controller starts a run.

The GPU machine has no Gradio or Chroma (and no network to fetch them), so this drives the objects the Train
tab's API calls, in-process, exactly as the web app holds them: ``Assistant`` + ``ModelLoader`` (the chat model,
the 1.5B shape in 4 bits with the app's engine, Unsloth on CUDA) and ``TrainingControl.start`` (which decides
whether the chat model must make room, and starts ``python -m assistant run`` in its own process). A chat thread
keeps asking questions (without retrieval) all along. Two runs:

- ``forced``: TRAIN_MEMORY_CAP_GB set below what both need, so the chat model is unloaded for the run (questions
  are told why) and reloaded after it, on the new adapter;
- ``fits``: no cap; the run fits beside the chat model on the card, and chat keeps answering during it.

For each: the decision, the run's outcome and time, answers and refusals during the run, the adapter answering
after it, and the peak GPU memory (the whole card, and each process) sampled by nvidia-smi. On the GPU machine:

    python scripts/gpu_train_tab_check.py --work /tmp/train-tab

prints one JSON line per mode. ``--cpu-dry-run`` runs the same on the tiny model on a CPU (a check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["Who keeps the lighthouse?", "What did the audit find?", "灯台の管理人は誰ですか？"]
TRAIN_YAML = """model_name: unused
backend: {backend}
load_in_4bit: {four_bit}
max_length: 512
max_prompt_length: 256
gradient_checkpointing: "{checkpointing}"
lora_r: 16
lora_alpha: 16
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
optim: {optim}
precision: {precision}
save_steps: 10
logging_steps: 1
"""


class MemorySampler:
    """Peak GPU memory from nvidia-smi every half second: the card's total and each process's."""

    def __init__(self):
        self.peak_total_mib, self.peak_by_pid = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True, timeout=10).stdout.split()
                apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                      timeout=10).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                return
            if total:
                self.peak_total_mib = max(self.peak_total_mib, int(total[0]))
            for line in apps:
                pid, used = (part.strip() for part in line.split(","))
                self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), int(used))

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def chat_loop(assistant, stop: threading.Event, log: list[dict]) -> None:
    """Ask question after question, as users would, recording what each got."""
    from engine.runtime import GenerationParams
    from errors import UserError

    params = GenerationParams(max_new_tokens=48, temperature=0.0)
    n = 0
    while not stop.is_set():
        question = QUESTIONS[n % len(QUESTIONS)]
        n += 1
        started = time.time()
        try:
            *_, answer = assistant.stream_answer([{"role": "user", "content": question}], params,
                                                 use_retrieval=False)
            log.append({"t": started, "ok": True, "adapter": answer.adapter})
        except UserError as e:
            log.append({"t": started, "ok": False, "message": str(e)[:200]})
            time.sleep(0.5)


def pairs_file(path: Path, n: int = 40) -> Path:
    """Preference rows of the toy repeat task (tests/finetune_fixtures.py)."""
    from tests.finetune_fixtures import repeat_task_rows, write_jsonl

    return write_jsonl(path, repeat_task_rows(n, seed=0))


def run_mode(mode: str, work: Path, model: Path, engine: str, cap_gb: float, steps: int) -> dict:
    from assistant.chat import Assistant
    from assistant.model_loader import READY, ModelLoader
    from assistant.training import TrainingControl
    from finetune import runs
    from settings import Settings

    folder = work / mode
    settings = Settings.from_env(
        environ={}, chat_model=str(model), adapter_dir=folder / "adapters", knowledge_dir=folder / "knowledge",
        pairs_db=folder / "pairs.sqlite", train_config=work / "train.yaml", train_memory_cap_gb=cap_gb,
        local_engine=engine, load_in_4bit=engine == "unsloth", max_new_tokens=48, temperature=0.0,
        adapter_poll_s=1.0)
    result: dict = {"mode": mode, "train_memory_cap_gb": cap_gb}
    with MemorySampler() as memory:
        started = time.time()
        assistant = Assistant(settings)
        loader = ModelLoader(assistant).start()
        if loader.wait() is None:
            raise SystemExit(f"the chat model did not load: {loader.error}")
        assistant.adapters.start_following()
        result["model_load_s"] = round(time.time() - started, 1)
        result["chat_model_gib"] = round(loader.runtime.memory_gib(), 2)
        result["app_pid"] = str(os.getpid())
        control = TrainingControl(loader)
        stop, log = threading.Event(), []
        chatting = threading.Thread(target=chat_loop, args=(assistant, stop, log), daemon=True)
        chatting.start()
        time.sleep(3)
        spec = runs.RunSpec(model_name=str(model), config=str(work / "train.yaml"),
                            sources=[str(pairs_file(work / "pairs.jsonl"))], held_out_share=0.1,
                            overrides={"max_steps": steps, "learning_rate": 2e-4, "beta": 0.1, "lora_r": 16},
                            eval_max_new_tokens=48)
        run_started = time.time()
        result["note"] = control.start(spec)
        record = runs.active_run(settings.adapter_dir)
        name = record.name if record else runs.list_runs(settings.adapter_dir)[0].name
        while (record := runs.read_run(settings.adapter_dir / name)).status not in runs.ENDED:
            time.sleep(1)
        run_ended = time.time()
        deadline = time.time() + 600
        while time.time() < deadline and not (loader.state == READY and loader.runtime.adapter == name):
            time.sleep(1)
        time.sleep(3)
        stop.set()
        chatting.join(timeout=120)
    during = [e for e in log if run_started <= e["t"] <= run_ended]
    after = [e for e in log if e["t"] > run_ended and e["ok"]]
    progress = TrainingControl(loader).progress(name)
    result.update(
        run=name, status=record.status, error=record.error, chat_unloaded=record.chat_unloaded,
        run_s=round(run_ended - run_started, 1), steps=progress["step"],
        eval=[{k: m.get(k) for k in ("name", "think_rate", "duplication_rate", "preference_accuracy")}
              for m in progress["eval"] or []],
        answers_during_run=sum(e["ok"] for e in during), refused_during_run=sum(not e["ok"] for e in during),
        refusal=next((e["message"] for e in during if not e["ok"]), None),
        adapter_after=after[-1]["adapter"] if after else None, model_state_after=loader.state,
        peak_card_gib=round(memory.peak_total_mib / 1024, 2),
        peak_app_gib=round(memory.peak_by_pid.get(result["app_pid"], 0) / 1024, 2),
        peak_other_processes_gib=round(max((v for k, v in memory.peak_by_pid.items() if k != result["app_pid"]),
                                           default=0) / 1024, 2),
        total_s=round(time.time() - started, 1))
    assistant.unload("done")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-tab"))
    parser.add_argument("--shape", default="1.5b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default="forced,fits")
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / f"model-{args.shape}"
    if args.cpu_dry_run:
        from finetune.tiny_model import build_tiny_model

        model = args.work / "model-tiny"
        if not (model / "config.json").exists():
            build_tiny_model(model)
        engine, yaml_values = "transformers", dict(backend="hf", four_bit="false", checkpointing="false",
                                                   optim="adamw_torch", precision="fp32")
    else:
        from engine.runtime import import_unsloth_if_used
        from scripts.gpu_generation_bench import build
        from settings import Settings

        import_unsloth_if_used(Settings.from_env(environ={}, local_engine="unsloth"))  # before transformers

        if not (model / "config.json").exists():
            build(args.shape, model)
        engine, yaml_values = "unsloth", dict(backend="unsloth", four_bit="true", checkpointing="unsloth",
                                              optim="adamw_8bit", precision="auto")
    (args.work / "train.yaml").write_text(TRAIN_YAML.format(**yaml_values), encoding="utf-8")
    for mode in args.modes.split(","):
        cap = 1.0 if mode == "forced" else 0.0
        if args.cpu_dry_run and mode == "forced":
            cap = 0.001
        print(json.dumps(run_mode(mode, args.work, model, engine, cap, args.steps), ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
