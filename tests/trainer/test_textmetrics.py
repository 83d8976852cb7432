"""kubetune.trainer.textmetrics: the scores shared by spec.evaluation.metrics and the graders."""

from __future__ import annotations

import pytest
from kubetune.trainer import textmetrics as tm


def test_exact_match_ignores_only_whitespace() -> None:
    assert tm.exact_match("Paris\n", "  Paris") == 1.0
    assert tm.exact_match("paris", "Paris") == 0.0


def test_bleu_and_chrf_are_sacrebleu_scores_in_0_1() -> None:
    from sacrebleu.metrics import BLEU, CHRF

    pred, ref = "the quick brown fox jumps over the dog", "the quick brown fox jumps over the lazy dog"
    assert tm.bleu(pred, ref) == pytest.approx(BLEU(effective_order=True).sentence_score(pred, [ref]).score / 100)
    assert tm.chrf(pred, ref) == pytest.approx(CHRF().sentence_score(pred, [ref]).score / 100)
    assert 0.3 < tm.bleu(pred, ref) < 1.0
    assert tm.bleu(ref, ref) == 1.0 and tm.chrf(ref, ref) == 1.0
    assert tm.bleu("zebra", ref) == 0.0
    assert tm.bleu("", ref) == 0.0 and tm.chrf("", ref) == 0.0


def test_rouge_l_is_the_lcs_f_measure() -> None:
    # LCS of 3 words: precision 3/3, recall 3/4 -> F = 2·1·0.75 / 1.75
    assert tm.rouge_l("the cat sat", "the cat sat down") == pytest.approx(2 * 0.75 / 1.75)
    assert tm.rouge_l("dogs bark", "the cat sat") == 0.0


def test_fuzzy_match_is_normalised_indel_similarity() -> None:
    assert tm.fuzzy_match("abc", "abd") == pytest.approx(2 / 3)
    assert tm.fuzzy_match("same", "same") == 1.0


@pytest.mark.parametrize(
    "text,ok",
    [
        ('{"a": 1}', 1.0),
        ("[1, 2]", 1.0),
        ('```json\n{"a": [1]}\n```', 1.0),
        ("42", 0.0),
        ('{"a": 1', 0.0),
        ("not json", 0.0),
    ],
)
def test_json_valid_wants_an_object_or_array(text: str, ok: float) -> None:
    assert tm.json_valid(text) == ok


def test_regex_match_is_a_full_match() -> None:
    assert tm.regex_match(" ORD-12345 \n", r"ORD-\d{5}") == 1.0
    assert tm.regex_match("order ORD-12345", r"ORD-\d{5}") == 0.0


def test_similarity_registry() -> None:
    assert set(tm.SIMILARITY) == {"exact_match", "bleu", "rouge_l", "chrf", "fuzzy_match"}
    for fn in tm.SIMILARITY.values():
        assert fn("a b c d", "a b c d") == pytest.approx(1.0)
