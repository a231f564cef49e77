"""Rendering the result files into docs/results.md: a paper-style table per task, and PNG plots.

Rows are method variants at their bit width; seeds are averaged (the spread over seeds is shown
next to the mean) and each seed's bootstrap 95% interval of the main score is listed. Every row
names the commit(s) it was measured at, so a table can be checked against the code.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alphatune.errors import ConfigError, DataError
from alphatune.experiments.grid import (
    BUDGETS,
    DEV_ITEMS,
    MAIN_METRIC,
    RATES_FROM,
    RECIPES,
    SEARCHED,
    choose_rate,
    learning_rates,
)
from alphatune.experiments.spec import read_result
from alphatune.experiments.tasks import get_task

logger = logging.getLogger(__name__)

# Per task: (column title, score key) in table order.
COLUMNS = {
    "e2e": [
        ("BLEU", "bleu"),
        ("NIST", "nist"),
        ("METEOR", "meteor"),
        ("ROUGE-L", "rouge_l"),
        ("CIDEr", "cider"),
        ("length", "length_ratio"),
    ],
    "webnlg": [
        ("BLEU all", "bleu"),
        ("BLEU seen", "seen_bleu"),
        ("BLEU unseen", "unseen_bleu"),
        ("length", "length_ratio"),
    ],
    "sst2": [("accuracy", "accuracy")],
}
TASK_TITLES = {
    "e2e": "E2E NLG (test)",
    "webnlg": "WebNLG 2017 (test)",
    "sst2": "SST-2 (GLUE dev)",
    "webnlg-heldout": "WebNLG 2017, four training categories held out (dev)",
}


@dataclass
class Row:
    """One method variant at one bit width: its runs over seeds."""

    variant: str
    bits: int | None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def metric(self, key: str) -> list[float]:
        return [r["scores"][key] for r in self.runs if r["scores"].get(key) is not None]

    @property
    def first(self) -> dict[str, Any]:
        return self.runs[0]


def load_results(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result file under ``results_dir/<task>/``, by task."""
    if not results_dir.is_dir():
        raise ConfigError(f"no results folder at {results_dir}; run the grid first")
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        for path in sorted(task_dir.glob("*.json")):
            by_task[task_dir.name].append(read_result(path, task_dir.name))
    return dict(by_task)


def rows(results: Sequence[dict[str, Any]], split: str = "test") -> list[Row]:
    grouped: dict[tuple[str, int | None], Row] = {}
    for result in results:
        spec = result["spec"]
        if spec["split"] != split:
            continue
        key = (result["variant"], spec["bits"])
        grouped.setdefault(key, Row(result["variant"], spec["bits"])).runs.append(result)
    for row in grouped.values():
        row.runs.sort(key=lambda r: r["spec"]["seed"])
    return sorted(grouped.values(), key=lambda r: (-(r.first["stored_bytes"]), r.variant))


def _number(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    half = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ±{half:.{digits}f}"


def _interval(row: Row, key: str) -> str:
    parts = []
    for run in row.runs:
        ci = run["scores"].get(f"{key}_ci")
        if ci:
            parts.append(f"[{ci[0]:.1f}, {ci[1]:.1f}]")
    return " ".join(parts) or "–"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}k"
    return str(n)


def task_table(task: str, results: Sequence[dict[str, Any]]) -> str:
    """The paper-style markdown table of one task's test runs."""
    columns = COLUMNS[task]
    main = MAIN_METRIC[task]
    header = [
        "method",
        "bits",
        "seeds",
        "trainable",
        "stored MiB",
        "× smaller than fp32",
        *(title for title, _ in columns),
        f"{ {key: title for title, key in columns}.get(main, main) } 95% CI per seed",
        "commit",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(results):
        run = row.first
        digits = {"nist": 2, "cider": 2, "length_ratio": 2}
        cells = [
            row.variant,
            "fp32" if row.bits is None else str(row.bits),
            str(len(row.runs)),
            _count(run["trainable_parameters"]),
            _mib(run["stored_bytes"]),
            f"{run['compression_vs_fp32']:.1f}",
            *(_number(row.metric(key), digits.get(key, 1)) for _, key in columns),
            _interval(row, main),
            ", ".join(sorted({r["environment"]["commit"][:8] for r in row.runs})),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dev_table(
    task: str, results: Sequence[dict[str, Any]], pairing: Callable[[], Pairing | None]
) -> str:
    """Every dev run of a dev-only task (``Task.splits``), best first: its score with the
    bootstrap interval, length ratio and sample size, and its paired difference against the
    default recipe's seed-0 run (AlphaTuning 3-bit) on the same items (``pairing()``)."""
    main = MAIN_METRIC[task]
    dev = sorted(
        (r for r in results if r["spec"]["split"] == "dev"),
        key=lambda r: -r["scores"][main],
    )
    if not dev:
        return "_no dev runs yet_"
    default = next(
        (r for r in dev if _recipe(r) == DEFAULT_RECIPE and r["spec"]["seed"] == 0), None
    )
    paired = pairing() if default is not None and len(dev) > 1 else None
    titles = ["method", "bits", "seed", "learning rate", "stored MiB", f"dev {main}", "95% CI",
              "length", "dev items", "− 3-bit default, paired 95% CI", "base", "commit"]  # fmt: skip
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in dev:
        spec, scores = r["spec"], r["scores"]
        ci = scores.get(f"{main}_ci")
        interval = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–"
        length = scores.get("length_ratio")
        bits = "fp32" if spec["bits"] is None else str(spec["bits"])
        difference = "–"
        if paired is not None and default is not None and r is not default:
            theirs = default["scores"][main]
            difference = f"{scores[main] - theirs:+.2f}"
            try:
                low, high, _ = paired(r["predictions"], default["predictions"])
                difference += f" [{low:+.2f}, {high:+.2f}]"
            except DataError as exc:  # predictions of an older evaluation set
                logger.warning("no paired interval for %s: %s", r["variant"], exc)
        cells = [
            r["variant"], bits, str(spec["seed"]), f"{spec['learning_rate']:g}",
            f"{r['stored_bytes'] / 2**20:.1f}", f"{scores[main]:.2f}", interval,
            "–" if length is None else f"{length:.2f}", str(scores.get("n", "–")), difference,
            _base(r), str(r["environment"].get("commit", "?"))[:8],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search_table(task: str, results: Sequence[dict[str, Any]]) -> str:
    """The learning-rate search on dev: one line per family and candidate, with the bootstrap
    interval and sample size (candidates closer than their intervals are a tie, not a choice).
    Only the searches' runs (``_in_search``): the recipe candidates and the default's second
    seed have their own table (``recipe_table``)."""
    main = MAIN_METRIC[task]
    dev = sorted(
        (r for r in results if r["spec"]["split"] == "dev" and _in_search(task, r)),
        key=lambda r: (r["variant"], r["spec"]["learning_rate"]),
    )
    if not dev:
        return "_no dev runs yet_"
    lines = [
        f"| method | learning rate | dev {main} | 95% CI | dev items | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for r in dev:
        lr, scores = r["spec"]["learning_rate"], r["scores"]
        ci = scores.get(f"{main}_ci")
        interval = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–"
        n = scores.get("n", "–")
        chosen = _chosen_mark(r, [d for d in dev if d["variant"] == r["variant"]], main)
        lines.append(
            f"| {r['variant']} | {lr:g} | {scores[main]:.2f} | {interval} | {n} | {chosen} |"
        )
    return "\n".join(lines)


# Pairs (candidate predictions, default predictions) -> (low, high, share the candidate wins).
Pairing = Callable[[Sequence[str], Sequence[str]], tuple[float, float, float]]


def recipe_table(
    task: str, results: Sequence[dict[str, Any]], pairing: Callable[[], Pairing | None]
) -> str:
    """The candidate recipes (``grid.RECIPES``, their searches) on dev against a dev run of the
    default recipe at the same rate and budget, with the paired bootstrap interval of the
    difference where the dev references can be read (``pairing()``, asked once a candidate has
    run), or "" when none has. The default's runs at other seeds are candidates too: how far a
    seed alone moves the score.

    The reference is the default's run on the same quantized base if there is one (a base
    quantized on another CPU differs by float order, and so do its scores), at the same seed if
    possible; the table names both runs' bases and the reference's seed.
    """
    main = MAIN_METRIC[task]
    recipes = {(m, b, tuple(sorted(o))) for m, b, o, _ in RECIPES}
    dev = [r for r in results if r["spec"]["split"] == "dev"]
    defaults = [r for r in dev if _recipe(r) == DEFAULT_RECIPE]
    candidates = [
        r for r in dev
        if _recipe(r) in recipes and (_recipe(r) != DEFAULT_RECIPE or r["spec"]["seed"] != 0)
    ]  # fmt: skip
    if not candidates:
        return ""
    paired = pairing()
    titles = ["recipe", "seed", "learning rate", "base", f"dev {main}", "default's run",
              f"its {main}", "difference", "paired 95% CI", "wins"]  # fmt: skip
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in sorted(candidates, key=lambda r: (r["variant"], r["spec"]["seed"])):
        spec, ours = r["spec"], r["scores"][main]
        reference = _reference(r, defaults)
        label = r["variant"] + ("" if spec["bits"] == 3 else f", {spec['bits']}-bit base")
        cells = [label, str(spec["seed"]), f"{spec['learning_rate']:g}", _base(r),
                 f"{ours:.2f}"]  # fmt: skip
        if reference is None:
            lines.append("| " + " | ".join(cells + ["–"] * 5) + " |")
            continue
        theirs = reference["scores"][main]
        interval, wins = "–", "–"
        if paired is not None and r.get("predictions") and reference.get("predictions"):
            try:
                low, high, share = paired(r["predictions"], reference["predictions"])
                interval, wins = f"[{low:+.2f}, {high:+.2f}]", f"{100 * share:.0f}%"
            except DataError as exc:  # predictions of an older evaluation set
                logger.warning("no paired interval for %s: %s", r["variant"], exc)
        run = f"seed {reference['spec']['seed']}, base {_base(reference)}"
        cells += [run, f"{theirs:.2f}", f"{ours - theirs:+.2f}", interval, wins]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DEFAULT_RECIPE = ("alphatuning", 3, ())  # ``_recipe`` of the default: 3-bit α₁, no options


def _recipe(run: dict[str, Any]) -> tuple[Any, ...]:
    spec = run["spec"]
    return (spec["method"], spec["bits"], tuple(sorted(spec["options"].items())))


def _in_search(task: str, run: dict[str, Any]) -> bool:
    """Whether a dev run is one of a family's learning-rate search as the grid runs it now (seed
    0 of ``grid.SEARCHED``, at one of ``grid.learning_rates``): what ``best_learning_rate``
    chooses from. Runs of a range since moved stay in their result files."""
    families = {recipe: family for family, recipe in SEARCHED.items()}
    family = families.get(_recipe(run))
    return (
        family is not None
        and run["spec"]["seed"] == 0
        and run["spec"]["learning_rate"] in learning_rates(task, family)
    )


def _base(run: dict[str, Any]) -> str:
    """The first 8 digits of the run's base fingerprint ("?" for a result that predates it)."""
    return str((run.get("notes") or {}).get("base", {}).get("fingerprint", "?"))[:8]


def _reference(run: dict[str, Any], defaults: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The default's dev run to compare ``run`` with: the same rate and budget, not itself; on
    the same base first, then at the same seed (seed 0 for the default's own reseeded runs)."""
    spec = run["spec"]
    variant = _recipe(run) != DEFAULT_RECIPE  # options or bits: compared at its own seed
    seed = spec["seed"] if variant else 0
    same = [
        d for d in defaults
        if d is not run and d["spec"]["learning_rate"] == spec["learning_rate"]
        and d["spec"]["budget"] == spec["budget"]
        and (variant or d["spec"]["seed"] != spec["seed"])
    ]  # fmt: skip
    if not same:
        return None
    return max(same, key=lambda d: (_base(d) == _base(run), d["spec"]["seed"] == seed))


def dev_pairing(task: str) -> Pairing | None:
    """``recipe_table``'s pairing on the task's dev sample, or None without the data files."""
    evaluation = get_task(task)
    try:
        eval_set = evaluation.eval_set("dev", DEV_ITEMS)
    except DataError as exc:
        logger.warning("no paired intervals for %s's recipes: %s", task, exc)
        return None

    def paired(ours: Sequence[str], theirs: Sequence[str]) -> tuple[float, float, float]:
        return evaluation.paired_difference(ours, theirs, eval_set)

    return paired


def _chosen_mark(run: dict[str, Any], family: list[dict[str, Any]], main: str) -> str:
    """The mark of the rate the grid takes for the family (``grid.choose_rate``), saying when it
    is the highest or lowest rate tried: the best rate may then lie outside the search."""
    rates = [r["spec"]["learning_rate"] for r in family]
    chosen = choose_rate((r["scores"][main], r["spec"]["learning_rate"]) for r in family)
    lr = run["spec"]["learning_rate"]
    if len(family) < 2 or lr != chosen:
        return ""
    if lr == max(rates):
        return "yes (the highest rate tried)"
    if lr == min(rates):
        return "yes (the lowest rate tried)"
    return "yes"


def _plot(task: str, results: Sequence[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """Score vs bits, vs trainable parameters and vs stored size, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = MAIN_METRIC[task]
    data = [(row, statistics.fmean(row.metric(main))) for row in rows(results) if row.metric(main)]
    if not data:
        return []
    axes = {
        "bits": (
            "bits per weight of the block linears (fp32 = 32)",
            lambda r: r.first["bits_per_weight"] or 32.0,
            False,
        ),
        "trainable": (
            "trainable parameters",
            lambda r: max(r.first["trainable_parameters"], 1),
            True,
        ),
        "size": ("stored model size (MiB)", lambda r: r.first["stored_bytes"] / 2**20, True),
    }
    written = []
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, (label, x_of, log_x) in axes.items():
        figure, ax = plt.subplots(figsize=(7, 4.5))
        for row, score in data:
            ours = row.variant.startswith("alphatuning")
            ax.scatter(
                x_of(row),
                score,
                marker="*" if ours else "o",
                s=90 if ours else 40,
                color="tab:red" if ours else "tab:blue",
            )
            tag = row.variant + ("" if row.bits is None else f" q{row.bits}")
            ax.annotate(
                tag, (x_of(row), score), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{TASK_TITLES[task]} {main}")
        ax.grid(alpha=0.3)
        figure.tight_layout()
        path = plots_dir / f"{task}-{main}-vs-{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def bases_paragraph(by_task: dict[str, list[dict[str, Any]]]) -> str:
    """Which cached quantized bases the runs on one used (by fingerprint, with the CPU's vector
    extensions where it was quantized): a base quantized again on another machine differs a
    little in float order, so runs on different bases differ by that too."""
    counts: dict[str, int] = {}
    for results in by_task.values():
        for result in results:
            base = result.get("notes", {}).get("base")
            if base is None:
                continue
            made = base.get("quantized") or {}
            where = "+".join(made.get("vector_extensions", [])) or "unrecorded CPU"
            key = f"`{base['fingerprint']}` ({where})"
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return ""
    listed = ", ".join(f"{key}: {n} run{'s' * (n != 1)}" for key, n in sorted(counts.items()))
    return (
        "Quantized bases (cached per quantizer and bit width; fingerprint, and the vector "
        f"extensions of the CPU that quantized it): {listed}. Runs from before this was "
        "recorded (2026-12-01) name none."
    )


def render(results_dir: Path, output: Path, plots_dir: Path | None = None) -> str:
    """Write docs/results.md (and its plots) from the result files; returns the markdown."""
    by_task = load_results(results_dir)
    plots_dir = plots_dir or output.parent / "results"
    machines = sorted({r["environment"]["processor"] for rs in by_task.values() for r in rs})
    dates = sorted(r["environment"]["date"][:10] for rs in by_task.values() for r in rs)
    parts = [
        "# AlphaTuning against the methods users run today",
        "",
        (
            "Rendered by `alphatune report` from the result files in "
            f"`{results_dir}` (one per run; rerun with `python -m alphatune.experiments grid`). "
            "Do not edit by hand."
        ),
        "",
        (
            f"Model: SmolLM2-135M-Instruct. Machine(s): {', '.join(machines) or '–'}. "
            f"Measured {dates[0] if dates else '–'} to {dates[-1] if dates else '–'}."
        ),
        "",
        (
            "Every method trains through the same loop (AdamW, weight decay 0.01, linear decay with "
            "6% warm-up, label smoothing 0.1, no dropout, gradient clipping 1.0), on the same "
            "prompts and tokenization, with the same steps × batch × max length, and is scored by "
            "the same greedy decoding. Learning rates were chosen on dev (seed 0, "
            f"{DEV_ITEMS} dev items), never on test. Greedy, not the paper's beam search: a beam "
            "of 10 would cost 10x the decoding time on these 2 cores for every run."
        ),
        "",
        (
            "Sizes: every quantized base (AlphaTuning, PEQA, the PTQ rows) keeps the 28.3M-parameter "
            "embedding / tied LM head in fp32 (113 MB), the configuration the grid began with; "
            "alphatune's default now stores it as an 8-bit table (< 0.1% perplexity, "
            "docs/lm_head.md), which would make those rows about 80 MiB smaller."
        ),
        "",
    ]
    bases = bases_paragraph(by_task)
    if bases:
        parts += [bases, ""]
    for task, results in by_task.items():
        budget = BUDGETS.get(task)
        parts += [f"## {TASK_TITLES.get(task, task)}", ""]
        dev_only = "test" not in get_task(task).splits
        if budget is not None:
            scores = (
                "Scores: one run per row; the interval is a bootstrap over the dev items (1,000 "
                "resamples), the difference a paired bootstrap against AlphaTuning 3-bit on the "
                "same items."
                if dev_only
                else "Scores: mean over seeds ± half the range; the interval is a bootstrap over "
                "test items (1,000 resamples) per seed."
            )
            parts += [
                (
                    f"Budget: {budget.steps} steps × batch {budget.batch_size} × max length "
                    f"{budget.max_length} tokens; decoding: greedy, at most {budget.max_new_tokens} "
                    f"new tokens. {scores} Length: the outputs' length over the references' as "
                    "BLEU counts it; below 1 BLEU's brevity penalty applies, and shorter outputs "
                    "usually leave facts out."
                ),
                "",
            ]
        if dev_only:
            rates = RATES_FROM.get(task)
            parts += [
                f"{get_task(task).description[:1].upper()}{get_task(task).description[1:]}."
                + (f" Learning rates: those {rates}'s searches chose." if rates else ""),
                "",
                dev_table(task, results, lambda task=task: dev_pairing(task)),
                "",
            ]
        if task in COLUMNS:
            if any(r["spec"]["split"] == "test" for r in results):
                parts += [task_table(task, results), ""]
                for path in _plot(task, results, plots_dir):
                    parts.append(f"![{path.stem}]({path.relative_to(output.parent)})")
            else:
                parts.append("No test run has finished yet; the learning-rate search is below.")
            parts += ["", "Learning-rate search (dev):", "", search_table(task, results), ""]
            recipes = recipe_table(task, results, lambda task=task: dev_pairing(task))
            if recipes:
                parts += [
                    (
                        "Candidate recipes for the default (3-bit α₁; dev, seed 0), against a dev run "
                        "of the default at the same rate: the difference with its paired "
                        "bootstrap interval (both scored on the same resampled items; it covers "
                        "the items, not training). The reference is the default's run on the "
                        "same quantized base where there is one: the default's seed-0 run was "
                        "made on another CPU, whose base differs by float order (and it won its "
                        "learning-rate search on these items, so it is biased up). The default "
                        "at seed 1 shows how far a seed or a base alone moves the score. The "
                        "default changes only on dev evidence."
                    ),
                    "",
                    recipes,
                    "",
                ]
    text = "\n".join(parts).rstrip() + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    return text
