from __future__ import annotations

import json
from pathlib import Path

import pytest

from alphatune.data import (
    EvalItem,
    Example,
    load_triples_eval,
    load_triples_train,
    triple_entities,
    triples_prompt,
)
from alphatune.errors import DataError

ENTRIES = [
    {
        "triples": [["Aarhus_Airport", "cityServed", '"Aarhus, Denmark"']],
        "refs": ["Aarhus Airport serves Aarhus.", "It serves Aarhus, Denmark.", "bad one"],
        "ref_comments": ["good", "good", "toFix"],
    },
    {
        "triples": [["A_B", "p", "C"], ["C", "q_r", "D"]],
        "refs": ["A B p C, which q r D."],
    },
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [json.dumps(entry) for entry in ENTRIES])


def test_prompt_format() -> None:
    prompt = triples_prompt([["A_B", "p", '"C, D"'], ["E", "has_part", "F"]])
    assert prompt == "Triples: A B | p | C, D ; E | has part | F\nText:"


def test_train_uses_only_good_refs(small_jsonl: Path) -> None:
    first, second = triples_prompt(ENTRIES[0]["triples"]), triples_prompt(ENTRIES[1]["triples"])
    assert load_triples_train(small_jsonl) == [
        Example(first, " Aarhus Airport serves Aarhus."),
        Example(first, " It serves Aarhus, Denmark."),
        Example(second, " A B p C, which q r D."),  # no ref_comments: every ref is used
    ]
    assert len(load_triples_train(small_jsonl, limit=1)) == 1


def test_eval_keeps_all_refs(small_jsonl: Path) -> None:
    items = load_triples_eval(small_jsonl)
    assert items[0] == EvalItem(
        triples_prompt(ENTRIES[0]["triples"]),
        tuple(ENTRIES[0]["refs"]),
        entities=("Aarhus Airport", "Aarhus, Denmark"),
    )
    assert items[1].entities == ("A B", "C", "D")  # each once, as the prompt spells them
    assert len(items) == 2
    assert load_triples_eval(small_jsonl, limit=1) == items[:1]


def test_entities_are_subjects_and_objects_never_properties() -> None:
    triples = [["X", "capital", "Y"], ["Y", "leader", '"X"'], ["Z", "p", '""']]
    assert triple_entities(triples) == ("X", "Y", "Z")  # an empty object is no entity


def test_blank_lines_skipped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", ["", json.dumps(ENTRIES[1]), "  "])
    assert len(load_triples_eval(path)) == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*missing.jsonl"):
        load_triples_train(tmp_path / "missing.jsonl")


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ENTRIES[0]), "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_triples_train(path)


@pytest.mark.parametrize("field", ["triples", "refs"])
def test_missing_field_names_file_line_and_field(tmp_path: Path, field: str) -> None:
    entry = {key: value for key, value in ENTRIES[1].items() if key != field}
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(ENTRIES[1]), json.dumps(entry)])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: missing field '{field}'"):
        load_triples_eval(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"triples": [["a", "b"]], "refs": ["x"]}, "3 strings"),
        ({"triples": [], "refs": ["x"]}, "non-empty"),
        ({"triples": [["a", "b", "c"]], "refs": "x"}, "list of strings"),
        ({"triples": [["a", "b", "c"]], "refs": ["x"], "ref_comments": []}, "parallel"),
        ({"triples": [["a", "b", "c"]], "refs": []}, "no non-blank reference"),
        (["not", "an", "object"], "JSON object"),
    ],
    ids=["short-triple", "no-triples", "refs-string", "comments-length", "no-refs", "array"],
)
def test_malformed_entries(tmp_path: Path, entry: object, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(entry)])
    with pytest.raises(DataError, match=rf"bad.jsonl:1: .*{message}"):
        load_triples_eval(path)


def test_empty_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        load_triples_train(path)


def test_real_files(shared_data: Path) -> None:
    folder = shared_data / "webnlg"
    dev_train = load_triples_train(folder / "dev.jsonl")
    assert len(dev_train) == 2258  # refs marked "good", per the data README
    dev = load_triples_eval(folder / "dev.jsonl")
    assert len(dev) == 872 and sum(len(item.references) for item in dev) == 2268
    train = load_triples_train(folder / "train.jsonl", limit=3)
    assert train[0].prompt == "Triples: Aarhus Airport | cityServed | Aarhus, Denmark\nText:"
    assert "_" not in train[0].prompt


def test_categories_keep_only_the_lines_they_accept(tmp_path: Path) -> None:
    """``categories`` filters lines by their ``category`` field (``None`` where it has none), in
    both loaders; a file whose lines all fail it loads as empty, not as an empty file."""
    entries = [{**ENTRIES[0], "category": "Airport"}, ENTRIES[1]]  # the second: no category
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps(entry) for entry in entries])
    airport = triples_prompt(ENTRIES[0]["triples"])
    assert {e.prompt for e in load_triples_train(path, categories=lambda c: c == "Airport")} == {
        airport
    }
    seen: list[str | None] = []
    items = load_triples_eval(path, categories=lambda c: seen.append(c) or c != "Airport")
    assert seen == ["Airport", None] and [item.prompt for item in items] == [
        triples_prompt(ENTRIES[1]["triples"])
    ]
    assert load_triples_eval(path, categories=lambda c: False) == []
