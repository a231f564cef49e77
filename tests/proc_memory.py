"""What the memory tests share: a mapped file's resident size, and files written back to disk."""

from __future__ import annotations

import os
from pathlib import Path


def resident_kib(path: str | Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        lines = smaps.readlines()
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def written_back(*paths: Path) -> None:
    """fsync each file: dirty page-cache pages are not reclaimed until they are written back, and
    a base on disk is long written back when it is loaded."""
    for path in paths:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def mapped_library(file_name: str) -> Path | None:
    """The path this process maps the shared library ``file_name`` from, or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().endswith("/" + file_name):
                return Path(fields[5].strip())
    return None
