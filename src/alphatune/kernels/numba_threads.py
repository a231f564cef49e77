"""How many numba threads a kernel call uses, and starting them without upsetting torch.

Both CPU kernels follow ``torch.get_num_threads()`` (capped by numba's pool) and fall back to one
thread for work too small to pay for a thread launch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def threads_for(work: int, min_parallel_work: int) -> int:
    """Threads for a call doing ``work`` units: 1 below ``min_parallel_work``, else torch's count."""
    if work < min_parallel_work:
        return 1
    from numba import config

    return max(1, min(torch.get_num_threads(), config.NUMBA_NUM_THREADS))


@contextmanager
def numba_threads(count: int) -> Iterator[None]:
    """Run numba's parallel loops on ``count`` threads; torch keeps its own thread count.

    Starting numba's OpenMP pool resets the process-wide OpenMP thread count that torch reads, so
    torch's setting is given back afterwards.
    """
    from numba import set_num_threads

    torch_threads = torch.get_num_threads()
    set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
