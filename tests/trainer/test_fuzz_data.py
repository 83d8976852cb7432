"""Fuzzed datasets (RELIABILITY I2): every file gives `FILE:LINE: what is wrong` or passes, and what
passes trains.

Files are made of lines that are plausible chat records bent out of shape (wrong types, roles,
orders, empty or odd strings, lone surrogates, deep nesting, huge numbers, extra keys) and raw
junk (bad UTF-8, BOMs, truncated JSON). For each file the checker must not raise anything but
DataError, every problem must carry the file and a line number, and every record the checker
accepts must encode with the tokenizer (the differential half: validation never lets through
what the trainer then chokes on). Deterministic: `derandomize`, 2,000 files.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.enums import DatasetFormat
from kubetune.api.spec import Dataset
from kubetune.trainer import builtin, data

FUZZ = settings(max_examples=2000, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))

TEXT = st.sampled_from(
    [
        "hi",
        "",
        "  ",
        "\u00e9t\u00e9",
        "\ud800",
        "a\x00b",
        "<|im_end|>",
        "{{ raise_exception('x') }}",
        "x" * 300,
        "\n\n",
        "\U0001f600",
    ]
) | st.text(max_size=12)
ODD = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.lists(st.integers(), max_size=2)
)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "System", ""]) | ODD
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE, "content": TEXT | ODD},
    optional={
        "weight": st.sampled_from([0, 1, 0.0, 1.0, 2, True, "1", None]),
        "name": TEXT | ODD,
        "tool_calls": st.just([]),
        "extra": TEXT,
    },
)
CONVERSATION = st.lists(MESSAGE | ODD, max_size=5)
RECORD = st.fixed_dictionaries(
    {"messages": CONVERSATION | ODD}, optional={"spans": st.just([]), "id": TEXT}
) | st.dictionaries(TEXT, ODD, max_size=2)


def line(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=True, allow_nan=True).encode()


JUNK = st.sampled_from(
    [
        b"",
        b"   ",
        b"{",
        b'{"messages": [',
        b"[]",
        b"null",
        b"42",
        b'"text"',
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",
        b"\x80abc",
        b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"messages": [], "n": ' + b"9" * 5000 + b"}",
        b'{"a": 1, "a": 2}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        b"\r",
    ]
)
GOOD = line({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]})
FILE_LINES = st.lists(RECORD.map(line) | JUNK | st.just(GOOD), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def tokenizer():
    return builtin.byte_tokenizer()


@FUZZ
@given(FILE_LINES)
def test_every_dataset_is_reported_or_trains(
    tmp_path_factory: pytest.TempPathFactory, tokenizer, lines: list[bytes]
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, problems = data.read_records(str(path), DatasetFormat.CHAT)
    for problem in problems:
        assert problem.file == str(path) and problem.line >= 0 and problem.message, problem
        assert str(problem).startswith(f"{path}:{problem.line}: ")
    for record in records:  # accepted means the trainer can encode it
        example = data.encode_full(record, DatasetFormat.CHAT, tokenizer)
        assert len(example.input_ids) == len(example.labels) > 0
        assert any(label != data.IGNORE_INDEX for label in example.labels), record.data
    try:
        data.check(Dataset(train=str(path), format="chat", minExamples=1))
    except data.DataError as err:
        assert all(p.file == str(path) for p in err.problems)
        assert str(err).strip()
