"""``alphatune report``: render the comparison's result files into docs/results.md with plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.text import Text

from alphatune.cli import options
from alphatune.cli.console import console


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser(
        "report", help="render the comparison's result files into docs/results.md with plots"
    )
    r.add_argument(
        "--results",
        type=Path,
        default=Path("benchmarks/results/paper"),
        help="folder of result files (python -m alphatune.experiments grid writes them)",
    )
    r.add_argument("--output", type=Path, default=Path("docs/results.md"))
    options.add_common(r)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.experiments.report import render

    render(args.results, args.output)
    console.print(Text(f"wrote {args.output} (plots in {args.output.parent / 'results'})"))
    return {"output": str(args.output)}
