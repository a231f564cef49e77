"""The comparison harness: a 2-step run of every method on a tiny model and tiny data slices, the
grid's learning-rate choice, the report, and bad input."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from alphatune.config import BCQConfig
from alphatune.data import load_triples_train
from alphatune.errors import ConfigError, DataError
from alphatune.evaluate import metrics
from alphatune.experiments import dev_tables, grid, report, tasks
from alphatune.experiments.methods import METHODS
from alphatune.experiments.runner import rescore, run
from alphatune.experiments.spec import (
    Budget,
    RunSpec,
    read_result,
    result_path,
    work_path,
    write_json,
)
from alphatune.experiments.tasks import SST2_LABELS, get_task

TINY = Budget(steps=2, batch_size=2, max_length=48, max_new_tokens=8, eval_limit=4)


def _head(source: Path, target: Path, lines: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open(encoding="utf-8", newline="") as handle:
        kept = [next(handle) for _ in range(lines)]
    target.write_text("".join(kept), encoding="utf-8", newline="")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_data_dir: Path) -> Path:
    """Small slices of every data file the tasks read (WebNLG test: seen and unseen entries)."""
    root = tmp_path_factory.mktemp("data")
    for split, lines in (("train", 41), ("dev", 30), ("test", 30)):
        _head(shared_data_dir / "e2e" / f"{split}.csv", root / "e2e" / f"{split}.csv", lines)
    for split in ("train", "dev"):
        _head(shared_data_dir / "webnlg" / f"{split}.jsonl", root / "webnlg" / f"{split}.jsonl", 12)
    records = (shared_data_dir / "webnlg" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    seen = [r for r in records if json.loads(r)["seen"]][:3]
    unseen = [r for r in records if not json.loads(r)["seen"]][:3]
    (root / "webnlg" / "test.jsonl").write_text("\n".join(seen + unseen) + "\n", encoding="utf-8")
    _head(shared_data_dir / "sst2" / "train.tsv", root / "sst2" / "train.tsv", 41)
    _head(shared_data_dir / "sst2" / "dev.tsv", root / "sst2" / "dev.tsv", 11)
    (root / "wikitext-2").mkdir()
    for split in ("valid", "test"):
        shutil.copy(shared_data_dir / "wikitext-2" / f"{split}.txt", root / "wikitext-2")
    return root


@pytest.fixture(scope="module")
def env(data_dir: Path, tmp_path_factory, tiny_model_dir: Path):
    """Data, cache, results and work folders of their own for the module's runs."""
    patch = pytest.MonkeyPatch()
    # METEOR's jar loads a 61 MB paraphrase table at every start (20-30 s on a busy core): the
    # runs score without it, one test below checks a real METEOR score.
    patch.setattr(tasks, "e2e_metrics", functools.partial(metrics.e2e_metrics, meteor=False))
    patch.setenv("ALPHATUNE_DATA_DIR", str(data_dir))
    patch.setenv("ALPHATUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("runs")
    yield {"results": root / "results", "work": root / "work", "model": str(tiny_model_dir)}
    patch.undo()


def _spec(env, method: str, bits: int | None = None, task: str = "e2e", **options) -> RunSpec:
    return RunSpec(task, method, bits, 0, 1e-3, "test", tuple(options.items()), TINY, env["model"])


def _check_result(result: dict, spec: RunSpec, trains: bool) -> None:
    assert result["format"] == 1 and result["spec"] == spec.to_dict()
    assert result["environment"]["commit"] and result["environment"]["torch"]
    assert len(result["predictions"]) == result["scores"]["n"] == 4
    assert result["stored_bytes"] > 0 and result["compression_vs_fp32"] > 0
    if trains:
        assert result["trainable_parameters"] > 0
        assert result["training"]["steps"] == 2 and result["training"]["final_loss"] > 0
    else:
        assert result["training"] is None


# Parents before the methods that quantize their weights.
ORDERED = [
    ("full-ft", None, {}),
    ("lora", None, {}),
    ("ft-ptq", 3, {"quantizer": "rtn"}),
    ("lora-ptq", 3, {"quantizer": "calibrated"}),
    ("ptq-lora", 3, {}),
    ("peqa", 3, {}),
    ("prompt-tuning", None, {}),
    ("adapter", None, {}),
    ("alphatuning", 3, {}),
    ("alphatuning", 2, {"granularity": "row", "grad_scale": "group_size"}),
    ("alphatuning", 3, {"multiplier": True}),
    ("alphatuning", 3, {"base": "greedy", "train": "all_alpha"}),
    ("alphatuning", 3, {"train": "all_alpha", "offset": True}),
    ("alphatuning", 3, {"layer_bits": "v-o-down4"}),
]


@pytest.mark.parametrize(("method", "bits", "options"), ORDERED, ids=lambda v: str(v))
def test_every_method_writes_a_result(env, method, bits, options, single_thread) -> None:
    spec = _spec(env, method, bits, **options)
    result = run(spec, env["results"], env["work"])
    _check_result(result, spec, METHODS[method].trains)
    on_disk = read_result(result_path(env["results"], spec), "e2e")
    assert on_disk["predictions"] == result["predictions"]
    assert {"bleu", "nist", "rouge_l", "cider", "bleu_ci"} <= set(result["scores"])
    assert isinstance(result["environment"]["vector_extensions"], list)
    if method in ("ptq-lora", "peqa", "alphatuning"):  # a cached base: which one, made where
        base = result["notes"]["base"]
        assert len(base["fingerprint"]) == 16 and base["quantized"]["commit"]


def test_runs_on_one_base_name_the_same_fingerprint(env) -> None:
    def base(**options) -> dict:
        spec = _spec(env, "alphatuning", 3, **options)
        return read_result(result_path(env["results"], spec))["notes"]["base"]

    first, second = base(), base(multiplier=True)
    assert first == second
    assert base(base="greedy", train="all_alpha")["fingerprint"] != first["fingerprint"]


def test_a_mixed_precision_run_has_a_base_of_its_own(env, single_thread) -> None:
    def result(**options) -> dict:  # the run's result; runs it unless an earlier test did
        return run(_spec(env, "alphatuning", 3, **options), env["results"], env["work"])

    uniform, mixed = result(), result(layer_bits="v-o-down4")
    assert mixed["notes"]["base"]["fingerprint"] != uniform["notes"]["base"]["fingerprint"]
    assert mixed["stored_bytes"] > uniform["stored_bytes"]
    assert mixed["bits_per_weight"] > uniform["bits_per_weight"]
    with pytest.raises(ConfigError, match="mixed-precision preset .*v-o-down4"):
        run(_spec(env, "alphatuning", 3, layer_bits="down9"), env["results"], env["work"])


def test_trainable_counts_follow_the_method(env) -> None:
    def trainable(method: str, bits: int | None, **options) -> int:
        path = result_path(env["results"], _spec(env, method, bits, **options))
        return read_result(path)["trainable_parameters"]

    from alphatune.experiments.methods import load_model
    from alphatune.quantize import find_target_layers

    rows = sum(
        m.out_features for m in find_target_layers(load_model(env["model"]), BCQConfig()).values()
    )
    group = trainable("alphatuning", 3)
    row = trainable("alphatuning", 2, granularity="row", grad_scale="group_size")
    assert row == rows <= group  # one multiplier per row; one α₁ per (row, group)
    assert trainable("full-ft", None) > trainable("lora", None) > trainable("prompt-tuning", None)
    assert trainable("peqa", 3) == group  # one scale per (row, group) as well


@pytest.mark.bnb
def test_qlora_writes_a_result(env, single_thread) -> None:
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the 'paper' extra (bitsandbytes)")
    spec = _spec(env, "qlora", 4)
    result = run(spec, env["results"], env["work"])
    _check_result(result, spec, True)
    assert 4.0 < result["bits_per_weight"] < 5.0  # NF4 codes + one fp32 absmax per 64


def test_a_finished_run_is_not_run_again(env) -> None:
    spec = _spec(env, "alphatuning", 3)
    path = result_path(env["results"], spec)
    before = path.read_bytes()
    run(spec, env["results"], env["work"])
    assert path.read_bytes() == before


def test_the_test_run_reuses_the_dev_runs_training(env) -> None:
    dev = RunSpec("e2e", "lora", None, 3, 1e-3, "dev", (), TINY, env["model"])
    test = RunSpec("e2e", "lora", None, 3, 1e-3, "test", (), TINY, env["model"])
    assert run(dev, env["results"], env["work"])["training"]["resumed_from"] == 0
    reused = run(test, env["results"], env["work"])["training"]
    assert reused["resumed_from"] == reused["steps"] == 2


def test_webnlg_scores_seen_and_unseen(env, single_thread) -> None:
    spec = _spec(env, "alphatuning", 3, task="webnlg")
    result = run(spec, env["results"], env["work"])
    scores = result["scores"]
    assert scores["n"] == 4
    assert scores["seen_n"] + scores["unseen_n"] == 4 and scores["seen_n"] > 0
    assert "unseen_bleu_ci" in scores
    eval_set = get_task("webnlg").eval_set("test", TINY.eval_limit)
    entities = [item.entities for item in eval_set.items]
    expected = metrics.missing_entities(result["predictions"], entities)
    assert scores["entities_missing"] == pytest.approx(expected)
    low, high = scores["entities_missing_ci"]
    assert 0 <= low <= scores["entities_missing"] <= high <= 100
    assert "unseen_entities_missing" in scores


def test_sst2_answers_are_labels_and_scored_as_accuracy(env, single_thread) -> None:
    spec = _spec(env, "alphatuning", 3, task="sst2")
    result = run(spec, env["results"], env["work"])
    assert set(result["predictions"]) <= {label.strip() for label in SST2_LABELS}
    assert 0 <= result["scores"]["accuracy"] <= 100
    low, high = result["scores"]["accuracy_ci"]
    assert low <= result["scores"]["accuracy"] <= high


def test_a_killed_decoding_resumes_from_its_saved_answers(env, monkeypatch, single_thread) -> None:
    """Answers are saved a chunk at a time: a run killed while decoding decodes only the chunks
    it had not finished, and its answers are those of one uninterrupted call."""
    from alphatune.experiments import runner

    # 4 prompts: two chunks of one left-padded batch each, as one call batches them.
    monkeypatch.setattr(runner, "GENERATION_BATCH", 2)
    monkeypatch.setattr(runner, "PREDICTION_CHUNK", 2)
    spec = replace(_spec(env, "lora"), learning_rate=3e-3)
    real, calls = runner._generate, []

    def dies_at_the_second_chunk(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine went away
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_generate", dies_at_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run(spec, env["results"], env["work"])
    saved = work_path(env["work"], spec) / "answers-test.json"
    first = json.loads(saved.read_text())["answers"]
    assert len(first) == 2
    calls.clear()
    monkeypatch.setattr(
        runner, "_generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k)
    )
    result = run(spec, env["results"], env["work"])  # training resumes at its last step
    assert calls == [2]  # only the chunk not decoded before
    assert result["notes"]["answers_decoded_before"] == 2
    assert all(result["predictions"][int(i)] == answer for i, answer in first.items())
    assert not saved.exists()  # the answers are in the result
    # One uninterrupted call over the same model gives the same answers.
    prepared = runner.get_method(spec.method).prepare(spec, work_path(env["work"], spec))
    runner._train(spec, prepared, work_path(env["work"], spec), False)
    prompts = [item.prompt for item in get_task("e2e").eval_set("test", TINY.eval_limit).items]
    assert runner._generate(spec, prepared, prompts, False) == result["predictions"]


def test_saved_answers_of_another_model_are_not_used(tmp_path) -> None:
    from alphatune.experiments import runner

    saved = tmp_path / "answers-test.json"
    identity = {"model": "a", "prompts": "p"}
    write_json(saved, {**identity, "answers": {"0": "x"}})
    assert runner._saved_answers(saved, identity) == {0: "x"}
    assert runner._saved_answers(saved, {**identity, "model": "b"}) == {}
    saved.write_text("{ truncated")
    assert runner._saved_answers(saved, identity) == {}


def test_rescore_recomputes_scores_from_predictions(env) -> None:
    spec = _spec(env, "alphatuning", 3)
    path = result_path(env["results"], spec)
    data = json.loads(path.read_text())
    data["scores"] = {"bleu": -1}
    write_json(path, data)
    rescored = rescore(path)
    assert rescored["scores"]["bleu"] >= 0
    assert rescored["rescored"]["commit"] and rescored["rescored"]["date"]
    assert rescored["environment"] == data["environment"]  # the run's own, kept


def test_rescore_of_one_task_leaves_the_others(env, single_thread, tmp_path) -> None:
    from alphatune.experiments.__main__ import main as experiments_main

    results = tmp_path / "results"
    for task in ("e2e", "webnlg"):
        source = result_path(env["results"], _spec(env, "alphatuning", 3, task=task))
        if not source.exists():
            run(_spec(env, "alphatuning", 3, task=task), env["results"], env["work"])
        target = results / task / source.name
        target.parent.mkdir(parents=True)
        data = json.loads(source.read_text())
        data["scores"] = {"bleu": -1}
        write_json(target, data)
    assert experiments_main(["--results", str(results), "rescore", "--task", "webnlg"]) == 0
    assert read_result(results / "webnlg" / source.name)["scores"]["bleu"] >= 0
    assert read_result(next((results / "e2e").glob("*.json")))["scores"] == {"bleu": -1}
    with pytest.raises(SystemExit):  # argparse: an unknown task, not an empty glob
        experiments_main(["--results", str(results), "rescore", "--task", "webnlgg"])


def test_e2e_scores_include_meteor(env, monkeypatch) -> None:
    monkeypatch.setattr(tasks, "e2e_metrics", metrics.e2e_metrics)
    path = result_path(env["results"], _spec(env, "alphatuning", 3))
    scores = rescore(path)["scores"]
    assert 0 <= scores["meteor"] <= 100 and scores["bleu_ci"][0] <= scores["bleu"]


def test_report_renders_tables_and_plots(env, tmp_path) -> None:
    output = tmp_path / "docs" / "results.md"
    text = report.render(env["results"], output)
    assert output.read_text() == text
    assert "## E2E NLG (test)" in text and "## WebNLG 2017 (test)" in text
    assert "| alphatuning" in text and "BLEU 95% CI per seed" in text
    assert "entities missing %" in text and "Entities missing: the percent" in text
    assert "Quantized bases (cached per quantizer and bit width" in text
    plots = sorted((tmp_path / "docs" / "results").glob("*.png"))
    assert {p.name for p in plots} >= {"e2e-bleu-vs-bits.png", "e2e-bleu-vs-trainable.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)


def test_bases_are_measured_once_and_rendered(env, tmp_path, monkeypatch, single_thread) -> None:
    """Every cached base gets its WikiText-2 perplexity (and the unquantized model once); a
    second call measures nothing again; the report shows them."""
    from alphatune.experiments import bases

    for options in ({}, {"layer_bits": "v-o-down4"}):  # two cached bases, whatever ran before
        run(_spec(env, "alphatuning", 3, **options), env["results"], env["work"])
    data = bases.measure_bases(env["results"], env["model"])
    entries = data["bases"]
    assert bases.UNQUANTIZED in entries and len(entries) >= 3
    assert all(e["wikitext2_perplexity"] > 1 for e in entries.values())
    mixed = [e for e in entries.values() if e.get("layer_bits")]
    assert len(mixed) == 1 and dict(mixed[0]["layer_bits"]) == {
        "*.v_proj": 4,
        "*.o_proj": 4,
        "*.down_proj": 4,
    }
    uniform = [e for n, e in entries.items() if n != bases.UNQUANTIZED and not e["layer_bits"]]
    assert any(
        mixed[0]["bits_per_weight"] > e["bits_per_weight"] for e in uniform if e["bits"] == 3
    )

    def fail(*_args):
        raise AssertionError("measured again")

    monkeypatch.setattr(bases, "_base_entry", fail)
    monkeypatch.setattr(bases, "_measure", fail)
    assert bases.measure_bases(env["results"], env["model"]) == data
    text = report.render(env["results"], tmp_path / "docs" / "results.md")
    assert "## The quantized bases, before tuning" in text
    assert "| fp32 | 32 | – | 32 | – |" in text and "`*.v_proj` 4" in text


def test_report_says_when_a_task_has_no_test_run_yet(env, tmp_path) -> None:
    """A task with only learning-rate search results gets a sentence, not an empty table or
    empty plots."""
    spec = _spec(env, "alphatuning", 3)
    data = json.loads(result_path(env["results"], spec).read_text())
    dev = replace(spec, split="dev", learning_rate=2e-3)  # a rate of AlphaTuning's search
    data["spec"] = dev.to_dict()
    results = tmp_path / "results"
    target = result_path(results, dev)
    target.parent.mkdir(parents=True)
    write_json(target, data)
    text = report.render(results, tmp_path / "docs" / "results.md")
    assert "No test run has finished yet; the learning-rate search is below." in text
    assert "| alphatuning | 0.002 |" in text  # the search table still lists the dev run
    assert not list((tmp_path / "docs" / "results").glob("*.png"))


def test_search_table_shows_each_candidates_interval_and_sample() -> None:
    """One line per rate of each family's search as the grid runs it: a second seed, a recipe
    candidate (both in the recipe table), a rate outside the search's range and test runs are
    not listed; a searched family with options (all α) is."""

    def dev_run(lr, bleu, ci=None, seed=0, method="lora", bits=None, options=None) -> dict:
        scores = {"bleu": bleu, "n": 200, **({"bleu_ci": ci} if ci else {})}
        spec = {"split": "dev", "learning_rate": lr, "method": method, "bits": bits,
                "seed": seed, "options": options or {}}  # fmt: skip
        variant = method + "".join(f"[{k}={v}]" for k, v in (options or {}).items())
        return {"spec": spec, "variant": variant, "scores": scores}

    test_run = dev_run(1e-3, 1.0)
    test_run["spec"]["split"] = "test"
    all_alpha = {"train": "all_alpha"}
    runs = [dev_run(2e-3, 61.5, [59.0, 64.0]), dev_run(1e-3, 57.94), test_run]
    runs += [dev_run(2e-3, 60.0, seed=1), dev_run(5e-4, 50.0)]  # a second seed; an old range
    runs += [dev_run(1e-3, 62.0, method="alphatuning", bits=3, options=all_alpha)]
    runs += [
        dev_run(2e-3, 63.0, method="alphatuning", bits=3, options={"grad_scale": "group_size"})
    ]
    lines = dev_tables.search_table("e2e", runs).splitlines()
    assert lines[0] == "| method | learning rate | dev bleu | 95% CI | dev items | chosen |"
    assert lines[2:] == [
        "| alphatuning[train=all_alpha] | 0.001 | 62.00 | – | 200 |  |",
        "| lora | 0.001 | 57.94 | – | 200 |  |",
        "| lora | 0.002 | 61.50 | [59.00, 64.00] | 200 | yes (the highest rate tried) |",
    ]


def test_recipe_table_compares_each_candidate_with_the_default_on_the_same_items() -> None:
    def dev_run(options: dict, bleu: float, predictions: list[str], lr=2e-3, seed=0, base=None):
        spec = {
            "split": "dev", "method": "alphatuning", "bits": 3, "seed": seed,
            "learning_rate": lr, "options": options, "budget": {"eval_limit": 200, "steps": 100},
        }  # fmt: skip
        variant = "alphatuning" + "".join(f", {k}={v}" for k, v in options.items())
        notes = {"base": {"fingerprint": base}} if base else {}
        return {"spec": spec, "variant": variant, "scores": {"bleu": bleu},
                "predictions": predictions, "notes": notes}  # fmt: skip

    default = dev_run({}, 46.84, ["a"])  # an older result: no base recorded
    all_alpha = dev_run({"train": "all_alpha"}, 48.0, ["b"], base="a36fd8629694")
    other_rate = dev_run({}, 44.2, ["c"], lr=5e-3)
    unlisted = dev_run({"granularity": "row"}, 40.0, ["d"], base="a36fd8629694")
    pairs = []

    def paired(ours, theirs):
        pairs.append((ours, theirs))
        if ours == ["e"]:
            raise DataError("8 hypotheses but 200 reference sets")
        return (0.5, 1.9, 0.97)

    runs = [default, all_alpha, other_rate, unlisted]
    lines = dev_tables.recipe_table("webnlg", runs, lambda: paired).splitlines()
    assert lines[2:] == [
        (
            "| alphatuning, train=all_alpha | 0 | 0.002 | a36fd862 | 48.00 | seed 0, base ? "
            "| 46.84 | +1.16 | [+0.50, +1.90] | 97% |"
        )
    ]
    assert pairs == [(["b"], ["a"])]
    # The default at seed 1 on the candidates' base becomes their reference; it is compared
    # with the seed-0 run itself (a seed and a base apart).
    reseeded = dev_run({}, 45.5, ["e"], seed=1, base="a36fd8629694")
    lines = dev_tables.recipe_table("webnlg", [*runs, reseeded], lambda: paired).splitlines()
    assert lines[2:] == [
        "| alphatuning | 1 | 0.002 | a36fd862 | 45.50 | seed 0, base ? | 46.84 | -1.34 | – | – |",
        (
            "| alphatuning, train=all_alpha | 0 | 0.002 | a36fd862 | 48.00 | seed 1, base a36fd862 "
            "| 45.50 | +2.50 | [+0.50, +1.90] | 97% |"
        ),
    ]
    # A candidate written since budgets carry a tag still finds a default saved before that.
    tagged_format = dev_run({"train": "all_alpha"}, 48.0, ["b"], base="a36fd8629694")
    tagged_format["spec"]["budget"] = {**tagged_format["spec"]["budget"], "tag": ""}
    lines = dev_tables.recipe_table("webnlg", [default, tagged_format], lambda: None).splitlines()
    assert lines[2].endswith("| seed 0, base ? | 46.84 | +1.16 | – | – |")
    without_data = dev_tables.recipe_table("webnlg", runs, lambda: None).splitlines()
    assert without_data[2].endswith("| +1.16 | – | – |")
    asked = []
    assert dev_tables.recipe_table("webnlg", [default, other_rate], lambda: asked.append(1)) == ""
    assert not asked  # the dev references are read only once a candidate has run


def test_report_command_writes_the_page(env, tmp_path) -> None:
    from alphatune.cli import main

    output = tmp_path / "results.md"
    assert main(["report", "--results", str(env["results"]), "--output", str(output)]) == 0
    assert output.read_text().startswith("# AlphaTuning against the methods users run today")
    missing = tmp_path / "nothing"
    assert main(["report", "--results", str(missing), "--output", str(output)]) == 2


# --- the grid ---------------------------------------------------------------------------------


def _fake_dev_result(results: Path, spec: RunSpec, bleu: float) -> None:
    write_json(
        result_path(results, spec),
        {"format": 1, "spec": spec.to_dict(), "scores": {grid.MAIN_METRIC[spec.task]: bleu}},
    )


# Fake dev scores per searched family: AlphaTuning's middle rate wins, LoRA's highest.
SEARCH_SCORES = {"alphatuning": (44.0, 47.0, 45.0), "lora": (40.0, 41.0, 42.0)}


def _fake_searches(
    results: Path, task: str, families: tuple[str, ...] = ("alphatuning", "lora")
) -> None:
    """Dev results for ``task``'s searches of ``families``, scored as ``SEARCH_SCORES``."""
    for family in families:
        for spec, bleu in zip(grid.search_specs(task, family), SEARCH_SCORES[family], strict=True):
            _fake_dev_result(results, spec, bleu)


def test_grid_waits_for_the_search_then_takes_the_best_dev_rate(tmp_path) -> None:
    results = tmp_path / "results"
    waiting = [s for s in grid.specs(results, ("e2e",)) if isinstance(s, str)]
    assert any("alphatuning learning-rate search" in s for s in waiting)
    searches = grid.search_specs("e2e", "alphatuning")
    assert all(s.split == "dev" and s.budget.eval_limit == grid.DEV_ITEMS for s in searches)
    for spec, bleu in zip(searches, (40.0, 55.0, 50.0), strict=True):
        _fake_dev_result(results, spec, bleu)
    assert grid.best_learning_rate(results, "e2e", "alphatuning") == searches[1].learning_rate
    runs = [s for s in grid.specs(results, ("e2e",)) if not isinstance(s, str)]
    ours = [s for s in runs if s.method == "alphatuning" and s.split == "test"]
    assert {s.seed for s in ours} == {0, 1}
    assert all(s.learning_rate == searches[1].learning_rate and s.split == "test" for s in ours)


def test_recipe_candidates_run_on_dev_at_their_familys_rate(tmp_path) -> None:
    """The recipe phase scores each candidate on dev at AlphaTuning's chosen rate and with the
    searches' dev items, so its runs compare with the default's own dev run."""
    results = tmp_path / "results"
    before = list(grid.specs(results, ("webnlg-recipe",)))
    # The candidates wait for AlphaTuning's rate; all α's own search does not.
    assert all(isinstance(s, str) for s in before[: len(grid.RECIPES)])
    assert before[len(grid.RECIPES) :] == grid.search_specs("webnlg", "alphatuning-all-alpha")
    searches = grid.search_specs("webnlg", "alphatuning")
    for spec, bleu in zip(searches, (44.0, 47.0, 45.0), strict=True):
        _fake_dev_result(results, spec, bleu)
    runs = list(grid.specs(results, ("webnlg-recipe",)))
    searched = grid.search_specs("webnlg", "alphatuning-all-alpha")
    assert runs[len(grid.RECIPES) :] == searched  # all α's own rate search comes last
    runs = runs[: len(grid.RECIPES)]
    assert len(runs) == len(grid.RECIPES) and not any(isinstance(s, str) for s in runs)
    # Its search at AlphaTuning's rate is the recipe run itself: one result, not two.
    assert searched[-1] == runs[0]
    assert all(s.split == "dev" and s.budget == searches[1].budget for s in runs)
    assert all(s.learning_rate == searches[1].learning_rate for s in runs)
    # Candidates at seed 0, the default once more at seed 1 (how far a seed moves it), and the
    # default on a 4-bit base, on a mixed-precision one and on one calibrated on task text too.
    assert [(s.seed, bool(s.options), s.bits) for s in runs] == [(0, True, 3)] * 3 + [
        (1, False, 3),
        (0, False, 4),
        (0, True, 3),
        (0, True, 3),
        (0, True, 3),
    ]
    assert [(s.option("layer_bits"), s.option("calibration")) for s in runs[-3:]] == [
        ("v-o-down4", None),
        (None, "wikitext+tasks"),
        ("v-o-down4", "wikitext+tasks"),
    ]
    assert grid.ORDER.index("webnlg-recipe") == grid.ORDER.index("webnlg") + 1


def test_webnlg_bits_phase_runs_the_4_bit_bases_on_test_after_the_recipes(tmp_path) -> None:
    """AlphaTuning 4-bit and QLoRA on WebNLG test come right after the recipe phase, at their
    families' rates, and are the same runs (one result each) as the rest phase's."""
    results = tmp_path / "results"
    _fake_searches(results, "webnlg")
    runs = list(grid.specs(results, ("webnlg-4bit",)))
    assert [(s.method, s.bits, s.split, s.seed) for s in runs] == [
        ("alphatuning", 4, "test", 0),
        ("qlora", 4, "test", 0),
    ]
    assert runs[0].learning_rate == grid.search_specs("webnlg", "alphatuning")[1].learning_rate
    assert runs[1].learning_rate == grid.search_specs("webnlg", "lora")[2].learning_rate
    assert set(runs) <= set(grid.specs(results, ("webnlg-rest",)))
    assert grid.ORDER.index("webnlg-4bit") == grid.ORDER.index("webnlg-recipe") + 1


def test_webnlg_4bit_seed_phase_runs_a_second_4_bit_seed_before_the_rest(tmp_path) -> None:
    """The 4-bit base's second seed on WebNLG test, at the family's rate, before any "-rest"
    phase."""
    results = tmp_path / "results"
    _fake_searches(results, "webnlg")
    runs = list(grid.specs(results, ("webnlg-4bit-seed",)))
    assert [(s.method, s.bits, s.split, s.seed) for s in runs] == [("alphatuning", 4, "test", 1)]
    assert runs[0].learning_rate == grid.search_specs("webnlg", "alphatuning")[1].learning_rate
    rest = [grid.ORDER.index(p) for p in grid.ORDER if p.endswith("-rest")]
    assert grid.ORDER.index("webnlg-4bit-seed") < min(rest)


def test_e2e_4bit_phase_runs_before_sst2_at_e2es_rates(tmp_path) -> None:
    """AlphaTuning 4-bit and QLoRA on E2E test (the QLoRA target) come before SST-2, at E2E's
    chosen rates, and are the same runs as E2E's rest phase's."""
    results = tmp_path / "results"
    _fake_searches(results, "e2e")
    runs = list(grid.specs(results, ("e2e-4bit",)))
    assert [(s.task, s.method, s.bits, s.split, s.seed) for s in runs] == [
        ("e2e", "alphatuning", 4, "test", 0),
        ("e2e", "qlora", 4, "test", 0),
    ]
    assert runs[0].learning_rate == grid.search_specs("e2e", "alphatuning")[1].learning_rate
    assert runs[1].learning_rate == grid.search_specs("e2e", "lora")[2].learning_rate
    assert set(runs) <= set(grid.specs(results, ("e2e-rest",)))
    assert grid.ORDER.index("e2e-4bit") < grid.ORDER.index("sst2")


def test_mixed_precision_phase_runs_e2e_dev_and_webnlg_test_before_sst2(tmp_path) -> None:
    results = tmp_path / "results"
    for task in ("e2e", "webnlg"):
        _fake_searches(results, task, ("alphatuning",))
    runs = list(grid.specs(results, ("mixed-precision",)))
    assert [(s.task, s.split, s.bits, s.option("layer_bits")) for s in runs] == [
        ("e2e", "dev", 3, "v-o-down4"),
        ("e2e", "dev", 3, "v-o-down4"),
        ("webnlg", "test", 3, "v-o-down4"),
        ("webnlg", "test", 3, "v-o-down4"),
    ]
    assert [s.option("calibration") for s in runs] == [None, "wikitext+tasks"] * 2
    assert runs[0].budget.eval_limit == grid.DEV_ITEMS
    assert runs[0].learning_rate == grid.search_specs("e2e", "alphatuning")[1].learning_rate
    assert runs[2].learning_rate == grid.search_specs("webnlg", "alphatuning")[1].learning_rate
    assert grid.ORDER.index("mixed-precision") < grid.ORDER.index("sst2")


def test_sst2_seed_phase_runs_the_headline_methods_second_seed(tmp_path) -> None:
    """AlphaTuning 3-bit, LoRA and LoRA -> PTQ 3-bit at seed 1 on SST-2, at their searched
    rates, before SST-2's remaining baselines: two seeds of each, as on the other tasks."""
    results = tmp_path / "results"
    _fake_searches(results, "sst2")
    runs = list(grid.specs(results, ("sst2-seed",)))
    first = list(grid.specs(results, ("sst2",)))
    headline = [s for s in first if not isinstance(s, str) and s.option("quantizer") != "rtn"]
    headline = [s for s in headline if s.split == "test"]
    assert [(s.method, s.bits, s.seed) for s in runs] == [(s.method, s.bits, 1) for s in headline]
    assert [s.learning_rate for s in runs] == [s.learning_rate for s in headline]
    assert grid.ORDER.index("sst2-seed") < grid.ORDER.index("sst2-rest")


def test_task_text_seed_phase_runs_the_candidate_base_at_seed_1_before_the_rest(tmp_path) -> None:
    results = tmp_path / "results"
    _fake_searches(results, "webnlg")
    (run,) = grid.specs(results, ("webnlg-task-text-seed",))
    assert (run.task, run.split, run.bits, run.seed) == ("webnlg", "test", 3, 1)
    assert (run.option("calibration"), run.option("layer_bits")) == ("wikitext+tasks", "v-o-down4")
    assert run.learning_rate == grid.search_specs("webnlg", "alphatuning")[1].learning_rate
    assert grid.ORDER.index("webnlg-task-text-seed") < grid.ORDER.index("webnlg-rest")


def test_task_text_elsewhere_phase_runs_the_candidate_base_on_e2e_and_sst2(tmp_path) -> None:
    """The task-text calibrated base on E2E test and SST-2 at each task's AlphaTuning rate, after
    SST-2's second seed and before its remaining baselines."""
    results = tmp_path / "results"
    for task in ("e2e", "sst2"):
        _fake_searches(results, task)
    runs = list(grid.specs(results, ("task-text-elsewhere",)))
    assert [(r.task, r.split, r.bits, r.seed) for r in runs] == [
        ("e2e", "test", 3, 0),
        ("sst2", "test", 3, 0),
    ]
    for spec in runs:
        assert spec.option("calibration") == "wikitext+tasks"
        assert spec.option("layer_bits") == "v-o-down4"
        searched = grid.search_specs(spec.task, "alphatuning")[1].learning_rate
        assert spec.learning_rate == searched
    order = grid.ORDER.index
    assert order("sst2-seed") < order("task-text-elsewhere") < order("sst2-rest")


def test_steps_phase_runs_the_headline_pair_longer_on_webnlg_dev(tmp_path) -> None:
    """AlphaTuning 3-bit and LoRA at 3x the steps on the held-out and seen WebNLG dev items, at
    the rates WebNLG's 100-step searches chose, before the "-rest" phases; their tagged budget
    gives them files (and a training) of their own beside the 100-step runs."""
    results = tmp_path / "results"
    _fake_searches(results, "webnlg")
    runs = list(grid.specs(results, ("webnlg-steps",)))
    assert [(s.task, s.method, s.bits, s.split, s.seed) for s in runs] == [
        ("webnlg-heldout", "alphatuning", 3, "dev", 0),
        ("webnlg-heldout", "lora", None, "dev", 0),
        ("webnlg", "alphatuning", 3, "dev", 0),
        ("webnlg", "lora", None, "dev", 0),
    ]
    assert [s.learning_rate for s in runs] == [2e-3, 1e-2] * 2
    assert all(s.budget.steps == 300 and s.budget.tag == "steps300" for s in runs)
    assert all(s.budget.eval_limit == grid.DEV_ITEMS for s in runs)
    at_budget = grid.search_specs("webnlg", "alphatuning")[1]
    assert runs[2].run_id == "alphatuning-q3-lr0.002-s0-steps300-dev"
    assert at_budget.run_id == "alphatuning-q3-lr0.002-s0-dev"
    assert runs[2].training_id != at_budget.training_id
    assert runs[2].variant == "alphatuning (steps300)"
    rest = [grid.ORDER.index(p) for p in grid.ORDER if p.endswith("-rest")]
    assert grid.ORDER.index("webnlg-steps") < min(rest)


def test_a_budget_tag_names_files_so_it_must_be_a_plain_word() -> None:
    from alphatune.experiments.spec import Budget

    with pytest.raises(ConfigError, match="budget tag"):
        Budget(tag="300 steps/x")
    assert grid._budget("webnlg", "dev", {"max_length": 256}).tag == "maxlength256"
    # A run by hand at another budget than the grid's gets files of its own, tagged with the
    # difference; at the grid's budget it is the grid's run.
    at_grid = grid._budget("e2e", "dev")
    assert grid.tagged_budget("e2e", "dev", at_grid) == at_grid
    by_hand = grid.tagged_budget("e2e", "dev", replace(at_grid, steps=2, eval_limit=8))
    assert by_hand.tag == "evallimit8steps2"


def test_a_search_row_cannot_change_its_budget(monkeypatch) -> None:
    phases = {"odd": [("e2e", "search", ("lora",), [], {"steps": 300})]}
    monkeypatch.setattr(grid, "PHASES", phases)
    with pytest.raises(ConfigError, match="a search runs at its task's budget"):
        list(grid.specs(Path("unused"), ("odd",)))


def test_budget_table_compares_longer_runs_with_the_task_budget_on_the_same_items() -> None:
    def dev_run(method, bits, bleu, predictions, steps=100, tag="", lr=2e-3) -> dict:
        budget = {"eval_limit": 200, "steps": steps, "tag": tag}
        spec = {"split": "dev", "method": method, "bits": bits, "seed": 0, "learning_rate": lr,
                "options": {}, "budget": budget}  # fmt: skip
        variant = method + (f" ({tag})" if tag else "")
        scores = {"bleu": bleu, "bleu_ci": [bleu - 2, bleu + 2], "length_ratio": 0.95}
        return {"spec": spec, "variant": variant, "scores": scores, "predictions": predictions}

    ours_100 = dev_run("alphatuning", 3, 46.84, ["a"])
    ours_300 = dev_run("alphatuning", 3, 48.5, ["b"], steps=300, tag="steps300")
    lora_300 = dev_run("lora", None, 49.0, ["c"], steps=300, tag="steps300", lr=5e-3)
    pairs = []

    def paired(ours, theirs):
        pairs.append((ours, theirs))
        return (0.4, 2.9, 0.99)

    assert dev_tables.budget_table("webnlg", [ours_100], lambda: paired) == ""
    lines = dev_tables.budget_table("webnlg", [ours_100, ours_300, lora_300], lambda: paired)
    assert lines.splitlines()[2:] == [
        (
            "| alphatuning (steps300) | 3 | 0 | 0.002 | 300 | 48.50 | [46.50, 50.50] | 0.95 | 100 "
            "| 46.84 | +1.66 | [+0.40, +2.90] |"
        ),
        "| lora (steps300) | fp32 | 0 | 0.005 | 300 | 49.00 | [47.00, 51.00] | 0.95 | – | – | – | – |",
    ]
    assert pairs == [(["b"], ["a"])]
    # On the tagged run's base where the task's budget has a run there.
    ours_300["notes"] = {"base": {"fingerprint": "a36fd8629694"}}
    other_base = dev_run("alphatuning", 3, 45.0, ["d"])
    other_base["notes"] = {"base": {"fingerprint": "a36fd8629694"}}
    lines = dev_tables.budget_table("webnlg", [ours_100, other_base, ours_300], lambda: None)
    assert "| 300 | 48.50 | [46.50, 50.50] | 0.95 | 100 | 45.00 | +3.50 | – |" in lines
    lines = dev_tables.budget_table("webnlg", [ours_100, ours_300], lambda: None)
    assert "| 100 (base ?) | 46.84 | +1.66 | – |" in lines
    # The tagged run is no default and no search run: the other dev tables leave it out.
    assert dev_tables._recipe(ours_300) != dev_tables.DEFAULT_RECIPE
    assert "steps300" not in dev_tables.search_table("webnlg", [ours_100, ours_300])


def test_every_task_has_its_headline_comparison_before_its_rest_and_ablations() -> None:
    """Each task's main phase (its searches and AlphaTuning against LoRA and LoRA → PTQ) comes
    before every task's "-rest" and "-ablations" phases; SST-2's split phases hold what the one
    phase held before (the three searches, the headline runs and ``REST``)."""
    mains = [grid.ORDER.index(t) for t in ("e2e", "webnlg", "sst2")]
    details = [i for i, p in enumerate(grid.ORDER) if p.endswith(("-rest", "-ablations"))]
    assert max(mains) < min(details)
    assert set(grid.PHASES) == set(grid.ORDER)
    phases = [row for p in ("sst2", "sst2-rest") for row in grid.PHASES[p]]
    assert {f for _, kind, families, _ in phases if kind == "search" for f in families} == {
        "alphatuning",
        "lora",
        "full-ft",
    }
    entries = [e for _, kind, _, rows in phases if kind == "test" for e in rows]
    assert sorted(entries, key=str) == sorted(grid._main((0,)) + grid.REST, key=str)


def test_a_task_can_move_its_search_past_the_chosen_edge() -> None:
    """WebNLG's and SST-2's AlphaTuning searches and SST-2's LoRA search are moved below their
    lowest rate, WebNLG's LoRA search and E2E's full fine-tuning search above (each chose its
    edge; E2E's twice); other tasks keep the family's range, and every search tries <= 3 rates."""
    webnlg = [s.learning_rate for s in grid.search_specs("webnlg", "alphatuning")]
    e2e = [s.learning_rate for s in grid.search_specs("e2e", "alphatuning")]
    assert webnlg == [1e-3, 2e-3, 5e-3]
    assert [s.learning_rate for s in grid.search_specs("sst2", "alphatuning")] == [2e-4, 5e-4, 1e-3]
    assert [s.learning_rate for s in grid.search_specs("sst2", "lora")] == [5e-4, 1e-3, 2e-3]
    assert e2e == list(grid.LEARNING_RATES["alphatuning"])
    assert [s.learning_rate for s in grid.search_specs("webnlg", "lora")] == [2e-3, 5e-3, 1e-2]
    assert [s.learning_rate for s in grid.search_specs("e2e", "lora")] == list(
        grid.LEARNING_RATES["lora"]
    )
    assert [s.learning_rate for s in grid.search_specs("e2e", "full-ft")] == [1e-4, 2e-4, 5e-4]
    # WebNLG's full fine-tuning starts from E2E's earlier moved range, which holds E2E's choice.
    assert [s.learning_rate for s in grid.search_specs("webnlg", "full-ft")] == [5e-5, 1e-4, 2e-4]
    assert grid.learning_rates("sst2", "full-ft") == grid.LEARNING_RATES["full-ft"]
    for task in grid.BUDGETS:
        for family in grid.LEARNING_RATES:
            assert len(grid.learning_rates(task, family)) <= 3


def test_derived_runs_come_after_their_parent() -> None:
    order = [m for m, *_ in grid._main()] + [m for m, *_ in grid.REST]
    entries = sorted(grid._main() + grid.REST, key=lambda e: grid._parent_first(e[0]))
    methods = [e[0] for e in entries]
    assert methods.index("lora") < methods.index("lora-ptq")
    assert methods.index("full-ft") < methods.index("ft-ptq")
    assert set(order) == set(methods)


# --- bad input --------------------------------------------------------------------------------


def test_unknown_method_and_task_are_clear_errors(env) -> None:
    with pytest.raises(ConfigError, match="unknown method 'lorax'; known: full-ft"):
        run(_spec(env, "lorax"), env["results"], env["work"])
    with pytest.raises(ConfigError, match="unknown task 'mnli'"):
        get_task("mnli")
    with pytest.raises(ConfigError, match="split must be one of"):
        RunSpec("e2e", "lora", None, 0, 1e-3, split="train")
    with pytest.raises(ConfigError, match="learning_rate"):
        RunSpec("e2e", "lora", None, 0, float("inf"))


def test_a_missing_data_file_names_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "e2e").mkdir()
    monkeypatch.setenv("ALPHATUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"e2e/train.csv not found"):
        get_task("e2e").train_examples()


def test_a_result_file_from_another_task_is_refused(env, tmp_path) -> None:
    spec = _spec(env, "alphatuning", 3)
    source = result_path(env["results"], spec)
    misplaced = tmp_path / "webnlg" / source.name
    misplaced.parent.mkdir()
    shutil.copy(source, misplaced)
    with pytest.raises(ConfigError, match="a result of task 'e2e' in the folder of task 'webnlg'"):
        report.load_results(tmp_path)
    (tmp_path / "webnlg" / "junk.json").write_text("{}")
    misplaced.unlink()
    with pytest.raises(ConfigError, match="junk.json: not an alphatune experiment result"):
        report.load_results(tmp_path)


def test_derived_run_trains_its_parent_again_where_its_weights_are_gone(env) -> None:
    """The parent ran (its result exists) on another machine: nothing of it is in this work
    folder (no weights, no checkpoint), so the derived run trains it again from step 0, same
    spec and seed, and says so."""
    parent = _spec(env, "lora")
    if not result_path(env["results"], parent).exists():  # this test alone: make the parent
        run(parent, env["results"], env["work"])
    folder = work_path(env["work"], parent)
    shutil.rmtree(folder)
    spec = _spec(env, "lora-ptq", 3, quantizer="rtn")
    result = run(spec, env["results"], env["work"])
    retrained = result["notes"]["parent_weights"]
    assert retrained["retrained"] is True and retrained["resumed_from"] == 0
    assert retrained["steps"] == parent.budget.steps
    assert (folder / "model" / "config.json").exists()
    assert not (folder / "handoff.partial").exists()
    parent_loss = read_result(result_path(env["results"], parent))["training"]["final_loss"]
    assert retrained["final_loss_in_parent_result"] == parent_loss
    assert retrained["final_loss"] == pytest.approx(parent_loss, rel=1e-3)  # same seed, same data


def test_derived_run_without_its_parent_says_which(env) -> None:
    spec = RunSpec("e2e", "ft-ptq", 3, 7, 1e-3, "test", (), TINY, env["model"])
    with pytest.raises(ConfigError, match="the weights of its full-ft run are missing"):
        run(spec, env["results"], env["work"])


def _held_out_data(shared_data_dir: Path, root: Path, extra_train: list[str] = ()) -> Path:
    """A WebNLG data folder: the first 12 training lines (Airport), 3 held-out categories'
    training lines and ``extra_train``; 4 held-out dev items; WikiText-2 valid for the base."""
    train = (shared_data_dir / "webnlg" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    dev = (shared_data_dir / "webnlg" / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    held_out = [r for r in train if json.loads(r)["category"] in tasks.HELD_OUT_CATEGORIES]
    by_category = {json.loads(r)["category"]: r for r in held_out}  # one line per category
    lines = train[:12] + list(by_category.values()) + list(extra_train)
    (root / "webnlg").mkdir(parents=True)
    (root / "webnlg" / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dev_held_out = [r for r in dev if json.loads(r)["category"] in tasks.HELD_OUT_CATEGORIES]
    (root / "webnlg" / "dev.jsonl").write_text("\n".join(dev_held_out[:4]) + "\n", encoding="utf-8")
    (root / "wikitext-2").mkdir()
    for split in ("valid", "test"):
        shutil.copy(shared_data_dir / "wikitext-2" / f"{split}.txt", root / "wikitext-2")
    return root


def test_held_out_task_trains_without_the_categories_it_scores(
    shared_data_dir, monkeypatch
) -> None:
    """``webnlg-heldout`` on the real files: its 187 dev items are the held-out categories',
    its training is WebNLG's minus exactly those categories' 4,119 references (of 18,025), and
    it has no test split."""
    monkeypatch.setenv("ALPHATUNE_DATA_DIR", str(shared_data_dir))
    task = tasks.get_task("webnlg-heldout")
    dev = task.eval_set("dev", grid.DEV_ITEMS)
    assert len(dev.items) == 187 and dev.subsets == {}  # one set: every item is unseen
    full = tasks.get_task("webnlg").train_examples()
    assert (len(full), len(task.train_examples())) == (18025, 18025 - 4119)
    with pytest.raises(ConfigError, match="no 'test' split"):
        task.eval_set("test", None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"triples": [["A", "p", "B"]], "refs": ["A p B."]}', "without a 'category' field"),
        (None, "no training line of the held-out categories \\['University'\\]"),
    ],
    ids=["no category", "a held-out category renamed"],
)
def test_held_out_training_refuses_what_it_cannot_filter(
    shared_data_dir, tmp_path, monkeypatch, line, message
) -> None:
    """A training line without a category, or a held-out category missing from the training
    file (renamed, say), is an error: either could let held-out data into training unseen."""
    root = _held_out_data(shared_data_dir, tmp_path / "data", [line] if line else [])
    if line is None:  # University's line renamed
        path = root / "webnlg" / "train.jsonl"
        path.write_text(path.read_text().replace('"University"', '"Universities"'))
    monkeypatch.setenv("ALPHATUNE_DATA_DIR", str(root))
    with pytest.raises(DataError, match=message):
        tasks.get_task("webnlg-heldout").train_examples()


def test_held_out_runs_take_webnlgs_rates(tmp_path) -> None:
    """The held-out phase's dev runs wait for WebNLG's searches, then run at WebNLG's chosen
    rates with the dev budget."""
    results = tmp_path / "results"
    assert all(isinstance(s, str) for s in grid.specs(results, ("webnlg-heldout",)))
    _fake_searches(results, "webnlg")
    runs = list(grid.specs(results, ("webnlg-heldout",)))
    assert [(s.task, s.method, s.bits, s.split, s.seed) for s in runs] == [
        ("webnlg-heldout", "alphatuning", 3, "dev", 0),
        ("webnlg-heldout", "alphatuning", 3, "dev", 1),
        ("webnlg-heldout", "alphatuning", 4, "dev", 0),
        ("webnlg-heldout", "alphatuning", 4, "dev", 1),
        ("webnlg-heldout", "lora", None, "dev", 0),
        ("webnlg-heldout", "alphatuning", 3, "dev", 0),
        ("webnlg-heldout", "alphatuning", 3, "dev", 1),
        ("webnlg-heldout", "alphatuning", 3, "dev", 0),
        ("webnlg-heldout", "alphatuning", 3, "dev", 1),
        ("webnlg-heldout", "alphatuning", 3, "dev", 0),
        ("webnlg-heldout", "alphatuning", 3, "dev", 1),
    ]
    mixed = ["v-o-down4"] * 2
    assert [s.option("layer_bits") for s in runs] == [None] * 5 + mixed + [None] * 2 + mixed
    assert [s.option("calibration") for s in runs] == [None] * 7 + ["wikitext+tasks"] * 4
    assert [s.learning_rate for s in runs] == [2e-3] * 4 + [1e-2] + [2e-3] * 6
    assert all(s.budget.eval_limit == grid.DEV_ITEMS for s in runs)


def test_report_renders_the_held_out_dev_runs(tmp_path) -> None:
    """A dev-only task gets its own section and table: best first, with interval, length, size,
    the paired difference against the 3-bit default's seed-0 run, base and commit."""
    from alphatune.experiments.spec import Budget

    results = tmp_path / "results"
    runs = []
    for method, bits, bleu in (("alphatuning", 3, 40.0), ("lora", None, 43.5)):
        spec = RunSpec("webnlg-heldout", method, bits, 0, 2e-3, "dev", (), Budget(steps=1))
        scores = {"bleu": bleu, "bleu_ci": [bleu - 2, bleu + 2], "length_ratio": 0.9, "n": 187}
        environment = {"processor": "cpu", "date": "2026-12-02T00:00:00+00:00",
                       "commit": "abc1234567"}  # fmt: skip
        data = {"format": 1, "spec": spec.to_dict(), "variant": method, "scores": scores,
                "stored_bytes": 2**20 * 150, "predictions": [method], "environment": environment,
                "notes": {"base": {"fingerprint": "f00d" * 4}} if bits else {}}  # fmt: skip
        write_json(result_path(results, spec), data)
        runs.append(data)
    text = report.render(results, tmp_path / "docs" / "results.md")
    assert "## WebNLG 2017, four training categories held out (dev)" in text
    assert "WebNLG trained without the categories Astronaut" in text
    assert "one run per row" in text and "mean over seeds" not in text.split("held out (dev)")[1]
    pairs = []

    def paired(ours, theirs):
        pairs.append((ours, theirs))
        return (-1.0, 8.0, 0.9)

    rows = dev_tables.dev_table("webnlg-heldout", runs, lambda: paired).splitlines()[2:]
    lora = "| lora | fp32 | 0 | 0.002 | 150.0 | 43.50 | [41.50, 45.50] | 0.90 | 187 "
    ours = "| alphatuning | 3 | 0 | 0.002 | 150.0 | 40.00 | [38.00, 42.00] | 0.90 | 187 "
    assert rows == [
        lora + "| +3.50 [-1.00, +8.00] | ? | abc12345 |",
        ours + "| – | f00df00d | abc12345 |",
    ]
    assert pairs == [(["lora"], ["alphatuning"])]


def test_a_held_out_run_writes_a_result(env, shared_data_dir, tmp_path, monkeypatch) -> None:
    """A 2-step AlphaTuning run of ``webnlg-heldout`` on the tiny model trains on the kept
    categories only (the held-out lines of its slice are left out) and scores the held-out dev
    items; a test run of it fails before any training."""
    data = _held_out_data(shared_data_dir, tmp_path / "data")
    monkeypatch.setenv("ALPHATUNE_DATA_DIR", str(data))
    lines = (data / "webnlg" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    airport = tmp_path / "airport.jsonl"  # the slice's 12 kept lines alone
    airport.write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    assert tasks.get_task("webnlg-heldout").train_examples() == load_triples_train(airport)
    assert len(load_triples_train(data / "webnlg" / "train.jsonl")) > len(
        load_triples_train(airport)
    )
    spec = replace(_spec(env, "alphatuning", 3, task="webnlg-heldout"), split="dev")
    result = run(spec, tmp_path / "results", tmp_path / "work")
    assert result["spec"]["task"] == "webnlg-heldout" and result["scores"]["n"] == 4
    assert 0 <= result["scores"]["bleu"] <= 100 and result["training"]["steps"] == 2
    with pytest.raises(ConfigError, match="no 'test' split"):
        run(replace(spec, split="test"), tmp_path / "results", tmp_path / "other-work")
    assert not (tmp_path / "other-work").exists()  # failed before any work began


def test_prompt_tuning_generates_what_its_forward_predicts(tiny_model_dir) -> None:
    """The virtual tokens lead every step: greedy tokens from ``generate`` (batched, left-padded,
    KV cache) equal a step-by-step argmax of the model's own forward on each prompt alone.
    peft's own generate garbled them (its cache grew by the whole sequence at each step)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from alphatune.evaluate.generation import _left_pad
    from alphatune.experiments.methods import DropVirtualTokens
    from alphatune.models import load_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    base = load_model(str(tiny_model_dir)).eval()
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    model = DropVirtualTokens(get_peft_model(base, config), 4).eval()
    prompts = [[5, 9, 13, 2, 7], [11, 3]]
    steps = 5
    with torch.no_grad():
        expected = []
        for ids in prompts:
            sequence = list(ids)
            for _ in range(steps):
                logits = model(input_ids=torch.tensor([sequence])).logits
                sequence.append(int(logits[0, -1].argmax()))
            expected.append(sequence[len(ids) :])
        input_ids, mask = _left_pad(prompts, pad_id=0)
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=steps,
                                min_new_tokens=steps, do_sample=False, num_beams=1,
                                pad_token_id=0)  # fmt: skip
    assert output[:, : input_ids.shape[1]].tolist() == input_ids.tolist()
    assert output[:, input_ids.shape[1] :].tolist() == expected


def test_task_pairs_leave_out_the_held_out_categories(tmp_path, monkeypatch) -> None:
    """The ``wikitext+tasks`` base's pairs: E2E's and WebNLG's training pairs, never a pair of
    the held-out categories (their dev items must stay unseen by every base)."""
    from alphatune.experiments import methods

    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "train.csv").write_text(
        'mr,ref\n"name[A], food[B]",A serves B.\n"name[C], food[D]",C serves D.\n',
        encoding="utf-8",
    )
    webnlg = [
        {"category": "Airport", "triples": [["X_Airport", "city", "Y"]], "refs": ["X serves Y."]},
        {"category": "Astronaut", "triples": [["Z", "mission", "W"]], "refs": ["Z flew W."]},
    ]
    (tmp_path / "webnlg").mkdir()
    (tmp_path / "webnlg" / "train.jsonl").write_text(
        "\n".join(json.dumps(r) for r in webnlg) + "\n", encoding="utf-8"
    )
    monkeypatch.setenv("ALPHATUNE_DATA_DIR", str(tmp_path))
    assert "Astronaut" in tasks.HELD_OUT_CATEGORIES
    e2e, triples = methods.task_pairs()
    assert [p.target for p in e2e] == [" A serves B.", " C serves D."]
    assert [p.target for p in triples] == [" X serves Y."]
    with pytest.raises(ConfigError, match="calibration must be one of"):
        methods.cached_base("model", 3, "calibrated", calibration="books")
