"""The adapters tab: the adapters in ADAPTER_DIR, and which one answers (a pinned one, the base, the newest)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import gradio as gr

from assistant.model_loader import READY, ModelLoader
from assistant.ui.errors import Refusal
from engine.adapter_switch import FOLLOW, AdapterSwitch
from errors import UserError
from finetune.adapters import AdapterEntry

COLUMNS = ["adapter", "base model", "written", "pairs", "steps", "eval", "status"]


class AdaptersTab:
    def __init__(self, switch: AdapterSwitch, loader: ModelLoader):
        self.switch, self.loader = switch, loader
        self.downloads = Path(tempfile.mkdtemp(prefix="think-rag-adapters-"))  # zips to download, gone at exit
        atexit.register(shutil.rmtree, self.downloads, True)

    def state(self, adapters: list[AdapterEntry] | None = None) -> dict:
        """What the API returns: the choice, the adapter in use, and every adapter with why it cannot be used."""
        active = self.switch.active
        adapters = self.switch.adapters() if adapters is None else adapters
        return {"mode": self.switch.choice.mode, "pinned": self.switch.choice.adapter,
                "active": active.name if active else None, "model_status": self.loader.state,
                "adapters": [a.to_dict() for a in adapters]}

    def listing(self):
        """(summary, table rows, the adapter picker, state as JSON)."""
        adapters = self.switch.adapters()
        state = self.state(adapters)
        active = self.switch.active
        in_use = active.name if active and self.loader.state == READY else None
        rows = [[a.name, a.base_model or "unknown", a.written, a.data_size, a.steps, a.eval_summary or "",
                 "in use" if a.name == in_use else ("usable" if a.usable else f"not usable: {a.reason}")]
                for a in adapters]
        if self.loader.state != READY:
            summary = f"**Model {self.loader.state}**: adapters can be chosen once it is ready."
        else:
            summary = (f"**In use:** {in_use or 'the base model'} ({self.switch.choice.describe()}). "
                       + ("A newer adapter written to the folder is swapped in between answers."
                          if self.switch.choice.mode == FOLLOW else "Follow the newest to pick up new adapters again."))
        summary += f" Folder: `{self.switch.settings.adapter_dir}`."
        names = [a.name for a in adapters]
        picker = gr.Dropdown(choices=names, value=in_use if in_use in names else None)
        return summary, rows, picker, state

    def _do(self, action, *args):
        if self.loader.state != READY:
            raise Refusal(f"The model is {self.loader.state}: adapters can be chosen once it is ready.")
        try:
            note = action(*args)
        except UserError as e:
            raise Refusal(str(e)) from None
        return *self.listing(), note, self.loader.status_markdown()

    def use_adapter(self, name: str | None):
        if not name:
            raise Refusal("Pick an adapter from the list first.")
        return self._do(self.switch.use_adapter, name)

    def rename(self, name: str | None, new_name: str):
        if not name:
            raise Refusal("Pick the adapter to rename from the list first.")
        return self._change(self.switch.rename, name, new_name or "")

    def delete(self, name: str | None):
        if not name:
            raise Refusal("Pick the adapter to delete from the list first.")
        return self._change(self.switch.delete, name)

    def _change(self, action, *args):
        """A rename or delete: allowed whatever the model's state (it only refuses the adapter answering)."""
        try:
            note = action(*args)
        except UserError as e:
            raise Refusal(str(e)) from None
        return *self.listing(), note, self.loader.status_markdown()

    def download(self, name: str | None) -> str:
        if not name:
            raise Refusal("Pick the adapter to download from the list first.")
        try:
            return str(self.switch.archive(name, self.downloads))
        except UserError as e:
            raise Refusal(str(e)) from None

    def use_base(self):
        return self._do(self.switch.use_base)

    def follow_newest(self):
        return self._do(self.switch.follow_newest)

    def build(self, demo: gr.Blocks, model_status: gr.Markdown) -> None:
        summary = gr.Markdown(elem_id="adapters-summary")
        table = gr.Dataframe(headers=COLUMNS, datatype=["str", "str", "str", "number", "number", "str", "str"],
                             interactive=False, value=[], wrap=True, elem_id="adapters-table",
                             column_widths=["14%", "14%", "12%", "8%", "8%", "24%", "20%"])
        with gr.Row():
            picker = gr.Dropdown(label="Adapter", choices=[], elem_id="adapter-picker")
            use = gr.Button("Use this adapter", variant="primary", elem_id="adapter-use")
            base = gr.Button("Use the base model", elem_id="adapter-base")
            follow = gr.Button("Follow the newest", elem_id="adapter-follow")
            refresh = gr.Button("Refresh", elem_id="adapters-refresh")
        with gr.Row():
            new_name = gr.Textbox(label="New name", placeholder="e.g. orpo-lighthouse-v2", elem_id="adapter-new-name")
            rename = gr.Button("Rename", elem_id="adapter-rename")
            delete = gr.Button("Delete", variant="stop", elem_id="adapter-delete")
            download = gr.Button("Download (zip)", elem_id="adapter-download")
        downloaded = gr.File(label="The adapter, zipped", interactive=False, height=90, elem_id="adapter-file")
        note = gr.Markdown(elem_id="adapters-note")
        state = gr.JSON(visible=False)
        listed = [summary, table, picker, state]
        changed = [*listed, note, model_status]
        refresh.click(self.listing, None, listed, api_name="list_adapters")
        use.click(self.use_adapter, picker, changed, api_name="use_adapter")
        base.click(self.use_base, None, changed, api_name="use_base_model")
        follow.click(self.follow_newest, None, changed, api_name="follow_newest")
        rename.click(self.rename, [picker, new_name], changed, api_name="rename_adapter")
        delete.click(self.delete, picker, changed, api_name="delete_adapter")
        download.click(self.download, picker, downloaded, api_name="download_adapter")
        demo.load(self.listing, None, listed, api_visibility="private")
