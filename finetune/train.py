"""ORPO training: config in; LoRA adapter, tokenizer, resolved config, training log and plot out.

    from finetune.config import load_config
    from finetune.train import train
    result = train(load_config("finetune/configs/tiny-smoke.yaml"))
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from errors import DataError, TrainingError
from finetune.adapters import CONFIG_NAME, INFO_NAME, TrainingInfo, write_training_info
from finetune.config import TrainConfig, save_config
from finetune.data import PreparedData, prepare_data
from finetune.output_dir import latest_checkpoint


@dataclass
class TrainResult:
    output_dir: Path
    backend: str
    global_step: int
    data_report: dict


def world_size() -> int:
    """Processes training together (set by torchrun or `accelerate launch`); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only the first process of a multi-process run writes the adapter, the config and the log."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_backend(name: str) -> str:
    cuda = torch.cuda.is_available()
    if name == "auto":
        # Several processes train through accelerate's DDP/FSDP, which the hf backend is built on.
        unsloth = cuda and world_size() == 1 and importlib.util.find_spec("unsloth") is not None
        return "unsloth" if unsloth else "hf"
    if name == "unsloth" and not cuda:
        raise TrainingError("backend=unsloth needs a CUDA GPU; use backend=hf (or auto) on this machine")
    if name == "unsloth" and importlib.util.find_spec("unsloth") is None:
        raise TrainingError("backend=unsloth but unsloth is not installed: pip install 'think-rag[gpu]', or use "
                            "backend=hf")
    return name


def resolve_precision(precision: str) -> tuple[bool, bool, torch.dtype]:
    """(bf16, fp16, compute dtype) for the Trainer."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return precision == "bf16", precision == "fp16", dtype


def orpo_arguments(config: TrainConfig, backend: str):
    from trl.experimental.orpo import ORPOConfig

    bf16, fp16, _ = resolve_precision(config.precision)
    optim = config.optim
    if "8bit" in optim and not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        optim = "adamw_torch"  # 8-bit optimizers need bitsandbytes on CUDA
    # Unsloth applies its own gradient checkpointing to the model; the Trainer's would be a second layer.
    checkpointing = backend == "hf" and config.gradient_checkpointing != "false"
    # Every ORPOConfig default that differs from TrainingArguments is set here on purpose.
    return ORPOConfig(
        output_dir=config.output_dir, max_length=config.max_length, beta=config.beta,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        optim=optim, num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        bf16=bf16, fp16=fp16, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, seed=config.seed, data_seed=config.seed,
        remove_unused_columns=False, report_to="none", logging_nan_inf_filter=False,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
    )


def _prepare(config: TrainConfig, tokenizer) -> PreparedData:
    prepared = prepare_data(config.data, tokenizer, config.data_format, config.columns or None, config.max_length,
                            config.max_prompt_length, config.on_overlength, config.data_split)
    if not prepared.pairs:
        raise DataError(f"no usable pairs in {config.data}:\n{prepared.summary()}")
    return prepared


def start_from_adapter(model, folder: str | Path) -> None:
    """Put an earlier adapter's LoRA weights into the model's new ones, so training continues that adapter (a
    next round on new pairs, made with it) instead of starting from fresh LoRA weights."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrainingError(f"init_adapter={folder}: no adapter_model.safetensors there; name an adapter folder")
    try:
        loaded = set_peft_model_state_dict(model, load_file(weights))
    except RuntimeError as e:  # a tensor of another shape: another rank or model
        raise TrainingError(f"init_adapter={folder} does not fit this run's LoRA ({str(e).splitlines()[-1].strip()}"
                            "): train with the lora_r, lora_alpha and target_modules it was trained with") from None
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if loaded.unexpected_keys or missing:
        raise TrainingError(f"init_adapter={folder} does not fit this run's LoRA ({len(missing)} LoRA weights "
                            f"missing, {len(loaded.unexpected_keys)} unexpected): train with the target_modules it "
                            "was trained with")


def train(config: TrainConfig, resume: bool = False, callbacks: list | None = None) -> TrainResult:
    """Train a LoRA adapter with ORPO; a run with `resume` continues from the newest checkpoint."""
    if not config.data:
        raise TrainingError("no data: set data=FILE|FOLDER|HUB_NAME in the config or on the command line")
    backend = resolve_backend(config.backend)
    if backend == "unsloth":
        from finetune import unsloth_backend

        unsloth_backend.import_unsloth()  # before transformers, TRL and PEFT
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset

    from finetune import hf_backend
    from finetune.orpo_trainer import LeanORPOTrainer
    from finetune.training_log import TrainingLogCallback, plot_log

    output_dir = Path(config.output_dir)
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(output_dir)
        if resume_from is None:
            raise TrainingError(f"--resume: no checkpoint-* folder in {output_dir}; train without --resume")

    # Data first: a bad file fails here, before any model is loaded.
    prepared = _prepare(config, hf_backend.load_tokenizer(config.model_name))
    _, _, dtype = resolve_precision(config.precision)
    from transformers import set_seed

    set_seed(config.seed)  # the LoRA weights are drawn when the adapters are added, before the Trainer seeds
    if backend == "unsloth":
        from finetune import unsloth_backend

        model, tokenizer = unsloth_backend.load_for_training(config)
    else:
        model, tokenizer = hf_backend.load_for_training(config, dtype)

    if config.init_adapter and not resume_from:
        start_from_adapter(model, config.init_adapter)
    dataset = Dataset.from_list([asdict(p) for p in prepared.pairs])
    # Under FSDP the output head is sharded: the lean log-probs, which read its weight outside the
    # forward, give way to the stock full-logits path.
    chunk_size = 0 if hf_backend.using_fsdp() else config.logprob_chunk_size
    trainer = LeanORPOTrainer(
        model=model, args=orpo_arguments(config, backend), train_dataset=dataset, processing_class=tokenizer,
        callbacks=[TrainingLogCallback(output_dir), *(callbacks or [])],
        logprob_chunk_size=chunk_size)
    main = is_main_process()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / CONFIG_NAME)
        # The app takes the folder for a finished adapter once this file is there: a run into the folder of an
        # earlier one removes it first, and writes it again last (finetune/adapters.py).
        (output_dir / INFO_NAME).unlink(missing_ok=True)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError as e:
        raise TrainingError(
            f"out of memory on {config.model_name} at max_length {config.max_length}, batch "
            f"{config.per_device_train_batch_size}: lower per_device_train_batch_size (and raise "
            "gradient_accumulation_steps to keep the effective batch), lower max_length, keep "
            "gradient_checkpointing=unsloth/true, load_in_4bit=true, or lower logprob_chunk_size") from e
    finally:
        if main:
            plot_log(output_dir)

    trainer.save_model(str(output_dir))  # the adapter and the tokenizer; in several processes, rank 0 only
    info = TrainingInfo(base_model=config.model_name, backend=backend, prompt_format=prepared.prompt_format,
                        global_step=trainer.state.global_step, processes=world_size(), data_report=prepared.report())
    if main:
        write_training_info(output_dir, info)
    if config.merge_16bit and main:
        merged_dir = output_dir / "merged-16bit"
        if backend == "unsloth":
            from finetune import unsloth_backend

            unsloth_backend.save_merged_16bit(model, tokenizer, merged_dir)
        else:
            del trainer, model
            hf_backend.save_merged_16bit(config, output_dir, merged_dir)
    return TrainResult(output_dir, backend, info.global_step, info.data_report)
