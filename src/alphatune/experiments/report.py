"""Rendering the result files into docs/results.md: a paper-style table per task, and PNG plots.

Rows are method variants at their bit width; seeds are averaged (the spread over seeds is shown
next to the mean) and each seed's bootstrap 95% interval of the main score is listed. Every row
names the commit(s) it was measured at, so a table can be checked against the code. The dev-set
tables (searches, recipe candidates, dev-only tasks) are ``dev_tables``'.
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alphatune.errors import ConfigError
from alphatune.experiments.bases import RESULTS_FILE as BASES_FILE
from alphatune.experiments.bases import bases_table
from alphatune.experiments.dev_tables import (
    budget_table,
    dev_pairing,
    dev_table,
    recipe_table,
    search_table,
)
from alphatune.experiments.grid import (
    BUDGETS,
    DEV_ITEMS,
    MAIN_METRIC,
    RATES_FROM,
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
        ("entities missing %", "entities_missing"),
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


def _rescored_sentence(by_task: dict[str, list[dict[str, Any]]]) -> str:
    """Which code scored runs whose scores were recomputed from their saved outputs."""
    commits = sorted(
        {r["rescored"]["commit"][:8] for rs in by_task.values() for r in rs if "rescored" in r}
    )
    if not commits:
        return ""
    return (
        " Some runs' scores were recomputed from their saved outputs after a metric was added "
        f"(`python -m alphatune.experiments rescore`, at {', '.join(commits)}); the commit "
        "column is the run's own."
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
            "Do not edit by hand." + _rescored_sentence(by_task)
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
    measured = results_dir / BASES_FILE
    if measured.exists():
        data = json.loads(measured.read_text(encoding="utf-8"))
        parts += [
            "## The quantized bases, before tuning",
            "",
            (
                f"WikiText-2 test perplexity (first {data['eval_tokens']:,} tokens, context 512) "
                "of each base the grid cached, beside the unquantized model "
                "(`python -m alphatune.experiments bases`; calibration reads WikiText-2 valid). "
                "Stored MiB count the fp32 embedding / head these bases keep."
            ),
            "",
            bases_table(data),
            "",
        ]
    for task, results in by_task.items():
        budget = BUDGETS.get(task)
        # The dev references are read once per task, by the first table that pairs runs.
        pairing = functools.cache(functools.partial(dev_pairing, task))
        parts += [f"## {TASK_TITLES.get(task, task)}", ""]
        evaluation = get_task(task)
        dev_only = "test" not in evaluation.splits
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
                    + (
                        " Entities missing: the percent of the input triples' subjects and objects "
                        "an output does not name word for word (lower is better; dates and "
                        "paraphrases count as missing for every method alike, see "
                        "docs/metrics.md)."
                        if any(key == "entities_missing" for _, key in COLUMNS.get(task, []))
                        else ""
                    )
                ),
                "",
            ]
        if dev_only:
            rates = RATES_FROM.get(task)
            parts += [
                f"{evaluation.description}."
                + (f" Learning rates: those {rates}'s searches chose." if rates else ""),
                "",
                dev_table(task, results, pairing),
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
            recipes = recipe_table(task, results, pairing)
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
        longer = budget_table(task, results, pairing)
        if longer:
            parts += [
                (
                    "Longer training (dev): runs at more steps than the budget above, each "
                    "against the same method, rate and seed at the task's steps on the same dev "
                    "items, with the paired bootstrap interval of the difference (it covers the "
                    "items, not training). The learning rates are those chosen at the task's "
                    "steps."
                ),
                "",
                longer,
                "",
            ]
    text = "\n".join(parts).rstrip() + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    return text
