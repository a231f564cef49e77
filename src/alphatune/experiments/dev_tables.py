"""The dev-set tables of the report: learning-rate searches, recipe candidates against the
default, and dev-only tasks (``Task.splits``), each score with its bootstrap interval and, where
two runs share the dev items, the paired interval of their difference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from alphatune.errors import DataError
from alphatune.experiments.grid import (
    DEV_ITEMS,
    MAIN_METRIC,
    RECIPES,
    SEARCHED,
    choose_rate,
    learning_rates,
)
from alphatune.experiments.tasks import get_task

logger = logging.getLogger(__name__)


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
        interval = _interval_cell(scores, main)
        length = scores.get("length_ratio")
        bits = "fp32" if spec["bits"] is None else str(spec["bits"])
        difference = "–"
        if paired is not None and default is not None and r is not default:
            difference = f"{scores[main] - default['scores'][main]:+.2f}"
            found = _paired_interval(paired, r, default)
            if found is not None:
                difference += f" [{found[0]:+.2f}, {found[1]:+.2f}]"
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
        interval = _interval_cell(scores, main)
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
    recipes = {(m, b, tuple(sorted(o)), "") for m, b, o, _ in RECIPES}
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
        found = None if paired is None else _paired_interval(paired, r, reference)
        if found is not None:
            low, high, share = found
            interval, wins = f"[{low:+.2f}, {high:+.2f}]", f"{100 * share:.0f}%"
        run = f"seed {reference['spec']['seed']}, base {_base(reference)}"
        cells += [run, f"{theirs:.2f}", f"{ours - theirs:+.2f}", interval, wins]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(
    task: str, results: Sequence[dict[str, Any]], pairing: Callable[[], Pairing | None]
) -> str:
    """Dev runs at another budget than the task's (``Budget.tag``, e.g. 3x the steps), each
    against the same recipe, rate and seed at the task's budget on the same dev items, with the
    paired bootstrap interval of the difference (``pairing()``, asked once such a run exists);
    "" when there is none."""
    main = MAIN_METRIC[task]
    dev = [r for r in results if r["spec"]["split"] == "dev"]
    tagged = [r for r in dev if _recipe(r)[3]]
    if not tagged:
        return ""
    paired = pairing()
    titles = ["method", "bits", "seed", "learning rate", "steps", f"dev {main}", "95% CI",
              "length", "at the task's steps", f"its {main}", "difference",
              "paired 95% CI"]  # fmt: skip
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in sorted(tagged, key=lambda r: (r["variant"], r["spec"]["seed"])):
        spec, scores = r["spec"], r["scores"]
        length = scores.get("length_ratio")
        cells = [
            r["variant"], "fp32" if spec["bits"] is None else str(spec["bits"]),
            str(spec["seed"]), f"{spec['learning_rate']:g}", str(_saved_budget(r)["steps"]),
            f"{scores[main]:.2f}", _interval_cell(scores, main),
            "–" if length is None else f"{length:.2f}",
        ]  # fmt: skip
        same = [d for d in dev if _same_run_at_task_budget(d, r)]
        if not same:
            lines.append("| " + " | ".join(cells + ["–"] * 4) + " |")
            continue
        # On the same quantized base where there is one: another base differs by float order.
        reference = max(same, key=lambda d: _base(d) == _base(r))
        theirs = reference["scores"][main]
        found = None if paired is None else _paired_interval(paired, r, reference)
        interval = "–" if found is None else f"[{found[0]:+.2f}, {found[1]:+.2f}]"
        steps = str(_saved_budget(reference)["steps"])
        if _base(reference) != _base(r):
            steps += f" (base {_base(reference)})"
        cells += [steps, f"{theirs:.2f}", f"{scores[main] - theirs:+.2f}", interval]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _same_run_at_task_budget(candidate: dict[str, Any], tagged: dict[str, Any]) -> bool:
    """Whether ``candidate`` is ``tagged``'s recipe, rate and seed at the task's own budget,
    scored on the same number of dev items."""
    ours, theirs = tagged["spec"], candidate["spec"]
    return (
        _recipe(candidate) == (*_recipe(tagged)[:3], "")
        and theirs["seed"] == ours["seed"]
        and theirs["learning_rate"] == ours["learning_rate"]
        and _saved_budget(candidate).get("eval_limit") == _saved_budget(tagged).get("eval_limit")
    )


# ``_recipe`` of the default: 3-bit α₁, no options, the task's own budget.
DEFAULT_RECIPE = ("alphatuning", 3, (), "")
# ``grid.SEARCHED`` inverted: the family whose learning-rate search a run's recipe belongs to.
_SEARCHED_FAMILY = {(*recipe, ""): family for family, recipe in SEARCHED.items()}


def _interval_cell(scores: dict[str, Any], main: str) -> str:
    """The main score's bootstrap interval as a table cell ("–" for a result without one)."""
    ci = scores.get(f"{main}_ci")
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–"


def _paired_interval(
    paired: Pairing, ours: dict[str, Any], theirs: dict[str, Any]
) -> tuple[float, float, float] | None:
    """``paired`` on two runs' predictions, or None when either has none or they were scored on
    another evaluation set (logged)."""
    if not (ours.get("predictions") and theirs.get("predictions")):
        return None
    try:
        return paired(ours["predictions"], theirs["predictions"])
    except DataError as exc:  # predictions of an older evaluation set
        logger.warning("no paired interval for %s: %s", ours["variant"], exc)
        return None


def _recipe(run: dict[str, Any]) -> tuple[Any, ...]:
    """Method, bits, options and budget tag (``Budget.tag``: "" for the task's own budget)."""
    spec = run["spec"]
    return (
        spec["method"],
        spec["bits"],
        tuple(sorted(spec["options"].items())),
        _saved_budget(run)["tag"],
    )


def _saved_budget(run: dict[str, Any]) -> dict[str, Any]:
    """The run's budget as saved, with the fields that result files written before them lack
    (``tag``: the task's own budget) filled in."""
    return {"tag": "", **(run["spec"].get("budget") or {})}


def _in_search(task: str, run: dict[str, Any]) -> bool:
    """Whether a dev run is one of a family's learning-rate search as the grid runs it now (seed
    0 of ``grid.SEARCHED``, at one of ``grid.learning_rates``): what ``best_learning_rate``
    chooses from. Runs of a range since moved stay in their result files."""
    family = _SEARCHED_FAMILY.get(_recipe(run))
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
        and _saved_budget(d) == _saved_budget(run)
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
