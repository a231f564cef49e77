"""The E2E NLG challenge (Novikova et al., 2017): restaurant meaning representations to text.

The files are CSVs with a header and the columns ``mr`` (meaning representation) and ``ref`` (one
human reference); an MR repeats over several rows, one per reference.

The CSV is read strictly: a stray or unclosed quote is an error naming the line where the record
starts, never rows silently merged into one field. (A quoted reference may span lines: two in the
official training set do; an MR never does.)
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from alphatune.data.examples import EvalItem, Example, check_limit
from alphatune.data.text import utf8_error
from alphatune.errors import DataError

logger = logging.getLogger(__name__)

E2E_COLUMNS = ("mr", "ref")
_EXPECTED = "E2E files are train.csv / dev.csv / test.csv, CSV with the header columns mr,ref"
# A line break followed by something like "name[...]" inside a field: rows merged by a quote.
_MERGED_ROW = re.compile(r"\n[^\n]*\w\[[^\]\n]*\]")


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
        # strict: a quote in the wrong place is an error, not text glued to the next rows.
        reader = csv.DictReader(handle, strict=True)
        start = [1]  # line where the record being read starts (a quoted field may span lines)
        try:
            yield from _checked_rows(path, reader, start)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({utf8_error(path)}); {_EXPECTED}") from err
        except csv.Error as err:
            raise DataError(
                f"{path}:{start[0]}: malformed CSV in the record starting on this line ({err}); "
                "an unclosed or stray quote?"
            ) from err


def _checked_rows(
    path: Path, reader: csv.DictReader[str], start: list[int]
) -> Iterator[tuple[str, str]]:
    """The body of :func:`_read_rows`: header check, then one ``(mr, ref)`` per row.

    ``start[0]`` follows the line where each record starts, for error messages.
    """
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
    start[0] = reader.line_num + 1
    for row in reader:
        line, start[0] = start[0], reader.line_num + 1
        # DictReader fills a short row with None; a blank field is just as unusable.
        mr, ref = (row["mr"] or "").strip(), (row["ref"] or "").strip()
        if not mr or not ref:
            raise DataError(
                f"{path}:{line}: empty or missing 'mr' or 'ref' field; every row needs both"
            )
        if "\n" in mr or _MERGED_ROW.search(ref):
            raise DataError(
                f"{path}:{line}: a field runs over several lines and holds what looks like "
                "further rows; an unclosed quote? (an MR is one line)"
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
