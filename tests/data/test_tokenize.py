from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from alphatune.data import (
    IGNORE_INDEX,
    EvalItem,
    Example,
    calibration_batch,
    collate,
    encode_example,
    encode_prompt,
    load_task,
    load_text_tokens,
)
from alphatune.data.tokenize import start_ids
from alphatune.errors import DataError
from alphatune.models import load_tokenizer

EXAMPLE = Example("Table: name[The Vaults], eatType[pub]\nText:", " The Vaults is a pub.")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer()


def test_prompt_and_target_tokenized_separately(tokenizer: Any) -> None:
    encoded = encode_example(tokenizer, EXAMPLE, max_length=128)
    prompt_ids = encode_prompt(tokenizer, EXAMPLE.prompt)
    target_ids = tokenizer(EXAMPLE.target, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [
        tokenizer.eos_token_id
    ]
    assert tokenizer.decode(encoded["input_ids"]) == EXAMPLE.prompt + EXAMPLE.target + "<|im_end|>"


def test_truncation_drops_prompt_from_the_left(tokenizer: Any) -> None:
    full = encode_example(tokenizer, EXAMPLE, max_length=128)
    n_target = sum(label != IGNORE_INDEX for label in full["labels"])
    short = encode_example(tokenizer, EXAMPLE, max_length=n_target + 2)
    assert short["input_ids"] == full["input_ids"][-(n_target + 2) :]
    assert short["labels"] == full["labels"][-(n_target + 2) :]
    assert short["labels"][:2] == [IGNORE_INDEX] * 2


def test_target_longer_than_max_length_keeps_one_prompt_token(tokenizer: Any) -> None:
    encoded = encode_example(tokenizer, EXAMPLE, max_length=3)
    assert len(encoded["input_ids"]) == 3
    assert encoded["labels"][0] == IGNORE_INDEX and IGNORE_INDEX not in encoded["labels"][1:]
    with pytest.raises(ValueError, match="max_length"):
        encode_example(tokenizer, EXAMPLE, max_length=1)


@pytest.fixture(scope="module")
def bos_tokenizer() -> Any:
    """A word-level tokenizer that starts every text with <bos>, as Gemma's does (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "c", "d", "e", "f"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def test_no_bos_where_the_tokenizer_adds_none(tokenizer: Any) -> None:
    assert start_ids(tokenizer) == []  # SmolLM2
    assert encode_prompt(tokenizer, "Hello") == tokenizer("Hello")["input_ids"]


def test_the_prompt_starts_with_the_bos_the_tokenizer_adds(bos_tokenizer: Any) -> None:
    assert start_ids(bos_tokenizer) == [2]
    assert encode_prompt(bos_tokenizer, "a b c") == [2, 4, 5, 6]
    encoded = encode_example(bos_tokenizer, Example("a b c", "d e"), max_length=128)
    assert encoded["input_ids"] == [2, 4, 5, 6, 7, 8, 1]
    assert encoded["labels"] == [IGNORE_INDEX] * 4 + [7, 8, 1]


def test_truncation_keeps_the_bos(bos_tokenizer: Any) -> None:
    example = Example("a b c", "d e f")
    short = encode_example(bos_tokenizer, example, max_length=6)  # the prompt loses "a b"
    assert short["input_ids"] == [2, 6, 7, 8, 9, 1]
    assert short["labels"] == [IGNORE_INDEX] * 2 + [7, 8, 9, 1]
    tight = encode_example(bos_tokenizer, example, max_length=3)  # BOS, one prompt token, one
    assert tight["input_ids"] == [2, 6, 7] and tight["labels"] == [IGNORE_INDEX] * 2 + [7]
    with pytest.raises(ValueError, match="max_length must be >= 3"):
        encode_example(bos_tokenizer, example, max_length=2)


def test_calibration_rows_start_as_the_model_sees_text(
    tokenizer: Any, bos_tokenizer: Any, tmp_path: Path
) -> None:
    path = tmp_path / "text.txt"
    path.write_text("a b c d e f " * 4, encoding="utf-8")
    stream = load_text_tokens(bos_tokenizer, path)
    rows = calibration_batch(bos_tokenizer, path, sequences=2, length=4)  # BOS + 3 tokens each
    assert torch.equal(rows[:, 0], torch.tensor([2, 2]))
    assert torch.equal(rows[:, 1:].reshape(-1), stream[:6])
    plain = calibration_batch(tokenizer, path, sequences=2, length=4)  # SmolLM2: no BOS
    assert torch.equal(plain.reshape(-1), load_text_tokens(tokenizer, path)[:8])
    with pytest.raises(DataError, match="only"):
        calibration_batch(bos_tokenizer, path, sequences=20, length=4)


def test_collate_right_pads() -> None:
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(out["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert all(tensor.dtype == torch.long for tensor in out.values())


def test_collate_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="item 0"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)


def test_load_task_dispatch(tmp_path: Path) -> None:
    path = tmp_path / "dev.csv"
    path.write_text("mr,ref\nname[A],A.\nname[A],A again.\n", encoding="utf-8")
    train = load_task("e2e", path, "train")
    assert len(train) == 2 and isinstance(train[0], Example)
    evaluation = load_task("e2e", path, "eval", limit=1)
    assert len(evaluation) == 1 and isinstance(evaluation[0], EvalItem)
    with pytest.raises(ValueError, match="unknown task 'sst2'; known tasks: e2e, triples"):
        load_task("sst2", path, "train")
    with pytest.raises(ValueError, match="split_role"):
        load_task("e2e", path, "test")  # type: ignore[arg-type]


def test_load_text_tokens(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "wiki.txt"
    text = " = Title = \n\n Some text , with @-@ tokens .\n"
    path.write_text(text, encoding="utf-8")
    tokens = load_text_tokens(tokenizer, path)
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokenizer.decode(tokens.tolist()) == text
    assert torch.equal(load_text_tokens(tokenizer, path, max_tokens=4), tokens[:4])
    with pytest.raises(DataError, match="not found"):
        load_text_tokens(tokenizer, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_text_tokens(tokenizer, tmp_path / "empty.txt")


def test_real_wikitext(tokenizer: Any, shared_data: Path) -> None:
    tokens = load_text_tokens(tokenizer, shared_data / "wikitext-2" / "valid.txt", max_tokens=100)
    assert tokens.shape == (100,)
