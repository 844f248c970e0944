"""Where the fast decode path's Triton kernels run, and how their time is measured to choose between paths.

Kernels run on CUDA, and on the CPU when Triton interprets them (``TRITON_INTERPRET=1``, set by the tests before
any kernel is defined): the same kernel code, checked on the CPU against plain PyTorch.
"""

from __future__ import annotations

import os

import torch

try:  # CUDA builds of torch ship Triton; elsewhere it is an extra
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``: CUDA, or the CPU when Triton interprets kernels."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def graph_ms(fn, replays: int = 20) -> float:
    """Milliseconds per call of ``fn`` captured in a CUDA graph (the median of ``replays``): how a decode step,
    captured too, pays for its kernels."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_ms(graph, replays)


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    """Milliseconds per replay of a captured ``graph`` (the median of ``replays``)."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
