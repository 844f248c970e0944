"""Which decode path answers and how it was chosen: the plan made at load, and whether a model can take the fast
path at all."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

SUPPORTED_ARCHITECTURES = ("qwen2", "llama")


def why_unsupported(model) -> str | None:
    """Why ``model`` (a transformers causal LM, possibly wrapped by PEFT) cannot take the fast path; None if it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        return f"the {config.model_type} architecture is not one of {', '.join(SUPPORTED_ARCHITECTURES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act} (only silu)"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "sliding-window attention layers"
    return None


@dataclass
class DecodePlan:
    """How this runtime decodes, as chosen at load (and changed only when the fast path falls back).

    ``path``: "fast" (engine/decode: static cache, captured step) or "standard" (transformers' generate).
    ``kernels``: for each op of the step, the kernel that runs it ("add_rms_norm", "attention", the 4-bit
    products "qkv", "o", "gate_up", "down", and "launches": overlapping or one after another).
    ``timings_us``: for each op timed on the GPU, each candidate's microseconds (per layer for the products
    and attention, per call for the norm, per captured step for the launches): the figures that chose it.
    ``fallback_reason``: why the standard path answers, when it does. ``notes``: candidates that failed.
    """

    path: str
    device: str
    fallback_reason: str | None = None
    kernels: dict[str, str] = field(default_factory=dict)
    timings_us: dict[str, dict[str, float]] = field(default_factory=dict)
    cache_positions: int | None = None
    start_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def standard(cls, device: str, reason: str) -> DecodePlan:
        return cls(path="standard", device=device, fallback_reason=reason)

    def fell_back(self, reason: str) -> DecodePlan:
        """This plan once the standard path answers instead, for ``reason`` (the choices kept for the record)."""
        return replace(self, path="standard", fallback_reason=reason)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the log: the path, and with the fast path each op's kernel and its time."""
        if self.path == "standard":
            return f"generation: the standard path (transformers generate) on {self.device}: {self.fallback_reason}"
        parts = []
        for op, kernel in self.kernels.items():
            timing = self.timings_us.get(op, {})
            figures = ", ".join(f"{name} {us:.1f} us" for name, us in timing.items())
            parts.append(f"{op}: {kernel}" + (f" ({figures})" if figures else ""))
        ready = f" in {self.start_seconds:.0f} s" if self.start_seconds else ""
        notes = f"; notes: {'; '.join(self.notes)}" if self.notes else ""
        return (f"generation: fast decode ready{ready} on {self.device}, static cache of {self.cache_positions} "
                f"positions; {'; '.join(parts) or 'no kernel timed'}{notes}")
