"""A process's memory as the kernel reports it (``/proc/self/status``), for the benchmark scripts.

Imported as ``proc_status`` by scripts in this folder; it imports nothing heavy, so a worker can
read its memory before and after its own imports.
"""

from __future__ import annotations

from pathlib import Path


def status_kib(*keys: str) -> dict[str, int]:
    """The fields ``keys`` of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``, ``RssAnon``), KiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            values[key] = int(rest.split()[0])
    return values
