"""``benchmarks/bench_decode.py``'s measurement of imports: a worker process must import nothing
heavy before it measures its configuration's imports (torch alone is ~370 MiB; a worker that
imported it while reading its arguments reported the torch-free runtime with torch loaded)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_a_worker_reads_its_arguments_without_importing_torch_or_alphatune(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import bench_decode
        bench_decode.parse_args(["--worker", {str(tmp_path / "job")!r}, {str(tmp_path / "row")!r}])
        heavy = sorted(m for m in ("torch", "transformers", "alphatune", "numba") if m in sys.modules)
        print(",".join(heavy))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "", f"imported before measuring: {done.stdout.strip()}"
