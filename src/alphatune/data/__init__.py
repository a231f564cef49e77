"""Task data: finding the files, loading them into examples, tokenizing them and batching them."""

from alphatune.data.calibration_pairs import DEFAULT_PAIR_SHARE, mixed_calibration, pairs_batch
from alphatune.data.e2e import e2e_prompt, load_e2e_eval, load_e2e_train
from alphatune.data.examples import EvalItem, Example, seeded_sample
from alphatune.data.locate import DATA_ENV, calibration_batch, default_file, find_data_dir
from alphatune.data.text import load_text_tokens
from alphatune.data.tokenize import (
    IGNORE_INDEX,
    TASKS,
    collate,
    encode_example,
    encode_prompt,
    load_task,
    start_ids,
)
from alphatune.data.triples import (
    load_triples_eval,
    load_triples_train,
    triple_entities,
    triples_prompt,
)

__all__ = [
    "DATA_ENV",
    "DEFAULT_PAIR_SHARE",
    "IGNORE_INDEX",
    "TASKS",
    "EvalItem",
    "Example",
    "calibration_batch",
    "collate",
    "default_file",
    "e2e_prompt",
    "encode_example",
    "encode_prompt",
    "find_data_dir",
    "load_e2e_eval",
    "load_e2e_train",
    "load_task",
    "load_text_tokens",
    "load_triples_eval",
    "load_triples_train",
    "mixed_calibration",
    "pairs_batch",
    "seeded_sample",
    "start_ids",
    "triple_entities",
    "triples_prompt",
]
