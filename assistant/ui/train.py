"""The Train tab: train an adapter on the collected pairs and uploaded files of pairs, follow the run live,
cancel or resume it, and compare the base model with the new adapter when it ends.

The run is a job of its own (``assistant/training.py`` starts it, ``finetune/runs.py`` records it,
``assistant/learning/run_job.py`` carries it out): this tab only starts it and reads its folder, every two
seconds while the tab is open, so a reload or an app restart loses nothing.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from assistant.model_loader import ModelLoader
from assistant.training import ROOT, TrainingControl, config_path
from assistant.ui.errors import Refusal
from assistant.ui.knowledge import gradio_upload_folder, is_file_inside, upload_box
from errors import UserError
from finetune import runs
from finetune.config import load_config
from finetune.pairs_store import PairsStore
from finetune.run_check import RunCheck, check_run

CONFIGS = ROOT / "finetune" / "configs"
LOSS_SERIES = ("loss", "nll_loss", "or_loss")
REWARD_SERIES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
# The evaluation's metrics (finetune/metrics.py, finetune/evaluation.py) as the table names them.
EVAL_COLUMNS = {"name": "model", "completions": "answers scored", "think_rate": "closes its reasoning",
                "duplication_rate": "repeats its reasoning as the answer", "accuracy": "correct",
                "preference_accuracy": "prefers the chosen answer", "margin": "log-prob margin (chosen − rejected)",
                "answer_chars": "answer length (characters)"}
RUN_COLUMNS = ["run", "status", "started", "error"]
PREVIEW_COLUMNS = ["prompt (its end)", "chosen", "rejected"]
PREVIEW_CHARS = 200
PAIRS_COME_FROM = ("Pairs come from the Chat tab: a 👎 and then a better answer (👍 after “Try again”), a pick "
                   "between two answers, or “Write a better answer”; or upload files of pairs below.")


def config_choices(default: Path) -> list[str]:
    """The training configs to start from: the project's (not the accelerate launch files) and TRAIN_CONFIG."""
    found = sorted(str(p.relative_to(ROOT)) for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate"))
    return list(dict.fromkeys([str(default), *found]))


def form_values(config_name: str) -> tuple[int, float, float, float, int]:
    """(steps, epochs, learning rate, beta, LoRA rank) of a config, as the form shows them: steps 0 where the
    config trains by epochs (its max_steps -1)."""
    config = load_config(config_path(config_name))
    return max(config.max_steps, 0), config.num_train_epochs, config.learning_rate, config.beta, config.lora_r


def model_label(name: str) -> str:
    return "base model (no adapter)" if name == "base" else f"adapter {Path(name).name}"


def eval_rows(models: list[dict]) -> list[list]:
    return [[model_label(m.get("name", "")) if key == "name" else m.get(key) for key in EVAL_COLUMNS]
            for m in models]


def _clip(text: str, tail: bool = False) -> str:
    text = " ".join(text.split())
    if len(text) <= PREVIEW_CHARS:
        return text
    return "…" + text[-PREVIEW_CHARS + 1:] if tail else text[:PREVIEW_CHARS - 1] + "…"


def check_markdown(check: RunCheck) -> str:
    """The check before a run, in a few lines."""
    lines = [f"**{check.pairs} usable pair{'s' if check.pairs != 1 else ''}**: {check.train} to train on, "
             f"{check.held_out} held out for the evaluation."]
    if check.eval_note:
        lines.append(f"{check.eval_note[0].upper()}{check.eval_note[1:]}.")
    if check.left_out_count:
        lines.append(f"{check.left_out_count} row{'s' if check.left_out_count != 1 else ''} left out: " + "; ".join(check.left_out[:3])
                     + ("…" if check.left_out_count > 3 else ""))
    fit = (f"{check.truncated} longer than the training context ({check.max_length} tokens) and cut to fit"
           if check.truncated else f"all within the training context ({check.max_length} tokens)")
    lines.append(f"Length: median {check.median} tokens, longest {check.longest}; {fit}.")
    length = f"{check.epochs:g} epoch{'s' if check.epochs != 1 else ''}, " if check.epochs is not None else ""
    pace = (f"about {_duration(check.seconds)} at {check.seconds_per_step:.1f} s a step (as measured in "
            f"{check.measured_in})" if check.seconds is not None else "time unknown until the first steps run")
    memory = f"about {check.memory_gib:.1f} GiB of memory" if check.memory_gib is not None else "memory unknown"
    lines.append(f"Run: {length}{check.steps} steps; {pace}; {memory}.")
    return "\n\n".join(lines)


def preview_rows(check: RunCheck) -> list[list[str]]:
    return [[_clip(r["prompt"], tail=True), _clip(r["chosen"]), _clip(r["rejected"])] for r in check.preview]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def curves(log: list[dict], keys: tuple[str, ...]) -> pd.DataFrame:
    rows = [{"step": r["step"], "value": r[k], "series": k} for r in log for k in keys if k in r]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def reward_plot(frame: pd.DataFrame) -> gr.LinePlot:
    """The rewards with room above and below: the accuracy line sits at 1.0 for most of a run, and a y axis
    ending there drew it on the frame's edge."""
    if frame.empty:
        return gr.LinePlot(value=frame)
    low, high = float(frame["value"].min()), float(frame["value"].max())
    pad = max(0.05 * (high - low), 0.05)
    return gr.LinePlot(value=frame, y_lim=[low - pad, high + pad])


def progress_markdown(state: dict) -> str:
    run = state["run"]
    if run is None:
        return "No training run yet. Choose the data and start one."
    text = f"**{run['name']}**: {run['status']}."
    log = state["log"]
    if state["max_steps"]:
        text += f" Step {state['step']} of {state['max_steps']} ({100 * state['step'] // state['max_steps']}%)."
    if run["status"] == runs.RUNNING and run["phase"] == runs.TRAINING and state["eta_s"] is not None:
        text += f" About {_duration(state['eta_s'])} left."
    elif run["status"] == runs.RUNNING:
        text += {runs.PREPARING: " Preparing the data…", runs.TRAINING: "" if log else " Loading the model…",
                 runs.EVALUATING: " Evaluating the base model and the new adapter on the held-out pairs…"
                 }.get(run["phase"], "")
    if log:
        last = log[-1]
        parts = [f"{k} {last[k]:.3f}" for k in ("loss", "rewards/margins", "rewards/accuracies") if k in last]
        if "peak_memory_gib" in last:
            parts.append(f"peak memory {last['peak_memory_gib']:.1f} GiB")
        text += " " + ", ".join(parts) + "."
    if run["chat_unloaded"] and run["status"] not in runs.ENDED:
        text += " The chat model is unloaded while it runs."
    if run.get("pairs") is not None:
        text += f" {run['pairs'] - run['held_out']} pairs to train on, {run['held_out']} held out for the evaluation."
    if run.get("eval_note"):
        text += f" {run['eval_note'][0].upper()}{run['eval_note'][1:]}."
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
        rows = eval_rows(state.get("eval") or [])
        runs_table = [[r["name"], r["status"], r["started"], r["error"] or ""] for r in state["runs"]]
        shown = {k: v for k, v in state.items() if k != "log"}
        return (progress_markdown(state), curves(log, LOSS_SERIES), reward_plot(curves(log, REWARD_SERIES)), rows,
                state.get("eval_plot"), runs_table, {**shown, "log_records": len(log)}, run["name"] if run else "",
                self.loader.status_markdown())

    def spec(self, use_pairs: bool, files, held_out: float, config_name: str, steps: float, epochs: float,
             learning_rate: float, beta: float, rank: float) -> runs.RunSpec:
        """The run the form describes; refused at once when it has no pairs to train on."""
        sources = []
        if use_pairs:
            store = PairsStore(self.settings.pairs_db)
            if store.count():
                sources.append(str(self.settings.pairs_db))
            elif not files:
                waiting = store.unpaired_down_votes()
                raise Refusal("No pairs to train on: the pairs store holds 0 pairs"
                               + (f" ({waiting} answer{'s' if waiting != 1 else ''} voted 👎 still wait for a better "
                                  "answer)" if waiting else "") + f". {PAIRS_COME_FROM}")
        elif not files:
            raise Refusal(f"No data chosen: tick “The collected pairs” or upload files of pairs. {PAIRS_COME_FROM}")
        for path in files or []:
            if not is_file_inside(path, [gradio_upload_folder()]):
                raise Refusal(f"{Path(path).name}: not a file uploaded to this app; use the upload box.")
            sources.append(path)
        length = {"max_steps": int(steps)} if steps and steps > 0 else \
            {"max_steps": -1, "num_train_epochs": float(epochs)}
        return runs.RunSpec(model_name=self.settings.chat_model, config=str(config_path(config_name)),
                            sources=sources, held_out_share=float(held_out),
                            overrides={**length, "learning_rate": float(learning_rate), "beta": float(beta),
                                       "lora_r": int(rank)},
                            eval_max_new_tokens=self.settings.max_new_tokens)

    def _check(self, spec: runs.RunSpec) -> RunCheck:
        try:
            check = check_run(spec, self.control.adapter_dir, cuda=self.control.cuda())
        except UserError as e:
            raise Refusal(str(e)) from None
        if not check.pairs:
            raise Refusal(f"No usable pairs in the data chosen ({check.left_out_count} rows left out: "
                           + "; ".join(check.left_out[:3]) + f"). {PAIRS_COME_FROM}")
        return check

    def check(self, *form):
        """(the check's summary, the preview's rows) of the run the form describes."""
        check = self._check(self.spec(*form))
        return check_markdown(check), preview_rows(check)

    def start(self, *form):
        spec = self.spec(*form)
        check = self._check(spec)
        return *self._do(self.control.start, spec), check_markdown(check), preview_rows(check)

    def cancel(self):
        return self._do(self.control.cancel)

    def resume(self, name: str):
        if not name:
            raise Refusal("No run to resume.")
        return self._do(self.control.resume, name)

    def _do(self, action, *args):
        try:
            note = action(*args)
        except UserError as e:
            raise Refusal(str(e)) from None
        return *self.view(), note

    def build(self, demo: gr.Blocks, model_status: gr.Markdown) -> None:
        configs = config_choices(self.settings.train_config)
        steps, epochs, learning_rate, beta, rank = form_values(configs[0])
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
            steps_box = gr.Number(steps, label="Steps (0: train by epochs)", precision=0, minimum=0,
                                  elem_id="train-steps")
            epochs_box = gr.Number(epochs, label="Epochs (when steps is 0)", minimum=0.01, elem_id="train-epochs")
            lr_box = gr.Number(learning_rate, label="Learning rate", elem_id="train-lr")
            beta_box = gr.Number(beta, label="Beta (ORPO)", elem_id="train-beta")
            rank_box = gr.Number(rank, label="LoRA rank", precision=0, minimum=1, elem_id="train-rank")
        with gr.Row():
            check = gr.Button("Check the data", elem_id="train-check")
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
            cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            resume = gr.Button("Resume", elem_id="train-resume")
        note = gr.Markdown(elem_id="train-note")
        checked = gr.Markdown(elem_id="train-check-summary")
        preview = gr.Dataframe(headers=PREVIEW_COLUMNS, interactive=False, value=[], wrap=True,
                               column_widths=["34%", "33%", "33%"], label="The first pairs", elem_id="train-preview")
        progress = gr.Markdown(elem_id="train-progress")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss", x_axis_format="d",
                                    elem_id="train-loss")
            rewards = gr.LinePlot(x="step", y="value", color="series", title="Rewards", x_axis_format="d",
                                  elem_id="train-rewards")
        eval_table = gr.Dataframe(headers=list(EVAL_COLUMNS.values()), interactive=False, value=[], wrap=True,
                                  column_widths=["19%", "9%", "11%", "14%", "8%", "12%", "14%", "13%"],
                                  label="The base model against the new adapter, on the held-out pairs",
                                  elem_id="train-eval")
        eval_chart = gr.Image(label="Base against the new adapter", type="filepath", interactive=False,
                              elem_id="train-eval-chart")
        runs_table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, value=[], elem_id="train-runs")
        state, shown = gr.JSON(visible=False), gr.Textbox(visible=False)
        viewed = [progress, loss_plot, rewards, eval_table, eval_chart, runs_table, state, shown, model_status]

        form = [use_pairs, files, held_out, config, steps_box, epochs_box, lr_box, beta_box, rank_box]
        config.change(lambda c: form_values(c), config, [steps_box, epochs_box, lr_box, beta_box, rank_box],
                      api_visibility="private")
        check.click(self.check, form, [checked, preview], api_name="check_training_data")
        start.click(self.start, form, [*viewed, note, checked, preview], api_name="start_training")
        cancel.click(self.cancel, None, [*viewed, note], api_name="cancel_training")
        resume.click(self.resume, shown, [*viewed, note], api_name="resume_training")
        refresh = gr.Button(visible=False)
        refresh.click(self.view, None, viewed, api_name="training_progress")
        # Redrawn every two seconds, outside the queue: a poll never waits behind answers.
        timer = gr.Timer(2.0)
        timer.tick(self.view, None, viewed, queue=False, api_visibility="private")
        demo.load(self.view, None, viewed, api_visibility="private")
