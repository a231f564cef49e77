"""Giving memory back after quantizing: what a process keeps that its model no longer needs.

Two things keep a freshly quantized model's process far above the model's own size (measured on
SmolLM2 quantized while loading: ~1.2 GiB resident for an 83 MiB model;
``benchmarks/bench_load_memory.py``):

- **The checkpoint's mapping.** transformers loads safetensors without copying: each tensor is a
  view of the memory-mapped file. Quantizing replaces the linear weights, but the few tensors
  kept as they are (norm weights, biases) are still views, and one view keeps the whole mapping
  alive, with every page loading touched (the whole fp32 checkpoint) counted as resident.
  ``own_mapped_tensors`` copies those few tensors so the mapping can go.
- **Freed heap pages.** Quantizing layer after layer allocates and frees megabytes per layer
  between small long-lived allocations (the packed codes that stay); glibc keeps the freed pages
  in its heap. ``release_free_memory`` asks it to return them (``malloc_trim``); elsewhere (not
  glibc) it does nothing.

And two things keep a *loaded* base above its size. **Pages of the file it was loaded from that
nothing reads any more.** A saved base is loaded as views of its mapped file (no copy), but some
tensors are converted on loading (fp16 scales become float32 parameters) and the decode engine
copies the codes into its kernel layout. The file's pages behind those sources stay resident
after being read once (hashed, converted). ``page_out`` asks the kernel to drop them
(``MADV_PAGEOUT``): they are clean file pages, so they are simply read back from the file if
anything touches them again. Nothing is lost either way: written (copy-on-write) pages of a
private mapping and anonymous memory are only ever swapped, never discarded. And **numba's
compiler**: LLVM's code is paged in when the first kernel is compiled or loaded from numba's
cache, and decode never runs it again; ``page_out_compiler`` gives its pages back the same way.
The system calls underneath are ``alphatune_runtime.memory``'s (the torch-free runtime uses them).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from alphatune_runtime.memory import (  # noqa: F401  (importable from here, as before)
    madvise,
    page_out_compiler,
    page_out_library,
    page_out_range,
    release_free_memory,
)

logger = logging.getLogger(__name__)


def page_out(tensor: torch.Tensor) -> int:
    """Drop the resident pages of a tensor that is a view of a memory-mapped file, when nothing
    will read it for a while (see the module doc).

    A no-op for tensors torch allocated. Other foreign memory (a numpy array's, anonymous) is
    advised too, which can only swap it out where the machine has swap: call it on tensors that
    are dead for the work ahead. Only whole pages inside the tensor are advised (its neighbours in
    the file may be in use). Returns the bytes advised (0 for torch's own memory, off Linux, or
    where the kernel lacks the advice). Rebuilding an engine reads paged-out codes back: measured
    on SmolLM2, a second ``Engine.build`` takes as long as the first (0.25-0.6 s).
    """
    if madvise() is None or not _is_view_of_foreign_memory(tensor) or not tensor.is_contiguous():
        return 0
    return page_out_range(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def own_mapped_tensors(model: nn.Module) -> int:
    """Copy every parameter and buffer that is a view of foreign memory (a memory-mapped
    checkpoint: its storage cannot be resized), so that the mapping can be released.

    Returns:
        How many tensors were copied.
    """
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and _is_view_of_foreign_memory(param):
                    param.data = param.data.clone()
                    copied += 1
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and _is_view_of_foreign_memory(buffer):
                    module._buffers[name] = buffer.clone()
                    copied += 1
    if copied:
        logger.debug("copied %d tensors out of a memory-mapped checkpoint", copied)
    return copied


def _is_view_of_foreign_memory(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and not tensor.untyped_storage().resizable()
