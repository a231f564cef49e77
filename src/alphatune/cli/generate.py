"""``alphatune generate``: generate text with a quantized base, one adapter, or one adapter per
prompt (a mixed-task batch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.text import Text

from alphatune.cli import options
from alphatune.cli.console import console, timed_step
from alphatune.cli.loading import load_base
from alphatune.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("generate", help="generate text with a quantized base (and adapter)")
    g.add_argument("--base", required=True, type=options.existing_dir)
    g.add_argument(
        "--adapter",
        type=options.adapter_spec,
        action="append",
        metavar="[NAME=]DIR",
        help="adapter directory; repeat as NAME=DIR to serve several in one batch",
    )
    g.add_argument("--prompt", action="append", required=True, help="input (repeatable)")
    g.add_argument(
        "--prompt-adapter",
        action="append",
        metavar="NAME",
        help="adapter of the --prompt at the same position (with NAME=DIR adapters)",
    )
    g.add_argument(
        "--task",
        choices=["e2e", "raw"],
        default="e2e",
        help="e2e: the prompt is a meaning representation; raw: used as is",
    )
    g.add_argument("--max-new-tokens", type=options.positive_int, default=64)
    g.add_argument("--beams", type=options.positive_int, default=1)
    g.add_argument(
        "--sample", action="store_true", help="sample instead of greedy decoding (seeded)"
    )
    g.add_argument("--temperature", type=options.positive_float, default=1.0)
    g.add_argument("--top-k", type=options.positive_int, default=None)
    g.add_argument("--top-p", type=options.fraction, default=None)
    g.add_argument("--seed", type=options.non_negative_int, default=0, help="sampling seed")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end an answer at TEXT"
    )
    g.add_argument(
        "--engine",
        choices=["auto", "on", "off"],
        default="auto",
        help="the native decode engine: where it serves the model (auto), required (on), or "
        "transformers generate (off); default: %(default)s",
    )
    options.add_common(g)


def mixed_adapters(args: argparse.Namespace) -> dict[str, Path] | None:
    """``--adapter NAME=DIR`` (several) with one ``--prompt-adapter`` per prompt, or ``None``."""
    specs: list[tuple[str | None, Path]] = args.adapter or []
    named = dict(spec for spec in specs if spec[0] is not None)
    usage = (
        "give one --adapter DIR, or several --adapter NAME=DIR with one --prompt-adapter NAME "
        "per --prompt (a mixed-task batch)"
    )
    if not named:
        if len(specs) > 1 or args.prompt_adapter:
            raise ConfigError(usage)
        return None
    if any(name is None for name, _ in specs):
        raise ConfigError(f"an --adapter without a name among named ones; {usage}")
    if len(named) != len(specs):
        raise ConfigError(f"an adapter name is given twice; {usage}")
    if len(args.prompt_adapter or []) != len(args.prompt):
        raise ConfigError(
            f"{len(args.prompt)} --prompt but {len(args.prompt_adapter or [])} "
            f"--prompt-adapter; {usage}"
        )
    return named


def run(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.data import e2e_prompt
    from alphatune.evaluate import check_prompt_lengths, generate
    from alphatune.mixed import load_adapters

    mixed = mixed_adapters(args)
    single = None if mixed is not None or not args.adapter else args.adapter[0][1]
    model, tokenizer = load_base(args.base, single)
    if mixed is not None:
        with timed_step(f"loading adapters {', '.join(mixed)}"):
            load_adapters(model, mixed)
    prompts = [e2e_prompt(p) if args.task == "e2e" else p for p in args.prompt]
    check_prompt_lengths(model, tokenizer, prompts, args.max_new_tokens)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.beams,
        adapters=args.prompt_adapter if mixed else None,
        progress=not args.no_progress,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        engine={"auto": None, "on": True, "off": False}[args.engine],
    )
    names = args.prompt_adapter if mixed else [None] * len(prompts)
    for prompt, name, text in zip(args.prompt, names, outputs, strict=True):
        console.print(Text(prompt, style="bold") + Text(f"  [{name}]" if name else "", style="dim"))
        console.print(Text(f"→ {text}"))
    return {"outputs": outputs}
