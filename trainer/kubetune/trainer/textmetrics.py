"""Text similarity and structure scores, each in [0, 1], shared by evaluation and graders.

One implementation for every place that compares a generated text with a reference: the
generation A/B of `spec.evaluation.metrics` and the GRPO reward graders. The scores come from
well-kept libraries (sacrebleu for BLEU and chrF, Google's rouge-score for ROUGE-L, RapidFuzz for
fuzzy matching) so they agree with the numbers people quote; here they are only normalised to
0..1 and made total (an empty prediction scores 0, never raises).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sacrebleu.metrics import BLEU, CHRF


def _norm(text: str) -> str:
    """Whitespace collapsed and trimmed: trailing newlines and double spaces are not errors."""
    return " ".join(str(text).split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the texts are equal after whitespace normalisation, else 0.0."""
    return 1.0 if _norm(pred) == _norm(ref) else 0.0


def bleu(pred: str, ref: str) -> float:
    """Sentence BLEU (sacrebleu, exponential smoothing, its default 13a tokeniser) in 0..1."""
    if not _norm(pred) or not _norm(ref):
        return 0.0
    from sacrebleu.metrics import BLEU

    return min(1.0, float(_bleu_metric(BLEU).sentence_score(_norm(pred), [_norm(ref)]).score) / 100.0)


def chrf(pred: str, ref: str) -> float:
    """Sentence chrF (sacrebleu: character 6-grams, beta 2) in 0..1; robust for short answers
    and languages without spaces."""
    if not _norm(pred) or not _norm(ref):
        return 0.0
    from sacrebleu.metrics import CHRF

    return min(1.0, float(_chrf_metric(CHRF).sentence_score(_norm(pred), [_norm(ref)]).score) / 100.0)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (Google's rouge-score, with stemming) in 0..1."""
    if not _norm(pred) or not _norm(ref):
        return 0.0
    return float(_rouge_scorer().score(_norm(ref), _norm(pred))["rougeL"].fmeasure)


def fuzzy_match(pred: str, ref: str) -> float:
    """Normalised Indel similarity (RapidFuzz `fuzz.ratio`) in 0..1: 1 for equal texts."""
    from rapidfuzz import fuzz

    a, b = _norm(pred), _norm(ref)
    if not a and not b:
        return 1.0
    return float(fuzz.ratio(a, b)) / 100.0


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)


def json_valid(pred: str) -> float:
    """1.0 when the text (optionally inside one ```json fence) parses as a JSON object or array."""
    text = str(pred).strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return 0.0
    return 1.0 if isinstance(value, (dict, list)) else 0.0


def regex_match(pred: str, pattern: str) -> float:
    """1.0 when the whole text (trimmed) matches `pattern` (Python `re.fullmatch`, DOTALL)."""
    return 1.0 if _compiled(pattern).fullmatch(str(pred).strip()) else 0.0


SIMILARITY: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "bleu": bleu,
    "rouge_l": rouge_l,
    "chrf": chrf,
    "fuzzy_match": fuzzy_match,
}
"""The reference-based scores by name: score(pred, ref) -> 0..1."""


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:  # rouge_score ships no types
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@lru_cache(maxsize=1)
def _bleu_metric(cls: type[BLEU]) -> BLEU:
    return cls(effective_order=True)


@lru_cache(maxsize=1)
def _chrf_metric(cls: type[CHRF]) -> CHRF:
    return cls()
