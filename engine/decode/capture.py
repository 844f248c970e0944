"""The decode step captured in CUDA graphs, and replayed: one graph for the greedy step and one for the sampling
step, sharing a memory pool; captured with or without overlapping launches (engine/kernels/dependent_launch.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from engine.kernels import dependent_launch
from engine.kernels.triton_runtime import replay_ms


@contextmanager
def state_kept(token: torch.Tensor, position: torch.Tensor) -> Iterator[torch.Tensor]:
    """The step's token and position as they were when the block began, put back when it ends (timing and
    capturing run the step, which moves them); yields a copy of the position."""
    token_before, position_before = token.clone(), position.clone()
    try:
        yield position_before
    finally:
        token.copy_(token_before)
        position.copy_(position_before)


def capture_steps(step: Callable[[bool], None], token: torch.Tensor, position: torch.Tensor,
                  answering: Callable[[], AbstractContextManager], overlap: bool) -> dict[bool, torch.cuda.CUDAGraph]:
    """``step(sample)`` captured for sample False and True, inside ``answering()``; token and position kept."""
    graphs = {}
    # A memory pool of its own for each capture, shared by its two graphs: a pool lives only as long as a
    # graph uses it, and capturing into the pool of graphs just dropped fails an allocator assertion.
    pool = torch.cuda.graph_pool_handle()
    with state_kept(token, position) as saved_position, answering(), torch.no_grad(), \
            dependent_launch.overlapping(overlap):
        for sample in (False, True):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # compiles, and lets the allocator settle, before capture
                for _ in range(3):
                    position.copy_(saved_position)
                    step(sample)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            position.copy_(saved_position)
            with torch.cuda.graph(graph, pool=pool):
                step(sample)
            graphs[sample] = graph
    torch.cuda.synchronize()
    return graphs


def step_ms(graph: torch.cuda.CUDAGraph, token: torch.Tensor, position: torch.Tensor, at: int,
            answering: Callable[[], AbstractContextManager], replays: int = 25) -> float:
    """Milliseconds of one replay of a captured step (the median) from position ``at``; token and position
    kept."""
    with state_kept(token, position), answering():
        position.fill_(at)
        return replay_ms(graph, replays)
