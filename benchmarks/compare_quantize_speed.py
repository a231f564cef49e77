"""Paired comparison of two variants in a ``bench_quantize_speed.py`` results file.

Each variant's entries are found by label prefixes, comma-separated (``hessian-float32-d``
matches ``hessian-float32-d1``, ``hessian-float32-d2``, ...); their draws are paired by
calibration window, so the comparison is not swamped by the few percent a window alone moves the
perplexity.
Prints each pair, the mean perplexities, the mean of the per-draw ratios with its 95% t-interval,
and the seconds of each variant (only side-by-side runs' seconds compare):

    python benchmarks/compare_quantize_speed.py \\
        benchmarks/results/quantize_speed_hessian_precision.json \\
        landed-69aaa3f-float32-d0,hessian-float32-d landed-69aaa3f-auto-d0,hessian-auto-d
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

# Student's t 0.975 quantiles by degrees of freedom (scipy is not a dependency); 1.96 beyond.
T_975 = dict(enumerate((12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
                        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
                       start=1))  # fmt: skip


def entry_draws(entry: dict) -> list[dict]:
    """An entry's per-draw records; an entry written before they were kept for every entry has
    draw 0's under its top-level keys (``first_draw`` 0), and no others."""
    if "draws" in entry:
        return entry["draws"]
    if entry.get("first_draw", 0) == 0 and "perplexity" in entry:
        return [{"draw": 0, "seconds": entry["seconds"], "perplexity": entry["perplexity"]}]
    return []


def draws(results: dict, prefixes: str) -> dict[int, dict]:
    """Draw number -> that draw's record, over every entry whose label starts with one of the
    comma-separated ``prefixes``."""
    found: dict[int, dict] = {}
    for label, entry in results.items():
        if label.startswith(tuple(prefixes.split(","))):
            for run in entry_draws(entry):
                if run["draw"] in found:
                    raise SystemExit(f"draw {run['draw']} appears twice under {prefixes!r}")
                found[run["draw"]] = run
    if not found:
        raise SystemExit(f"no entry with draws under the prefixes {prefixes!r}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument(
        "before", help="label prefix(es, comma-separated) of the baseline's entries"
    )
    parser.add_argument("after", help="label prefix(es) of the variant's entries")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    before, after = draws(results, args.before), draws(results, args.after)
    paired = sorted(before.keys() & after.keys())
    if len(paired) < 2:
        raise SystemExit(f"{len(paired)} draws in common: a paired comparison needs 2 or more")
    ratios = []
    for d in paired:
        a, b = before[d], after[d]
        ratios.append(b["perplexity"] / a["perplexity"] - 1)
        print(f"draw {d}: perplexity {a['perplexity']:.2f} -> {b['perplexity']:.2f} "
              f"({ratios[-1]:+.2%}), {a['seconds']:.1f} -> {b['seconds']:.1f} s")  # fmt: skip
    n = len(ratios)
    mean = statistics.mean(ratios)
    half = T_975.get(n - 1, 1.96) * statistics.stdev(ratios) / math.sqrt(n)
    means = [statistics.mean(side[d]["perplexity"] for d in paired) for side in (before, after)]
    seconds = [[side[d]["seconds"] for d in paired] for side in (before, after)]
    speed = [s_after / s_before for s_before, s_after in zip(*seconds, strict=True)]
    print(f"{n} draws: mean perplexity {means[0]:.2f} -> {means[1]:.2f} "
          f"({means[1] / means[0] - 1:+.2%}); per-draw ratio {mean:+.2%}, "
          f"95% interval {mean - half:+.2%} to {mean + half:+.2%}")  # fmt: skip
    print(f"seconds {min(seconds[0]):.1f}-{max(seconds[0]):.1f} -> "
          f"{min(seconds[1]):.1f}-{max(seconds[1]):.1f}; time ratio per draw "
          f"{min(speed):.2f}-{max(speed):.2f} (median {statistics.median(speed):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
