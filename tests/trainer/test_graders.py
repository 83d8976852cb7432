"""GRPO graders (OpenAI reinforcement API semantics), text metrics, and preference/GRPO record
checks with FILE:LINE problems before any model loads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from kubetune.api.enums import TrainingType
from kubetune.api.spec import Dataset, Grader, GRPOConfig
from kubetune.trainer import data, graders, prefdata, textmetrics


def scorer(**spec: object) -> graders.Scorer:
    return graders.Scorer(Grader.model_validate({"name": "g", **spec}), "spec.method.grpo.graders[0]")


def test_string_check_operations_and_templates() -> None:
    item = {"answer": "Paris", "meta": {"city": "Paris"}}
    eq = scorer(type="stringCheck", reference="{{item.answer}}", operation="eq")
    assert eq({"output_text": "Paris"}, item) == 1.0
    assert eq({"output_text": "paris"}, item) == 0.0
    ne = scorer(type="stringCheck", reference="{{item.meta.city}}", operation="ne")
    assert ne({"output_text": "Rome"}, item) == 1.0 and ne({"output_text": "Paris"}, item) == 0.0
    like = scorer(type="stringCheck", reference="{{item.answer}}", operation="like")
    assert like({"output_text": "It is Paris."}, item) == 1.0 and like({"output_text": "It is PARIS."}, item) == 0.0
    ilike = scorer(type="stringCheck", reference="{{item.answer}}", operation="ilike")
    assert ilike({"output_text": "It is PARIS."}, item) == 1.0
    quoted = scorer(
        type="stringCheck",
        input="answer: {{ sample.output_text }}",
        reference="answer: {{item.answer}}",
        operation="eq",
    )
    assert quoted({"output_text": "Paris"}, item) == 1.0


def test_text_similarity_metrics() -> None:
    ref = "the return window is thirty days for a full refund"
    for metric in textmetrics.SIMILARITY:
        s = scorer(type="textSimilarity", reference="{{item.ref}}", evaluationMetric=metric)
        same = s({"output_text": ref}, {"ref": ref})
        close = s({"output_text": "the return window is thirty days"}, {"ref": ref})
        far = s({"output_text": "zzz qqq"}, {"ref": ref})
        assert same == pytest.approx(1.0), metric
        assert 0.0 <= far < 0.3, (metric, far)
        if metric != "exact_match":
            assert far < close < same, (metric, far, close)
    assert textmetrics.rouge_l("a b c d", "a b x d") == pytest.approx(0.75)
    assert textmetrics.json_valid('{"a": 1}') == 1.0 and textmetrics.json_valid("{a: 1}") == 0.0


def test_regex_and_json_schema() -> None:
    r = scorer(type="regex", pattern=r"^\d+$")
    assert r({"output_text": "42"}, {}) == 1.0 and r({"output_text": "forty-two"}, {}) == 0.0
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    j = scorer(type="jsonSchema", jsonSchema=schema)
    assert j({"output_text": '{"answer": 4}'}, {}) == 1.0
    assert j({"output_text": '{"answer": "4"}'}, {}) == 0.0
    assert j({"output_text": "answer: 4"}, {}) == 0.0


def test_invalid_json_schema_is_refused_with_the_field() -> None:
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        Grader.model_validate({"name": "g", "type": "jsonSchema", "jsonSchema": {"type": "integr"}})


def test_multi_is_the_weighted_mean() -> None:
    m = scorer(
        type="multi",
        graders=[
            {"name": "exact", "type": "stringCheck", "reference": "{{item.a}}", "operation": "eq", "weight": 3},
            {"name": "digits", "type": "regex", "pattern": r"^\d+$", "weight": 1},
        ],
    )
    assert m({"output_text": "7"}, {"a": "7"}) == pytest.approx(1.0)
    assert m({"output_text": "8"}, {"a": "7"}) == pytest.approx(0.25)
    assert m({"output_text": "x"}, {"a": "x"}) == pytest.approx(0.75)


def test_python_grader_runs_in_a_subprocess_with_a_time_limit(tmp_path: Path) -> None:
    source = (
        "import os, time\n"
        "def grade(sample, item):\n"
        "    if sample['output_text'] == 'hang':\n"
        "        time.sleep(60)\n"
        "    if sample['output_text'] == 'boom':\n"
        "        raise RuntimeError('bad')\n"
        "    if sample['output_text'] == 'pid':\n"
        "        return float(os.getpid())\n"
        "    return float(len(sample['output_text']) == int(item['n']))\n"
    )
    path = tmp_path / "grader.py"
    path.write_text(source)
    s = scorer(type="python", file=str(path), timeoutSeconds=1)
    try:
        import os

        assert s({"output_text": "abc"}, {"n": 3}) == 1.0
        assert s({"output_text": "ab"}, {"n": 3}) == 0.0
        assert s({"output_text": "pid"}, {"n": 3}) != float(os.getpid())  # not in the trainer's process
        started = time.monotonic()
        assert s({"output_text": "hang"}, {"n": 3}) == 0.0
        assert time.monotonic() - started < 20
        assert s.worker is not None and s.worker.timeouts == 1
        assert s({"output_text": "boom"}, {"n": 3}) == 0.0 and s.worker.errors == 1
        assert s({"output_text": "abc"}, {"n": 3}) == 1.0  # restarted worker still grades
    finally:
        s.close()


def test_python_grader_file_problems_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(graders.GraderError) as err:
        scorer(type="python", file=str(tmp_path / "missing.py"))
    assert err.value.param == "spec.method.grpo.graders[0].file"
    (tmp_path / "broken.py").write_text("def grade(sample, item)\n    return 1\n")
    with pytest.raises(graders.GraderError, match="broken.py line 1"):
        scorer(type="python", file=str(tmp_path / "broken.py"))
    with pytest.raises(ValueError, match="does not compile"):
        Grader.model_validate({"name": "g", "type": "python", "source": "def grade(:\n"})


def test_unknown_template_variable_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown template variable"):
        Grader.model_validate(
            {"name": "g", "type": "stringCheck", "reference": "{{reference.answer}}", "operation": "eq"}
        )


def test_reward_function_feeds_trl_columns() -> None:
    fn = graders.reward_function(scorer(type="stringCheck", reference="{{item.answer}}", operation="eq"), ["answer"])
    assert fn.__name__ == "g"
    out = fn(prompts=["q1", "q2"], completions=[[{"role": "assistant", "content": "4"}], "5"], answer=["4", "4"])
    assert out == [1.0, 0.0]


# ------------------------------------------------------------------------------- data


def _write(path: Path, records: list[object]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _validate(train: str, check: object) -> data.DataReport:
    return data.validate(Dataset(train=train, validationSplit=0.25, minExamples=1), record_check=check)  # type: ignore[arg-type]


def test_openai_and_trl_pairs_are_read_and_normalised(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi?"}]
    good = [{"role": "assistant", "content": "Hello!"}]
    bad = [{"role": "assistant", "content": "Go away."}]
    train = _write(
        tmp_path / "p.jsonl",
        [
            {"input": {"messages": msgs}, "preferred_output": good, "non_preferred_output": bad},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
            {"prompt": msgs, "chosen": good, "rejected": bad},
            {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        ],
    )
    report = _validate(train, prefdata.check_pair)
    rows = [prefdata.row(r.data, TrainingType.DPO) for r in report.train + report.validation]
    assert len(rows) == 4
    openai = next(r for r in rows if r["prompt"] == msgs and r["chosen"] == good)
    assert openai == {"prompt": msgs, "chosen": good, "rejected": bad}
    assert {"prompt": "2+2=", "chosen": "4", "rejected": "5"} in rows


def test_preference_problems_are_reported_with_file_and_line(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "Hi?"}]
    train = _write(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "q", "chosen": "a"},  # 1 missing side
            {"prompt": "q", "chosen": "same", "rejected": " same "},  # 2 identical
            {"prompt": "q", "chosen": "", "rejected": "b"},  # 3 empty completion
            {
                "input": {"messages": msgs},
                "preferred_output": [{"role": "assistant", "content": "x"}],
            },  # 4 missing side
            {
                "input": {"messages": msgs},
                "preferred_output": [{"role": "user", "content": "x"}],
                "non_preferred_output": [{"role": "assistant", "content": "y"}],
            },  # 5 wrong role
            {"prompt": "q", "chosen": "a", "rejected": "b", "score": 1},  # 6 unknown key
            "not json",  # 7
            {"prompt": "q", "chosen": "a", "rejected": "b"},  # 8 fine
        ],
    )
    with pytest.raises(data.DataError) as err:
        _validate(train, prefdata.check_pair)
    found = {(p.line, p.message.split(";")[0].split(":")[0]) for p in err.value.problems}
    lines = {p.line: p.message for p in err.value.problems}
    assert sorted(lines) == [1, 2, 3, 4, 5, 6, 7]
    assert "missing key 'rejected'" in lines[1]
    assert "identical" in lines[2]
    assert "empty completion" in lines[3]
    assert "non_preferred_output" in lines[4]
    assert "preferred_output[0].role" in lines[5]
    assert "unknown key 'score'" in lines[6]
    assert "invalid JSON" in lines[7]
    assert all(str(p).startswith(f"{train}:{p.line}: ") for p in err.value.problems), found


def test_kto_and_grpo_records(tmp_path: Path) -> None:
    kto = _write(
        tmp_path / "k.jsonl",
        [
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b", "label": "yes"},
            {"prompt": "q", "completion": " ", "label": False},
        ],
    )
    with pytest.raises(data.DataError) as err:
        _validate(kto, prefdata.check_kto)
    lines = {p.line: p.message for p in err.value.problems}
    assert sorted(lines) == [2, 3] and "expected true or false" in lines[2] and "empty completion" in lines[3]

    cfg = GRPOConfig.model_validate(
        {"graders": [{"name": "g", "type": "stringCheck", "reference": "{{item.answer}}", "operation": "eq"}]}
    )
    check = prefdata.grpo_checker(cfg.item_fields())
    grpo = _write(
        tmp_path / "g.jsonl",
        [
            {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"},
            {"prompt": "1+2?"},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "answer": "4"},
            {"messages": [{"role": "user", "content": "2+3?"}], "answer": "5", "difficulty": 1},
        ],
    )
    with pytest.raises(data.DataError) as err:
        _validate(grpo, check)
    lines = {p.line: p.message for p in err.value.problems}
    assert sorted(lines) == [2, 3]
    assert "missing key 'answer', which a grader reads" in lines[2]
    assert "last message must be a user message" in lines[3]
    row = prefdata.row(
        {"messages": [{"role": "user", "content": "2+3?"}], "answer": "5", "difficulty": 1}, TrainingType.GRPO
    )
    assert row == {"prompt": [{"role": "user", "content": "2+3?"}], "answer": "5", "difficulty": 1}
