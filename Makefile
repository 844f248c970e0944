# make run   set up .venv and start the chat app on http://127.0.0.1:7860
# make test  set up .venv and run the linter and every CPU test (GPU tests run through the device tool)
# make test-container  build the image with podman and run the compose project on the CPU (root or sudo; apt)
# make screenshots  run the browser tests, writing their pictures into docs/screenshots/ (tests alone never do)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin

SUDO    := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: run test lint chromium podman test-container screenshots bench-knowledge

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone: pip then takes the local CPU build instead of a multi-GB CUDA one.
	$(BIN)/pip install -q "$$($(PY) -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if d.startswith("torch")))')"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m assistant serve

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# The browser tests drive Debian's chromium (Playwright's own browser download cannot work offline).
chromium:
	@command -v chromium >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

test: lint chromium
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
	  $(BIN)/python -m pytest -m "not gpu" -q

# Debian's podman and buildah, run as root with runc (tests/container/containers.conf says why); mmdebstrap makes
# the stand-in base image where python:3.11-slim cannot be pulled.
podman:
	@command -v podman >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq podman buildah fuse-overlayfs uidmap mmdebstrap runc)

test-container: $(BIN)/.installed podman
	$(SUDO) env CONTAINERS_CONF=$(CURDIR)/tests/container/containers.conf HF_HUB_OFFLINE=1 \
	  $(BIN)/python tests/container/end_to_end.py

screenshots: $(BIN)/.installed chromium
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False \
	  SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(BIN)/python -m pytest -m browser -q tests/test_assistant_browser.py

bench-knowledge: $(BIN)/.installed
	@test -d /usr/share/debian-reference || ($(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq debian-reference-en debian-reference-ja debian-faq debian-faq-ja)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.retrieval_quality --haystack --out docs/retrieval-quality.md
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.ingest_speed --chunks 10000 100000 --encode-sample 20000
