"""Triples-to-text data in the WebNLG JSONL format (Gardent et al., 2017).

One JSON object per line::

    {"triples": [["Aarhus_Airport", "cityServed", "\\"Aarhus, Denmark\\""]],
     "refs": ["Aarhus Airport serves the city of Aarhus, Denmark."],
     "ref_comments": ["good"]}

``ref_comments`` is optional; when present it runs parallel to ``refs`` and only the refs marked
``"good"`` are used for training, as in the LoRA and Prefix-Tuning pipelines. Evaluation uses
every ref. Other fields (``category``, ``eid``, ``seen``, ...) are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from alphatune.data.examples import EvalItem, Example, check_limit
from alphatune.data.text import utf8_error
from alphatune.errors import DataError

# Decides from a line's ``category`` field (``None`` when it has none) whether to keep the line.
CategoryFilter = Callable[[str | None], bool]

logger = logging.getLogger(__name__)

_EXPECTED = (
    'one JSON object per line with "triples": [[subject, property, object], ...] and '
    '"refs": [text, ...] (optional "ref_comments": ["good" | ..., ...] parallel to refs)'
)


def _clean(part: str) -> str:
    """DBpedia spelling to words (``Abilene,_Texas`` -> ``Abilene, Texas``, ``"25"`` -> ``25``)."""
    return part.replace("_", " ").strip().strip('"').strip()


def triples_prompt(triples: Sequence[Sequence[str]]) -> str:
    """The prompt the model sees for one triple set.

    Each triple becomes ``"subject | property | object"`` (underscores as spaces, surrounding
    double quotes dropped); triples are joined with ``" ; "``.

    >>> triples_prompt([["Aarhus_Airport", "cityServed", '"Aarhus, Denmark"']])
    'Triples: Aarhus Airport | cityServed | Aarhus, Denmark\\nText:'
    """
    joined = " ; ".join(" | ".join(_clean(part) for part in triple) for triple in triples)
    return f"Triples: {joined}\nText:"


def triple_entities(triples: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The subjects and objects of a triple set as the prompt spells them, each once, in order.

    >>> triple_entities([["Aarhus_Airport", "cityServed", '"Aarhus, Denmark"'],
    ...                  ["Aarhus_Airport", "elevationAboveTheSeaLevel", "25.0"]])
    ('Aarhus Airport', 'Aarhus, Denmark', '25.0')
    """
    names = (_clean(name) for subject, _, obj in triples for name in (subject, obj))
    return tuple(dict.fromkeys(name for name in names if name))


def _string_list(record: dict[str, Any], field: str, where: str) -> list[str]:
    """``record[field]`` checked to be a list of strings."""
    if field not in record:
        raise DataError(f"{where}: missing field '{field}'; expected {_EXPECTED}")
    value = record[field]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{where}: field '{field}' must be a list of strings, got {value!r:.80}")
    return value


def _read_entries(
    path: str | os.PathLike[str], categories: CategoryFilter | None = None
) -> Iterator[tuple[list[list[str]], list[str], list[str] | None, str]]:
    """Yield ``(triples, refs, ref_comments or None, "file:line")`` per non-blank line (per line
    whose ``category`` field, ``None`` where it has none, passes ``categories``; a line it drops
    is checked to be a JSON object, not further)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"triples file not found: {path}; expected a JSONL file with {_EXPECTED}")
    entries = 0
    with path.open(encoding="utf-8") as handle:
        lineno = 0
        try:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{where}: not valid JSON ({err.msg}, column {err.colno})"
                    ) from err
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                entries += 1
                if categories is not None and not categories(record.get("category")):
                    continue
                triples = _triples(record, where)
                refs = _string_list(record, "refs", where)
                comments = None
                if "ref_comments" in record:
                    comments = _string_list(record, "ref_comments", where)
                    if len(comments) != len(refs):
                        raise DataError(
                            f"{where}: 'ref_comments' has {len(comments)} entries but 'refs' has "
                            f"{len(refs)}; they must be parallel"
                        )
                yield triples, refs, comments, where
        except UnicodeDecodeError as err:
            # The reader decodes in blocks: lineno can be far from the bad byte; find the byte.
            raise DataError(f"{path}: not UTF-8 text ({utf8_error(path)})") from err
    if entries == 0:
        raise DataError(f"{path}: file is empty; expected {_EXPECTED}")


def _triples(record: dict[str, Any], where: str) -> list[list[str]]:
    """``record["triples"]`` checked to be a non-empty list of ``[subject, property, object]``."""
    if "triples" not in record:
        raise DataError(f"{where}: missing field 'triples'; expected {_EXPECTED}")
    triples = record["triples"]
    if not isinstance(triples, list) or not triples:
        raise DataError(f"{where}: field 'triples' must be a non-empty list, got {triples!r:.80}")
    for triple in triples:
        if (
            not isinstance(triple, list)
            or len(triple) != 3
            or not all(isinstance(part, str) for part in triple)
        ):
            raise DataError(
                f"{where}: each triple must be [subject, property, object] (3 strings), "
                f"got {triple!r:.80}"
            )
    return triples


def load_triples_train(
    path: str | os.PathLike[str],
    limit: int | None = None,
    categories: CategoryFilter | None = None,
) -> list[Example]:
    """One training example per usable reference, in file order.

    A reference is usable when it is non-blank and, if the line has ``ref_comments``, marked
    ``"good"``.

    Args:
        path: a JSONL file (e.g. ``webnlg/train.jsonl``).
        limit: keep only the first ``limit`` examples (not lines); ``None`` keeps all.
        categories: keep only the lines whose ``category`` it accepts (``None``: all lines).

    Returns:
        ``Example(prompt=triples_prompt(triples), target=" " + ref)`` per usable reference.
    """
    check_limit(limit)
    examples: list[Example] = []
    skipped = 0
    for triples, refs, comments, _ in _read_entries(path, categories):
        if limit is not None and len(examples) >= limit:
            break
        prompt = triples_prompt(triples)
        for index, ref in enumerate(refs):
            if (comments is not None and comments[index] != "good") or not ref.strip():
                skipped += 1
                continue
            if limit is not None and len(examples) >= limit:
                break
            examples.append(Example(prompt=prompt, target=" " + ref.strip()))
    logger.debug(
        "loaded %d training examples from %s (%d refs not marked good or blank skipped)",
        len(examples),
        path,
        skipped,
    )
    return examples


def load_triples_eval(
    path: str | os.PathLike[str],
    limit: int | None = None,
    categories: CategoryFilter | None = None,
) -> list[EvalItem]:
    """One evaluation item per line (triple set) with all its non-blank references.

    Args:
        path: a JSONL file (e.g. ``webnlg/dev.jsonl`` or ``webnlg/test.jsonl``).
        limit: keep only the first ``limit`` lines; ``None`` keeps all.
        categories: keep only the lines whose ``category`` it accepts (``None``: all lines).

    Returns:
        ``EvalItem(prompt=triples_prompt(triples), references=(ref, ...),
        entities=triple_entities(triples))`` per line, in file order, references in their
        original order whatever their comment.
    """
    check_limit(limit)
    items: list[EvalItem] = []
    for triples, refs, _, where in _read_entries(path, categories):
        if limit is not None and len(items) >= limit:
            break
        references = tuple(ref.strip() for ref in refs if ref.strip())
        if not references:
            raise DataError(f"{where}: 'refs' has no non-blank reference; evaluation needs one")
        items.append(
            EvalItem(triples_prompt(triples), references, entities=triple_entities(triples))
        )
    logger.debug("loaded %d evaluation items from %s", len(items), path)
    return items
