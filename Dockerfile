# The assistant, the knowledge store's Chroma server and the trainer in one image, for a host with an NVIDIA GPU
# (NVIDIA Container Toolkit); compose.yaml runs it as each of them. Everything the services write goes to
# volumes that compose.yaml mounts: /data (knowledge store, adapters and training runs, preference pairs) and
# /cache (the Hugging Face cache: downloaded models). README.md, "Running in containers", has the commands.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False ANONYMIZED_TELEMETRY=False \
    HF_HOME=/cache/huggingface KNOWLEDGE_DIR=/data/knowledge ADAPTER_DIR=/data/adapters \
    PAIRS_DB=/data/pairs/pairs.sqlite
# build-essential: Triton (Unsloth's kernels) compiles a small C helper at run time; curl: the health checks.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git curl \
    && rm -rf /var/lib/apt/lists/*
# The user the services run as, owning the volumes' mount points (a new named volume takes their owner).
RUN useradd --create-home --uid 1000 app \
    && mkdir -p /data/knowledge /data/adapters /data/pairs /cache/huggingface && chown -R app:app /data /cache
WORKDIR /app

# Dependencies before code, so a code change does not reinstall them; and only pyproject.toml (the one list of
# versions) decides them. torch first and alone, at the version pyproject.toml pins (PyPI's Linux wheel brings
# its CUDA libraries); then the pinned stack with Unsloth and bitsandbytes, on empty stand-ins of the packages.
COPY pyproject.toml ./
# The versions are pyproject.toml's pins, read here, not repeated in this file.
# hadolint ignore=DL3013
RUN pip install "$(python -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if d.startswith("torch")))')"
# hadolint ignore=DL3013
RUN mkdir knowledge finetune engine assistant && touch README.md settings.py errors.py logs.py locks.py compat.py \
    knowledge/__init__.py finetune/__init__.py engine/__init__.py assistant/__init__.py && pip install '.[gpu]' \
    && pip uninstall -y think-rag \
    && rm -rf README.md settings.py errors.py logs.py locks.py compat.py knowledge finetune engine assistant build ./*.egg-info
COPY README.md settings.py errors.py logs.py locks.py compat.py ./
COPY knowledge knowledge
COPY finetune finetune
COPY engine engine
COPY assistant assistant
# hadolint ignore=DL3013
RUN pip install --no-deps . && rm -rf build ./*.egg-info

USER 1000:1000
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["curl", "-fs", "-o", "/dev/null", "http://127.0.0.1:7860/health"]
# Inside the container the app listens on all addresses; it refuses to start without APP_AUTH logins.
CMD ["python", "-m", "assistant", "serve", "--host", "0.0.0.0", "--port", "7860"]
