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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
from functools import cache

import torch
from torch import nn

logger = logging.getLogger(__name__)


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


# madvise(2) advice: reclaim these pages now (Linux 5.4 and later; older kernels say EINVAL).
_MADV_PAGEOUT = 21


@cache
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        advise = ctypes.CDLL(name, use_errno=True).madvise if name else None
    except (OSError, AttributeError):
        return None
    if advise is not None:
        advise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        advise.restype = ctypes.c_int
    return advise


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
    advise = _madvise()
    if advise is None or not _is_view_of_foreign_memory(tensor) or not tensor.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    start = -(-begin // page) * page
    end = (begin + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return 0
    if advise(start, end - start, _MADV_PAGEOUT) != 0:
        logger.debug("madvise(MADV_PAGEOUT) refused: errno %d", ctypes.get_errno())
        return 0
    return end - start


def page_out_library(file_name: str) -> int:
    """Drop the resident pages of every mapping of the shared library ``file_name`` (say
    ``libllvmlite.so``), when this process will not run its code for a while.

    Clean pages of the library file are read back from it on demand; its written pages (data,
    relocations) can only be swapped. Returns the bytes advised (0 off Linux or where the library
    is not mapped).
    """
    advise = _madvise()
    if advise is None:
        return 0
    advised = 0
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].rstrip("\n").endswith("/" + file_name):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if advise(start, end - start, _MADV_PAGEOUT) == 0:
                advised += end - start
    return advised


def page_out_compiler() -> int:
    """Page out numba's compiler (LLVM, llvmlite's shared library: ~28 MiB resident once a
    kernel is compiled or loaded from numba's cache).

    Compiled functions run without it; only compiling or loading another function uses it again,
    which reads its pages back. The decode engine calls this once its step is loaded, so that
    decode holds the kernels, not the compiler. Returns the bytes advised.
    """
    return page_out_library("libllvmlite.so")


def release_free_memory() -> None:
    """Return the heap's free pages to the operating system (glibc ``malloc_trim``; else a no-op).

    Cheap (it walks the heap's free lists): called after each layer a quantization replaces.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
