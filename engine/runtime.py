"""Where the tokens come from: the model in this process, or an OpenAI-compatible server.

Both runtimes take a finished prompt string and stream text pieces back, so the chat, the verifier and the
CLI never care which one runs. Each knows which adapter (if any) is answering, so every answer can say so.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, TypedDict

from engine.adapter_switch import AdapterChoice, AdapterError, chosen_adapter
from engine.decode.plan import DecodePlan
from errors import ModelUnavailable, PromptTooLong
from finetune.adapters import AdapterEntry
from finetune.prompts import prompt_token_ids
from settings import Settings

if TYPE_CHECKING:  # imported where used: they load torch
    from engine.adapter_merge import MergedAdapter
    from engine.decode.decoder import FastDecoder

logger = logging.getLogger(__name__)

TINY_MODEL_HINT = (
    "For an offline try-out, build the tiny test model and point CHAT_MODEL at it:\n"
    "    python -m finetune tiny-model data/tiny-model && CHAT_MODEL=data/tiny-model make run"
)


@dataclass
class GenerationParams:
    max_new_tokens: int = 1024
    temperature: float = 0.6  # DeepSeek-R1's recommended 0.5-0.7
    top_p: float = 0.95


class TokenUsage(TypedDict):
    """Token counts of one finished generation."""

    prompt_tokens: int
    completion_tokens: int


class ModelRuntime(Protocol):
    model_name: str
    adapter: str | None  # the adapter answering (its folder name), None for the base model
    active_adapter: AdapterEntry | None  # its entry, None for the base model
    prompt_format: str  # "alpaca" or "chat": the format the adapter was trained with
    last_usage: TokenUsage | None  # of the last finished generation (where known); None before the first
    decode_plan: DecodePlan | None  # how this process decodes (LocalRuntime); None where a server does

    def render_chat(self, messages: list[dict]) -> str: ...

    def stream(self, prompt: str, params: GenerationParams, stop: threading.Event | None = None) -> Iterator[str]: ...

    def activate(self, adapter: AdapterEntry | None) -> None: ...

    def close(self) -> None: ...


def _prompt_format(settings: Settings, adapter: AdapterEntry | None) -> str:
    if settings.prompt_format != "auto":
        return settings.prompt_format
    return (adapter.prompt_format if adapter and adapter.prompt_format else None) or "alpaca"


class LocalRuntime:
    """transformers + PEFT in this process; 4-bit on CUDA; Unsloth's inference path when installed.

    Every answer is generated on one long-lived thread, one at a time: with a new thread for each answer, decode
    on CUDA ran at a quarter to a half of the speed (docs/benchmarks.md, "One generating thread"). Adapters are
    swapped on that thread too, between answers, through PEFT's multi-adapter API: the one in use and the one
    before it stay loaded (going back is instant), older ones are unloaded.
    """

    KEEP_LOADED = 2

    def __init__(self, settings: Settings, choice: AdapterChoice | None = None):
        import torch

        from finetune.hf_backend import model_load_failure

        self.settings = settings
        self.model_name = settings.chat_model
        self.adapter: str | None = None
        self.active_adapter: AdapterEntry | None = None
        self.prompt_format = _prompt_format(settings, None)
        self._loaded: dict[str, tuple[tuple, str]] = {}  # folder name -> (its version, its PEFT adapter name)
        self._peft_names = (f"adapter_{n}" for n in itertools.count())  # folder names may hold dots; PEFT's may not
        self._generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.last_usage: TokenUsage | None = None
        self.decoder: FastDecoder | None = None  # when the fast path runs
        self._merged: MergedAdapter | None = None  # when adapters are merged into the weights for it
        self.decode_plan: DecodePlan | None = None  # set below, once the path is chosen
        cuda = torch.cuda.is_available()
        try:
            self.model, self.tokenizer, self.engine = _load_model(settings, cuda)
        except OSError as e:
            message = model_load_failure("CHAT_MODEL", self.model_name, e)
            raise ModelUnavailable(f"{message}\n{TINY_MODEL_HINT}") from None
        self.model.eval()
        self.device = next(self.model.parameters()).device
        # Prompt and answer together: CONTEXT_LENGTH, or less where the model's own positions end sooner.
        self.context_length = min(settings.context_length,
                                  getattr(self.model.config, "max_position_embeddings", None) or settings.context_length)
        adapter = chosen_adapter(settings, choice)  # None: the saved choice
        if adapter:
            try:
                self._activate(adapter)
            except AdapterError as e:
                raise ModelUnavailable(str(e)) from None
        auto = self.device.type == "cuda"
        if settings.fast_decode == "on" or (settings.fast_decode == "auto" and auto):
            self._generator.submit(self._start_fast_decode).result()  # compiled and captured on its own thread
        else:
            self.decode_plan = DecodePlan.standard(
                str(self.device), f"FAST_DECODE={settings.fast_decode} on {self.device.type} with the {self.engine} engine")
            logger.info(self.decode_plan.summary())

    def _start_fast_decode(self) -> None:
        """The fast decode path (engine/decode/): bf16 weights take the active adapter merged in,
        other weights (4-bit) run its LoRA layers inside the captured step."""
        from engine.adapter_merge import MergedAdapter, can_merge
        from engine.decode.start import start_fast_decoder

        if can_merge(self.model):
            self._merged = MergedAdapter()
            self._merge_active_adapter()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [self.tokenizer.eos_token_id])
        self.decoder, self.decode_plan = start_fast_decoder(self.model, self.settings.context_length, eos,
                                                            self._answering_model)
        if self.decoder is None and self._merged is not None:
            self._merged.restore(self.model)
            self._merged = None

    def activate(self, adapter: AdapterEntry | None) -> None:
        """Answer with ``adapter`` (None: the base model) from the next generation on; runs on the generating
        thread, after the generations already started."""
        self._generator.submit(self._activate, adapter).result()

    def _activate(self, adapter: AdapterEntry | None) -> None:
        stale = []
        if adapter is not None:
            name, stale = self._load_adapter(adapter)
            self.model.set_adapter(name)
        self.adapter, self.active_adapter = (adapter.name if adapter else None), adapter
        self.prompt_format = _prompt_format(self.settings, adapter)
        # The one in use is the last of _loaded; the oldest beyond KEEP_LOADED go.
        stale += [self._loaded.pop(folder)[1] for folder in list(self._loaded)[:-self.KEEP_LOADED]]
        for name in stale:
            self.model.delete_adapter(name)
        if self.decoder is not None:
            self._merge_active_adapter()
            try:
                self.decoder.capture()  # the step runs the layers as they are now
            except Exception as e:  # noqa: BLE001 - the standard path still answers, with this adapter
                self._drop_fast_decode(f"capturing the decode step with the new adapter failed: {e}")

    def _drop_fast_decode(self, reason: str) -> None:
        """Answer through transformers' generate from now on (the adapter taken out of the weights again)."""
        if self._merged is not None:
            self._merged.restore(self.model)
        self.decoder, self._merged = None, None
        self.decode_plan = self.decode_plan.fell_back(reason)
        logger.warning("generation: the standard path (transformers generate) from now on; %s", reason)

    def _merge_active_adapter(self) -> None:
        if self._merged is not None:
            name = self._loaded[self.active_adapter.name][1] if self.active_adapter else None
            self._merged.merge(self.model, name)

    def _load_adapter(self, adapter: AdapterEntry) -> tuple[str, list[str]]:
        """The PEFT name of ``adapter``, loaded now unless this version of it already is, and the PEFT name of
        an earlier version of the same folder to unload once the new one is in use."""
        from peft import PeftModel

        loaded = self._loaded.pop(adapter.name, None)
        if loaded and loaded[0] == adapter.version:
            self._loaded[adapter.name] = loaded  # now the most recently used
            return loaded[1], []
        name = next(self._peft_names)
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter.path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=name)
                self.model.eval()
        except (OSError, ValueError) as e:
            raise AdapterError(f"cannot load the adapter {adapter.path} ({str(e).splitlines()[0]}): train it "
                               "again, or move it out of ADAPTER_DIR") from None
        self._loaded[adapter.name] = (adapter.version, name)
        return name, [loaded[1]] if loaded else []

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def close(self) -> None:
        """Free the model's memory, for a training run that needs it; this runtime answers no more."""
        import gc

        import torch

        self._generator.shutdown(wait=True)
        compiled = self.decoder is not None
        self.model, self._loaded, self.decoder, self._merged = None, {}, None, None
        if compiled:
            torch.compiler.reset()  # compiled code holds on to the weights it was traced with
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def memory_gib(self) -> float:
        """What the model's weights take (on the GPU when it runs there)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**30

    def _answering_model(self):
        """The context in which ``self.model`` answers as the model in use: with adapters loaded, the base
        model answers with them switched off."""
        merged = self._merged is not None  # the adapter is in the weights already
        base_only = (self.active_adapter is None or merged) and hasattr(self.model, "disable_adapter")
        return self.model.disable_adapter() if base_only else contextlib.nullcontext()

    def complete(self, prompts: list[str], params: GenerationParams, batch_size: int = 32) -> list[str]:
        """Whole completions of many prompts at once (batched, not streamed), on the generating thread."""
        from engine.batch_generate import GenerationConfig, generate

        config = GenerationConfig(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p, batch_size=batch_size)

        def run() -> list[str]:
            with self._answering_model():
                return generate(self.model, self.tokenizer, prompts, config)

        return self._generator.submit(run).result()

    def stream(self, prompt: str, params: GenerationParams, stop: threading.Event | None = None) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop is not None and stop.is_set()

        input_ids = torch.tensor([prompt_token_ids(self.tokenizer, prompt)], device=self.device)
        room = self.context_length - input_ids.shape[1]
        if room < 1:
            raise PromptTooLong(f"the prompt is {input_ids.shape[1]} tokens and the model's context holds "
                                f"{self.context_length}: ask a shorter question, start a new chat, or turn off "
                                "“Search my documents”")
        params = replace(params, max_new_tokens=min(params.max_new_tokens, room))
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
                with self._answering_model():
                    if self.decoder is not None and self.decoder.fits(prompt_tokens):
                        streamer.put(input_ids.cpu())  # the prompt, which the streamer skips, as generate does
                        generated = self.decoder.generate(
                            input_ids, params.max_new_tokens, params.temperature, params.top_p, stop,
                            lambda token: streamer.put(torch.tensor([token])))
                        streamer.end()
                    else:
                        generated = self.model.generate(**kwargs).shape[1] - prompt_tokens
            except BaseException:
                streamer.end()  # let the loop below end; the error is raised by result()
                raise
            self.last_usage = TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=generated)

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
    """An OpenAI-compatible server's /v1/completions endpoint, streamed (server-sent events).

    Adapters are swapped with vLLM's runtime LoRA API (a server started with ``--enable-lora`` and
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): ``POST /v1/load_lora_adapter`` with the adapter's folder, which
    must be the same path on the server (a shared volume), then requests name it as their ``model``.
    """

    def __init__(self, settings: Settings):
        import httpx

        self.settings = settings
        self.model_name = settings.openai_model or settings.chat_model
        self.adapter = settings.openai_model if settings.openai_model != settings.chat_model else None
        self.active_adapter: AdapterEntry | None = None
        self.prompt_format = _prompt_format(settings, None)
        self._request_model = self.model_name  # the name requests ask for: the base, or a LoRA loaded into it
        self._loaded: dict[str, tuple] = {}  # adapters this runtime loaded into the server: name -> version
        self.base_url = settings.openai_base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {settings.openai_api_key}"} if settings.openai_api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(600, connect=10))
        self._chat_model = settings.chat_model
        self._tokenizer = None
        self.last_usage: TokenUsage | None = None  # where the server reports them
        self.decode_plan: DecodePlan | None = None  # the server decodes

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

        body = {"model": self._request_model, "prompt": prompt, "max_tokens": params.max_new_tokens,
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
                        self.last_usage = TokenUsage(prompt_tokens=chunk["usage"]["prompt_tokens"],
                                                     completion_tokens=chunk["usage"]["completion_tokens"])
                    text = (chunk.get("choices") or [{}])[0].get("text") or ""
                    if text:
                        yield text
        except httpx.TransportError as e:
            raise ModelUnavailable(f"cannot reach the model server at {self.base_url} ({e}); start it or set "
                                   "MODEL_BACKEND=local") from None

    def close(self) -> None:
        """Close the connection to the server (the server keeps its model)."""
        self._client.close()

    def activate(self, adapter: AdapterEntry | None) -> None:
        """Ask for ``adapter`` (None: the base model, OPENAI_MODEL or CHAT_MODEL) from the next request on;
        adapters this runtime loaded before are unloaded from the server."""
        if adapter is not None and self._loaded.get(adapter.name) != adapter.version:
            if adapter.name in self._loaded:  # trained again since: the server holds the old weights
                self._lora_call("unload_lora_adapter", {"lora_name": adapter.name})
            self._lora_call("load_lora_adapter", {"lora_name": adapter.name, "lora_path": str(adapter.path.resolve())},
                            reload=True)
            self._loaded[adapter.name] = adapter.version
        self._request_model = adapter.name if adapter else self.model_name
        self.adapter = adapter.name if adapter else None
        self.active_adapter = adapter
        self.prompt_format = _prompt_format(self.settings, adapter)
        for name in [n for n in self._loaded if n != self.adapter]:
            self._loaded.pop(name)
            self._lora_call("unload_lora_adapter", {"lora_name": name})

    def _lora_call(self, endpoint: str, body: dict, reload: bool = False) -> None:
        import httpx

        url = f"{self.base_url}/{endpoint}"
        try:
            response = self._client.post(f"/{endpoint}", json=body)
            if reload and response.status_code == 400 and "already" in response.text:
                # Loaded by an earlier run of the app: the server may hold older weights under the name.
                self._client.post("/unload_lora_adapter", json={"lora_name": body["lora_name"]})
                response = self._client.post(f"/{endpoint}", json=body)
        except httpx.TransportError as e:
            raise AdapterError(f"cannot reach the model server at {url} ({e}); start it, or choose again") from None
        if response.status_code != 200:
            raise AdapterError(
                f"{url} answered {response.status_code}: {response.text[:300]}. Swapping adapters needs vLLM "
                "started with --enable-lora (and --max-lora-rank at least the adapter's rank) and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and ADAPTER_DIR at the same path on the server.")


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
