"""All settings of the assistant, knowledge store and trainer, in one place.

Every field has a documented default and can be overridden by the environment variable named in its
metadata (``Settings.from_env()``). The README's settings table lists the same variables; a test keeps the
two in step.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from errors import UserError


class SettingsError(UserError):
    """A setting has a value no command can use; the message names the variable and what it accepts."""


def _setting(default, env: str, help: str, **kwargs):
    return field(default=default, metadata={"env": env, "help": help}, **kwargs)


@dataclass(frozen=True)
class Settings:
    # Knowledge store
    knowledge_dir: Path = _setting(
        Path("data/knowledge"), "KNOWLEDGE_DIR",
        "Folder of the embedded Chroma store (used when CHROMA_HOST is unset) and of its write lock.")
    embedding_model: str = _setting(
        "intfloat/multilingual-e5-small", "EMBEDDING_MODEL",
        "sentence-transformers model name on the Hugging Face hub, or a local folder.")
    embedding_query_prefix: str | None = _setting(
        None, "EMBEDDING_QUERY_PREFIX",
        "Text put before each query before embedding. Unset: 'query: ' for E5 models, else nothing.")
    embedding_passage_prefix: str | None = _setting(
        None, "EMBEDDING_PASSAGE_PREFIX",
        "Text put before each passage before embedding. Unset: 'passage: ' for E5 models, else nothing.")
    embedding_batch_size: int = _setting(64, "EMBEDDING_BATCH_SIZE", "Passages embedded per batch.")
    embedding_dtype: str = _setting(
        "auto", "EMBEDDING_DTYPE",
        "float32, bfloat16 or float16. auto: float16 on CUDA, bfloat16 on CPUs with native bf16 "
        "(AMX/AVX512-BF16; faster, the same rankings: docs/benchmarks.md), else float32.")
    embedding_backend: str = _setting(
        "auto", "EMBEDDING_BACKEND",
        "What runs the embedding model: torch, onnx (ONNX Runtime), onnx-int8 (ONNX Runtime, int8 weights), "
        "openvino (in EMBEDDING_DTYPE) or openvino-int8 (int8 weights and activations). All but torch are exported "
        "once and cached under HF_HOME. auto: torch on CUDA, openvino-int8 on a CPU (the fastest there "
        "with torch's hit@5; docs/benchmarks.md).")
    rerank_model: str | None = _setting(
        None, "RERANK_MODEL",
        "Cross-encoder that rescores the fused candidates of each search, a hub name (e.g. "
        "BAAI/bge-reranker-v2-m3, multilingual) or a local folder. Unset: no reranking.")
    rerank_candidates: int = _setting(
        30, "RERANK_CANDIDATES", "Fused candidates the reranker rescores per search (when RERANK_MODEL is set).")
    query_translation: bool = _setting(
        False, "QUERY_TRANSLATION",
        "The chat model translates each question into the other language (English <-> Japanese) before the "
        "search, which then looks for both: for an English-only encoder, or words the encoder misses. Costs one "
        "short generation per question.")
    chroma_host: str | None = _setting(
        None, "CHROMA_HOST", "Host of a Chroma server. Unset: an embedded store on disk in KNOWLEDGE_DIR.")
    chroma_port: int = _setting(8000, "CHROMA_PORT", "Port of the Chroma server named by CHROMA_HOST.")
    collection: str = _setting(
        "knowledge", "KNOWLEDGE_COLLECTION", "Chroma collection name (3-500 characters).")
    chunk_size: int = _setting(
        1000, "CHUNK_SIZE", "Largest chunk, in characters. Chunks end at sentence ends (. ! ? 。 ！ ？) or lines.")
    chunk_overlap: int = _setting(
        200, "CHUNK_OVERLAP", "Characters of whole sentences repeated from the end of the previous chunk.")
    max_file_mb: float = _setting(
        50.0, "MAX_FILE_MB", "Files larger than this are refused by name, and the rest are still added.")
    max_unzipped_mb: float = _setting(
        256.0, "MAX_UNZIPPED_MB",
        "ZIP-based files (DOCX) that would expand to more than this are refused by name before they are opened "
        "(a zip bomb).")
    read_timeout_s: float = _setting(
        120.0, "READ_TIMEOUT_S",
        "Longest time reading one file may take (parsing and chunking, in a separate process); a file that takes "
        "longer is refused by name, and the rest are still added.")
    read_memory_mb: float = _setting(
        2048.0, "READ_MEMORY_MB",
        "Most memory (address space) the process that reads files may use; a file that needs more is refused by "
        "name, and the rest are still added.")

    # Model
    chat_model: str = _setting(
        "unsloth/DeepSeek-R1-Distill-Qwen-14B", "CHAT_MODEL",
        "Base chat model: a hub name or a local folder (e.g. one built by `python -m finetune tiny-model`).")
    adapter_dir: Path = _setting(
        Path("data/adapters"), "ADAPTER_DIR",
        "Folder of trained LoRA adapters (or one adapter). The app answers with the newest one trained on "
        "CHAT_MODEL, or the one chosen in its Adapters tab (kept in ADAPTER_DIR/app_adapter_choice.json).")
    adapter_poll_s: float = _setting(
        3.0, "ADAPTER_POLL_S",
        "Seconds between the app's looks at ADAPTER_DIR for a newer adapter while it follows the newest "
        "(0: never look; the adapter chosen at start stays).")
    pairs_db: Path = _setting(
        Path("data/pairs.sqlite"), "PAIRS_DB",
        "The preference pairs store (SQLite): the app records votes, picks, edits and corrected verdicts in it; "
        "`python -m finetune train data=...` reads it, and `python -m finetune pairs` by default.")
    export_source_paths: bool = _setting(
        False, "EXPORT_SOURCE_PATHS",
        "Exports (pairs, conversations) name each passage's source by its full path on the server; off: by its "
        "file name, so a shared export does not show the server's folders.")
    train_config: Path = _setting(
        Path("finetune/configs/recipe-r1-qwen14b.yaml"), "TRAIN_CONFIG",
        "The training config the Train tab starts from (steps, learning rate, beta and LoRA rank are in the "
        "form; the rest comes from this YAML).")
    train_memory_cap_gb: float = _setting(
        0.0, "TRAIN_MEMORY_CAP_GB",
        "Memory the chat model and a training run started from the app may use together, in GiB. 0: the GPU's "
        "free memory decides. When the run's estimate does not fit beside the chat model, the model is "
        "unloaded for the run and reloaded after it (on CPU only when this is set).")
    model_backend: str = _setting(
        "local", "MODEL_BACKEND",
        "local: generate in this process (transformers + PEFT; Unsloth's fast path on CUDA when installed). "
        "openai: an OpenAI-compatible server (vLLM, ...) at OPENAI_BASE_URL.")
    openai_base_url: str = _setting("http://127.0.0.1:8000/v1", "OPENAI_BASE_URL",
                                    "Base URL of the OpenAI-compatible server (MODEL_BACKEND=openai).")
    openai_model: str | None = _setting(None, "OPENAI_MODEL",
                                        "Model name to ask that server for. Unset: CHAT_MODEL.")
    openai_api_key: str | None = _setting(None, "OPENAI_API_KEY", "Bearer token for that server, if it wants one.")
    local_engine: str = _setting(
        "auto", "LOCAL_ENGINE",
        "MODEL_BACKEND=local only: unsloth, transformers, or auto (unsloth on CUDA when it is installed).")
    load_in_4bit: bool = _setting(True, "LOAD_IN_4BIT", "Load CHAT_MODEL in 4 bits on CUDA (bitsandbytes).")
    fast_decode: str = _setting(
        "auto", "FAST_DECODE",
        "MODEL_BACKEND=local only: decode with a static KV cache and the decode step captured in a CUDA graph "
        "(Qwen2 and Llama architectures; compiled and captured at load, 7 s at the 1.5B shape on an H200). "
        "auto: on with CUDA (either engine; bitsandbytes 4-bit weights through our GEMVs where they are faster), "
        "off on CPU; "
        "on: also on CPU (no graphs; for tests); off: transformers' generate. The start-up log names the path.")
    context_length: int = _setting(
        8192, "CONTEXT_LENGTH", "Most tokens of prompt + answer the model is set up for (Unsloth sizes its "
        "buffers by it); a retrieval prompt is about 3,000 tokens.")
    prompt_format: str = _setting(
        "auto", "PROMPT_FORMAT",
        "alpaca (the recipe's template) or chat (the model's chat template). auto: what the adapter was "
        "trained with, else alpaca. Prompting with the other format loses what training taught.")

    # Answers
    retrieval_k: int = _setting(5, "RETRIEVAL_K", "Passages retrieved for each turn and each claim.")
    max_new_tokens: int = _setting(1024, "MAX_NEW_TOKENS", "Default most tokens generated per answer.")
    temperature: float = _setting(0.6, "TEMPERATURE", "Default sampling temperature (0: greedy).")

    # Serving
    app_auth: str | None = _setting(
        None, "APP_AUTH", "Logins for the app, as user:password pairs separated by commas. Required to serve "
        "on an address other than loopback.")
    max_upload_mb: float = _setting(50.0, "MAX_UPLOAD_MB", "Largest file the app accepts as an upload.")
    gpu_concurrency: int = _setting(1, "GPU_CONCURRENCY", "Generations that run at once; the rest wait in line.")
    queue_size: int = _setting(64, "QUEUE_SIZE", "Requests that may wait in line; more are turned away.")

    @property
    def conversations_db(self) -> Path:
        """The chat's saved conversations: beside the pairs store (PAIRS_DB), so in the same volume."""
        return Path(self.pairs_db).with_name("conversations.sqlite")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then environment variables, then keyword overrides."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(raw, hints[f.name], f.metadata["env"])
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        """Every setting is checked here, once, so a bad value stops every command at start."""
        problems = list(_problems(self))
        if problems:
            raise SettingsError("\n".join(problems))


CHOICES = {
    "embedding_dtype": ("auto", "float32", "bfloat16", "float16"),
    "embedding_backend": ("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-int8"),
    "model_backend": ("local", "openai"),
    "local_engine": ("auto", "unsloth", "transformers"),
    "fast_decode": ("auto", "on", "off"),
    "prompt_format": ("auto", "alpaca", "chat"),
}
POSITIVE = ("embedding_batch_size", "chunk_size", "max_file_mb", "context_length", "retrieval_k", "max_new_tokens",
            "max_upload_mb", "gpu_concurrency", "queue_size", "rerank_candidates")
# Chroma's rule for collection names (3-512 characters), less the "-manifest" the store adds for its second one.
COLLECTION_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,498}[a-zA-Z0-9]")


def _env(s: Settings, name: str) -> str:
    """`VARIABLE=value`, as the user set it."""
    return f"{s.__dataclass_fields__[name].metadata['env']}={getattr(s, name)!r}"


def _problems(s: Settings) -> Iterator[str]:
    for name, choices in CHOICES.items():
        if getattr(s, name) not in choices:
            yield f"{_env(s, name)}: use one of {', '.join(choices)}, or unset it for the default"
    for name in POSITIVE:
        if not getattr(s, name) > 0:
            yield f"{_env(s, name)}: must be above 0; raise it, or unset it for the default"
    if not 0 <= s.chunk_overlap < s.chunk_size:
        yield (f"CHUNK_OVERLAP={s.chunk_overlap} must be at least 0 and smaller than CHUNK_SIZE={s.chunk_size}; "
               "lower CHUNK_OVERLAP (a fifth of CHUNK_SIZE is usual) or raise CHUNK_SIZE")
    if not s.train_memory_cap_gb >= 0:
        yield f"{_env(s, 'train_memory_cap_gb')}: must be 0 (no cap) or above"
    if not s.adapter_poll_s >= 0:
        yield f"{_env(s, 'adapter_poll_s')}: must be 0 (never look) or above"
    if not s.temperature >= 0:
        yield f"{_env(s, 'temperature')}: must be 0 (greedy) or above"
    if not 1 <= s.chroma_port <= 65535:
        yield f"{_env(s, 'chroma_port')}: use a port from 1 to 65535"
    if not COLLECTION_NAME.fullmatch(s.collection) or ".." in s.collection or _is_ip_address(s.collection):
        yield (f"{_env(s, 'collection')}: use 3 to 500 characters from a-z A-Z 0-9 . _ -, starting and ending "
               "with a letter or digit, without '..' (Chroma's rule for collection names)")
    for login in (s.app_auth or "").split(","):
        user, sep, password = login.strip().partition(":")
        if login.strip() and not (sep and user and password):
            yield (f"APP_AUTH has a malformed login {user or login.strip()!r}: write user:password pairs separated "
                   "by commas, e.g. APP_AUTH=alice:s3cret,bob:hunter2")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse(raw: str, hint, env: str):
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return hint(raw)
    except ValueError:
        raise SettingsError(f"{env}={raw!r} is not a valid {hint.__name__}; unset it or give a valid value") from None


def settings_table() -> str:
    """The Markdown table of settings that the README carries."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = "unset" if f.default is None else f"`{f.default}`"
        rows.append(f"| `{f.metadata['env']}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows)
