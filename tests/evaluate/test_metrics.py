from __future__ import annotations

import pytest
import sacrebleu

from alphatune.evaluate import corpus_bleu


def test_exact_match_is_100() -> None:
    hyps = ["the cat sat on the mat", "a dog ran in the park today"]
    assert corpus_bleu(hyps, [(hyps[0],), ("something else entirely", hyps[1])]) == pytest.approx(
        100.0
    )


def test_variable_reference_counts_match_sacrebleu() -> None:
    hyps = ["the cat is on the mat", "there is a dog in the big park"]
    refs = [
        ("the cat sat on the mat", "a cat is on the mat"),
        ("a dog is in the park",),
    ]
    expected = sacrebleu.corpus_bleu(
        hyps,
        [[refs[0][0], refs[1][0]], [refs[0][1], None]],  # type: ignore[list-item]
    ).score
    score = corpus_bleu(hyps, refs)
    assert score == pytest.approx(expected)
    assert 0.0 < score < 100.0


def test_more_references_never_lower() -> None:
    hyps = ["the cat is on the mat"]
    one = corpus_bleu(hyps, [("the cat sat on the mat",)])
    two = corpus_bleu(hyps, [("the cat sat on the mat", "the cat is on a mat")])
    assert two >= one


def test_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference sets"):
        corpus_bleu(["a", "b"], [("a",)])


def test_bad_references() -> None:
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        corpus_bleu(["a", "b"], [("a",), ()])
    with pytest.raises(TypeError, match="wrap it as a tuple"):
        corpus_bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_bleu([], [])
