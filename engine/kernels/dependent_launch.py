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

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.kernels.triton_runtime import triton

_overlapping = False  # set while a decode step is captured with the attribute (one capture at a time)


def supported(device: torch.device) -> bool:
    """Whether ``device`` and this Triton can launch kernels this way: CUDA compute capability 9.0 (Hopper)."""
    if device.type != "cuda" or triton is None or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return hasattr(triton_cuda, "gdc_wait") and hasattr(triton_cuda, "gdc_launch_dependents")


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
    import triton.language.extra.cuda as triton_cuda

    @triton.jit
    def wait_and_signal(PDL: tl.constexpr):
        """A Triton kernel's first statement: wait for the kernel before it, then let the next one start."""
        if PDL:
            triton_cuda.gdc_wait()
            triton_cuda.gdc_launch_dependents()


# The CUDA source's wait and signal, where it is compiled with PDL defined (sm_90 and later).
CUDA_WAIT_AND_SIGNAL = """
#if PDL
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
"""

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]  # a 64-byte union


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


def launch_compiled(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """Launch a kernel of ``torch.cuda._compile_kernel`` (tensors and ints as arguments) on the current stream,
    with the attribute while ``overlapping``; else as its own call does."""
    if not _overlapping:
        kernel(grid=grid, block=block, args=args)
        return
    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1
    config = _LaunchConfig(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(*block), shared_mem=0,
                           stream=torch.cuda.current_stream().cuda_stream, attrs=ctypes.pointer(attribute),
                           num_attrs=1)
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    result = libcuda.cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {result}")
