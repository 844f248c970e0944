"""Programmatic dependent launch (Hopper and later): a kernel may start while the kernel before it finishes.

Between two kernels of a replayed decode step the GPU drains the first, then starts the second, whose blocks
then set themselves up (the 4-bit GEMV builds its 32 KB code table and issues its first weight loads) before
reading the first one's output; a step has nine launches a layer. With this launch attribute the second
kernel's blocks start as soon as the first's have all started and signalled (``griddepcontrol.launch_dependents``),
do what needs nothing from it, and wait (``griddepcontrol.wait``) for the first to finish, its writes visible,
before they read or write anything it could touch. On an H200 a 14B 4-bit step took 4.42 ms so, 4.55 without
(docs/benchmarks.md).

The kernels of the step that can (the GEMV of gemv_4bit_mma, the Triton attention and norm) therefore wait
before touching their inputs and outputs, and signal right after; every other kernel launches as usual. It is
switched on only while the decode step is captured (``overlapping``), and the fast decode path keeps it only
where the captured step is timed faster with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import compat
from engine.kernels.triton_runtime import triton

_overlapping = False  # set while a decode step is captured with the attribute (one capture at a time)


def why_unsupported(device: torch.device) -> str | None:
    """Why kernels cannot launch this way on ``device`` with this Triton; None if they can (CUDA compute
    capability 9.0, Hopper, and Triton's PDL intrinsics, compat.triton_pdl)."""
    if device.type != "cuda":
        return f"{device.type} is no CUDA device"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "it needs compute capability 9.0 (Hopper)"
    return compat.why_no_triton_pdl()


@contextmanager
def overlapping(on: bool = True) -> Iterator[None]:
    """The kernels that can are launched with the attribute inside this block (their launches read it)."""
    global _overlapping
    before, _overlapping = _overlapping, on
    try:
        yield
    finally:
        _overlapping = before


def active() -> bool:
    """Whether the kernels launched now take the attribute (and are compiled to wait and signal)."""
    return _overlapping


def triton_options() -> dict:
    """Launch options for a Triton kernel written with a ``PDL`` constexpr that guards its wait and signal."""
    return {"PDL": True, "launch_pdl": True} if _overlapping else {"PDL": False}


if triton is not None:
    import triton.language as tl

    triton_cuda = compat.triton_pdl()

    if triton_cuda is not None:

        @triton.jit
        def wait_and_signal(PDL: tl.constexpr):
            """A Triton kernel's first statement: wait for the kernel before it, then let the next one start."""
            if PDL:
                triton_cuda.gdc_wait()
                triton_cuda.gdc_launch_dependents()

    else:  # a Triton without the intrinsics: never launched overlapping (why_unsupported says so)

        @triton.jit
        def wait_and_signal(PDL: tl.constexpr):
            pass


# The CUDA source's wait and signal, where it is compiled with PDL defined (sm_90 and later).
CUDA_WAIT_AND_SIGNAL = """
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
"""


def launch_compiled(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """Launch a kernel of ``compat.compile_cuda_kernel`` (tensors and ints as arguments) on the current stream,
    with the attribute while ``overlapping``; else as its own call does."""
    if not _overlapping:
        kernel(grid=grid, block=block, args=args)
        return
    compat.launch_with_attributes(kernel, grid, block, args,
                                  {compat.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: 1})
