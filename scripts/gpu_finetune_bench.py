"""ORPO speed and memory on the GPU machine: backend (unsloth, hf) x shape (tiny, R1-Distill-Qwen-1.5B, -14B)
x length (prompt 256 + completion 768, and prompt 2048 + completion 2048 = the full 4096 context).

Random weights with the exact DeepSeek-R1-Distill-Qwen architectures (speed and memory do not depend on the
values), the tiny model's tokenizer (token ids only select embedding rows), the recipe's settings (4-bit,
LoRA r=16 on all projections, batch 2 x 4, adamw_8bit, gradient checkpointing, bf16). Each (backend, shape)
runs in its own process, so unsloth is imported before transformers. Results are appended to
$OUT/results.jsonl as they come and rendered to $OUT/results.md.

    python scripts/gpu_finetune_bench.py all --backends unsloth --shapes 14b,1.5b,tiny --budget-s 540
    python scripts/gpu_finetune_bench.py all --backends hf --shapes tiny --device cpu    # CPU check of the script

Counted: s/step = wall time of one optimizer step (4 micro-batches of 2 pairs), after one warm-up step;
tokens/s = real tokens (attention masks) of chosen and rejected sequences per second; peak = CUDA
max_memory_allocated; MFU = 6 * N * tokens/s / peak bf16 FLOP/s, N = parameters except the input embedding
(the conventional count: no attention FLOPs, no recomputation by gradient checkpointing, no credit for the
frozen base needing no weight gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B/blob/main/config.json
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072,
                 rms_norm_eps=1e-6, max_window_layers=21, tie_word_embeddings=False),
    # huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-14B/blob/main/config.json
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=131072,
                rms_norm_eps=1e-5, max_window_layers=48, tie_word_embeddings=False),
}
LENGTHS = {"256+768": (256, 768), "2048+2048": (2048, 2048)}
H100_BF16_NOMINAL = 790e12
OUT = Path(os.environ.get("OUT", "outputs/gpu-bench"))
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/finetune-bench"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_dir(shape: str) -> Path:
    return WORK / f"model-{shape}"


def build(shape: str) -> Path:
    """Random weights of the shape, saved with the tiny tokenizer (built on the GPU in bf16)."""
    out = model_dir(shape)
    if (out / "config.json").exists():
        return out
    from finetune.tiny_model import build_tiny_model, build_tokenizer

    if shape == "tiny":
        return build_tiny_model(out)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    log(f"built {shape} in {time.perf_counter() - start:.0f} s")
    return out


def bench_pairs(tokenizer, prompt_tokens: int, completion_tokens: int, n: int, seed: int = 0) -> list[dict]:
    """Pairs of exactly prompt_tokens (with BOS) + completion_tokens (with EOS) tokens of random text."""
    from finetune.data import PreferencePair

    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"]))
    ids = [i for i in range(len(tokenizer)) if i not in special]

    def text(n_tokens: int) -> str:
        # decode random ids, re-encode, cut at exactly n_tokens (merges may change the count)
        t = tokenizer.decode([rng.choice(ids) for _ in range(n_tokens * 2)])
        spans = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return t[:spans[n_tokens - 1][1]]

    return [PreferencePair(text(prompt_tokens - 1), text(completion_tokens - 1) + tokenizer.eos_token,
                           text(completion_tokens - 1) + tokenizer.eos_token) for _ in range(n)]


def counted_params(path: Path) -> int:
    """Parameters of the base model except the input embedding, counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def measured_bf16_flops() -> float:
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 50
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * 8192**3 * n / (time.perf_counter() - start)
    del a, b
    torch.cuda.empty_cache()
    return flops


def run(backend: str, shape: str, lengths: list[str], steps: int, chunk: int, device: str) -> None:
    """One process: load the model once, then train `steps` optimizer steps at each length."""
    from finetune.config import TrainConfig
    from finetune.train import resolve_backend

    config = TrainConfig(model_name=str(model_dir(shape)), backend=backend, max_length=4096, max_steps=steps,
                         save_steps=10**6, logging_steps=1, output_dir=str(WORK / f"out-{backend}-{shape}"),
                         logprob_chunk_size=chunk, learning_rate=1e-5)
    if device == "cpu":
        config.load_in_4bit = False
        config.per_device_train_batch_size, config.gradient_accumulation_steps = 1, 1
    backend = resolve_backend(backend)
    if backend == "unsloth":
        from finetune import unsloth_backend

        unsloth_backend.import_unsloth()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from finetune import hf_backend
    from finetune.orpo_trainer import LeanORPOTrainer
    from finetune.train import orpo_arguments, resolve_precision

    start = time.perf_counter()
    if backend == "unsloth":
        from finetune import unsloth_backend

        model, tokenizer = unsloth_backend.load_for_training(config)
    else:
        model, tokenizer = hf_backend.load_for_training(config, resolve_precision(config.precision)[2])
    load_s = time.perf_counter() - start
    n_params = counted_params(model_dir(shape))
    peak_flops = float(os.environ.get("BENCH_PEAK_FLOPS", H100_BF16_NOMINAL))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.trainer = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0, self.k0 = time.perf_counter(), self.trainer.tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(self.trainer.tokens_seen - self.k0)

    def measure(name: str, chunk: int) -> dict:
        prompt_tokens, completion_tokens = LENGTHS[name]
        n_pairs = config.per_device_train_batch_size * config.gradient_accumulation_steps * steps
        pairs = bench_pairs(tokenizer, prompt_tokens, completion_tokens, n_pairs)
        result = {"backend": backend, "shape": shape, "length": name, "logprob_chunk_size": chunk,
                  "load_s": round(load_s, 1), "params_counted": n_params,
                  "batch": f"{config.per_device_train_batch_size}x{config.gradient_accumulation_steps}"}
        timer = StepTimer()
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = LeanORPOTrainer(
                model=model, args=orpo_arguments(config, backend), processing_class=tokenizer,
                train_dataset=Dataset.from_list([p.__dict__ for p in pairs]), callbacks=[timer],
                logprob_chunk_size=chunk)
            timer.trainer = trainer
            trainer.train()
            measured = timer.times[1:] or timer.times  # the first step compiles and warms up
            tokens = sum(timer.tokens[1:] or timer.tokens)
            s_per_step = sum(measured) / len(measured)
            tokens_per_s = tokens / sum(measured)
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            result.update(
                s_per_step=round(s_per_step, 2), tokens_per_s=round(tokens_per_s),
                tokens_per_step=round(tokens / len(measured)),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
                mfu=round(6 * n_params * tokens_per_s / peak_flops, 3), loss=[round(x, 3) for x in losses],
                nll_loss=[round(h["nll_loss"], 3) for h in trainer.state.log_history if "nll_loss" in h],
                step_times=[round(t, 2) for t in timer.times])
            del trainer
        except torch.OutOfMemoryError as e:
            result["error"] = f"out of memory: {str(e).splitlines()[0][:160]}"
        except Exception as e:  # record and go on to the next length: a bench reports, it does not stop
            result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(json.dumps(result))
        append(result)
        return result

    for name in lengths:
        result = measure(name, chunk)
        if "error" in result and not result["error"].startswith("out of memory") and chunk > 0:
            measure(name, 0)  # the lean path failed: record the full-logits path instead


def diagnose_stock(shape: str, device: str) -> None:
    """Stock TRL ORPOTrainer (peft_config, 4-bit, bf16) as a user would start it: what does it log, and what
    is the raw loss of each micro-batch?"""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from finetune.quantization import four_bit_config

    path = model_dir(shape)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for name, max_length in (("256+768", 1024), ("2048+2048", None)):
        kwargs = {"dtype": torch.bfloat16}
        if device == "cuda":
            kwargs.update(device_map={"": 0}, quantization_config=four_bit_config(torch.bfloat16))
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        pairs = bench_pairs(tokenizer, *LENGTHS[name], n=8)
        raw, dtypes = [], []

        class Recording(ORPOTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                raw.append(float(loss))  # noqa: B023 - one trainer per loop pass
                dtypes.append(  # noqa: B023
                    str(torch.get_autocast_dtype("cuda")) if torch.is_autocast_enabled("cuda") else "off")
                return loss

        args = dict(output_dir=str(WORK / "stock"), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                    max_steps=1, logging_steps=1, learning_rate=1e-5, remove_unused_columns=False,
                    report_to="none", save_strategy="no", bf16=device == "cuda", use_cpu=device == "cpu")
        if max_length is not None:
            args["max_length"] = max_length  # else ORPOConfig's default, 1024
        trainer = Recording(model=model, args=ORPOConfig(**args),
                            train_dataset=Dataset.from_list([p.__dict__ for p in pairs]), processing_class=tokenizer,
                            peft_config=LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
        try:
            trainer.train()
            logged = [{k: h[k] for k in ("loss", "nll_loss", "log_odds_ratio") if k in h}
                      for h in trainer.state.log_history if "loss" in h]
            result = {"diagnosis": "stock trl", "shape": shape, "length": name, "max_length": max_length or 1024,
                      "logged": logged, "raw_micro_batch_losses": raw, "autocast_in_compute_loss": dtypes[:1]}
        except Exception as e:
            result = {"diagnosis": "stock trl", "shape": shape, "length": name, "error": f"{type(e).__name__}: {e}"}
        log(json.dumps(result))
        append(result)
        del trainer, model
        if device == "cuda":
            torch.cuda.empty_cache()


def append(result: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    render()


def render() -> None:
    rows = [json.loads(line) for line in (OUT / "results.jsonl").read_text().splitlines() if line.strip()]
    lines = ["| backend | shape | prompt+completion | s/step | tokens/s | peak GiB | MFU | loss (per step) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "backend" not in r:
            continue
        name = r["backend"] + ("" if r.get("logprob_chunk_size", 1) else " (full logits)")
        if "error" in r:
            lines.append(f"| {name} | {r['shape']} | {r['length']} | {r['error']} | | | | |")
        else:
            lines.append(f"| {name} | {r['shape']} | {r['length']} | {r['s_per_step']} | {r['tokens_per_s']} | "
                         f"{r['peak_gib']} | {r['mfu']} | {r['loss']} |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--backends", default="unsloth,hf")
    a.add_argument("--shapes", default="14b,1.5b,tiny")
    a.add_argument("--lengths", default="256+768,2048+2048")
    a.add_argument("--steps", type=int, default=3)
    a.add_argument("--budget-s", type=float, default=540)
    a.add_argument("--device", default="cuda")
    a.add_argument("--diagnose", default="", help="shape to run the stock-TRL loss diagnosis on, first")
    a.add_argument("--full-logits", default="", help="shape to also run hf with full logits on, last")
    a.add_argument("--jobs", default="", help="explicit order instead: backend:shape[:length], "
                   "hf0:shape:length (full logits), diagnose:shape; comma-separated")
    r = sub.add_parser("run")
    r.add_argument("--backend")
    r.add_argument("--shape")
    r.add_argument("--lengths")
    r.add_argument("--steps", type=int)
    r.add_argument("--chunk", type=int, default=1024)
    r.add_argument("--device", default="cuda")
    b = sub.add_parser("build")
    b.add_argument("--shape")
    d = sub.add_parser("diagnose")
    d.add_argument("--shape")
    d.add_argument("--device", default="cuda")
    args = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    if args.cmd == "run":
        return run(args.backend, args.shape, args.lengths.split(","), args.steps, args.chunk, args.device)
    if args.cmd == "diagnose":
        return diagnose_stock(args.shape, args.device)
    if args.cmd == "build":
        build(args.shape)
        return None

    deadline = time.monotonic() + args.budget_s
    peak = measured_bf16_flops()
    log(f"measured bf16 matmul: {peak / 1e12:.0f} TFLOP/s")
    append({"measured_bf16_tflops": None if peak != peak else round(peak / 1e12)})
    env = dict(os.environ, BENCH_PEAK_FLOPS=str(H100_BF16_NOMINAL))
    jobs = []
    if args.diagnose:
        jobs.append(["diagnose", "--shape", args.diagnose])
    for shape in args.shapes.split(","):
        for backend in args.backends.split(","):
            jobs.append(["run", "--backend", backend, "--shape", shape, "--lengths", args.lengths,
                         "--steps", str(args.steps)])
    if args.full_logits:
        jobs.append(["run", "--backend", "hf", "--shape", args.full_logits, "--lengths", "2048+2048",
                     "--steps", "2", "--chunk", "0"])
    if args.jobs:
        jobs = []
        for spec in args.jobs.split(","):
            kind, shape, *length = spec.split(":")
            if kind == "diagnose":
                jobs.append(["diagnose", "--shape", shape])
                continue
            job = ["run", "--backend", kind.rstrip("0"), "--shape", shape,
                   "--lengths", length[0] if length else args.lengths, "--steps", str(args.steps)]
            jobs.append(job + (["--chunk", "0"] if kind.endswith("0") else []))
    for job in jobs:
        shape = job[job.index("--shape") + 1]
        left = deadline - time.monotonic()
        if left < 30:
            log(f"skipped {' '.join(job)}: budget spent")
            append({"skipped": " ".join(job)})
            continue
        subprocess.run([sys.executable, __file__, "build", "--shape", shape], env=env, check=True)
        left = deadline - time.monotonic()
        log(f"start {' '.join(job)} ({left:.0f} s left)")
        try:
            subprocess.run([sys.executable, __file__, *job, "--device", args.device], env=env, timeout=left,
                           check=False)
        except subprocess.TimeoutExpired:
            append({"timeout": " ".join(job)})
    log("done")


if __name__ == "__main__":
    main()
