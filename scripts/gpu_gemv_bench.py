"""The linear layers of one decode token, alone, on the GPU: bf16, bitsandbytes nf4, and our GEMVs on the same nf4
bytes: the Triton one (``engine/kernels/gemv_4bit.py``) and the tensor-core one (``engine/kernels/gemv_4bit_mma.py``).

    python scripts/gpu_gemv_bench.py --shape 14b --out results.jsonl

Random weights of a DeepSeek-R1-Distill-Qwen shape (every layer's own weights, so nothing is read from the L2
cache). First a sweep of the kernel's tilings on each product of the decode step (engine.decode.projections.GROUPS: q, k and v
fused; o; gate and up fused; down), eight layers' weights in turn in one CUDA graph; then all the layers of a
token in one CUDA graph with the best tiling per product, against bitsandbytes' own batch-1 kernel and bf16
products. Each line: microseconds per launch or milliseconds per token, and the fraction of the copy bandwidth
(bytes of weights and absmax read, over the time, against a large copy's rate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.decode.projections import GROUPS, PROJECTIONS  # noqa: E402
from engine.kernels import gemv_4bit_mma  # noqa: E402
from engine.kernels.gemv_4bit import CANDIDATES, GemvConfig, Nf4Weight, gemv  # noqa: E402
from engine.kernels.triton_runtime import graph_ms  # noqa: E402
from scripts.gpu_generation_bench import SHAPES, copy_bandwidth  # noqa: E402


def projection_sizes(shape: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection of a layer."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


def nf4_layers(sizes: dict, layers: int):
    """bitsandbytes Linear4bit modules (nf4, double-quantized absmax, as Unsloth's checkpoints) for every layer."""
    import bitsandbytes as bnb

    modules = []
    for _ in range(layers):
        row = {}
        for name, (n, k) in sizes.items():
            m = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True)
            dense = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            m.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
            row[name] = m.cuda()  # quantized here
        modules.append(row)
    return modules


def weight_bytes(w: Nf4Weight) -> int:
    return w.packed.numel() + w.absmax.numel() * w.absmax.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=0, help="layers built (default: the shape's)")
    parser.add_argument("--full-sweep", action="store_true",
                        help="sweep 36 Triton tilings (default: the ones tried at load, gemv_4bit.CANDIDATES)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    sizes = projection_sizes(shape)
    layers = args.layers or shape["num_hidden_layers"]
    bandwidth = copy_bandwidth()
    lines = []

    def emit(row: dict) -> None:
        row = {"shape": args.shape, **row}
        print(json.dumps(row), flush=True)
        lines.append(row)

    emit({"what": "copy bandwidth", "tb_s": bandwidth / 1e12})
    torch.manual_seed(0)
    modules = nf4_layers(sizes, layers)
    x_hidden = torch.randn(1, 1, shape["hidden_size"], dtype=torch.bfloat16, device="cuda")
    x_inter = torch.randn(1, 1, shape["intermediate_size"], dtype=torch.bfloat16, device="cuda")

    def input_for(name: str) -> torch.Tensor:
        return x_inter if name == "down" else x_hidden

    # Correctness first: each projection against bitsandbytes' product (before its bytes are fused).
    for name in PROJECTIONS:
        m, x = modules[0][name], input_for(name)
        expected = m(x).float()
        weight = Nf4Weight.from_bnb(m)
        error = float((gemv(x, weight).float() - expected).norm() / expected.norm())
        mma_error = float((gemv_4bit_mma.gemv(x, weight).float() - expected).norm() / expected.norm())
        truth = x.double().view(-1) @ weight.dequantize(torch.float64).T  # the same weights, in float64
        emit({"what": "check", "projection": name, "relative_error_to_bitsandbytes": error,
              "tensor_core_relative_error_to_bitsandbytes": mma_error,
              "bitsandbytes_to_float64": float((expected.double().view(-1) - truth).norm() / truth.norm()),
              "tensor_core_to_float64": float((gemv_4bit_mma.gemv(x, weight).double() - truth).norm()
                                              / truth.norm())})
    weights = [{group: Nf4Weight.from_bnb(*[row[n] for n in names]) for group, names in GROUPS.items()}
               for row in modules]

    # The tiling sweep on each product, eight layers' weights in turn.
    configs = [GemvConfig(block_n, block_k, warps, 1) for block_n, block_k, warps in
               itertools.product((2, 4, 8, 16), (512, 1024, 2048), (2, 4, 8))] if args.full_sweep else CANDIDATES
    best: dict[str, tuple[float, GemvConfig]] = {}
    best_mma: dict[str, gemv_4bit_mma.MmaConfig] = {}
    turns = min(8, layers)
    for group, names in GROUPS.items():
        x, ws = input_for(names[0]), [weights[i][group] for i in range(turns)]
        read = sum(weight_bytes(w) for w in ws)
        own_ms = graph_ms(lambda x=x, names=names: [modules[i][n](x) for i in range(turns) for n in names])
        results = []
        for config in configs:
            try:
                ms = graph_ms(lambda x=x, ws=ws, config=config: [gemv(x, w, config=config) for w in ws])
            except Exception as e:  # noqa: BLE001 - a tiling the compiler refuses is a result too
                emit({"what": "sweep", "product": group, "config": config.__dict__,
                      "error": str(e).splitlines()[0][:200]})
                continue
            results.append((ms, config))
        results.sort(key=lambda r: r[0])
        for ms, config in results[:4]:
            emit({"what": "sweep", "product": group, "size": [ws[0].out_features, ws[0].in_features],
                  "config": config.__dict__, "us_per_launch": 1000 * ms / turns,
                  "of_copy_bandwidth": read / (ms / 1000) / bandwidth,
                  "bitsandbytes_us": 1000 * own_ms / turns})
        if results:
            best[group] = results[0]
        mma = []
        for config in gemv_4bit_mma.CANDIDATES:
            try:
                ms = graph_ms(lambda x=x, ws=ws, config=config: [gemv_4bit_mma.gemv(x, w, config=config)
                                                                  for w in ws])
            except Exception as e:  # noqa: BLE001 - a tiling that fails to compile or launch is a result too
                emit({"what": "sweep", "kernel": "tensor-core", "product": group, "config": config.__dict__,
                      "error": str(e).splitlines()[0][:200]})
                continue
            mma.append((ms, config))
            emit({"what": "sweep", "kernel": "tensor-core", "product": group,
                  "size": [ws[0].out_features, ws[0].in_features], "config": config.__dict__,
                  "us_per_launch": 1000 * ms / turns, "of_copy_bandwidth": read / (ms / 1000) / bandwidth})
        best_mma[group] = min(mma, key=lambda r: r[0])[1]

    def config_for(group: str) -> GemvConfig:
        return best.get(group, (0, GemvConfig()))[1]

    # A whole token's linear layers in one graph.
    nf4_read = sum(weight_bytes(w) for row in weights for w in row.values())
    ms = graph_ms(lambda: [gemv(input_for(names[0]), row[g], config=config_for(g))
                           for row in weights for g, names in GROUPS.items()])
    emit({"what": "token", "path": "triton gemv", "ms": ms, "gb": nf4_read / 1e9,
          "of_copy_bandwidth": nf4_read / (ms / 1000) / bandwidth})
    ms = graph_ms(lambda: [gemv_4bit_mma.gemv(input_for(names[0]), row[g], config=best_mma[g])
                           for row in weights for g, names in GROUPS.items()])
    emit({"what": "token", "path": "tensor-core gemv", "ms": ms, "gb": nf4_read / 1e9,
          "of_copy_bandwidth": nf4_read / (ms / 1000) / bandwidth})
    ms = graph_ms(lambda: [row[n](input_for(n)) for row in modules for n in PROJECTIONS])
    emit({"what": "token", "path": "bitsandbytes Linear4bit", "ms": ms, "gb": nf4_read / 1e9,
          "of_copy_bandwidth": nf4_read / (ms / 1000) / bandwidth})
    dense = [{n: torch.randn(*sizes[n], dtype=torch.bfloat16, device="cuda") * 0.02 for n in PROJECTIONS}
             for _ in range(layers)]
    dense_read = sum(w.numel() * 2 for row in dense for w in row.values())
    ms = graph_ms(lambda: [torch.nn.functional.linear(input_for(n), row[n]) for row in dense for n in PROJECTIONS])
    emit({"what": "token", "path": "bf16 F.linear", "ms": ms, "gb": dense_read / 1e9,
          "of_copy_bandwidth": dense_read / (ms / 1000) / bandwidth})
    emit({"what": "best tiling", "configs": {group: c.__dict__ for group, (_, c) in best.items()}})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in lines)


if __name__ == "__main__":
    main()
