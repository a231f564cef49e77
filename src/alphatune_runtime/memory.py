"""Giving memory back without torch: freed heap pages, file pages nothing reads, numba's compiler.

``alphatune.memory`` explains when each applies (quantizing, loading a base, the decode engine)
and holds the torch-aware parts; these are the system calls underneath, shared with the torch-free
runtime:

- ``release_free_memory``: return the heap's free pages to the operating system (glibc
  ``malloc_trim``; elsewhere a no-op);
- ``page_out_range``: ask the kernel to drop the resident pages of a range (``MADV_PAGEOUT``):
  clean file pages are read back from the file if anything touches them again; written pages and
  anonymous memory can only be swapped, never discarded;
- ``page_out_library`` / ``page_out_compiler``: the same for a shared library's mappings, such as
  LLVM's (numba's compiler), which decode never runs once its step is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
from functools import cache

# Under "alphatune": the CLI and users set that logger's level and filters for the whole library.
logger = logging.getLogger(f"alphatune.{__name__}")


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
def madvise() -> ctypes._CFuncPtr | None:
    """libc's ``madvise`` (None off Linux or where libc cannot be found)."""
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


def page_out_range(address: int, nbytes: int) -> int:
    """Advise ``MADV_PAGEOUT`` on the whole pages inside ``[address, address + nbytes)`` (its
    neighbours may be in use). Returns the bytes advised (0 off Linux or where the kernel lacks
    the advice)."""
    advise = madvise()
    if advise is None:
        return 0
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
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
    advise = madvise()
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

    Not free (~10 ms a call after a SmolLM2 layer's fit: it walks the heap's free lists):
    quantization calls it once a transformer block, and where a step has freed much memory.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
