"""Scores of generated text against references: BLEU, the E2E NLG metrics, bootstrap intervals.

What this module owns: how a corpus of hypotheses (one string per item) is scored against its
references (one or more strings per item). ``corpus_bleu`` is sacrebleu's default BLEU.
``e2e_metrics`` reproduces the five scores of the official E2E NLG Challenge script
(github.com/tuetschek/e2e-metrics, ``measure_scores.py``) with maintained packages: sacrebleu for
BLEU, our own NIST (mteval-v13a's definition), and pycocoevalcap's bundled Stanford PTB tokenizer,
METEOR 1.5 jar, ROUGE-L and CIDEr-D code. ``bootstrap_interval`` gives a percentile interval for
any corpus metric. ``missing_entities`` counts the input's names an output leaves out
(data-to-text omissions). docs/metrics.md lists where the scores can differ from the official script.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU
from sacrebleu.metrics.bleu import BLEUScore
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from alphatune.errors import AlphaTuneError, ConfigError, DataError

logger = logging.getLogger(__name__)

Metric = Callable[[Sequence[str], Sequence[Sequence[str]]], float]

_INSTALL_PAPER = 'pip install "alphatune[paper]"'
_INSTALL_JAVA = "install a Java runtime (Debian/Ubuntu: apt-get install default-jre-headless)"


class MetricUnavailableError(AlphaTuneError, RuntimeError):
    """A metric needs a program or package that is not installed (Java, pycocoevalcap)."""


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise unless there is one non-empty reference set per hypothesis and at least one item."""
    if len(hypotheses) != len(references):
        raise DataError(
            f"got {len(hypotheses)} hypotheses but {len(references)} reference sets; "
            "give one reference set per hypothesis"
        )
    if not hypotheses:
        raise DataError("cannot score an empty corpus")
    for index, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(
                f"references[{index}] is a string; wrap it as a tuple of references: (ref,)"
            )
        if not refs:
            raise DataError(f"references[{index}] is empty; every item needs a reference")


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference slot, padded with ``None`` (skipped)."""
    most = max(len(refs) for refs in references)
    return [
        [refs[slot] if slot < len(refs) else None for refs in references] for slot in range(most)
    ]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, 4-grams) with many references per item.

    Items may have different numbers of references; the shorter ones are padded with ``None``,
    which sacrebleu skips.

    Args:
        hypotheses: one generated text per item, length n.
        references: the references of each item, length n, each with at least one string.

    Returns:
        BLEU on sacrebleu's 0-100 scale.
    """
    score = _bleu_score(hypotheses, references, lowercase=False)
    logger.debug("%s", score)
    return float(score.score)


def _bleu_score(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool
) -> BLEUScore:
    """sacrebleu's BLEU (13a tokens, 4-grams, exp smoothing) of the corpus, after the checks:
    the score with its length statistics."""
    _check_corpus(hypotheses, references)
    streams = _reference_streams(references)
    return BLEU(lowercase=lowercase).corpus_score(list(hypotheses), streams)  # type: ignore[arg-type]


def bleu_length_ratio(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = False
) -> float:
    """Hypothesis length over reference length as BLEU counts them (13a tokens, the closest
    reference length per item): below 1, BLEU's brevity penalty ``exp(1 - 1/ratio)`` applies.

    A BLEU gap between two systems with the same n-gram precisions is a length gap: the shorter
    outputs leave facts out. ``lowercase``: as :func:`e2e_bleu` (the same lengths either way).
    """
    score = _bleu_score(hypotheses, references, lowercase)
    return float(score.sys_len / score.ref_len) if score.ref_len else 0.0


def e2e_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """BLEU as the E2E NLG script reports it: lowercased, 13a tokenization, 4-grams.

    The official script runs mteval-v13a.pl without ``-c``, which lowercases; otherwise this is
    :func:`corpus_bleu` (same tokenizer, closest reference length, exp smoothing).

    Args:
        hypotheses: one generated text per item, length n.
        references: the references of each item, length n, each with at least one string.

    Returns:
        BLEU on the 0-100 scale (the script prints it on 0-1).
    """
    return float(_bleu_score(hypotheses, references, lowercase=True).score)


# --------------------------------------------------------------------------------------------
# NIST, as mteval-v13a.pl computes it


_NIST_ORDER = 5
# mteval's length penalty is 0.5 when the output is 2/3 of the reference length.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def _ngrams(tokens: list[str], order: int) -> Counter[tuple[str, ...]]:
    """Counts of every n-gram of length 1..order."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, order + 1):
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts


def _nist(hypotheses: list[list[str]], references: list[list[list[str]]]) -> float:
    """NIST-5 of tokenized text, by mteval-v13a's definition (Doddington 2002).

    Information weights come from all references of the corpus:
    ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))``, the empty prefix counting every
    reference word. Each hypothesis n-gram matches up to its largest count in any one reference
    of its item. The score sums, over n = 1..5, the matched information divided by the number of
    hypothesis n-grams, times a length penalty on hypothesis words / (reference words / mean
    references per item). nltk's ``corpus_nist`` agrees with one reference per item, but with
    several it scores each reference alone and keeps the best, which gives lower scores.
    """
    reference_counts: Counter[tuple[str, ...]] = Counter()
    reference_words = 0
    for refs in references:
        for ref in refs:
            reference_counts.update(_ngrams(ref, _NIST_ORDER))
            reference_words += len(ref)
    if reference_words == 0:
        raise DataError("every reference is empty after tokenization; NIST needs reference words")

    def info(ngram: tuple[str, ...]) -> float:
        prefix = reference_counts[ngram[:-1]] if len(ngram) > 1 else reference_words
        return math.log2(prefix / reference_counts[ngram])

    matched_info = [0.0] * (_NIST_ORDER + 1)  # index n: n-grams of length n
    hypothesis_ngrams = [0] * (_NIST_ORDER + 1)
    for hyp, refs in zip(hypotheses, references, strict=True):
        most: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            most |= _ngrams(ref, _NIST_ORDER)  # | keeps the larger count
        for ngram, count in _ngrams(hyp, _NIST_ORDER).items():
            if ngram in most:
                matched_info[len(ngram)] += info(ngram) * min(count, most[ngram])
        for n in range(1, _NIST_ORDER + 1):
            hypothesis_ngrams[n] += max(len(hyp) - n + 1, 0)
    precision = sum(
        matched_info[n] / max(hypothesis_ngrams[n], 1) for n in range(1, _NIST_ORDER + 1)
    )
    # mteval counts the non-empty references (the E2E script pads missing ones with '').
    mean_references = sum(1 for refs in references for ref in refs if ref) / len(references)
    ratio = hypothesis_ngrams[1] / (reference_words / mean_references)
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        penalty = math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return precision * penalty


def e2e_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """NIST-5 as the E2E NLG script reports it (mteval-v13a.pl, lowercased 13a tokens).

    Implements mteval-v13a's definition; see docs/metrics.md for how it differs from nltk's
    ``corpus_nist`` when items have several references.

    Args:
        hypotheses: one generated text per item, length n.
        references: the references of each item, length n, each with at least one string.

    Returns:
        NIST, >= 0 (about 8-9 for good E2E systems).
    """
    _check_corpus(hypotheses, references)
    tokenize = Tokenizer13a()  # mteval-v13a's rules; it lowercases first unless run with -c
    return _nist(
        [tokenize(hyp.lower()).split() for hyp in hypotheses],
        [[tokenize(ref.lower()).split() for ref in refs] for refs in references],
    )


# --------------------------------------------------------------------------------------------
# METEOR, ROUGE-L and CIDEr: pycocoevalcap's code and jars, as the official script runs them


def _pycocoevalcap_dir() -> Path:
    """pycocoevalcap's package folder (its jars are under it); raise if it or Java is missing."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError as error:
        raise MetricUnavailableError(
            f"METEOR, ROUGE_L and CIDEr need pycocoevalcap ({error}); {_INSTALL_PAPER}"
        ) from error
    if shutil.which("java") is None:
        raise MetricUnavailableError(
            "no `java` on PATH: METEOR, ROUGE_L and CIDEr run the Stanford PTB tokenizer and "
            "METEOR 1.5 jars bundled with pycocoevalcap, as the official E2E script does; "
            f"{_INSTALL_JAVA}, or score BLEU and NIST alone with e2e_bleu and e2e_nist"
        )
    return Path(ptb.__file__).resolve().parent.parent


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise MetricUnavailableError(
            f"{path} is missing from the pycocoevalcap install; reinstall it with "
            '`pip install --force-reinstall "pycocoevalcap>=1.2"`'
        )
    return path


def _ptb_tokenize(texts: list[str], package: Path) -> list[str]:
    """Lowercased Stanford PTB tokens without punctuation, one string per text (the COCO way)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    jar = _require_file(package / "tokenizer" / "stanford-corenlp-3.4.1.jar")
    lines = [" ".join(text.split()) for text in texts]  # a line break would split an item
    command = [
        "java",
        "-Dfile.encoding=UTF-8",
        "-cp",
        str(jar),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
        "-encoding",
        "UTF-8",
    ]
    done = subprocess.run(
        command,
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,  # a failure is reported below, with the tokenizer's stderr
    )
    tokenized = done.stdout.split("\n")[: len(lines)]
    if done.returncode != 0 or len(tokenized) != len(lines):
        raise MetricUnavailableError(
            f"the Stanford PTB tokenizer failed (exit {done.returncode}, {len(tokenized)} of "
            f"{len(lines)} lines back): {done.stderr.strip()[-500:]}"
        )
    punctuation = set(PUNCTUATIONS)
    return [" ".join(w for w in line.split() if w not in punctuation) for line in tokenized]


def _meteor(hypotheses: list[str], references: list[list[str]], package: Path) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``) of PTB-tokenized text, on 0-1.

    Talks to the jar's ``-stdio`` mode as pycocoevalcap's wrapper does: one ``SCORE`` line per
    item returns its statistics, one ``EVAL`` line over all of them returns the item scores and
    then the corpus score, which aggregates the statistics (not a mean of item scores).
    """
    jar = _require_file(package / "meteor" / "meteor-1.5.jar")
    _require_file(package / "meteor" / "data" / "paraphrase-en.gz")
    command = ["java", "-Xmx2G", "-jar", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    # stderr goes to a file: an unread pipe could fill up and stall the jar.
    with (
        tempfile.TemporaryFile(mode="w+", encoding="utf-8") as errors,
        subprocess.Popen(
            command,
            cwd=jar.parent,  # the jar finds data/paraphrase-en.gz next to itself
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            encoding="utf-8",
        ) as process,
    ):
        assert process.stdin is not None and process.stdout is not None

        def answer(line: str) -> str:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(line + "\n")
            process.stdin.flush()
            reply = process.stdout.readline().strip()
            if not reply:
                process.kill()
                process.wait()
                errors.seek(0)
                raise MetricUnavailableError(
                    f"METEOR ({jar}) stopped answering: {errors.read().strip()[-500:]}"
                )
            return reply

        try:
            stats = []
            for hyp, refs in zip(hypotheses, references, strict=True):
                # "|||" separates fields in the protocol; tokenized text rarely has it.
                fields = [ref.replace("|||", "") for ref in refs] + [hyp.replace("|||", "")]
                stats.append(answer(" ||| ".join(["SCORE", *fields])))
            answer(" ||| ".join(["EVAL", *stats]))  # the first item's score
            for _ in range(len(stats) - 1):  # the other items' scores
                process.stdout.readline()
            score = float(process.stdout.readline().strip())  # the corpus score
        finally:
            process.kill()
    return score


def _rouge_l(hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean over items of COCO's ROUGE-L (LCS F-measure, beta 1.2, best precision and recall
    over the references), on 0-1. An empty hypothesis scores 0 and references without tokens
    are skipped (COCO's code divides by zero on both)."""
    from pycocoevalcap.rouge.rouge import Rouge

    rouge = Rouge()
    scores = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        refs = [ref for ref in refs if ref.split()]
        scores.append(rouge.calc_score([hyp], refs) if hyp.split() and refs else 0.0)
    return float(np.mean(scores))


def _cider_d(hypotheses: list[str], references: list[list[str]]) -> float:
    """COCO's ``Cider`` (which is CIDEr-D: clipped counts, length penalty sigma 6, times 10),
    document frequencies from this corpus's references."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for hyp, refs in zip(hypotheses, references, strict=True):
        scorer += (hyp, refs)
    score, _ = scorer.compute_score()
    return float(score)


def e2e_metrics(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, meteor: bool = True
) -> dict[str, float]:
    """The E2E NLG Challenge scores: BLEU, NIST, METEOR, ROUGE_L, CIDEr.

    Follows the official script's conventions: BLEU and NIST on lowercased 13a tokens
    (mteval-v13a); METEOR, ROUGE_L and CIDEr on lowercased Stanford PTB tokens with punctuation
    removed, through the jars bundled with pycocoevalcap (needs ``java`` on PATH). CIDEr is
    COCO's CIDEr-D with document frequencies from these references. Nothing is downloaded.

    Scales are those of the LoRA and AlphaTuning papers' E2E tables: BLEU, METEOR and ROUGE_L on
    0-100, NIST and CIDEr as computed (the official script prints BLEU, METEOR and ROUGE_L on
    0-1).

    Args:
        hypotheses: one generated text per item, length n.
        references: the references of each item, length n, each with at least one string;
            items may have different numbers of references.
        meteor: compute METEOR (starts the METEOR jar, whose paraphrase table takes 10-30 s to
            load); ``False`` leaves the key out. ROUGE_L and CIDEr still need ``java`` for the
            tokenizer.

    Returns:
        ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` to floats, in that order.

    Raises:
        MetricUnavailableError: Java or pycocoevalcap is missing (BLEU and NIST need neither:
            :func:`e2e_bleu`, :func:`e2e_nist`).

    Example::

        >>> scores = e2e_metrics(["The Eagle is a pub."], [["The Eagle is a pub.", "A pub."]])
        >>> round(scores["BLEU"]), round(scores["ROUGE_L"])
        (100, 100)
    """
    _check_corpus(hypotheses, references)
    package = _pycocoevalcap_dir()  # fail before the slow parts
    scores = {"BLEU": e2e_bleu(hypotheses, references)}
    scores["NIST"] = e2e_nist(hypotheses, references)
    tokens = _ptb_tokenize(list(hypotheses) + [ref for refs in references for ref in refs], package)
    hyp_tokens = tokens[: len(hypotheses)]
    ref_tokens: list[list[str]] = []
    start = len(hypotheses)
    for refs in references:
        ref_tokens.append(tokens[start : start + len(refs)])
        start += len(refs)
    if meteor:
        scores["METEOR"] = 100.0 * _meteor(hyp_tokens, ref_tokens, package)
    scores["ROUGE_L"] = 100.0 * _rouge_l(hyp_tokens, ref_tokens)
    scores["CIDEr"] = _cider_d(hyp_tokens, ref_tokens)
    logger.debug("E2E metrics over %d items: %s", len(hypotheses), scores)
    return scores


# --------------------------------------------------------------------------------------------
# Omissions (data-to-text)

# A trailing DBpedia disambiguation, "Alan Bean (astronaut)": outputs name the entity without it.
_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)\s*$")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


def _name_words(text: str) -> list[str]:
    """Lowercase ASCII words of a name or an output: accents folded (outputs write "Suarez" for
    "Suárez"), punctuation dropped (", Texas" vs " Texas")."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    folded = "".join(char for char in decomposed if not unicodedata.combining(char))
    # Anything else outside a-z0-9 (an en dash, "ø") separates words rather than vanishing.
    return _NOT_WORD.sub(" ", folded).split()


def _entity_counts(hypotheses: Sequence[str], entities: Sequence[Sequence[str]]) -> np.ndarray:
    """Per item: (entities not named, entities), int64 (n, 2)."""
    rows = []
    for hypothesis, names in zip(hypotheses, entities, strict=True):
        said = f" {' '.join(_name_words(hypothesis))} "
        wanted = [_name_words(_DISAMBIGUATION.sub("", name)) for name in names]
        wanted = [words for words in wanted if words]
        missing = sum(f" {' '.join(words)} " not in said for words in wanted)
        rows.append([missing, len(wanted)])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _missing_share(counts: np.ndarray) -> np.ndarray:
    """Percent missing from summed (missing, total) counts, per row of ``counts``."""
    missing, total = counts[..., 0], counts[..., 1]
    return 100.0 * missing / np.maximum(total, 1)


def missing_entities(hypotheses: Sequence[str], entities: Sequence[Sequence[str]]) -> float:
    """Percent of the input's entities an output does not name: omissions in data-to-text.

    An entity counts as named when its words, lowercased, accents folded, punctuation and a
    trailing parenthesised disambiguation dropped, occur in that order in the output. This is
    literal: a date written out ("1923-06-28" as "June 28, 1923"), a unit or a paraphrase counts
    as missing for every system alike, so compare systems with it; it is not an absolute error
    rate (docs/metrics.md). The metric's signature is ``Metric``'s, entities in place of
    references, so :func:`bootstrap_interval` gives its interval.

    Args:
        hypotheses: one generated text per item.
        entities: the names each item's input holds (``EvalItem.entities``), at least one each.

    Example::

        >>> missing_entities(["Abilene Regional Airport serves Abilene."],
        ...                  [("Abilene Regional Airport", "Abilene, Texas")])
        50.0
    """
    _check_corpus(hypotheses, entities)
    return float(_missing_share(_entity_counts(hypotheses, entities).sum(axis=0)))


# --------------------------------------------------------------------------------------------
# Bootstrap


# BLEU metrics whose corpus score is a function of summed per-item statistics.
_BLEU_SETTINGS: dict[Metric, dict[str, bool]] = {
    corpus_bleu: {"lowercase": False},
    e2e_bleu: {"lowercase": True},
}


def _bleu_statistics(
    scorer: BLEU, hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> np.ndarray:
    """Per-item sufficient statistics, int64 (n, 2 + 2 * order): sys_len, ref_len, counts,
    totals. Summing rows and passing them to ``BLEU.compute_bleu`` gives the corpus score."""
    rows = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        item = scorer.corpus_score([hyp], [[ref] for ref in refs])
        rows.append([item.sys_len, item.ref_len, *item.counts, *item.totals])
    return np.asarray(rows, dtype=np.int64)


def bootstrap_interval(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    metric: Metric = corpus_bleu,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a corpus metric over items (Koehn 2004).

    Each sample draws n items with replacement and scores them as a corpus; the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the sample scores. For
    :func:`corpus_bleu` and :func:`e2e_bleu` the per-item n-gram statistics are computed once
    and summed per sample (1,000 samples of ~1,900 items take well under a second); any other
    metric is called once per sample.

    Args:
        hypotheses: one generated text per item, length n.
        references: the references of each item, length n.
        metric: ``metric(hypotheses, references) -> float``, e.g. ``corpus_bleu`` or
            ``lambda h, r: e2e_metrics(h, r, meteor=False)["CIDEr"]``.
        samples: bootstrap samples, >= 1.
        seed: seed of the resampling; the same seed gives the same interval.
        confidence: the interval's coverage, in (0, 1).

    Returns:
        ``(low, high)`` on the metric's scale.

    Example::

        >>> hyps = ["the cat sat on the mat", "a dog ran", "birds fly south"]
        >>> refs = [("the cat sat on the mat",), ("a dog ran away",), ("birds fly",)]
        >>> low, high = bootstrap_interval(hyps, refs, samples=200)
        >>> low <= corpus_bleu(hyps, refs) <= high
        True
    """
    _check_corpus(hypotheses, references)
    _check_bootstrap(samples, confidence)
    scores = _sample_scores(hypotheses, references, metric, _draws(len(hypotheses), samples, seed))
    return _percentiles(scores, confidence)


def paired_bootstrap_difference(
    hypotheses: Sequence[str],
    baseline: Sequence[str],
    references: Sequence[Sequence[str]],
    metric: Metric = corpus_bleu,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Interval of ``metric(hypotheses) - metric(baseline)`` on the same items (paired bootstrap,
    Koehn 2004): each sample scores both systems on one draw of items, so the item-to-item
    spread both share cancels, and two systems closer than their separate intervals can still
    be told apart.

    Returns:
        ``(low, high, share)``: the interval of the difference, and the share of samples in
        which ``hypotheses`` scored higher, ties counted half (Koehn's p-value for "not
        better" is ``1 - share``).
    """
    _check_corpus(hypotheses, references)
    _check_corpus(baseline, references)
    _check_bootstrap(samples, confidence)
    picks = _draws(len(hypotheses), samples, seed)
    ours = np.asarray(_sample_scores(hypotheses, references, metric, picks))
    theirs = np.asarray(_sample_scores(baseline, references, metric, picks))
    low, high = _percentiles(list(ours - theirs), confidence)
    share = (ours > theirs).mean() + 0.5 * (ours == theirs).mean()
    return low, high, float(share)


def _check_bootstrap(samples: int, confidence: float) -> None:
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")


def _draws(n: int, samples: int, seed: int) -> list[np.ndarray]:
    """One draw of n item indices per sample: the same draws for every metric and a given seed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=n) for _ in range(samples)]


def _percentiles(scores: list[float], confidence: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(scores, [tail, 100.0 - tail])
    return float(low), float(high)


def _sample_scores(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    metric: Metric,
    picks: list[np.ndarray],
) -> list[float]:
    """The metric on each draw of items. Metrics that are a function of summed per-item
    statistics (BLEU, missing entities) sum them per draw instead of rescoring the texts."""
    n = len(hypotheses)
    settings = _BLEU_SETTINGS.get(metric)
    if settings is None and metric is not missing_entities:
        return [
            metric([hypotheses[i] for i in picked], [references[i] for i in picked])
            for picked in picks
        ]
    weights = np.stack([np.bincount(picked, minlength=n) for picked in picks])  # (samples, n)
    if settings is None:
        return _missing_share(weights @ _entity_counts(hypotheses, references)).tolist()
    scorer = BLEU(**settings)
    stats = _bleu_statistics(scorer, hypotheses, references)  # (n, 2 + 2 * order)
    order = (stats.shape[1] - 2) // 2
    totals = weights @ stats  # (samples, 2 + 2 * order)
    scores = [
        BLEU.compute_bleu(
            correct=total[2 : 2 + order].tolist(),
            total=total[2 + order :].tolist(),
            sys_len=int(total[0]),
            ref_len=int(total[1]),
            smooth_method=scorer.smooth_method,
            smooth_value=scorer.smooth_value,
            max_ngram_order=order,
        ).score
        for total in totals
    ]
    return scores
