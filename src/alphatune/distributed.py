"""Data-parallel α-tuning: one process per device, started by ``torchrun`` or ``accelerate launch``.

What this module owns: reading the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), joining and leaving the process group (gloo on
CPU, NCCL on CUDA), wrapping the model in ``DistributedDataParallel``, which examples of a
micro-batch each process takes, and summing numbers across processes. ``alphatune.train`` uses it;
nothing here knows about data or files.

Why only the scales travel: ``DistributedDataParallel`` all-reduces the gradients of parameters
that require grad. After ``prepare_for_alphatuning`` those are the trained scales (α₁ by default);
the binary codes (``packed_codes``), the frozen scales and offsets are buffers, and the embeddings
and norms are parameters with ``requires_grad=False``. DDP copies rank 0's parameters (and, from
torch 2.13, its buffers) to every process once, at start; buffers are not synced before each
forward, as they never change. Every process loads the same base, which ``train`` checks first
by comparing the base fingerprints.

Example (library; ``torchrun --nproc-per-node 2 script.py``)::

    with data_parallel() as parallel:
        model, tokenizer = load_quantized("base")
        model.to(parallel.device)
        prepare_for_alphatuning(model)
        train(model, tokenizer, examples, TrainConfig(batch_size=8), fingerprint=...)
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from alphatune.errors import AlphaTuneError, ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Variables every launcher (torchrun, accelerate launch, a SLURM wrapper) sets for each process.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands among the processes training together.

    A single process (no launcher) is ``DataParallel()``: rank 0 of 1, and every method is a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and shows progress (rank 0)."""
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th one, from ``rank``.

        Shares differ by at most one item; together they are ``items``, each item once.
        """
        return items[self.rank :: self.world_size]

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over every process (a copy; unchanged with one process)."""
        if not self.enabled:
            return values
        total = values.detach().clone().to(self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(values.device)

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, by rank (a picklable object)."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def raise_together(self, error: Exception | None) -> None:
        """Raise on every process when any process failed, so that none waits for ever in a
        collective the failed one never reaches.

        The failed process raises its own ``error``; the others an ``AlphaTuneError`` naming it.
        """
        messages = self.gather(None if error is None else f"{error}")
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message]
        if failed:
            rank, message = failed[0]
            raise AlphaTuneError(f"process {rank} of {self.world_size} stopped: {message}")

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (``model`` itself with one process).

        Only gradients of parameters that require grad are all-reduced, once per optimizer step;
        buffers (the codes) are at most copied once, when the model is wrapped.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (codes, frozen scales) never change: no sync before each forward. torch >= 2.13
        # names this forward_sync_buffers (buffers then sync once, at start, with the parameters).
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            options = {"forward_sync_buffers": False}
        else:
            options = {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=device_ids, **options)


# What MPI launchers (mpirun, accelerate's multi-CPU launcher) set instead of WORLD_SIZE.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher).

    An MPI launch of several processes (no ``WORLD_SIZE``) is refused: each process would train
    alone on all the data and write the same files.
    """
    if "WORLD_SIZE" not in os.environ:
        for name in MPI_SIZE_VARIABLES:
            if os.environ.get(name, "1").strip() not in ("", "0", "1"):
                raise ConfigError(
                    f"started by an MPI launcher ({name}={os.environ[name]}), which alphatune "
                    "does not join; launch with torchrun --nproc-per-node N, or accelerate "
                    "launch --multi_gpu --num_processes N (also on CPU machines)"
                )
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE is {text!r}, expected a whole number of processes; start the run with "
            "torchrun or accelerate launch, or unset WORLD_SIZE"
        ) from None


def current() -> DataParallel:
    """This process's place in the initialised process group (one process if there is none).

    Raises ``ConfigError`` when a launcher started several processes but none joined a process
    group: each would train alone on all the data and write the same files.
    """
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        if world_size > 1:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            backend = dist.get_backend()
            device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
            return DataParallel(dist.get_rank(), world_size, local_rank, device)
        return DataParallel()
    if launched_world_size() > 1:
        raise ConfigError(
            f"{launched_world_size()} processes were launched (WORLD_SIZE) but this one joined no "
            "process group; run training inside 'with alphatune.data_parallel():' (the "
            "'alphatune tune' command does this)"
        )
    return DataParallel()


def default_backend() -> str:
    """NCCL when CUDA is available (one GPU per process), else gloo (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def data_parallel(backend: str | None = None) -> Iterator[DataParallel]:
    """Join the process group the launcher describes, for the duration of the block.

    Without a launcher (``WORLD_SIZE`` unset or 1) this yields a single process on the CPU and
    starts nothing; one process from a launcher on a CUDA machine gets ``cuda:LOCAL_RANK``.
    A process group that is already initialised is used as it is and left open.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.

    Yields:
        This process's ``DataParallel``; with NCCL its ``device`` is ``cuda:LOCAL_RANK``, which
        becomes the current CUDA device.
    """
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    world_size = launched_world_size()
    if world_size <= 1:
        # One process from a launcher (torchrun --nproc-per-node 1) trains on its GPU, as N would.
        launched_on_gpu = "LOCAL_RANK" in os.environ and torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        yield (
            DataParallel(device=torch.device("cuda", local_rank))
            if launched_on_gpu
            else DataParallel()
        )
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; train with a single process")
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {world_size} but {', '.join(missing)} are not set; start the "
            "processes with torchrun or accelerate launch, which set them"
        )
    backend = backend or default_backend()
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process with LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} "
                "visible); start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    try:
        parallel = current()
        logger.info(
            "process %d of %d (%s, %s)",
            parallel.rank,
            parallel.world_size,
            backend,
            parallel.device,
        )
        yield parallel
    finally:
        dist.destroy_process_group()
