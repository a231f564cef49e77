"""What the commands print: the console for results, the one for errors, progress bars and timed
steps.

Paths and user text are printed as plain text (``rich.text.Text``), never as rich markup:
``name[Aromi]`` or a folder called ``[old]`` is data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

console = Console(stderr=False)
# Errors go to stderr unwrapped, so that paths and names in them stay greppable.
error_console = Console(stderr=True, soft_wrap=True)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not enabled, transient=True) as bar:
        yield bar


@contextmanager
def timed_step(message: str) -> Iterator[None]:
    """A spinner while the step runs, then a tick with the seconds it took."""
    began = time.perf_counter()
    with console.status(Text(message)):
        yield
    seconds = time.perf_counter() - began
    console.print(Text.assemble(("✓ ", "green"), message, (f" ({seconds:.1f} s)", "dim")))


def format_interval(interval: tuple[float, float]) -> str:
    return f"(95% bootstrap interval {interval[0]:.1f}–{interval[1]:.1f})"
