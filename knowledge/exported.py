"""A sentence-transformers model run by ONNX Runtime or OpenVINO instead of torch, exported once and cached.

The whole model (transformer, pooling, normalization) becomes one ONNX graph (``torch.onnx``, the TorchScript
exporter, eager attention so ONNX Runtime can fuse it), from token ids to the sentence embedding. The files live
in ``$HF_HOME/think-rag/exports/<model>-<key>/`` (HF_HOME defaults to ``~/.cache/huggingface``; the container
keeps it on the /cache volume), where ``<key>`` hashes the model's version (a hub snapshot's commit, or a local
folder's path, weight sizes and times) and the ONNX Runtime version: each file is written once per model
version, by whichever process needs it first, under a lock, and then loaded by every later process. If that
folder cannot be written, the files go to a temporary folder for this process alone.

- ``model.onnx``: the float32 graph as exported. OpenVINO reads it (backend ``openvino``) and runs it in bf16 on
  CPUs with native bf16, as it does by default.
- ``model-fused.onnx``: ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu) of it
  (backend ``onnx``).
- ``model-int8.onnx``: the fused graph with every MatMul's weights quantized to int8 per output channel and its
  activations quantized on the fly (ONNX Runtime's dynamic quantization; backend ``onnx-int8``). The embedding
  table stays float: quantizing it too took some chunks' embeddings far from the float ones.
- ``model-openvino-int8.xml`` (and ``.bin``): ``model.onnx`` quantized to int8, weights and activations, by NNCF's
  post-training quantization, its activation ranges taken from ``calibration.txt`` (backend ``openvino-int8``).
  Two kinds of MatMul stay in OpenVINO's float: each layer's feed-forward output projection, whose inputs carry
  the outliers BERT-like encoders are known for, and attention's two products of activations. Quantizing those
  too ran faster still but lost vector-mode hit@5 on the benchmark (docs/benchmarks.md, "OpenVINO int8").

sentence-transformers' own ``backend="onnx"`` needs optimum-onnx, whose only release (0.1.0) wants
transformers<4.58; and ``backend="openvino"`` needs optimum-intel, which wants transformers<5.6. Our
transformers is 5.17, so the export is done here with torch, onnx and onnxruntime alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("onnx", "onnx-int8", "openvino", "openvino-int8")
FILES = {"onnx": "model-fused.onnx", "onnx-int8": "model-int8.onnx", "openvino": "model.onnx",
         "openvino-int8": "model-openvino-int8.xml"}
CALIBRATION = Path(__file__).with_name("calibration.txt")
# MatMuls left in float by the int8 OpenVINO model (names as torch.onnx writes a BERT or XLM-R encoder's modules)
FLOAT_MATMULS = (r".*/layer\.\d+/output/dense/MatMul", r".*/attention/self/MatMul.*")
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def export_folder(model_name: str) -> Path:
    """Where the exports of ``model_name`` are kept (see the module's docstring)."""
    from huggingface_hub import constants

    tools = "|".join(f"{name} {_version(name)}" for name in ("onnxruntime", "openvino", "nncf"))
    key = hashlib.sha256(f"{_model_version(model_name)}|{tools}".encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name.rstrip("/\\").split("/")[-1])[:60]
    return Path(constants.HF_HOME) / "think-rag" / "exports" / f"{slug}-{key.hexdigest()[:16]}"


def load_runner(model, model_name: str, backend: str, precision: str | None = None) -> Runner:
    """A function from token arrays (``input_names(model)``) to sentence embeddings, for ``backend``.

    ``model`` is the loaded SentenceTransformer (eager attention), used for the export when no cached file
    exists yet. ``precision`` is OpenVINO's inference precision hint ("f32", "bf16", "f16"); None: its default.
    """
    path = _exported(model, model_name, backend)
    if backend in ("openvino", "openvino-int8"):
        import openvino

        config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
        requests = threading.local()  # an infer request runs one inference at a time: one per thread

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            if not hasattr(requests, "request"):
                requests.request = compiled.create_infer_request()
            return np.array(requests.request.infer(inputs)[0])  # a copy: the request reuses its output buffer

        return run
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, inputs)[0]


def input_names(model) -> list[str]:
    """The token arrays the model's tokenizer gives (XLM-R models have no token_type_ids)."""
    features = model.preprocess(["a"])
    return [name for name in TOKEN_INPUTS if name in features]


def _exported(model, model_name: str, backend: str) -> Path:
    from filelock import FileLock

    folder = export_folder(model_name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".lock"))
        lock.acquire(timeout=600)
    except OSError as e:
        logger.warning("cannot write %s (%s); exporting to a temporary folder for this process", folder, e)
        folder = Path(tempfile.mkdtemp(prefix="think-rag-export-"))
        lock = None
    try:
        plain, fused, int8 = (folder / FILES[b] for b in ("openvino", "onnx", "onnx-int8"))
        if not plain.exists():
            _write(plain, lambda tmp: _export_onnx(model, tmp))
        if backend in ("onnx", "onnx-int8") and not fused.exists():
            _write(fused, lambda tmp: _fuse(plain, tmp, model))
        if backend == "onnx-int8" and not int8.exists():
            _write(int8, lambda tmp: _quantize(fused, tmp))
        quantized = folder / FILES["openvino-int8"]
        if backend == "openvino-int8" and not quantized.exists():
            _write(quantized, lambda tmp: _quantize_openvino(plain, tmp, model))
        return folder / FILES[backend]
    finally:
        if lock is not None:
            lock.release()


def _write(path: Path, make: Callable[[Path], None]) -> None:
    """Make the file under a temporary name and rename it, so a reader never sees half of one. An OpenVINO model
    is two files (``.xml`` and its ``.bin`` weights): the ``.bin`` is renamed first, the ``.xml`` that names it last."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    weights, tmp_weights = path.with_suffix(".bin"), tmp.with_suffix(".bin")
    logger.info("writing %s (once per model version)", path)
    try:
        make(tmp)
        if tmp_weights.exists():
            os.replace(tmp_weights, weights)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_weights.unlink(missing_ok=True)


def _export_onnx(model, path: Path) -> None:
    import torch

    names = input_names(model)
    # two texts of different lengths, so the traced graph sees padding
    sample = model.preprocess(["a short text", "a somewhat longer text, so that the first one is padded"])

    class WholeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model({**dict(zip(names, tensors, strict=True)), "modality": "text"})["sentence_embedding"]

    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"sentence_embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on branches that are constant for these models
        torch.onnx.export(WholeModel().eval(), tuple(sample[n] for n in names), str(path), dynamo=False,
                          input_names=names, output_names=["sentence_embedding"], dynamic_axes=axes,
                          opset_version=17)


def _fuse(source: Path, path: Path, model) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    config = model[0].auto_model.config
    fused = optimize_model(str(source), model_type="bert", num_heads=getattr(config, "num_attention_heads", 0),
                           hidden_size=getattr(config, "hidden_size", 0))
    fused.save_model_to_file(str(path))


def _quantize(source: Path, path: Path) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs advice to pre-process the graph, which is for static quantization
    try:
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def _quantize_openvino(source: Path, path: Path, model) -> None:
    import nncf
    import openvino
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    names = input_names(model)
    texts = calibration_texts()
    batches = [model.preprocess(texts[i:i + 16]) for i in range(0, len(texts), 16)]
    dataset = nncf.Dataset([{name: batch[name].numpy() for name in names} for batch in batches])
    quantized = nncf.quantize(
        openvino.Core().read_model(str(source)), dataset, model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(batches), ignored_scope=nncf.IgnoredScope(patterns=list(FLOAT_MATMULS), validate=False),
        # SmoothQuant took the embeddings further from the float ones (docs/benchmarks.md, "OpenVINO int8")
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
    openvino.save_model(quantized, str(path))


def calibration_texts() -> list[str]:
    """The paragraphs of ``calibration.txt`` (English and Japanese), in the file's order."""
    blocks = CALIBRATION.read_text(encoding="utf-8").split("\n\n")
    return [b.strip() for b in blocks if b.strip() and not b.lstrip().startswith("#")]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _model_version(name: str) -> str:
    folder = Path(name).expanduser()
    if folder.is_dir():
        weights = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".json"))
        return str(folder.resolve()) + "".join(
            f"|{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in weights)
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")  # .../snapshots/<commit>/config.json
    return str(config) if isinstance(config, str) else name
