"""The training log: one JSON line per logging step, and a PNG plot of it at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

LOG_NAME = "training_log.jsonl"
PLOT_NAME = "training_log.png"
LOGGED_KEYS = ("loss", "nll_loss", "or_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "log_odds_ratio", "log_odds_chosen", "learning_rate", "grad_norm",
               "tokens_per_s", "peak_memory_gib")


def read_log(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / LOG_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TrainingLogCallback(TrainerCallback):
    """Appends each training log to output_dir/training_log.jsonl (the first process only, when several
    train together). A resumed run first drops the lines of steps after its checkpoint, so the file reads
    like one uninterrupted run."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOG_NAME

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_log(self.path.parent) if r["step"] <= state.global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        # The wall time and the run's length let a reader of the log (the Train tab) show progress and an ETA.
        record = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch, "time": time.time()}
        record.update({k: logs[k] for k in LOGGED_KEYS if k in logs})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_log(self.path.parent)


def plot_log(output_dir: str | Path) -> Path | None:
    records = read_log(output_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", ["loss", "nll_loss", "or_loss"]),
              ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
              ("preference", ["rewards/accuracies", "log_odds_ratio"]),
              ("learning rate", ["learning_rate"]),
              ("throughput (tokens/s)", ["tokens_per_s"]),
              ("peak memory (GiB)", ["peak_memory_gib"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    steps = [r["step"] for r in records]
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key, marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(output_dir) / PLOT_NAME
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
