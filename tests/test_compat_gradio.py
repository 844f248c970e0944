"""compat.py's Gradio section: the internals the app uses are there in the pinned Gradio, and a release without
one of them fails with the version checked on, not an AttributeError inside a request."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

import compat


def test_the_pinned_gradio_has_every_internal_the_app_uses(tmp_path):
    assert compat.gradio_api_prefix().startswith("/")
    assert not compat.is_gradio_app(object()) and compat.gradio_upload_folder()
    box = gr.File(file_count="multiple", type="filepath")
    moved = []
    box.move_resource_to_block_cache = lambda path: moved.append(path) or "cached"
    compat.move_to_block_cache_only_if(box, lambda path: str(path).endswith(".keep"))
    assert box.move_resource_to_block_cache("a.keep") == "a.keep" and box.move_resource_to_block_cache("b") == "cached"
    assert moved == ["b"]


def test_a_gradio_without_an_internal_names_it_and_the_version_checked_on(monkeypatch):
    import gradio.route_utils

    monkeypatch.delattr(gradio.route_utils, "API_PREFIX")
    with pytest.raises(compat.CompatError, match=r"no gradio\.route_utils\.API_PREFIX \(checked on gradio 6\.31\.0\)"):
        compat.gradio_api_prefix()
    older_box = SimpleNamespace(move_resource_to_block_cache=lambda path: path)  # a File without the async twin
    with pytest.raises(compat.CompatError, match="async_move_resource_to_block_cache"):
        compat.move_to_block_cache_only_if(older_box, lambda path: True)
