"""The comparison's tasks: their training pairs, their evaluation items, and how they are scored.

- ``e2e``: E2E NLG (restaurant meaning representations to text); BLEU, NIST, METEOR, ROUGE-L and
  CIDEr against all references of each MR, BLEU with a bootstrap 95% interval.
- ``webnlg``: WebNLG 2017 (DBpedia triples to text); BLEU (sacrebleu, cased, 13a) on all, seen
  and unseen test categories (the ``seen`` field), each with its interval, and the percent of
  the triples' entities the outputs leave out (``missing_entities``).
- ``webnlg-heldout``: WebNLG trained without four categories and scored on their dev items
  (``WebNLGHeldOut``): a dev-only task for choosing recipes on unseen categories.
- ``sst2``: SST-2 sentiment as the classification task: the model reads the sentence and the label
  with the higher likelihood (" positive" / " negative") is its answer; accuracy with its interval.
  GLUE's test labels are not public, so the reported (``test``) split is GLUE's dev set and the
  learning-rate search (``dev``) uses the last 1,000 training rows, held out from training.

Evaluation items are the whole split or, with a limit, a seeded random sample of it (the same
sample for every method and seed).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alphatune.data import (
    EvalItem,
    Example,
    collate,
    encode_example,
    find_data_dir,
    load_e2e_eval,
    load_e2e_train,
    load_triples_eval,
    load_triples_train,
    seeded_sample,
)
from alphatune.errors import ConfigError, DataError
from alphatune.evaluate.metrics import (
    bleu_length_ratio,
    bootstrap_interval,
    corpus_bleu,
    e2e_bleu,
    e2e_metrics,
    missing_entities,
    paired_bootstrap_difference,
)
from alphatune.models import model_device

logger = logging.getLogger(__name__)

SAMPLE_SEED = 20221007  # the evaluation sample: one fixed draw for every run
BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class EvalSet:
    """Evaluation items with, per item, the subsets it belongs to (e.g. ``seen``)."""

    items: list[EvalItem]
    subsets: dict[str, list[int]]  # subset name -> indices into items ("all" is implicit)


def _sample(n: int, limit: int | None) -> list[int]:
    """Indices of the evaluated items: all, or a seeded sample of ``limit`` in file order."""
    return seeded_sample(range(n), limit, SAMPLE_SEED)


def _file(relative: str) -> Path:
    path = find_data_dir() / relative
    if not path.is_file():
        raise DataError(f"data file {path} not found; the comparison reads ../shared/data")
    return path


class Task:
    """A task of the comparison: its data and its scoring."""

    name: str = ""
    generates: bool = True
    splits: tuple[str, ...] = ("dev", "test")  # the eval_set splits it has
    description: str = ""  # what the report says of a task that is not a plain benchmark

    def check_split(self, split: str) -> None:
        """Raise ``ConfigError`` unless the task has ``split`` (before any training is spent)."""
        if split not in self.splits:
            raise ConfigError(
                f"task {self.name!r} has no {split!r} split (it has {', '.join(self.splits)})"
                + (f": {self.description}" if self.description else "")
            )

    def train_examples(self) -> list[Example]:
        raise NotImplementedError

    def eval_set(self, split: str, limit: int | None) -> EvalSet:
        raise NotImplementedError

    def score(self, predictions: Sequence[str], eval_set: EvalSet) -> dict[str, Any]:
        """Scores of the predictions (one per item), each with its interval where one applies."""
        raise NotImplementedError

    def paired_difference(
        self, predictions: Sequence[str], baseline: Sequence[str], eval_set: EvalSet
    ) -> tuple[float, float, float]:
        """The bootstrap 95% interval of main score(predictions) - main score(baseline) on the
        same items, and the share of resamples ``predictions`` wins (``metrics
        .paired_bootstrap_difference``)."""
        references = [item.references for item in eval_set.items]
        return paired_bootstrap_difference(
            list(predictions), list(baseline), references, metric=self.main_metric,
            samples=BOOTSTRAP_SAMPLES, seed=0,
        )  # fmt: skip

    # The main score as ``metrics.Metric`` (hypotheses, references) -> float.
    main_metric = staticmethod(corpus_bleu)


def _text_scores(predictions: Sequence[str], items: Sequence[EvalItem]) -> dict[str, Any]:
    """BLEU (sacrebleu, cased), its bootstrap 95% interval over items (1,000 resamples) and the
    length ratio its brevity penalty reads; where every item names its input's entities, the
    percent of them the outputs leave out, with its interval."""
    predictions = list(predictions)
    references = [item.references for item in items]
    low, high = bootstrap_interval(predictions, references, samples=BOOTSTRAP_SAMPLES, seed=0)
    scores = {
        "bleu": corpus_bleu(predictions, references),
        "bleu_ci": [low, high],
        "length_ratio": bleu_length_ratio(predictions, references),
        "n": len(items),
    }
    entities = [item.entities for item in items]
    if all(entities):
        low, high = bootstrap_interval(
            predictions, entities, metric=missing_entities, samples=BOOTSTRAP_SAMPLES, seed=0
        )
        scores.update(
            entities_missing=missing_entities(predictions, entities),
            entities_missing_ci=[low, high],
        )
    return scores


class E2E(Task):
    name = "e2e"
    main_metric = staticmethod(e2e_bleu)  # the official script's lowercased BLEU

    def train_examples(self) -> list[Example]:
        return load_e2e_train(_file("e2e/train.csv"))

    def eval_set(self, split: str, limit: int | None) -> EvalSet:
        items = load_e2e_eval(_file(f"e2e/{split}.csv"))
        return EvalSet([items[i] for i in _sample(len(items), limit)], {})

    def score(self, predictions: Sequence[str], eval_set: EvalSet) -> dict[str, Any]:
        """The official E2E metrics (``e2e_metrics``: lowercased BLEU, NIST, METEOR, ROUGE-L,
        CIDEr-D) and the interval of that BLEU."""
        references = [item.references for item in eval_set.items]
        scores: dict[str, Any] = {
            k.lower(): v for k, v in e2e_metrics(predictions, references).items()
        }
        low, high = bootstrap_interval(
            list(predictions), references, metric=e2e_bleu, samples=BOOTSTRAP_SAMPLES, seed=0
        )
        scores.update(
            bleu_ci=[low, high],
            length_ratio=bleu_length_ratio(predictions, references, lowercase=True),
            n=len(eval_set.items),
        )
        return scores


class WebNLG(Task):
    name = "webnlg"

    def train_examples(self) -> list[Example]:
        return load_triples_train(_file("webnlg/train.jsonl"))

    def eval_set(self, split: str, limit: int | None) -> EvalSet:
        path = _file(f"webnlg/{split}.jsonl")
        items = load_triples_eval(path)
        # The same non-blank lines load_triples_eval read, in the same order.
        records = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        if len(records) != len(items):
            raise DataError(f"{path}: {len(records)} records but {len(items)} items were loaded")
        kept = _sample(len(items), limit)
        subsets: dict[str, list[int]] = {}
        if all("seen" in records[i] for i in kept):
            subsets["seen"] = [j for j, i in enumerate(kept) if records[i]["seen"]]
            subsets["unseen"] = [j for j, i in enumerate(kept) if not records[i]["seen"]]
        return EvalSet([items[i] for i in kept], subsets)

    def score(self, predictions: Sequence[str], eval_set: EvalSet) -> dict[str, Any]:
        scores = _text_scores(predictions, eval_set.items)
        for name, indices in eval_set.subsets.items():
            if indices:
                part = _text_scores(
                    [predictions[i] for i in indices], [eval_set.items[i] for i in indices]
                )
                scores.update({f"{name}_{k}": v for k, v in part.items()})
        return scores


# WebNLG's dev set holds only categories seen in training, so it cannot show what test's unseen
# half shows. ``webnlg-heldout`` trains without these four mid-sized training categories (person,
# institution, fiction, place: 1,488 of 6,940 training lines, 4,119 of 18,025 references) and
# scores on their 187 dev items: unseen categories, on dev. (13 of those items' 209 entities also
# occur in the kept categories' training, as generic facts like a country's leader do.)
HELD_OUT_CATEGORIES = ("Astronaut", "ComicsCharacter", "Monument", "University")


class WebNLGHeldOut(WebNLG):
    """WebNLG with four training categories held out: its dev split is those categories' dev
    items, categories the training never showed. Only dev: it chooses recipes, test stays
    WebNLG's own."""

    name = "webnlg-heldout"
    splits = ("dev",)
    description = (
        "WebNLG trained without the categories "
        + ", ".join(HELD_OUT_CATEGORIES)
        + " and scored on their dev items: unseen categories on dev, where a recipe can be "
        "chosen without looking at test (test runs belong to task 'webnlg')"
    )

    def train_examples(self) -> list[Example]:
        path = _file("webnlg/train.jsonl")
        removed: set[str] = set()

        def kept(category: str | None) -> bool:
            if category is None:
                raise DataError(
                    f"{path}: a line without a 'category' field; task {self.name!r} holds "
                    "categories out of training and must know every line's"
                )
            if category in HELD_OUT_CATEGORIES:
                removed.add(category)
                return False
            return True

        examples = load_triples_train(path, categories=kept)
        missing = set(HELD_OUT_CATEGORIES) - removed
        if missing:  # a renamed category would otherwise stay in training unnoticed
            raise DataError(
                f"{path}: no training line of the held-out categories {sorted(missing)}"
            )
        return examples

    def eval_set(self, split: str, limit: int | None) -> EvalSet:
        self.check_split(split)
        path = _file("webnlg/dev.jsonl")
        items = load_triples_eval(path, categories=lambda c: c in HELD_OUT_CATEGORIES)
        if not items:
            raise DataError(f"{path}: no dev item of the held-out categories {HELD_OUT_CATEGORIES}")
        return EvalSet([items[i] for i in _sample(len(items), limit)], {})


SST2_LABELS = (" negative", " positive")  # label 0, label 1


def sst2_prompt(sentence: str) -> str:
    return f"Review: {sentence.strip()}\nSentiment:"


def _read_sst2(path: Path) -> list[tuple[str, int]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None or {"sentence", "label"} - set(reader.fieldnames):
            raise DataError(f"{path}: expected a TSV with the header 'sentence<TAB>label'")
        for row in reader:
            label = (row["label"] or "").strip()
            if label not in ("0", "1") or not (row["sentence"] or "").strip():
                raise DataError(f"{path}:{reader.line_num}: expected a sentence and label 0 or 1")
            rows.append((row["sentence"], int(label)))
    return rows


SST2_HELD_OUT = 1000  # last training rows, the learning-rate search's dev set


def _sst2_split(rows: list[tuple[str, int]]) -> int:
    """Where the held-out dev rows start: the last 1,000 (a fifth of a smaller file)."""
    return len(rows) - min(SST2_HELD_OUT, len(rows) // 5)


def _accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percent of predictions equal to their item's label (its one reference)."""
    hits = sum(p == refs[0] for p, refs in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


class SST2(Task):
    name = "sst2"
    generates = False

    def train_examples(self) -> list[Example]:
        rows = _read_sst2(_file("sst2/train.tsv"))
        rows = rows[: _sst2_split(rows)]
        return [Example(prompt=sst2_prompt(s), target=SST2_LABELS[label]) for s, label in rows]

    def eval_set(self, split: str, limit: int | None) -> EvalSet:
        if split == "dev":
            rows = _read_sst2(_file("sst2/train.tsv"))
            rows = rows[_sst2_split(rows) :]
        else:  # GLUE's test labels are not public: its dev set is the reported one
            rows = _read_sst2(_file("sst2/dev.tsv"))
        items = [
            EvalItem(prompt=sst2_prompt(s), references=(SST2_LABELS[label].strip(),))
            for s, label in rows
        ]
        return EvalSet([items[i] for i in _sample(len(items), limit)], {})

    main_metric = staticmethod(_accuracy)

    def score(self, predictions: Sequence[str], eval_set: EvalSet) -> dict[str, Any]:
        correct = [
            p == item.references[0] for p, item in zip(predictions, eval_set.items, strict=True)
        ]
        n = len(correct)
        accuracy = 100.0 * sum(correct) / n
        rng = random.Random(0)
        draws = sorted(
            100.0 * sum(correct[rng.randrange(n)] for _ in range(n)) / n
            for _ in range(BOOTSTRAP_SAMPLES)
        )
        low = draws[int(0.025 * BOOTSTRAP_SAMPLES)]
        high = draws[int(0.975 * BOOTSTRAP_SAMPLES) - 1]
        return {"accuracy": accuracy, "accuracy_ci": [low, high], "n": n}


def classify(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 16,
) -> list[str]:
    """The label (stripped) whose tokens the model finds most likely after each prompt.

    Each (prompt, label) pair is scored by the summed log-probability of the label's tokens,
    tokenized as training tokenizes targets.
    """
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    device = model_device(model)
    scores = torch.empty(len(prompts), len(labels))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index, label in enumerate(labels):
                # max_length large enough never to cut; the eos after the label is not scored.
                encoded = [
                    encode_example(tokenizer, Example(prompt=p, target=label), 10_000)
                    for p in prompts
                ]
                for start in range(0, len(encoded), batch_size):
                    batch = collate(encoded[start : start + batch_size], pad_id)
                    logits = model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                    ).logits.float()
                    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
                    targets = batch["labels"][:, 1:]
                    scored = (targets != -100) & (targets != tokenizer.eos_token_id)
                    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
                    scores[start : start + len(encoded[start : start + batch_size]), index] = (
                        picked * scored
                    ).sum(-1)
    finally:
        model.train(was_training)
    return [labels[int(i)].strip() for i in scores.argmax(dim=1)]


TASKS: dict[str, Task] = {task.name: task for task in (E2E(), WebNLG(), WebNLGHeldOut(), SST2())}


def get_task(name: str) -> Task:
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return task
