"""Starting the fast decode path: the decoder built (weights fused, kernels chosen, the step captured), checked
against the model, and the DecodePlan that says which path answers and why; any failure falls back to the
standard path (transformers' generate) with the reason in the plan."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from engine.decode import tuning
from engine.decode.cache import KVCache
from engine.decode.decoder import FastDecoder
from engine.decode.ops import compiled_ops, eager_ops
from engine.decode.plan import DecodePlan, why_unsupported
from engine.decode.projections import FusedWeights
from engine.kernels import rotary_store
from engine.kernels.triton_runtime import runs_on

logger = logging.getLogger(__name__)


def build_decoder(model, max_len: int, eos_token_ids: set[int], answering: Callable[[], AbstractContextManager],
                  choices: dict[str, tuning.Choice] | None = None) -> FastDecoder:
    """A FastDecoder for ``model`` (a Qwen2 or Llama causal LM, possibly wrapped by PEFT) with a static cache of
    ``max_len`` positions: its projections' weights fused, the step's kernels chosen (timed on a GPU), and the
    step captured, with overlapping launches where they were timed faster. ``choices``, if given, receives each
    op's Choice (for the DecodePlan)."""
    reason = why_unsupported(model)
    if reason:
        raise ValueError(reason)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = KVCache(lm, max_len)
    weights = FusedWeights(list(lm.model.layers))
    cuda = cache.device.type == "cuda"
    ops = compiled_ops(dynamic=False) if cuda else eager_ops()
    if runs_on(cache.device):  # rotary and cache writes in one Triton kernel, where the whole cache is attended
        ops.rotate_and_store = rotary_store.rotate_and_store
    kernels = tuning.choose_step_kernels(lm, cache, weights.nf4, ops)
    ops.add_rms_norm = kernels.add_rms_norm
    weights.keep_nf4(kernels.products)
    prefill_ops = compiled_ops(dynamic=True) if cuda else ops  # for any prompt length
    decoder = FastDecoder(model, cache, weights, ops, prefill_ops, kernels, eos_token_ids, answering)
    launches = tuning.choose_overlap(decoder)
    if choices is not None:
        choices.update(kernels.choices, launches=launches)
    return decoder


def start_fast_decoder(model, max_len: int, eos_token_ids: set[int],
                       answering: Callable[[], AbstractContextManager]) -> tuple[FastDecoder | None, DecodePlan]:
    """A built, checked FastDecoder for ``model`` and the plan (logged once), or None and the plan of the
    standard path with the reason, where the fast path cannot run.

    The check: the logits of one decode step after a short prompt agree with the model's own forward over
    the same tokens. A variant the step gets wrong falls back here rather than answering wrongly; so does any
    failure to build, time, compile or capture the step."""
    device = next(model.parameters()).device
    reason = why_unsupported(model)
    if reason:
        plan = DecodePlan.standard(str(device), f"no fast decode for this model: {reason}")
        logger.info(plan.summary())
        return None, plan
    logger.debug("fast decode (%s), static cache of %d positions: choosing kernels, compiling and capturing the "
                 "decode step", "CUDA graphs" if device.type == "cuda" else "eager, no CUDA", max_len)
    started, choices, decoder = time.perf_counter(), {}, None
    try:
        decoder = build_decoder(model, max_len, eos_token_ids, answering, choices)
        error = decoder.check()
    except Exception as e:  # noqa: BLE001 - any failure to build, compile or capture means: use the standard path
        error = _where(e)
    plan = DecodePlan(path="fast", device=str(device), cache_positions=max_len,
                      kernels={op: c.kernel for op, c in choices.items()},
                      timings_us={op: c.timings_us for op, c in choices.items() if c.timings_us},
                      notes=[c.note for c in choices.values() if c.note],
                      start_seconds=round(time.perf_counter() - started, 1))
    if error:
        plan = plan.fell_back(f"the fast decode failed its check: {error}")
        decoder = None
    logger.info(plan.summary())
    return decoder, plan


def _where(e: Exception) -> str:
    """The exception, and where: the innermost frame, and the last of this package's."""
    frames = traceback.extract_tb(e.__traceback__)
    package = Path(__file__).parent
    ours = [f for f in frames if Path(f.filename).parent in (package, package.parent / "kernels")] or frames
    places = [f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in (frames[-1], ours[-1])]
    where = " from ".join(dict.fromkeys(places))
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} at {where}"
