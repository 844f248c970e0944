"""Where the tokens come from: the model in this process, or an OpenAI-compatible server.

Both runtimes take a finished prompt string and stream text pieces back, so the chat, the verifier and the
CLI never care which one runs. Each knows which adapter (if any) is answering, so every answer can say so.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from errors import ModelUnavailable
from finetune.prompts import prompt_token_ids
from settings import Settings

TINY_MODEL_HINT = (
    "For an offline try-out, build the tiny test model and point CHAT_MODEL at it:\n"
    "    python -m finetune tiny-model data/tiny-model && CHAT_MODEL=data/tiny-model make run"
)


@dataclass
class GenerationParams:
    max_new_tokens: int = 1024
    temperature: float = 0.6  # DeepSeek-R1's recommended 0.5-0.7
    top_p: float = 0.95


class ModelRuntime(Protocol):
    model_name: str
    adapter: str | None  # the adapter answering (its folder name), None for the base model
    prompt_format: str  # "alpaca" or "chat": the format the adapter was trained with

    def render_chat(self, messages: list[dict]) -> str: ...

    def stream(self, prompt: str, params: GenerationParams, stop: threading.Event | None = None) -> Iterator[str]: ...


@dataclass
class AdapterInfo:
    path: Path
    base_model: str | None
    prompt_format: str | None

    @property
    def name(self) -> str:
        return self.path.name


def find_adapter(adapter_dir: Path, base_model: str) -> AdapterInfo | None:
    """The newest adapter in ``adapter_dir`` (or ``adapter_dir`` itself) trained on ``base_model``."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        return None
    folders = [adapter_dir] if (adapter_dir / "adapter_config.json").exists() else [
        p for p in adapter_dir.iterdir() if (p / "adapter_config.json").exists()]
    for folder in sorted(folders, key=lambda p: (p / "adapter_config.json").stat().st_mtime, reverse=True):
        info = _read_json(folder / "training_info.json")
        config = _read_json(folder / "adapter_config.json")
        base = info.get("base_model") or config.get("base_model_name_or_path")
        if base is None or _same_model(base, base_model):
            return AdapterInfo(folder, base, info.get("prompt_format"))
        print(f"note: adapter {folder} was trained on {base}, not CHAT_MODEL={base_model}; not loaded",
              file=sys.stderr)
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/").split("/")[-1].lower() == b.rstrip("/").split("/")[-1].lower()


def _prompt_format(settings: Settings, adapter: AdapterInfo | None) -> str:
    if settings.prompt_format != "auto":
        return settings.prompt_format
    return (adapter.prompt_format if adapter and adapter.prompt_format else None) or "alpaca"


class LocalRuntime:
    """transformers + PEFT in this process; 4-bit on CUDA; Unsloth's inference path when installed.

    Every answer is generated on one long-lived thread, one at a time: with a new thread for each answer, decode
    on CUDA ran at a quarter to a half of the speed (docs/benchmarks.md, "One generating thread").
    """

    def __init__(self, settings: Settings):
        import torch

        from finetune.hf_backend import model_load_failure

        self.model_name = settings.chat_model
        adapter = find_adapter(settings.adapter_dir, settings.chat_model)
        self.adapter = adapter.name if adapter else None
        self.prompt_format = _prompt_format(settings, adapter)
        self._generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.last_usage: dict[str, int] = {}  # token counts of the last finished generation
        cuda = torch.cuda.is_available()
        try:
            self.model, self.tokenizer, self.engine = _load_model(settings, cuda)
        except OSError as e:
            message = model_load_failure("CHAT_MODEL", self.model_name, e)
            raise ModelUnavailable(f"{message}\n{TINY_MODEL_HINT}") from None
        if adapter:
            from peft import PeftModel

            try:
                self.model = PeftModel.from_pretrained(self.model, str(adapter.path))
            except OSError as e:
                raise ModelUnavailable(f"cannot load the adapter {adapter.path} ({str(e).splitlines()[0]}): train "
                                       "it again, or move it out of ADAPTER_DIR") from None
        self.model.eval()
        self.device = next(self.model.parameters()).device

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def stream(self, prompt: str, params: GenerationParams, stop: threading.Event | None = None) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop is not None and stop.is_set()

        input_ids = torch.tensor([prompt_token_ids(self.tokenizer, prompt)], device=self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False, timeout=600)
        sampling = params.temperature > 0
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                      max_new_tokens=params.max_new_tokens, do_sample=sampling,
                      stopping_criteria=StoppingCriteriaList([Stop()]),
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        prompt_tokens = input_ids.shape[1]

        def run():
            try:
                output = self.model.generate(**kwargs)
            except BaseException:
                streamer.end()  # let the loop below end; the error is raised by result()
                raise
            self.last_usage = {"prompt_tokens": prompt_tokens, "completion_tokens": output.shape[1] - prompt_tokens}

        generation = self._generator.submit(run)
        eos = self.tokenizer.eos_token or ""
        for piece in streamer:
            if eos and eos in piece:
                piece = piece.split(eos)[0]
                if piece:
                    yield piece
                break
            yield piece
        generation.result()


def _load_model(settings: Settings, cuda: bool):
    import importlib.util

    name = settings.chat_model
    engine = settings.local_engine
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if engine == "unsloth" and not (cuda and has_unsloth):
        raise ModelUnavailable("LOCAL_ENGINE=unsloth needs a CUDA GPU and `pip install '.[gpu]'`; "
                               "use LOCAL_ENGINE=auto or transformers")
    if cuda and has_unsloth and engine != "transformers":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(name, load_in_4bit=settings.load_in_4bit,
                                                             max_seq_length=settings.context_length)
        FastLanguageModel.for_inference(model)
        return model, tokenizer, "unsloth"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.quantization import require_bitsandbytes

    tokenizer = AutoTokenizer.from_pretrained(name)
    if cuda and settings.load_in_4bit:
        require_bitsandbytes("LOAD_IN_4BIT")
    return AutoModelForCausalLM.from_pretrained(name, **model_kwargs(settings, cuda)), tokenizer, "transformers"


def model_kwargs(settings: Settings, cuda: bool) -> dict:
    """from_pretrained's arguments for the transformers engine: bf16 on CUDA (4 bits when LOAD_IN_4BIT), else fp32."""
    import torch

    from finetune.quantization import four_bit_config

    if not cuda:
        return {"dtype": torch.float32}
    kwargs = {"dtype": torch.bfloat16, "device_map": "cuda"}
    if settings.load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(torch.bfloat16)
    return kwargs


class OpenAIRuntime:
    """An OpenAI-compatible server's /v1/completions endpoint, streamed (server-sent events)."""

    def __init__(self, settings: Settings):
        import httpx

        self.model_name = settings.openai_model or settings.chat_model
        self.adapter = settings.openai_model if settings.openai_model != settings.chat_model else None
        self.prompt_format = _prompt_format(settings, None)
        self.base_url = settings.openai_base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {settings.openai_api_key}"} if settings.openai_api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(600, connect=10))
        self._chat_model = settings.chat_model
        self._tokenizer = None
        self.last_usage: dict[str, int] = {}  # token counts of the last generation, where the server reports them

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template's text without its leading BOS: the server adds one to every prompt it tokenizes
        (vLLM and `transformers serve` tokenize /completions prompts with special tokens), as training did."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from finetune.hf_backend import model_load_failure

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self._chat_model)
            except OSError as e:  # the server has the weights; its chat template is read here from CHAT_MODEL
                raise ModelUnavailable(model_load_failure("CHAT_MODEL", self._chat_model, e)) from None
        text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = self._tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text

    def stream(self, prompt: str, params: GenerationParams, stop: threading.Event | None = None) -> Iterator[str]:
        import httpx

        body = {"model": self.model_name, "prompt": prompt, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            with self._client.stream("POST", "/completions", json=body) as response:
                if response.status_code != 200:
                    raise ModelUnavailable(f"{self.base_url}/completions answered {response.status_code}: "
                                           f"{response.read().decode(errors='replace')[:300]}")
                for line in response.iter_lines():
                    if stop is not None and stop.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        self.last_usage = {k: chunk["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
                    text = (chunk.get("choices") or [{}])[0].get("text") or ""
                    if text:
                        yield text
        except httpx.TransportError as e:
            raise ModelUnavailable(f"cannot reach the model server at {self.base_url} ({e}); start it or set "
                                   "MODEL_BACKEND=local") from None


def import_unsloth_if_used(settings: Settings) -> None:
    """Unsloth patches transformers when imported, so it must come first: call this before anything else."""
    import importlib.util

    if settings.model_backend != "local" or settings.local_engine == "transformers":
        return
    if importlib.util.find_spec("unsloth") is None:
        return
    import torch

    if torch.cuda.is_available():
        import unsloth  # noqa: F401


def load_runtime(settings: Settings) -> ModelRuntime:
    if settings.model_backend == "openai":
        return OpenAIRuntime(settings)
    return LocalRuntime(settings)
