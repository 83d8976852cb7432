"""Text similarity and format metrics, each a float in [0, 1], from well-kept libraries.

Shared by the GRPO textSimilarity grader (graders.py) and the evaluation of generated answers:
sacrebleu for BLEU and chrF (scores divided by 100), rouge-score for ROUGE-L F1, rapidfuzz for
the fuzzy match ratio. `SIMILARITY` maps the names the API offers
(kubetune.api.enums.SimilarityMetric) to the functions.
"""

from __future__ import annotations

import json
import re
from typing import Callable


def exact_match(pred: str, ref: str) -> float:
    """1 when the texts are equal after stripping surrounding whitespace."""
    return float(pred.strip() == ref.strip())


def bleu(pred: str, ref: str) -> float:
    """Sentence BLEU (sacrebleu, exponential smoothing so short texts are not 0), in [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_bleu(pred, [ref]).score / 100.0


def chrf(pred: str, ref: str) -> float:
    """Sentence chrF (sacrebleu), in [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_chrf(pred, [ref]).score / 100.0


_ROUGE: list = []


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (rouge-score, with its Porter stemmer)."""
    if not _ROUGE:
        from rouge_score import rouge_scorer

        _ROUGE.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return float(_ROUGE[0].score(ref, pred)["rougeL"].fmeasure)


def fuzzy_match(pred: str, ref: str) -> float:
    """rapidfuzz's normalised Indel similarity ratio, in [0, 1]."""
    from rapidfuzz import fuzz

    return fuzz.ratio(pred, ref) / 100.0


def json_valid(pred: str) -> float:
    """1 when the text parses as JSON."""
    try:
        json.loads(pred)
    except (ValueError, RecursionError):
        return 0.0
    return 1.0


def regex_match(pred: str, pattern: str) -> float:
    """1 when the pattern matches anywhere in the text (re.search)."""
    return float(re.search(pattern, pred) is not None)


SIMILARITY: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "bleu": bleu,
    "rouge_l": rouge_l,
    "chrf": chrf,
    "fuzzy_match": fuzzy_match,
}
