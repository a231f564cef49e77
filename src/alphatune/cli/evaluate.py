"""``alphatune evaluate``: BLEU of a quantized base (and adapter) on a task, or perplexity on a
text file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.text import Text

from alphatune.cli import options
from alphatune.cli.console import console, format_interval
from alphatune.cli.loading import existing_inputs, load_base
from alphatune.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser("evaluate", help="BLEU on a task (or perplexity on a text file)")
    e.add_argument("--base", required=True, type=options.existing_dir)
    e.add_argument("--adapter", type=options.existing_dir, default=None)
    e.add_argument("--task", choices=["e2e", "triples"], default="e2e")
    e.add_argument(
        "--data",
        type=options.existing_file,
        default=None,
        help="eval file (default: the test split)",
    )
    e.add_argument("--limit", type=options.positive_int, default=None, help="first N inputs")
    e.add_argument("--beams", type=options.positive_int, default=1)
    e.add_argument("--max-new-tokens", type=options.positive_int, default=64)
    e.add_argument("--predictions", type=Path, default=None, help="write generations here")
    e.add_argument(
        "--overwrite", action="store_true", help="replace an existing --predictions file"
    )
    e.add_argument(
        "--perplexity",
        type=options.existing_file,
        default=None,
        help="score perplexity on this text file",
    )
    e.add_argument("--max-tokens", type=options.positive_int, default=8192)
    e.add_argument("--context", type=options.positive_int, default=512)
    options.add_common(e)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.data import default_file, load_task, load_text_tokens, start_ids
    from alphatune.evaluate import context_length, perplexity, score_generation
    from alphatune.files import check_output_file, write_file

    path = None if args.perplexity else args.data or default_file(args.task, "test")
    if args.predictions:
        if args.perplexity:
            raise ConfigError("--predictions saves generations; it does not go with --perplexity")
        inputs = existing_inputs(args.base, args.adapter, path)
        check_output_file(args.predictions, args.overwrite, inputs)
    model, tokenizer = load_base(args.base, args.adapter)
    if args.perplexity:
        limit = context_length(model)
        if limit is not None and args.context > limit:
            raise ConfigError(
                f"--context {args.context} is longer than the model's context of {limit} "
                f"tokens; use --context {limit} or less"
            )
        tokens = load_text_tokens(tokenizer, args.perplexity, max_tokens=args.max_tokens)
        value = perplexity(
            model,
            tokens,
            context=args.context,
            progress=not args.no_progress,
            prefix=start_ids(tokenizer),  # Gemma's BOS; none for SmolLM2
        )
        console.print(
            Text(f"perplexity on {args.perplexity} ({tokens.numel()} tokens): {value:.2f}")
        )
        return {"perplexity": value, "tokens": tokens.numel()}
    items = load_task(args.task, path, "eval", args.limit)
    score = score_generation(
        model,
        tokenizer,
        items,
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    console.print(
        Text.assemble(
            f"BLEU on {score.items} inputs of {path}: ",
            (f"{score.bleu:.2f}", "bold"),
            f" {format_interval(score.bleu_interval)}",
        )
    )
    if args.predictions:
        text = "\n".join(score.predictions) + "\n"
        write_file(args.predictions, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return {"bleu": score.bleu, "bleu_interval": list(score.bleu_interval), "items": score.items}
