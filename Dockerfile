# The assistant, the knowledge store and the trainer in one image, for a host with an NVIDIA GPU
# (NVIDIA Container Toolkit). compose.yaml runs it three ways: the app, a Chroma server, a training job.
#   docker compose up            # app on http://127.0.0.1:7860 (APP_AUTH in .env), Chroma server beside it
#   docker compose run --rm finetune train --config finetune/configs/recipe-r1-qwen14b.yaml data=/data/pairs
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf KNOWLEDGE_DIR=/data/knowledge ADAPTER_DIR=/data/adapters GRADIO_ANALYTICS_ENABLED=False
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# Dependencies first, so code changes do not reinstall them. torch first and alone (PyPI's Linux wheel brings
# its CUDA libraries); then the pinned stack with Unsloth and bitsandbytes.
COPY pyproject.toml README.md ./
RUN mkdir knowledge finetune assistant && touch settings.py knowledge/__init__.py finetune/__init__.py \
    assistant/__init__.py && pip install torch==2.13.0 && pip install '.[gpu]' && pip uninstall -y think-rag
COPY settings.py ./
COPY knowledge knowledge
COPY finetune finetune
COPY assistant assistant
RUN pip install --no-deps .

VOLUME /data
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD curl -fs http://127.0.0.1:7860/health || exit 1
# Inside the container the app listens on all addresses; it refuses to start without APP_AUTH logins.
CMD ["python", "-m", "assistant", "serve", "--host", "0.0.0.0", "--port", "7860"]
