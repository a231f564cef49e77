from __future__ import annotations

import math
import random
import shutil
from collections.abc import Sequence

import pytest
import sacrebleu

from alphatune.errors import ConfigError, DataError
from alphatune.evaluate import (
    MetricUnavailableError,
    bleu_length_ratio,
    bootstrap_interval,
    corpus_bleu,
    e2e_bleu,
    e2e_metrics,
    e2e_nist,
    missing_entities,
    paired_bootstrap_difference,
)

needs_java = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="no `java` on PATH: METEOR, ROUGE_L and CIDEr run pycocoevalcap's jars "
    "(apt-get install default-jre-headless)",
)


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


# --------------------------------------------------------------------------------------------
# BLEU and NIST by hand

CAT = "the cat sat on the mat"
CAT_REF = "the cat sat on a mat"


@pytest.mark.parametrize("metric", [corpus_bleu, e2e_bleu], ids=["corpus_bleu", "e2e_bleu"])
def test_bleu_by_hand(metric) -> None:  # type: ignore[no-untyped-def]
    # Clipped matches: 1-grams 5/6 ("the" twice, once in the reference), 2-grams 3/5
    # (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3; equal lengths, so BP = 1.
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 12 ** (-1/4) = 0.53728.
    assert metric([CAT], [(CAT_REF,)]) == pytest.approx(100 * 12 ** (-1 / 4))


def test_e2e_bleu_lowercases_like_mteval() -> None:
    hyps, refs = ["The Cat sat."], [("the cat sat.",)]
    assert e2e_bleu(hyps, refs) == pytest.approx(100.0)
    assert corpus_bleu(hyps, refs) < 100.0  # sacrebleu's default keeps case


def test_e2e_bleu_variable_reference_counts() -> None:
    hyps = ["The cat is on the mat.", "There is a dog in the big park."]
    refs = [("The cat sat on the mat.", "A cat is on the mat."), ("A dog is in the park.",)]
    expected = sacrebleu.corpus_bleu(
        hyps,
        [[refs[0][0], refs[1][0]], [refs[0][1], None]],  # type: ignore[list-item]
        lowercase=True,
    ).score
    assert e2e_bleu(hyps, refs) == pytest.approx(expected)


def test_nist_by_hand_one_reference() -> None:
    # The reference has 6 words, each once: unigram info log2(6/1); every longer n-gram has
    # info log2(1/1) = 0. Clipped unigram matches 5 of 6 ("the" once), equal lengths:
    # NIST = 5 * log2(6) / 6 = 2.15414.
    assert e2e_nist([CAT], [(CAT_REF,)]) == pytest.approx(5 * math.log2(6) / 6)


def test_nist_by_hand_two_references() -> None:
    # References "the cat sat" and "the dog sat": 6 words; counts the 2, sat 2, cat 1, dog 1.
    # Unigram info: the, sat log2(6/2); cat log2(6). Bigram info: "the cat" log2(2/1) = 1,
    # "cat sat" log2(1/1) = 0; the trigram 0. Mean reference length 6 / 2 = 3 = output length.
    # NIST = (2 log2 3 + log2 6) / 3 + (1 + 0) / 2 = 2.41830.
    score = e2e_nist(["the cat sat"], [("the cat sat", "the dog sat")])
    assert score == pytest.approx((2 * math.log2(3) + math.log2(6)) / 3 + 0.5)


def test_nist_matches_nltk_with_one_reference() -> None:
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    hyps = ["the cat sat on the mat", "a dog ran in the park", "birds fly south in winter"]
    refs = [(CAT_REF,), ("the dog ran in a park",), ("birds fly south in the winter",)]
    expected = nist_score.corpus_nist(
        [[ref.split() for ref in r] for r in refs], [hyp.split() for hyp in hyps], n=5
    )
    assert e2e_nist(hyps, refs) == pytest.approx(expected)


def test_nist_clips_against_all_references_unlike_nltk() -> None:
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    # Four reference words, each once: 2 bits each; both reference bigrams have info 0.
    # mteval matches all four output unigrams across the two references: 4 * 2 / 4 = 2.
    # nltk scores each reference alone and keeps the best, two unigrams: 2 * 2 / 4 = 1.
    # Output length 4 >= mean reference length 2, so no length penalty in either.
    hyps, refs = ["the cat a dog"], [("the cat", "a dog")]
    assert e2e_nist(hyps, refs) == pytest.approx(2.0)
    # n=4: nltk divides by zero when no output has five words (5-grams add 0 here anyway).
    nltk = nist_score.corpus_nist([[ref.split() for ref in refs[0]]], [hyps[0].split()], n=4)
    assert nltk == pytest.approx(1.0)


def test_bleu_length_ratio_by_hand() -> None:
    """Outputs of 4 + 4 tokens against closest references of 2 + 3: 8 / 5."""
    hyps = ["the cat sat down", "a dog ran off"]
    refs = [("the cat sat on the mat", "a b"), ("a dog ran", "x")]
    # Item 1: references of 6 and 2 tokens, both 2 from 4: sacrebleu takes the shorter, 2.
    # Item 2: references of 3 and 1 tokens: 3 is closest to 4.
    assert bleu_length_ratio(hyps, refs) == pytest.approx(8 / 5)
    assert bleu_length_ratio(["The Cat"], [("the cat sat on",)]) == pytest.approx(0.5)
    assert bleu_length_ratio(["The Cat"], [("the cat sat on",)], lowercase=True) == 0.5
    score = sacrebleu.corpus_bleu(["the cat"], [["the cat sat on"]])
    assert score.bp == pytest.approx(
        math.exp(1 - 1 / bleu_length_ratio(["the cat"], [("the cat sat on",)]))
    )


def test_nist_length_penalty() -> None:
    # Half the mean reference length: penalty exp(-beta * log(0.5)^2), beta = -log 0.5 / log^2 1.5.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    full = e2e_nist(["a b c d"], [("a b c d",)])
    half = e2e_nist(["a b"], [("a b c d",)])
    # "a b" matches 2 unigrams of info 2 each and one bigram of info 0: precision 4/2 + 0/1.
    assert half == pytest.approx(2.0 * math.exp(-beta * math.log(0.5) ** 2))
    assert full == pytest.approx(4 * 2.0 / 4)


@pytest.mark.parametrize("metric", [e2e_bleu, e2e_nist, e2e_metrics, bootstrap_interval])
def test_empty_and_mismatched_input(metric) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="empty corpus"):
        metric([], [])
    with pytest.raises(DataError, match="2 hypotheses but 1 reference sets"):
        metric(["a", "b"], [("a",)])
    with pytest.raises(DataError, match=r"references\[0\] is empty"):
        metric(["a"], [()])


def test_missing_java_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr("alphatune.evaluate.metrics.shutil.which", lambda name: None)
    with pytest.raises(MetricUnavailableError, match="no `java` on PATH.*apt-get install"):
        e2e_metrics(["a"], [("a",)], meteor=False)


# --------------------------------------------------------------------------------------------
# METEOR, ROUGE-L, CIDEr (Java)

# Exact matches with disjoint words and >= 4 tokens: every n-gram has document frequency 1 of 2,
# so CIDEr-D's tf-idf vectors are equal and nonzero for n = 1..4: 10 * mean(1, 1, 1, 1) = 10.
EXACT_HYPS = ["The Golden Palace is a coffee shop.", "Near Burger King, try Zizzi!"]
EXACT_REFS = [(EXACT_HYPS[0],), (EXACT_HYPS[1],)]


@pytest.fixture(scope="module")
def exact_scores() -> dict[str, float]:
    """The one METEOR run of the suite: starting the jar loads its paraphrase table (~10-30 s)."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH; apt-get install default-jre-headless")
    pytest.importorskip("pycocoevalcap")
    return e2e_metrics(EXACT_HYPS, EXACT_REFS)


@needs_java
def test_exact_match_scores(exact_scores: dict[str, float]) -> None:
    assert list(exact_scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert exact_scores["BLEU"] == pytest.approx(100.0)
    assert exact_scores["METEOR"] == pytest.approx(100.0, abs=1e-6)
    assert exact_scores["ROUGE_L"] == pytest.approx(100.0)
    assert exact_scores["CIDEr"] == pytest.approx(10.0)
    assert exact_scores["NIST"] == pytest.approx(e2e_nist(EXACT_HYPS, EXACT_REFS))


@needs_java
def test_rouge_and_cider_by_hand() -> None:
    pytest.importorskip("pycocoevalcap")
    hyps = ["The cat sat on the mat.", "A dog ran away!"]
    refs = [("the cat sat on a mat", "Cat."), ("a dog ran away",)]
    scores = e2e_metrics(hyps, refs, meteor=False)
    assert "METEOR" not in scores
    # Item 1, PTB tokens without punctuation: LCS with reference 1 is "the cat sat on mat":
    # P = R = 5/6; with "cat": P = 1/6, R = 1. COCO takes the best P and best R over references:
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 5/6 / (1 + 1.44 * 5/6) = 0.92424.
    # Item 2 matches exactly (punctuation removed): 1. ROUGE_L = mean = 96.212.
    first = 2.44 * (5 / 6) / (1 + 1.44 * (5 / 6))
    assert scores["ROUGE_L"] == pytest.approx(100 * (first + 1.0) / 2)
    assert 0.0 < scores["CIDEr"] < 10.0


@needs_java
def test_cider_of_one_item_is_zero() -> None:
    pytest.importorskip("pycocoevalcap")
    # With one item every n-gram's idf is log(1/1) = 0: CIDEr needs a corpus.
    assert e2e_metrics([CAT], [(CAT,)], meteor=False)["CIDEr"] == pytest.approx(0.0)


@needs_java
def test_empty_hypothesis_scores_zero_on_its_item() -> None:
    pytest.importorskip("pycocoevalcap")
    scores = e2e_metrics(["", "a dog ran away"], [("a cat",), ("a dog ran away",)], meteor=False)
    assert scores["ROUGE_L"] == pytest.approx(50.0)
    assert all(math.isfinite(value) for value in scores.values())


# --------------------------------------------------------------------------------------------
# Bootstrap


def _corpus(items: int, seed: int) -> tuple[list[str], list[tuple[str, ...]]]:
    """Items whose hypotheses drop or swap words of their first reference, seeded."""
    rng = random.Random(seed)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "near", "mat", "park", "pub"]
    hyps, refs = [], []
    for _ in range(items):
        ref = [rng.choice(words) for _ in range(rng.randint(5, 12))]
        hyp = [word if rng.random() < 0.7 else rng.choice(words) for word in ref]
        other = [word if rng.random() < 0.8 else rng.choice(words) for word in ref]
        hyps.append(" ".join(hyp))
        refs.append((" ".join(ref), " ".join(other))[: rng.randint(1, 2)])
    return hyps, refs


@pytest.mark.parametrize("metric", [corpus_bleu, e2e_bleu], ids=["corpus_bleu", "e2e_bleu"])
def test_bootstrap_contains_estimate_and_is_seeded(metric) -> None:  # type: ignore[no-untyped-def]
    hyps, refs = _corpus(60, seed=1)
    low, high = bootstrap_interval(hyps, refs, metric, samples=300, seed=3)
    assert low < metric(hyps, refs) < high
    assert bootstrap_interval(hyps, refs, metric, samples=300, seed=3) == (low, high)
    assert bootstrap_interval(hyps, refs, metric, samples=300, seed=4) != (low, high)


def test_bootstrap_narrows_with_more_items() -> None:
    small = _corpus(40, seed=2)
    large = _corpus(640, seed=2)
    low, high = bootstrap_interval(*small, samples=300)
    large_low, large_high = bootstrap_interval(*large, samples=300)
    # The width shrinks like 1 / sqrt(items): 4x here; ask for 2x.
    assert large_high - large_low < (high - low) / 2


def test_bootstrap_fast_path_equals_recomputing() -> None:
    hyps, refs = _corpus(30, seed=5)
    for metric in (corpus_bleu, e2e_bleu):
        fast = bootstrap_interval(hyps, refs, metric, samples=40, seed=7, confidence=0.9)
        slow = bootstrap_interval(
            hyps, refs, lambda h, r, m=metric: m(h, r), samples=40, seed=7, confidence=0.9
        )
        assert fast == pytest.approx(slow, abs=1e-9)


def test_missing_entities_by_hand() -> None:
    """Accents, case, punctuation and a disambiguation do not count; order and every word do."""
    entities = [
        ("Adolfo Suárez Madrid–Barajas Airport", "Alcobendas", "Alan Bean (astronaut)"),
        ("Abilene, Texas", "1634.0", "Aarhus"),
    ]
    hypotheses = [
        "Adolfo Suarez Madrid-Barajas airport serves ALCOBENDAS; Alan Bean flew.",
        "Abilene Texas, at 1634.0 metres.",  # "Aarhus" not named
    ]
    assert missing_entities(hypotheses, entities) == pytest.approx(100 / 6)
    assert missing_entities(["Barajas Madrid Suarez Adolfo Airport"], [entities[0][:1]]) == 100.0
    assert missing_entities(["Abilene"], [("Abilene, Texas",)]) == 100.0  # a part is missing
    assert missing_entities(["Aarhusian"], [("Aarhus",)]) == 100.0  # whole words only
    with pytest.raises(DataError, match="references\\[0\\] is empty"):
        missing_entities(["text"], [()])


def test_missing_entities_interval_sums_counts_like_recomputing() -> None:
    """The bootstrap sums per-item counts (a ratio of sums, not a mean of item shares); the
    slow path, rescoring each draw's texts, gives the same interval."""
    rng = random.Random(3)
    names = ["Aarhus", "Denmark", "Alan Bean", "Apollo 12", "NASA", "Texas"]
    entities = [tuple(rng.sample(names, rng.randint(1, 4))) for _ in range(40)]
    hyps = [" ".join(name for name in item if rng.random() < 0.6) for item in entities]
    fast = bootstrap_interval(hyps, entities, missing_entities, samples=50, seed=2)
    slow = bootstrap_interval(
        hyps, entities, lambda h, e: missing_entities(h, e), samples=50, seed=2
    )
    assert fast == pytest.approx(slow, abs=1e-9)
    assert fast[0] < missing_entities(hyps, entities) < fast[1]


def test_bootstrap_any_metric() -> None:
    hyps, refs = _corpus(50, seed=6)
    hyps[::3] = [r[0] for r in refs[::3]]  # a third of the items match exactly

    def exact_match(h: Sequence[str], r: Sequence[Sequence[str]]) -> float:
        return 100.0 * sum(hyp in ref for hyp, ref in zip(h, r, strict=True)) / len(h)

    low, high = bootstrap_interval(hyps, refs, exact_match, samples=200)
    assert 0.0 <= low < exact_match(hyps, refs) < high <= 100.0


def test_paired_bootstrap_separates_what_separate_intervals_cannot() -> None:
    """A system that fixes a few items of another is better on every resample of the same items,
    although the two separate intervals overlap."""
    baseline, refs = _corpus(200, seed=8)
    better = list(baseline)
    better[::10] = [r[0] for r in refs[::10]]  # a tenth of the items now match a reference
    low, high, share = paired_bootstrap_difference(better, baseline, refs, samples=300)
    difference = corpus_bleu(better, refs) - corpus_bleu(baseline, refs)
    assert 0 < low < difference < high and share == 1.0
    ours, theirs = (
        bootstrap_interval(better, refs, samples=300),
        bootstrap_interval(baseline, refs, samples=300),
    )
    assert ours[0] < theirs[1]  # the separate intervals overlap
    same = paired_bootstrap_difference(baseline, baseline, refs, samples=50)
    assert same == (0.0, 0.0, 0.5)  # every sample a tie: counted half
    slow = paired_bootstrap_difference(
        better, baseline, refs, lambda h, r: corpus_bleu(h, r), samples=50, seed=2
    )
    assert slow == pytest.approx(
        paired_bootstrap_difference(better, baseline, refs, samples=50, seed=2)
    )
    with pytest.raises(DataError, match="199 hypotheses but 200 reference sets"):
        paired_bootstrap_difference(better, baseline[:-1], refs)


def test_bootstrap_settings_are_checked() -> None:
    hyps, refs = _corpus(5, seed=0)
    with pytest.raises(ConfigError, match="samples must be >= 1"):
        bootstrap_interval(hyps, refs, samples=0)
    with pytest.raises(ConfigError, match=r"confidence must be in \(0, 1\)"):
        bootstrap_interval(hyps, refs, confidence=1.0)
