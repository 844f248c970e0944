"""Two processes on the gloo backend train as one: they step together and save what one process saves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune.config import save_config
from finetune.train import train
from finetune.training_log import read_log
from tests.finetune_fixtures import tiny_config, write_jsonl
from tests.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]


def pair(a: int, b: int) -> dict:
    reasoning = f"{a} plus {b} makes {a + b}"
    return {"instruction": f"What is {a} plus {b}?", "input": "", "chosen": f"<think>{reasoning}</think>{a + b}",
            "rejected": f"<think>{reasoning}</think>{reasoning}, so {a + b}"}



def test_two_gloo_processes_match_one_process(tiny_model_dir, tmp_path):
    # Two pairs of equal token lengths: ORPO's NLL is a mean over the batch's tokens, so only then do one
    # batch of two and two processes with one pair each weigh every token alike.
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(2, 3), pair(4, 1)])
    common = dict(max_steps=4, save_steps=100, learning_rate=1e-2)
    single = train(tiny_config(tiny_model_dir, data, tmp_path / "one", per_device_train_batch_size=2, **common))

    config_file = tmp_path / "two.yaml"
    save_config(tiny_config(tiny_model_dir, data, tmp_path / "two", per_device_train_batch_size=1, **common),
                config_file)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "finetune", "train", "--config", str(config_file)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("after 4 steps (hf backend)") == 2  # both ranks ran every step

    one = load_file(single.output_dir / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert any((one[name] != 0).any() for name in one if "lora_B" in name)  # training moved the adapter

    two_log, one_log = read_log(tmp_path / "two"), read_log(single.output_dir)
    assert [r["step"] for r in two_log] == [1, 2, 3, 4]  # written once, by rank 0
    for a, b in zip(two_log, one_log, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4
