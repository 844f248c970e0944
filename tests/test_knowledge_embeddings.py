"""Embedding settings: the prefixes E5 models were trained with, and the dtype chosen for this machine."""

from __future__ import annotations

import pytest
import torch

from knowledge.embeddings import default_prefixes, resolve_dtype


@pytest.mark.parametrize("model, prefixes", [
    ("intfloat/multilingual-e5-small", ("query: ", "passage: ")),
    ("/models/multilingual-e5-base", ("query: ", "passage: ")),
    ("sentence-transformers/all-MiniLM-L6-v2", ("", "")),
])
def test_e5_models_get_their_query_and_passage_prefixes(model, prefixes):
    assert default_prefixes(model) == prefixes


def test_dtype_names_map_to_torch_dtypes():
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16, torch.float16)
