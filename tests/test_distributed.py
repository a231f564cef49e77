"""Data-parallel α-tuning: 2 CPU processes (gloo) reach the α of 1 process with the same batches.

The processes are started with ``torch.multiprocessing`` and the environment torchrun would give
them; ``test_cli_tune_under_torchrun`` runs the real command under torchrun.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_llama

from alphatune import AlphaTuningConfig, BCQConfig, TrainConfig, prepare_for_alphatuning, quantize_
from alphatune.data import Example
from alphatune.distributed import DataParallel, current, data_parallel
from alphatune.errors import ConfigError
from alphatune.files import CHECKPOINT_DIR
from alphatune.train import train

NAMES = ["Aromi", "Blue Spice", "Cotto", "Zizzi", "The Mill", "Wildwood", "Strada"]
EXAMPLES = [
    Example(prompt=f"Table: name[{n}]\nText:", target=f" {n} is a pub near the river.")
    for n in NAMES
]
# 3 examples per micro-batch: shares of 2 and 1 (unequal token counts), 2 micro-batches per step
# (no_sync on the first), label smoothing on, eval loss every 2 steps.
CONFIG = {
    "max_steps": 4,
    "batch_size": 3,
    "grad_accum": 2,
    "learning_rate": 1e-2,
    "warmup_ratio": 0.25,
    "checkpoint_every": 2,
    "eval_every": 2,
}
WORLD_SIZE = 2
TIMEOUT_S = 240


def tunable(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    quantize_(model, BCQConfig(bits=3, group_size=32, method="offset"))
    prepare_for_alphatuning(model, AlphaTuningConfig())
    return model


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: Path) -> None:
    """One training process, with the environment torchrun sets."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from alphatune.models import load_tokenizer

    reduced: list[list[str]] = []  # names of the tensors in each all-reduced bucket
    wrap = DataParallel.wrap

    def recording_wrap(self, model):
        network = wrap(self, model)
        names = {id(p): n for n, p in model.named_parameters()}

        def hook(state, bucket):
            reduced.append([names[id(p)] for p in bucket.parameters()])
            return allreduce_hook(None, bucket)

        network.register_comm_hook(None, hook)
        return network

    DataParallel.wrap = recording_wrap  # this process only
    errors = {}
    with data_parallel() as parallel:
        tokenizer = load_tokenizer()
        model = tunable(tokenizer)
        result = train(
            model,
            tokenizer,
            EXAMPLES,
            TrainConfig(**CONFIG),
            eval_examples=EXAMPLES,
            output_dir=out / f"run{rank}",
            progress=False,
            fingerprint="base",
        )
        alpha = trained(model)
        # Bad settings fail on every process with a clear error (and no process hangs); both
        # fail before the model is touched.
        for name, kwargs in {
            "batch": {"config": TrainConfig(max_steps=1, batch_size=1)},
            "base": {"config": TrainConfig(max_steps=1), "fingerprint": f"base-{rank}"},
        }.items():
            try:
                train(
                    model,
                    tokenizer,
                    EXAMPLES,
                    progress=False,
                    **{"fingerprint": "b"} | kwargs,
                )
            except Exception as err:  # noqa: BLE001  (reported to the test, which checks it)
                errors[name] = f"{type(err).__name__}: {err}"
        summary = {
            "world_size": parallel.world_size,
            "train_losses": result.train_losses,
            "eval_losses": result.eval_losses,
            "reduced": reduced,
            "errors": errors,
        }
    save_file(alpha, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(summary))


def start_processes(out: Path) -> mp.ProcessContext:
    # spawn, not fork: once numba's OpenMP threading layer has started in this process (any
    # earlier test of a parallel kernel), GNU OpenMP terminates a forked child.
    return mp.start_processes(
        _worker,
        args=(WORLD_SIZE, free_port(), out),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )


def wait_for(context: mp.ProcessContext) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} training processes did not finish in {TIMEOUT_S} s")


@pytest.fixture(scope="module")
def runs(tokenizer, tmp_path_factory):
    """The 2-process run's folder, and the 1-process model and result (trained meanwhile)."""
    out = tmp_path_factory.mktemp("ddp")
    context = start_processes(out)
    try:
        model = tunable(tokenizer)
        result = train(
            model,
            tokenizer,
            EXAMPLES,
            TrainConfig(**CONFIG),
            eval_examples=EXAMPLES,
            output_dir=tmp_path_factory.mktemp("single"),
            progress=False,
            fingerprint="base",
        )
    finally:
        wait_for(context)
    return out, model, result


def test_two_processes_reach_the_alpha_of_one(runs, tokenizer):
    two_processes, model, result = runs
    expected = trained(model)
    start = trained(tunable(tokenizer))
    ranks = [load_file(str(two_processes / f"rank{r}.safetensors")) for r in range(WORLD_SIZE)]
    assert set(ranks[0]) == set(expected)
    for name, value in expected.items():
        assert not torch.equal(value, start[name]), name  # training moved every α
        # DDP hands every process the same averaged gradient: the same update, bit for bit.
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        # Only the summation order differs from one process.
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-6)
    summary = json.loads((two_processes / "rank0.json").read_text())
    assert summary["world_size"] == WORLD_SIZE
    torch.testing.assert_close(summary["train_losses"], result.train_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        [loss for _, loss in summary["eval_losses"]],
        [loss for _, loss in result.eval_losses],
        rtol=1e-5,
        atol=1e-6,
    )


def test_only_the_trained_scales_are_all_reduced(runs):
    two_processes, model, _ = runs
    summary = json.loads((two_processes / "rank0.json").read_text())
    per_step = CONFIG["max_steps"]
    buckets = summary["reduced"]
    names = [name for bucket in buckets for name in bucket]
    trainable = set(trained(model))
    # Every α₁ once per optimizer step (grad_accum=2: the first micro-batch does not sync).
    assert sorted(names) == sorted(list(trainable) * per_step)
    assert all(name.endswith(".alpha1") for name in names)
    # The frozen codes and scales are buffers, which DDP never all-reduces.
    buffers = {name for name, _ in model.named_buffers()}
    assert any(name.endswith("packed_codes") for name in buffers)
    assert not any(name.endswith("packed_codes") for name, _ in model.named_parameters())


def test_only_rank_zero_writes_checkpoints(runs):
    two_processes = runs[0]
    assert (two_processes / "run0" / CHECKPOINT_DIR).is_dir()
    assert not (two_processes / "run1").exists()


def test_bad_settings_stop_every_process(runs):
    two_processes = runs[0]
    for rank in range(WORLD_SIZE):
        errors = json.loads((two_processes / f"rank{rank}.json").read_text())["errors"]
        assert errors["batch"].startswith("ConfigError: batch_size 1 is smaller than the 2")
        assert "different bases (process 0: base-0, process 1: base-1)" in errors["base"]


def test_share_splits_every_item_once():
    items = list(range(7))
    shares = [DataParallel(rank=r, world_size=3).shard(items) for r in range(3)]
    assert sorted(item for share in shares for item in share) == items
    assert [len(s) for s in shares] == [3, 2, 2]


def test_launched_processes_without_a_group_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="joined no process group"):
        current()


def test_a_launch_without_its_rendezvous_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with (
        pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT are not set"),
        data_parallel(),
    ):
        pass


def test_an_mpi_launch_is_refused(monkeypatch):
    # accelerate launch without --multi_gpu on a CPU machine starts its processes with mpirun.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with (
        pytest.raises(ConfigError, match="MPI launcher .*accelerate launch --multi_gpu"),
        data_parallel(),
    ):
        pass


def test_single_process_needs_no_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with data_parallel() as parallel:
        assert parallel == DataParallel() and parallel.is_main and not parallel.enabled


@pytest.fixture(scope="module")
def saved_base(tokenizer, tmp_path_factory):
    """A tiny quantized base with its tokenizer, and an E2E-style training file."""
    from alphatune import save_quantized

    work = tmp_path_factory.mktemp("cli-ddp")
    config = BCQConfig(bits=3, group_size=32, method="offset")
    model = make_tiny_llama(len(tokenizer))
    quantize_(model, config)
    save_quantized(model, work / "base", config, tokenizer)
    data = work / "train.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows((f"name[{n}]", f"{n} is a pub near the river.") for n in NAMES)
    return work / "base", data


@pytest.mark.slow
def test_cli_tune_under_torchrun(saved_base, tmp_path):
    from alphatune.adapters import load_adapter, read_adapter
    from alphatune.bases import load_quantized
    from alphatune.cli import main
    from alphatune.files import ADAPTER_WEIGHTS

    base, data = saved_base
    argv = [
        "tune", "--base", base, "--data", data, "--max-steps", "3", "--batch-size", "3",
        "--grad-accum", "2", "--checkpoint-every", "0", "--no-progress",
    ]  # fmt: skip
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    command = [*launch, "-m", "alphatune.cli", *map(str, argv), "--output", str(tmp_path / "two")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 processes" in done.stdout
    assert main([*map(str, argv), "--output", str(tmp_path / "one")]) == 0

    one = load_file(str(tmp_path / "one" / ADAPTER_WEIGHTS))
    two = load_file(str(tmp_path / "two" / ADAPTER_WEIGHTS))
    assert set(one) == set(two)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6)
    model, _ = load_quantized(base)
    config, _ = read_adapter(model, tmp_path / "two")
    assert config["metadata"]["processes"] == 2
    load_adapter(model, tmp_path / "two")
