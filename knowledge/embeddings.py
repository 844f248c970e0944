"""Text to vectors with a sentence-transformers model, with the query/passage prefixes it was trained on.

The model runs on torch, or (``EMBEDDING_BACKEND``) exported to ONNX Runtime, ONNX Runtime int8, OpenVINO or
OpenVINO int8 (``knowledge/exported.py``: exported once per model version and cached under
``$HF_HOME/think-rag/exports``).
"""

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
    """``model`` is the SentenceTransformer: it computes the vectors on the torch backend, and tokenizes for the
    others (which also export from it the first time)."""

    def __init__(self, settings: Settings):
        from sentence_transformers import SentenceTransformer

        self.model_name = settings.embedding_model
        query_prefix, passage_prefix = default_prefixes(self.model_name)
        self.query_prefix = query_prefix if settings.embedding_query_prefix is None else settings.embedding_query_prefix
        self.passage_prefix = (
            passage_prefix if settings.embedding_passage_prefix is None else settings.embedding_passage_prefix
        )
        self.batch_size = settings.embedding_batch_size
        self.backend = resolve_backend(settings.embedding_backend)
        if self.backend == "torch":
            self.dtype = resolve_dtype(settings.embedding_dtype)
            model_kwargs = {"dtype": self.dtype}
        else:  # the export wants float32 and plain attention ops, which ONNX Runtime fuses
            self.dtype = _exported_dtype(self.backend, settings.embedding_dtype)
            model_kwargs = {"attn_implementation": "eager"}
        try:
            self.model = SentenceTransformer(self.model_name, device="cuda" if self.backend == "torch" and _cuda()
                                             else "cpu", model_kwargs=model_kwargs)
        except OSError as e:
            raise EmbeddingModelError(_load_failure(self.model_name, e)) from None
        self.dimension = self.model.get_embedding_dimension()
        self._run = None
        if self.backend != "torch":
            from knowledge.exported import input_names, load_runner

            precision = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(settings.embedding_dtype)
            self._inputs = input_names(self.model)
            try:
                self._run = load_runner(self.model, self.model_name, self.backend, precision)
            except (ImportError, OSError, RuntimeError, ValueError) as e:  # a package missing, an unexportable model
                raise EmbeddingModelError(
                    f"cannot run EMBEDDING_MODEL={self.model_name!r} on EMBEDDING_BACKEND={self.backend!r} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Set EMBEDDING_BACKEND=torch, "
                    "or install this project's dependencies again (pip install -e .).") from e

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode([self.passage_prefix + t for t in texts])

    def embed_query(self, text: str) -> np.ndarray:
        return self._encode([self.query_prefix + text])[0]

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self._run is None:
            return self.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
        # as SentenceTransformer.encode does: longest first, so each batch pads to similar lengths
        order = np.argsort([-len(t) for t in texts], kind="stable")
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = order[start:start + self.batch_size]
            features = self.model.preprocess([texts[i] for i in batch])
            vectors[batch] = self._run({name: features[name].numpy() for name in self._inputs})
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _load_failure(name: str, error: OSError) -> str:
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")):  # meant as a folder, not a hub name
        what = "no such folder" if not Path(name).expanduser().exists() else str(error).splitlines()[0]
        return (f"cannot load EMBEDDING_MODEL={name!r}: {what}. Set EMBEDDING_MODEL to a sentence-transformers "
                "folder, or to a hub name such as intfloat/multilingual-e5-small.")
    return (f"cannot load EMBEDDING_MODEL={name!r} ({str(error).splitlines()[0]}). If it is a hub name, check "
            "its spelling and connect to the internet once so the hub can download it; or set EMBEDDING_MODEL "
            "to a local sentence-transformers folder.")


# The fastest CPU backend that kept torch's hit@5 on the retrieval benchmark, in vector and hybrid mode
# (docs/benchmarks.md, "OpenVINO int8"); onnx-int8 lost vector-mode hit@5.
AUTO_CPU_BACKEND = "openvino-int8"


def resolve_backend(name: str) -> str:
    """The backend for EMBEDDING_BACKEND: "auto" is torch on CUDA, else AUTO_CPU_BACKEND."""
    if name != "auto":
        return name
    return "torch" if _cuda() else AUTO_CPU_BACKEND


def _exported_dtype(backend: str, name: str) -> str:
    """What the exported model computes in, for the record: OpenVINO follows EMBEDDING_DTYPE (auto: bf16 on
    CPUs with native bf16, as resolve_dtype), ONNX Runtime computes in float32 or int8."""
    if backend in ("onnx-int8", "openvino-int8"):
        return "int8"
    if backend == "onnx":
        return "float32"
    if name == "auto":
        return "bfloat16" if _cpu_has_native_bf16() else "float32"
    return name


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
