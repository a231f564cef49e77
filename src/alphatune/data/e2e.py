"""The E2E NLG challenge (Novikova et al., 2017): restaurant meaning representations to text.

The files are CSVs with a header and the columns ``mr`` (meaning representation) and ``ref`` (one
human reference); an MR repeats over several rows, one per reference.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from alphatune.data.examples import EvalItem, Example, check_limit
from alphatune.errors import DataError

logger = logging.getLogger(__name__)

E2E_COLUMNS = ("mr", "ref")
_EXPECTED = "E2E files are train.csv / dev.csv / test.csv, CSV with the header columns mr,ref"


def e2e_prompt(mr: str) -> str:
    """The prompt the model sees for one meaning representation.

    >>> e2e_prompt("name[The Vaults], eatType[pub]")
    'Table: name[The Vaults], eatType[pub]\\nText:'
    """
    return f"Table: {mr}\nText:"


def _read_rows(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """Yield stripped ``(mr, ref)`` per data row, in file order, checking header and rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"E2E file not found: {path}; {_EXPECTED}")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            yield from _checked_rows(path, reader)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason}); {_EXPECTED}") from err
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err


def _checked_rows(path: Path, reader: csv.DictReader[str]) -> Iterator[tuple[str, str]]:
    """The body of :func:`_read_rows`: header check, then one ``(mr, ref)`` per row."""
    header = reader.fieldnames
    if header is None:
        raise DataError(f"{path}: file is empty; {_EXPECTED}")
    missing = [column for column in E2E_COLUMNS if column not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found header {list(header)}; "
            f"{_EXPECTED}"
        )
    rows = 0
    for row in reader:
        # DictReader fills a short row with None; a blank field is just as unusable.
        mr, ref = (row["mr"] or "").strip(), (row["ref"] or "").strip()
        if not mr or not ref:
            raise DataError(
                f"{path}:{reader.line_num}: empty or missing 'mr' or 'ref' field; "
                "every row needs both"
            )
        rows += 1
        yield mr, ref
    if rows == 0:
        raise DataError(f"{path}: has a header but no data rows; {_EXPECTED}")


def load_e2e_train(path: str | os.PathLike[str], limit: int | None = None) -> list[Example]:
    """One training example per CSV row, in file order.

    Args:
        path: an E2E CSV (``train.csv``, ``dev.csv`` or ``test.csv``).
        limit: keep only the first ``limit`` rows; ``None`` keeps all.

    Returns:
        ``Example(prompt=e2e_prompt(mr), target=" " + ref)`` per row.
    """
    check_limit(limit)
    examples: list[Example] = []
    for mr, ref in _read_rows(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(Example(prompt=e2e_prompt(mr), target=" " + ref))
    logger.debug("loaded %d E2E training examples from %s", len(examples), path)
    return examples


def load_e2e_eval(path: str | os.PathLike[str], limit: int | None = None) -> list[EvalItem]:
    """One evaluation item per distinct MR with all its references, in first-appearance order.

    Args:
        path: an E2E CSV (usually ``dev.csv`` or ``test.csv``).
        limit: keep only the first ``limit`` distinct MRs; ``None`` keeps all. The whole file is
            still read, so each kept MR has all of its references.

    Returns:
        ``EvalItem(prompt=e2e_prompt(mr), references=(ref, ...))`` per MR; references are in
        file order and have no leading space.
    """
    check_limit(limit)
    grouped: dict[str, list[str]] = {}
    for mr, ref in _read_rows(path):
        refs = grouped.get(mr)
        if refs is None:
            if limit is not None and len(grouped) >= limit:
                continue
            grouped[mr] = refs = []
        refs.append(ref)
    items = [
        EvalItem(prompt=e2e_prompt(mr), references=tuple(refs)) for mr, refs in grouped.items()
    ]
    logger.debug("loaded %d E2E evaluation items from %s", len(items), path)
    return items
