"""``python -m alphatune_runtime BASE --prompt TEXT``: generate from a saved base without torch.

The prompts are used as given (no chat template, no task formatting: ``alphatune generate`` adds
those); each answer is printed after its prompt. A bad base or request prints what is wrong and
exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from alphatune_runtime.errors import AlphaTuneError
from alphatune_runtime.sampling import Sampling


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value

    return parse


_positive = _at_least(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m alphatune_runtime",
        description="Generate text from a saved alphatune base with the torch-free runtime.",
    )
    parser.add_argument("base", help="directory of a base saved by 'alphatune quantize'")
    parser.add_argument("--adapter", default=None, help="adapter directory ('alphatune tune')")
    parser.add_argument("--prompt", action="append", required=True, help="input (repeatable)")
    parser.add_argument("--max-new-tokens", type=_positive, default=64)
    parser.add_argument("--threads", type=_positive, default=None, help="default: all cores")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=_positive, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=_at_least(0), default=0)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT")
    parser.add_argument("--timing", action="store_true", help="print load and decode times")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from alphatune_runtime.model import Model

    try:
        began = time.perf_counter()
        model = Model.load(args.base, adapter=args.adapter, threads=args.threads)
        loaded = time.perf_counter()
        sampling = Sampling(args.sample, args.temperature, args.top_k, args.top_p, args.seed)
        answers = model.generate(
            args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop
        )
    except AlphaTuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prompt, answer in zip(args.prompt, answers, strict=True):
        print(f"{prompt}\n→ {answer}")
    if args.timing:
        print(
            f"loaded in {loaded - began:.2f} s, generated in {time.perf_counter() - loaded:.2f} s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
