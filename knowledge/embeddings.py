"""Text to vectors with a sentence-transformers model, with the query/passage prefixes it was trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from errors import UserError
from settings import Settings


class EmbeddingModelError(UserError):
    """The embedding model cannot be loaded; the message says what to set or fetch."""


def default_prefixes(model_name: str) -> tuple[str, str]:
    """(query, passage) prefixes: E5 models were trained with them and rank worse without."""
    if "e5" in model_name.lower().replace("\\", "/").split("/")[-1]:
        return "query: ", "passage: "
    return "", ""


class Embedder:
    def __init__(self, settings: Settings):
        from sentence_transformers import SentenceTransformer

        self.model_name = settings.embedding_model
        query_prefix, passage_prefix = default_prefixes(self.model_name)
        self.query_prefix = query_prefix if settings.embedding_query_prefix is None else settings.embedding_query_prefix
        self.passage_prefix = (
            passage_prefix if settings.embedding_passage_prefix is None else settings.embedding_passage_prefix
        )
        self.batch_size = settings.embedding_batch_size
        self.dtype = resolve_dtype(settings.embedding_dtype)
        try:
            self.model = SentenceTransformer(self.model_name, device="cuda" if _cuda() else "cpu",
                                             model_kwargs={"dtype": self.dtype})
        except OSError as e:
            raise EmbeddingModelError(_load_failure(self.model_name, e)) from None
        self.dimension = self.model.get_embedding_dimension()

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode([self.passage_prefix + t for t in texts])

    def embed_query(self, text: str) -> np.ndarray:
        return self._encode([self.query_prefix + text])[0]

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)


def _load_failure(name: str, error: OSError) -> str:
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")):  # meant as a folder, not a hub name
        what = "no such folder" if not Path(name).expanduser().exists() else str(error).splitlines()[0]
        return (f"cannot load EMBEDDING_MODEL={name!r}: {what}. Set EMBEDDING_MODEL to a sentence-transformers "
                "folder, or to a hub name such as intfloat/multilingual-e5-small.")
    return (f"cannot load EMBEDDING_MODEL={name!r} ({str(error).splitlines()[0]}). If it is a hub name, check "
            "its spelling and connect to the internet once so the hub can download it; or set EMBEDDING_MODEL "
            "to a local sentence-transformers folder.")


def resolve_dtype(name: str):
    """The torch dtype for EMBEDDING_DTYPE; "auto" picks the fastest one that keeps rankings."""
    import torch

    if name == "auto":
        if _cuda():
            return torch.float16
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
