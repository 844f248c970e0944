"""The small operations between the linear layers, as one set the layer loop calls: their formulas (beside their
kernels in engine/kernels/), eager on the CPU, fused by torch.compile on CUDA; the decoder then puts the Triton
kernels chosen at load in place of some (engine/decode/tuning.py)."""

from __future__ import annotations

import torch

from engine.kernels.activation import silu_mul
from engine.kernels.decode_attention import attend_native
from engine.kernels.residual_norm import add_rms_norm_native, rms_norm
from engine.kernels.rotary_store import rotate, rotate_and_store_native


class Ops:
    def __init__(self, wrap):
        self.rms_norm, self.add_rms_norm = wrap(rms_norm), wrap(add_rms_norm_native)
        self.silu_mul, self.rotate_and_store = wrap(silu_mul), wrap(rotate_and_store_native)
        self.attend, self.rotate = wrap(attend_native), wrap(rotate)


def eager_ops() -> Ops:
    return Ops(lambda fn: fn)


def compiled_ops(dynamic: bool) -> Ops:
    return Ops(lambda fn: torch.compile(fn, dynamic=dynamic, fullgraph=True))
