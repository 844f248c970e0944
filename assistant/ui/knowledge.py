"""The knowledge tab: upload documents, list them, remove one, search the store directly.

Only files uploaded to the app are added: files in Gradio's upload folder (or already in KNOWLEDGE_DIR/uploads/).
A client can name any server path in a request; such a path is refused by name, never read. Uploads are copied
into KNOWLEDGE_DIR/uploads/ under a cleaned base name (never a path the browser sent) and added from there, so
the store's source names stay stable and inside one folder. That folder is not one of Gradio's allowed paths:
documents are read by the store, never served back as files.
"""

from __future__ import annotations

import html
import re
import shutil
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

import compat
from assistant.ui.errors import Refusal
from assistant.ui.markdown import passage_markdown
from errors import UserError
from knowledge import KnowledgeStore

UPLOADS = "uploads"
MAX_NAME_CHARS = 120
NOT_UPLOADED = ("not a file uploaded to this app: add files with the upload box (or with `python -m knowledge add` "
                "on the server)")


def gradio_upload_folder() -> Path:
    """Where Gradio keeps uploaded files: GRADIO_TEMP_DIR, by default <the system's temp folder>/gradio."""
    return Path(compat.gradio_upload_folder()).resolve()


def is_file_inside(path: str | Path, folders: Sequence[Path]) -> bool:
    """Whether `path`, links resolved, is a file inside one of `folders`."""
    resolved = Path(path).resolve()
    return resolved.is_file() and any(resolved.is_relative_to(Path(f).resolve()) for f in folders)


def safe_upload_name(name: str) -> str:
    """A base name that cannot leave the uploads folder: no folders, no '..', no leading dot, no odd bytes."""
    name = unicodedata.normalize("NFC", str(name)).replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^\w.\- ]", "_", name).strip(" .")
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    stem = stem[:MAX_NAME_CHARS] or "upload"
    return f"{stem}.{suffix[:16]}" if suffix else stem


def save_uploads(files: list[tuple[str | Path, str]], uploads_dir: Path, max_mb: float,
                 uploaded_to: Sequence[Path]) -> tuple[list[Path], list[dict]]:
    """Copy (temporary path, name the browser gave) pairs into uploads_dir; refuse by name files over max_mb
    and files that are not inside one of the `uploaded_to` folders (uploads_dir itself counts as one).

    Returns the saved paths and {"source", "reason"} for each refused file.
    """
    uploads_dir = Path(uploads_dir)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    root = uploads_dir.resolve()
    saved, refused = [], []
    for temp_path, client_name in files:
        name = safe_upload_name(client_name)
        if not is_file_inside(temp_path, [*uploaded_to, root]):
            refused.append({"source": name, "reason": NOT_UPLOADED})
            continue
        size = Path(temp_path).stat().st_size
        if size > max_mb * 1024 * 1024:
            refused.append({"source": name, "reason": f"the file is {size / 1048576:.1f} MB, over the "
                            f"{max_mb:g} MB upload limit (raise MAX_UPLOAD_MB, or add it with "
                            "`python -m knowledge add`)"})
            continue
        target = (uploads_dir / name).resolve()
        if target.parent != root:  # cannot happen after safe_upload_name; a bug if it does
            raise AssertionError(f"upload name {client_name!r} escaped the uploads folder")
        if Path(temp_path).resolve() != target:  # a file of uploads_dir added again is already in place
            shutil.copyfile(temp_path, target)
        saved.append(target)
    return saved, refused


def report_markdown(added: list[dict], skipped: list[dict], failed: list[dict]) -> str:
    """Per-file results, as `python -m knowledge add` prints them."""
    lines = []
    for item in added:
        lines.append(f"- **added** {_name(item['source'])} ({item['chunks']} chunks)")
        lines += [f"    - warning: {html.escape(w)}" for w in item.get("warnings", [])]
    lines += [f"- **skipped** {_name(i['source'])}: {html.escape(i['reason'])}" for i in skipped]
    lines += [f"- **failed** {_name(i['source'])}: {html.escape(i['error'])}" for i in failed]
    lines.append(f"\n{len(added)} added, {len(skipped)} skipped, {len(failed)} failed")
    return "\n".join(lines)


def _shown_source(source: str, root: Path) -> str:
    path = Path(source)
    return str(path.relative_to(root)) if path.is_relative_to(root) else source


def _name(source: str) -> str:
    return f"`{Path(source).name}`"


def _not_uploaded(path: str | Path | None) -> bool:
    return path is not None and not is_file_inside(path, [gradio_upload_folder()])


def uploaded_paths(payload) -> list[str] | None:
    """The upload box's files as paths. (gr.File's own preprocess also leaves an empty temporary file in
    Gradio's cache for each file, which nothing ever deletes.)"""
    return compat.uploaded_file_paths(payload)


def upload_box(**kwargs) -> gr.File:
    """A gr.File for several files that copies into Gradio's cache only files that were uploaded to it.

    Before an event runs, Gradio copies every path a request names as a file into its cache (downloading URLs).
    Its own check that the path was uploaded is skipped in an app mounted with gr.mount_gradio_app, whose Blocks
    never "launch" (Gradio 6.31, processing_utils._check_allowed). Here any other path is handed on as sent, for
    save_uploads to refuse by name. The methods are replaced on the instance: subclassing a Gradio component
    makes Gradio write a .pyi stub file beside the subclass's module whenever it is imported.
    """
    box = gr.File(file_count="multiple", type="filepath", **kwargs)
    compat.move_to_block_cache_only_if(box, _not_uploaded)
    box.preprocess = uploaded_paths
    return box


class KnowledgeTab:
    """`store` is None when the store could not be opened; `store_error` then says why."""

    def __init__(self, store: KnowledgeStore | None, settings, store_error: str | None = None):
        self.store, self.settings, self.store_error = store, settings, store_error
        self.uploads_dir = Path(settings.knowledge_dir) / UPLOADS

    def _need_store(self) -> KnowledgeStore:
        if self.store is None:
            raise Refusal(f"The knowledge store is unavailable: {self.store_error}")
        return self.store

    def add_files(self, paths: list[str] | None):
        """Add uploaded files; returns (report, documents table, remove choices, cleared upload box)."""
        if not paths:
            return "*Choose files to add first.*", *self._listing(), None
        store = self._need_store()
        saved, refused = save_uploads([(p, Path(p).name) for p in paths], self.uploads_dir,
                                      self.settings.max_upload_mb, uploaded_to=[gradio_upload_folder()])
        try:
            report = store.add(saved) if saved else None
        except UserError as e:
            return f"**Cannot add:** {html.escape(str(e))}", *self._listing(), None
        added, skipped, failed = (report.added, report.skipped, report.failed) if report else ([], [], [])
        failed = [*failed, *({"source": r["source"], "error": r["reason"]} for r in refused)]
        return report_markdown(added, skipped, failed), *self._listing(), None

    def documents(self) -> list[list]:
        """[[source, chunks], ...] for every document in the store."""
        try:
            return [[d.source, d.chunks] for d in self._need_store().documents()]
        except UserError as e:
            raise Refusal(f"Cannot list the documents: {e}") from None

    def _listing(self):
        """(table rows, remove choices): uploads by their name inside KNOWLEDGE_DIR, other files by path."""
        rows = self.documents() if self.store is not None else []
        root = Path(self.settings.knowledge_dir).resolve()
        shown = [[_shown_source(source, root), chunks] for source, chunks in rows]
        choices = [(f"{Path(source).name}  ({chunks} chunks)", source) for source, chunks in rows]
        return shown, gr.Dropdown(choices=choices, value=None)

    def refresh(self):
        return self._listing()

    def remove(self, source: str | None):
        if not source:
            return "*Pick a document to remove.*", *self._listing()
        try:
            count = self._need_store().remove(source)
        except UserError as e:
            return f"**Cannot remove** {_name(source)}: {html.escape(str(e))}", *self._listing()
        return f"**removed** {_name(source)} ({count} chunks)", *self._listing()

    def search(self, query: str, k: float, mode: str) -> str:
        if not (query or "").strip():
            return "*Type something to search for.*"
        try:
            hits = self._need_store().search(query.strip(), k=int(k), mode=mode)
        except UserError as e:
            return f"**Cannot search:** {html.escape(str(e))}"
        if not hits:
            return "*No passages found.*"
        blocks = []
        for number, hit in enumerate(hits, start=1):
            page = f", page {hit.page}" if hit.page is not None else ""
            blocks.append(f"<details><summary>[{number}] {html.escape(Path(hit.source).name)}{page} "
                          f"(score {hit.score:.3f})</summary>\n\n{passage_markdown(hit.text)}\n\n</details>")
        return "\n\n".join(blocks)

    def build(self, settings, demo: gr.Blocks) -> None:
        if self.store is None:
            gr.Markdown(f"**The knowledge store is unavailable:** {html.escape(str(self.store_error))}")
        with gr.Row():
            with gr.Column():
                gr.Markdown(f"### Add documents\nPDF, Word, HTML, Markdown, text, JSON… up to "
                            f"{settings.max_upload_mb:g} MB each. A file added again replaces its old version.")
                upload = upload_box(label="Files", elem_id="upload")
                add = gr.Button("Add to knowledge", variant="primary", elem_id="add-documents")
                add_report = gr.Markdown(elem_id="add-report")
            with gr.Column():
                gr.Markdown("### Documents")
                table = gr.Dataframe(headers=["document", "chunks"], datatype=["str", "number"],
                                     interactive=False, elem_id="documents", value=[], wrap=True,
                                     column_widths=["85%", "15%"])
                with gr.Row():
                    remove_choice = gr.Dropdown(label="Document", choices=[], scale=3, elem_id="remove-choice")
                    remove = gr.Button("Remove", variant="stop", scale=1, elem_id="remove")
                    refresh = gr.Button("Refresh", scale=1, elem_id="refresh")
                remove_report = gr.Markdown(elem_id="remove-report")
        gr.Markdown("### Search the store")
        with gr.Row():
            query = gr.Textbox(label="Query", scale=4, elem_id="search-query")
            k = gr.Slider(1, 20, value=settings.retrieval_k, step=1, label="Passages", scale=1)
            mode = gr.Radio(["hybrid", "vector", "lexical"], value="hybrid", label="Mode", scale=2)
            search = gr.Button("Search", scale=1, elem_id="search")
        results = gr.Markdown(elem_id="search-results")

        store_events = dict(concurrency_limit=1, concurrency_id="store")
        add.click(self.add_files, upload, [add_report, table, remove_choice, upload], api_name="add_documents",
                  **store_events)
        remove.click(self.remove, remove_choice, [remove_report, table, remove_choice], api_name="remove_document",
                     **store_events)
        refresh.click(self.refresh, None, [table, remove_choice], api_visibility="private")
        gr.on([query.submit, search.click], self.search, [query, k, mode], results, api_name="search")
        demo.load(self.refresh, None, [table, remove_choice], api_visibility="private")
        gr.api(self.documents_api, api_name="list_documents")

    def documents_api(self) -> list[dict]:
        """Every document in the store: {"source", "chunks"}."""
        return [{"source": source, "chunks": chunks} for source, chunks in self.documents()]
