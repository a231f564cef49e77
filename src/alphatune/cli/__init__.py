"""The ``alphatune`` command: quantize, tune, generate, evaluate, demo, report.

Only this package parses arguments; it builds configs and calls the library. Every check that can
fail (settings, inputs, whether the output may be written) runs before the minutes of work.

What this module owns: the parser (each command adds its own sub-parser), logging setup, and how
an error ends the command. One module per command (``quantize``, ``tune``, ``generate``,
``evaluate``, ``demo``, ``report``); ``options`` holds the argument types and the option groups
commands share, ``console`` what they print, ``loading`` what they read.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from alphatune.cli import demo, evaluate, generate, quantize, report, tune
from alphatune.cli.console import error_console
from alphatune.errors import AlphaTuneError

# In the order ``alphatune --help`` lists them.
COMMANDS = {
    "quantize": quantize,
    "tune": tune,
    "generate": generate,
    "evaluate": evaluate,
    "demo": demo,
    "report": report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alphatune",
        description="Quantize a language model with binary-coding quantization and α-tune it per task.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    logging.getLogger("alphatune").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not args.verbose:
        # transformers' own per-file loading bars add noise to ours.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        COMMANDS[args.command].run(args)
    except AlphaTuneError as err:
        # Plain text: messages quote user data such as "name[Aromi]", which is not markup.
        error_console.print(Text("error: ", style="red") + Text(str(err)), highlight=False)
        return 2
    except OSError as err:
        # The disk filled up, a file vanished, a permission changed mid-run: say so plainly
        # (a traceback with --verbose).
        if args.verbose:
            raise
        error_console.print(Text("error: ", style="red") + Text(str(err)), highlight=False)
        return 1
    return 0
