"""The Train tab: train an adapter on the collected pairs and uploaded files of pairs, follow the run live,
cancel or resume it, and compare the base model with the new adapter when it ends.

The run is a job of its own (``assistant/training.py``, ``finetune/runs.py``): this tab only starts it and
reads its folder, every two seconds while the tab is open, so a reload or an app restart loses nothing.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from assistant.training import ROOT, TrainingControl, config_path
from assistant.ui_knowledge import gradio_upload_folder, is_file_inside, upload_box
from assistant.ui_model import ModelLoader
from errors import UserError
from finetune import runs
from finetune.config import load_config

CONFIGS = ROOT / "finetune" / "configs"
LOSS_SERIES = ("loss", "nll_loss", "or_loss")
REWARD_SERIES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
EVAL_COLUMNS = ["model", "think_rate", "duplication_rate", "accuracy", "preference_accuracy", "margin",
                "answer_chars"]
RUN_COLUMNS = ["run", "status", "started", "error"]


def config_choices(default: Path) -> list[str]:
    """The training configs to start from: the project's (not the accelerate launch files) and TRAIN_CONFIG."""
    found = sorted(str(p.relative_to(ROOT)) for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate"))
    return list(dict.fromkeys([str(default), *found]))


def form_values(config_name: str) -> tuple[int, float, float, int]:
    """(steps, learning rate, beta, LoRA rank) of a config, for the form."""
    config = load_config(config_path(config_name))
    return config.max_steps, config.learning_rate, config.beta, config.lora_r


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def curves(log: list[dict], keys: tuple[str, ...]) -> pd.DataFrame:
    rows = [{"step": r["step"], "value": r[k], "series": k} for r in log for k in keys if k in r]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def progress_markdown(state: dict) -> str:
    run = state["run"]
    if run is None:
        return "No training run yet. Choose the data and start one."
    text = f"**{run['name']}**: {run['status']}."
    log = state["log"]
    if state["max_steps"]:
        text += f" Step {state['step']} of {state['max_steps']} ({100 * state['step'] // state['max_steps']}%)."
    if run["status"] == runs.RUNNING and run["phase"] == "training" and state["eta_s"] is not None:
        text += f" About {_duration(state['eta_s'])} left."
    elif run["status"] == runs.RUNNING:
        text += {"preparing": " Preparing the data…", "training": "" if log else " Loading the model…",
                 "evaluating": " Evaluating the base model and the new adapter on the held-out pairs…"
                 }.get(run["phase"], "")
    if log:
        last = log[-1]
        parts = [f"{k} {last[k]:.3f}" for k in ("loss", "rewards/margins", "rewards/accuracies") if k in last]
        if "peak_memory_gib" in last:
            parts.append(f"peak memory {last['peak_memory_gib']:.1f} GiB")
        text += " " + ", ".join(parts) + "."
    if run["chat_unloaded"] and run["status"] not in runs.ENDED:
        text += " The chat model is unloaded while it runs."
    if run["error"]:
        text += f"\n\n**Error:** {run['error']}"
    if run["status"] == runs.DONE:
        text += " The adapter is in the Adapters tab; the app follows it unless another is pinned."
    if run["status"] == runs.CANCELLED:
        text += " Its last checkpoint is kept: Resume continues it."
    return text


class TrainTab:
    def __init__(self, control: TrainingControl, loader: ModelLoader):
        self.control, self.loader = control, loader
        self.settings = loader.assistant.settings

    def view(self, name: str | None = None):
        """(progress, loss curves, reward curves, eval table, eval chart, runs table, state, run name, status)."""
        state = self.control.progress(name or None)
        run, log = state["run"], state.get("log") or []
        rows = [[m.get(c) if c != "model" else m.get("name") for c in EVAL_COLUMNS] for m in state.get("eval") or []]
        runs_table = [[r["name"], r["status"], r["started"], r["error"] or ""] for r in state["runs"]]
        shown = {k: v for k, v in state.items() if k != "log"}
        return (progress_markdown(state), curves(log, LOSS_SERIES), curves(log, REWARD_SERIES), rows,
                state.get("eval_plot"), runs_table, {**shown, "log_records": len(log)}, run["name"] if run else "",
                self.loader.status_markdown())

    def start(self, use_pairs: bool, files, held_out: float, config_name: str, steps: float, learning_rate: float,
              beta: float, rank: float):
        sources = []
        if use_pairs:
            if not Path(self.settings.pairs_db).exists():
                raise gr.Error("No pairs collected yet: vote, pick or edit answers in the chat first, or upload "
                               "files of pairs.")
            sources.append(str(self.settings.pairs_db))
        for path in files or []:
            if not is_file_inside(path, [gradio_upload_folder()]):
                raise gr.Error(f"{Path(path).name}: not a file uploaded to this app; use the upload box.")
            sources.append(path)
        spec = runs.RunSpec(model_name=self.settings.chat_model, config=str(config_path(config_name)),
                            sources=sources, held_out_share=float(held_out),
                            overrides={"max_steps": int(steps), "learning_rate": float(learning_rate),
                                       "beta": float(beta), "lora_r": int(rank)},
                            eval_max_new_tokens=self.settings.max_new_tokens)
        return self._do(self.control.start, spec)

    def cancel(self):
        return self._do(self.control.cancel)

    def resume(self, name: str):
        if not name:
            raise gr.Error("No run to resume.")
        return self._do(self.control.resume, name)

    def _do(self, action, *args):
        try:
            note = action(*args)
        except UserError as e:
            raise gr.Error(str(e)) from None
        return *self.view(), note

    def build(self, demo: gr.Blocks, model_status: gr.Markdown) -> None:
        configs = config_choices(self.settings.train_config)
        steps, learning_rate, beta, rank = form_values(configs[0])
        gr.Markdown("Train a LoRA adapter with ORPO on the pairs collected in the chat and on files of pairs. "
                    "The run is a process of its own: reloading the page or restarting the app does not stop it. "
                    "When it ends, the base model and the new adapter are compared on the held-out pairs.")
        with gr.Row():
            use_pairs = gr.Checkbox(value=True, label="The collected pairs", elem_id="train-use-pairs")
            held_out = gr.Slider(0, 0.5, value=0.1, step=0.05, label="Held out for evaluation",
                                 elem_id="train-held-out")
        files = upload_box(label="Files of pairs (any format `finetune prepare` reads)", elem_id="train-files")
        with gr.Row():
            config = gr.Dropdown(configs, value=configs[0], label="Config (the rest of the settings)",
                                 elem_id="train-config")
            steps_box = gr.Number(steps, label="Steps", precision=0, minimum=1, elem_id="train-steps")
            lr_box = gr.Number(learning_rate, label="Learning rate", elem_id="train-lr")
            beta_box = gr.Number(beta, label="Beta (ORPO)", elem_id="train-beta")
            rank_box = gr.Number(rank, label="LoRA rank", precision=0, minimum=1, elem_id="train-rank")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
            cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            resume = gr.Button("Resume", elem_id="train-resume")
        note = gr.Markdown(elem_id="train-note")
        progress = gr.Markdown(elem_id="train-progress")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss", elem_id="train-loss")
            reward_plot = gr.LinePlot(x="step", y="value", color="series", title="Rewards",
                                      elem_id="train-rewards")
        eval_table = gr.Dataframe(headers=EVAL_COLUMNS, interactive=False, value=[], elem_id="train-eval")
        eval_chart = gr.Image(label="Base against the new adapter", type="filepath", interactive=False,
                              elem_id="train-eval-chart")
        runs_table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, value=[], elem_id="train-runs")
        state, shown = gr.JSON(visible=False), gr.Textbox(visible=False)
        viewed = [progress, loss_plot, reward_plot, eval_table, eval_chart, runs_table, state, shown, model_status]

        config.change(lambda c: form_values(c), config, [steps_box, lr_box, beta_box, rank_box],
                      api_visibility="private")
        start.click(self.start, [use_pairs, files, held_out, config, steps_box, lr_box, beta_box, rank_box],
                    [*viewed, note], api_name="start_training")
        cancel.click(self.cancel, None, [*viewed, note], api_name="cancel_training")
        resume.click(self.resume, shown, [*viewed, note], api_name="resume_training")
        refresh = gr.Button(visible=False)
        refresh.click(self.view, None, viewed, api_name="training_progress")
        # Redrawn every two seconds, outside the queue: a poll never waits behind answers.
        timer = gr.Timer(2.0)
        timer.tick(self.view, None, viewed, queue=False, api_visibility="private")
        demo.load(self.view, None, viewed, api_visibility="private")
