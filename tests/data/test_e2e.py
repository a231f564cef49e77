from __future__ import annotations

from pathlib import Path

import pytest

from alphatune.data import EvalItem, Example, e2e_prompt, load_e2e_eval, load_e2e_train
from alphatune.errors import DataError

CSV = (
    "mr,ref\r\n"
    '"name[A], food[Thai]",A serves Thai food.\r\n'
    '"name[B], eatType[pub]","B, a pub."\r\n'
    '"name[A], food[Thai]",  Thai food at A.  \r\n'
)


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    path = tmp_path / "dev.csv"
    path.write_bytes(CSV.encode("utf-8"))
    return path


def test_prompt_format() -> None:
    assert e2e_prompt("name[A]") == "Table: name[A]\nText:"


def test_train_one_example_per_row_in_order(small_csv: Path) -> None:
    examples = load_e2e_train(small_csv)
    assert examples == [
        Example(e2e_prompt("name[A], food[Thai]"), " A serves Thai food."),
        Example(e2e_prompt("name[B], eatType[pub]"), " B, a pub."),
        Example(e2e_prompt("name[A], food[Thai]"), " Thai food at A."),
    ]
    assert load_e2e_train(small_csv, limit=2) == examples[:2]
    assert load_e2e_train(small_csv, limit=0) == []


def test_eval_groups_by_mr_in_first_appearance_order(small_csv: Path) -> None:
    items = load_e2e_eval(small_csv)
    assert items == [
        EvalItem(e2e_prompt("name[A], food[Thai]"), ("A serves Thai food.", "Thai food at A.")),
        EvalItem(e2e_prompt("name[B], eatType[pub]"), ("B, a pub.",)),
    ]
    # The limit counts MRs, and a kept MR still gets references from later rows.
    assert load_e2e_eval(small_csv, limit=1) == items[:1]


def test_negative_limit_rejected(small_csv: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        load_e2e_train(small_csv, limit=-1)


def test_missing_file_names_path_and_expected_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="nope.csv") as info:
        load_e2e_train(missing)
    assert "train.csv" in str(info.value) and "mr,ref" in str(info.value)


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("mr,text\nname[A],hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv.*missing column\(s\) ref"):
        load_e2e_eval(path)


@pytest.mark.parametrize("content", ["", "mr,ref\n"], ids=["no-header", "header-only"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty.csv"):
        load_e2e_train(path)


def test_blank_field_names_line(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text('mr,ref\nname[A],ok\n"name[B]",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"blank.csv:3"):
        load_e2e_train(path)


def test_real_files(shared_data: Path) -> None:
    folder = shared_data / "e2e"
    train = load_e2e_train(folder / "train.csv", limit=5)
    assert len(train) == 5
    assert train[0].prompt.startswith("Table: name[The Vaults]")
    assert train[0].target.startswith(" The Vaults")
    dev = load_e2e_eval(folder / "dev.csv")
    assert len(dev) == 547  # distinct MRs, per the data README
    assert sum(len(item.references) for item in dev) == 4672
    test = load_e2e_eval(folder / "test.csv")  # LF line ends, unlike train/dev
    assert len(test) == 630
