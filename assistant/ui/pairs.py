"""The pairs tab: the preference pairs collected so far; browse, delete a bad one, export for training."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import gradio as gr

from assistant.feedback import FeedbackStore
from assistant.ui.errors import Refusal
from errors import UserError
from finetune.pairs_store import StoredPair, write_export

PREVIEW_CHARS = 160
COLUMNS = ["id", "origin", "question", "chosen", "rejected", "user", "saved"]


def _side(title: str, answer) -> str:
    reasoning = "\n".join(f"> {line}" for line in (answer.reasoning.strip() or "(no reasoning)").splitlines())
    who = "written by a person" if answer.model is None else f"by {Path(answer.model).name} + adapter " \
                                                               f"{answer.adapter or 'none'}"
    return f"#### {title} ({who})\n**Reasoning**\n\n{reasoning}\n\n**Answer**\n\n{answer.answer.strip() or '(none)'}"


def pair_markdown(pair: StoredPair) -> str:
    """One pair in full: the question, then the chosen and the rejected answer, reasoning and answer each."""
    question = pair.chosen.question or pair.chosen.instruction or "(see the prompt)"
    return (f"### Pair {pair.id} ({pair.origin}{', by ' + pair.user if pair.user else ''})\n"
            f"**Question:** {question}\n\n{_side('Chosen', pair.chosen)}\n\n{_side('Rejected', pair.rejected)}")


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 1] + "…"


class PairsTab:
    """``feedback`` is None when the pairs store cannot be opened; ``error`` then says why."""

    def __init__(self, feedback: FeedbackStore | None, exports_folder: Path, error: str | None = None,
                 source_paths: bool = False):
        self.feedback, self.error, self.source_paths = feedback, error, source_paths
        self.exports_folder = Path(exports_folder) / "pairs"

    def _need(self) -> FeedbackStore:
        if self.feedback is None:
            raise Refusal(f"The pairs store is unavailable: {self.error}")
        return self.feedback

    def listing(self):
        """(summary, table rows)."""
        if self.feedback is None:
            return f"**The pairs store is unavailable:** {self.error}", []
        store = self.feedback.store
        rows = [[p.id, p.origin, _preview(p.chosen.question or p.chosen.prompt),
                 _preview(p.chosen.answer or p.chosen.reasoning), _preview(p.rejected.answer or p.rejected.reasoning),
                 p.user or "", time.strftime("%Y-%m-%d %H:%M", time.localtime(p.created_at))] for p in store.pairs()]
        summary = (f"**{len(rows)} pair{'' if len(rows) == 1 else 's'}** in `{store.path}`; "
                   f"{store.unpaired_down_votes()} thumbs-down answers "
                   "wait for a better answer to the same question. Train on them with "
                   f"`python -m finetune train ... data={store.path}`.")
        return summary, rows

    def open_pair(self, event: gr.SelectData):
        """A row clicked in the table: (the pair in full, its id for Delete)."""
        pair_id = int(event.row_value[0])
        try:
            pair = self._need().store.pair(pair_id)
        except UserError as e:
            raise Refusal(str(e)) from None
        return pair_markdown(pair), pair_id

    def delete(self, pair_id: float | None):
        if pair_id is None:
            raise Refusal("Click the pair's row in the table first (or give its id).")
        try:
            self._need().store.delete_pair(int(pair_id))
        except UserError as e:
            raise Refusal(str(e)) from None
        return *self.listing(), f"Deleted pair {int(pair_id)}.", ""

    def export(self, layout: str) -> str:
        """The pairs as a JSONL file to download: TRL's rows ("trl") or the recipe's columns ("recipe").

        One file per layout, replaced whole each time (Gradio serves a copy it takes when the value is set)."""
        self.exports_folder.mkdir(parents=True, exist_ok=True)
        path = self.exports_folder / f"pairs-{layout}.jsonl"
        partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
        write_export(self._need().store, layout, partial, self.source_paths)
        os.replace(partial, path)
        return str(path)

    def downloads(self):
        """The two export buttons, each holding the pairs as they are now: a download button hands out the
        file it holds when clicked, so the file is written before, whenever the list is shown."""
        if self.feedback is None:
            return gr.DownloadButton(value=None, interactive=False), gr.DownloadButton(value=None, interactive=False)
        return (gr.DownloadButton(value=self.export("trl"), interactive=True),
                gr.DownloadButton(value=self.export("recipe"), interactive=True))

    def build(self, tab: gr.Tab) -> None:
        summary = gr.Markdown(elem_id="pairs-summary")
        table = gr.Dataframe(headers=COLUMNS, datatype=["number", "str", "str", "str", "str", "str", "str"],
                             interactive=False, value=[], wrap=True, elem_id="pairs-table",
                             column_widths=["4%", "9%", "21%", "23%", "23%", "8%", "12%"],
                             label="Click a pair to read it in full")
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="pairs-refresh")
            pair_id = gr.Number(label="Pair id", precision=0, elem_id="pair-id")
            delete = gr.Button("Delete this pair", variant="stop", elem_id="pair-delete")
        note = gr.Markdown(elem_id="pairs-note")
        opened = gr.Markdown(elem_id="pair-full")
        with gr.Row():
            trl = gr.DownloadButton("Export as TRL preference JSONL", elem_id="export-trl", interactive=False)
            recipe = gr.DownloadButton("Export in the recipe's columns (JSONL)", elem_id="export-recipe",
                                       interactive=False)
        refresh.click(self.listing, None, [summary, table], api_name="list_pairs").then(
            self.downloads, None, [trl, recipe], api_visibility="private")
        table.select(self.open_pair, None, [opened, pair_id], api_visibility="private")
        delete.click(self.delete, pair_id, [summary, table, note, opened], api_name="delete_pair").then(
            self.downloads, None, [trl, recipe], api_visibility="private")
        # Listed, and the exports written, when the tab is opened: not on every page load of the app.
        tab.select(self.listing, None, [summary, table], api_visibility="private").then(
            self.downloads, None, [trl, recipe], api_visibility="private")
        # The exports as named endpoints, for scripts.
        exported, api = gr.File(visible=False), gr.Button(visible=False)
        api.click(lambda: self.export("trl"), None, exported, api_name="export_pairs_trl")
        api.click(lambda: self.export("recipe"), None, exported, api_name="export_pairs_recipe")
