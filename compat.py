"""Every use of a third-party library's private or unstable API, in one place, with the version it was checked on.

A private API can change in any release without notice. Each section below wraps one such use: it names the
library version the code was checked on, looks for what it needs before using it, and says plainly what is
missing when the installed version differs (a ``why_*`` function returns the reason as a string, None when the
API is there; a call raises ``CompatError`` with the same reason). Callers then fall back (the fast decode path
takes the standard one) or fail with that message, instead of an AttributeError deep in a kernel launch.

Sections: torch (NVRTC-compiled CUDA kernels, and launching them with attributes through the CUDA driver);
Triton (programmatic dependent launch); Gradio (the app's route internals, the upload box's cache moves).
"""

from __future__ import annotations

import ctypes


class CompatError(RuntimeError):
    """A third-party private API is missing or changed in the installed version."""


# -- torch: CUDA kernels compiled at run time by NVRTC ---------------------------------------------------------
# Used by engine/kernels/gemv_4bit_mma.py (compiled) and engine/kernels/dependent_launch.py (launched).
# Checked on torch 2.11 (CUDA 13) on H100 and H200; the same names are in torch 2.13.

TORCH_CHECKED = "2.11"


def why_no_cuda_compiler() -> str | None:
    """Why ``compile_cuda_kernel`` cannot run with the installed torch; None if it can."""
    import torch

    if not hasattr(torch.cuda, "_compile_kernel"):
        return (f"torch {torch.__version__} has no torch.cuda._compile_kernel (a private API, checked on torch "
                f"{TORCH_CHECKED})")
    return None


def compile_cuda_kernel(source: str, name: str):
    """``torch.cuda._compile_kernel``: the ``extern "C"`` kernel ``name`` of CUDA ``source``, compiled by NVRTC
    for the current device. The result is called as ``kernel(grid=..., block=..., args=[...])`` (tensors and
    ints) and holds its CUfunction as ``kernel.func`` (read by ``launch_with_attributes``)."""
    import torch

    reason = why_no_cuda_compiler()
    if reason:
        raise CompatError(reason)
    kernel = torch.cuda._compile_kernel(source, name)
    if not hasattr(kernel, "func"):
        raise CompatError(f"torch {torch.__version__}'s compiled kernel has no .func handle (checked on torch "
                          f"{TORCH_CHECKED})")
    return kernel


# The CUDA driver's launch structures (cuda.h, CUDA 12.0 on; checked with CUDA 13): cuLaunchKernelEx takes a
# CUlaunchConfig whose attributes are CUlaunchAttribute (an id, padding, and a 64-byte union of values).
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


def _driver():
    """The CUDA driver library as torch loads it: ``torch.cuda._utils._get_gpu_runtime_library``."""
    import torch

    utils = getattr(torch.cuda, "_utils", None)
    if utils is None or not hasattr(utils, "_get_gpu_runtime_library"):
        raise CompatError(f"torch {torch.__version__} has no torch.cuda._utils._get_gpu_runtime_library (checked "
                          f"on torch {TORCH_CHECKED})")
    return utils._get_gpu_runtime_library()


def launch_with_attributes(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list,
                           attributes: dict[int, int]) -> None:
    """Launch a kernel of ``compile_cuda_kernel`` on the current stream through ``cuLaunchKernelEx``, with
    launch ``attributes`` (CUlaunchAttributeID -> its integer value); tensors and ints as arguments."""
    import torch

    values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    attrs = (_LaunchAttribute * len(attributes))()
    for slot, (key, value) in zip(attrs, attributes.items(), strict=True):
        slot.id, slot.value[0] = key, value
    config = _LaunchConfig(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(*block), shared_mem=0,
                           stream=torch.cuda.current_stream().cuda_stream, attrs=attrs, num_attrs=len(attributes))
    result = _driver().cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {result}")


# -- Triton: programmatic dependent launch ----------------------------------------------------------------------
# Used by engine/kernels/dependent_launch.py. ``triton.language.extra.cuda`` (gdc_wait, gdc_launch_dependents)
# and the ``launch_pdl`` launch option are experimental. Checked on Triton 3.6 (the GPU machine's); present in 3.9.

TRITON_CHECKED = "3.6"


def triton_pdl():
    """Triton's CUDA extras (``gdc_wait``, ``gdc_launch_dependents``), or None where this Triton lacks them."""
    try:
        import triton.language.extra.cuda as triton_cuda
    except ImportError:
        return None
    if not (hasattr(triton_cuda, "gdc_wait") and hasattr(triton_cuda, "gdc_launch_dependents")):
        return None
    return triton_cuda


def why_no_triton_pdl() -> str | None:
    """Why this Triton cannot compile kernels that wait and signal across launches; None if it can."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    if triton_pdl() is None:
        return (f"Triton {triton.__version__} has no triton.language.extra.cuda.gdc_wait/gdc_launch_dependents "
                f"(checked on Triton {TRITON_CHECKED})")
    return None


# -- Gradio: the app's use of its internals -------------------------------------------------------------------
# Used by assistant/ui/app.py (the API's login check asks the mounted Gradio app) and assistant/ui/knowledge.py
# (the upload box). Checked on Gradio 6.31.0.

GRADIO_CHECKED = "6.31.0"


def _gradio_attribute(module: str, name: str):
    import importlib

    import gradio

    value = getattr(importlib.import_module(module), name, None)
    if value is None:
        raise CompatError(f"gradio {gradio.__version__} has no {module}.{name} (checked on gradio {GRADIO_CHECKED})")
    return value


def gradio_api_prefix() -> str:
    """``gradio.route_utils.API_PREFIX``: the path under which a Gradio app serves its own routes."""
    return _gradio_attribute("gradio.route_utils", "API_PREFIX")


def is_gradio_app(app) -> bool:
    """Whether an ASGI app mounted beside ours is Gradio's (``gradio.routes.App``)."""
    return isinstance(app, _gradio_attribute("gradio.routes", "App"))


def gradio_upload_folder() -> str:
    """``gradio.utils.get_upload_folder()``: where Gradio keeps uploaded files (GRADIO_TEMP_DIR)."""
    return _gradio_attribute("gradio.utils", "get_upload_folder")()


def uploaded_file_paths(payload) -> list[str] | None:
    """The paths of a ``gr.File`` payload before Gradio's preprocess (``gradio.data_classes.FileData`` or
    ``ListFiles``)."""
    if payload is None:
        return None
    many = _gradio_attribute("gradio.data_classes", "ListFiles")
    return [f.path for f in (payload if isinstance(payload, many) else [payload])]


def move_to_block_cache_only_if(box, keep_in_place) -> None:
    """Make ``box`` (a ``gr.File``) copy into Gradio's cache only the paths for which ``keep_in_place(path)`` is
    false, handing the others on as sent: it replaces the instance's ``move_resource_to_block_cache`` and
    ``async_move_resource_to_block_cache``, the internals Gradio calls on every path a request names."""
    for name in ("move_resource_to_block_cache", "async_move_resource_to_block_cache"):
        if not hasattr(box, name):
            import gradio

            raise CompatError(f"gradio {gradio.__version__}'s File has no {name} (checked on gradio {GRADIO_CHECKED})")
    move, async_move = box.move_resource_to_block_cache, box.async_move_resource_to_block_cache

    def move_unless_kept(path):
        return str(path) if keep_in_place(path) else move(path)

    async def async_move_unless_kept(path):
        return str(path) if keep_in_place(path) else await async_move(path)

    box.move_resource_to_block_cache = move_unless_kept
    box.async_move_resource_to_block_cache = async_move_unless_kept
