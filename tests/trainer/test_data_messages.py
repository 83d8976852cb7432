"""Issue 15, item 8: data of a shape we recognise but cannot train as asked gets one message that
says so and what to set, at its FILE:LINE — never one "unknown key … remove it" per key.

Tool calls are "not supported yet"; text content parts are joined (other parts are not
supported); preference data read by a supervised job suggests `spec.method.type`, and a
preference job reading supervised data suggests `supervised`; another format's keys suggest
`spec.dataset.format`; `weight` takes 0, 1, 0.0 and 1.0 alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune.api.spec import Dataset
from kubetune.gateway import translate
from kubetune.trainer import builtin, data, prefdata

U = {"role": "user", "content": "Where is my order?"}
A = {"role": "assistant", "content": "It ships today."}


def write(tmp_path: Path, rows: list[dict], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def problems_by_line(path: Path, fmt: str = "chat", **kw) -> dict[int, list[str]]:
    _, problems = data.read_records(str(path), fmt, **kw)
    out: dict[int, list[str]] = {}
    for p in problems:
        assert str(p).startswith(f"{path}:{p.line}: ")
        out.setdefault(p.line, []).append(p.message)
    return out


@pytest.fixture(scope="module")
def tok():
    return builtin.byte_tokenizer()


def test_tool_calls_are_not_supported_yet(tmp_path: Path) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "track", "arguments": '{"order": 7}'}}
    rows = [
        {"messages": [U, A], "tools": [{"type": "function", "function": {"name": "track"}}]},  # 1 definitions
        {
            "messages": [
                U,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "shipped"},
                A,
            ]
        },  # 2 call + result
        {"messages": [U, {"role": "assistant", "function_call": {"name": "track"}, "content": ""}]},  # 3 legacy
        {"messages": [U, {**A, "tool_calls": []}], "tools": [], "parallel_tool_calls": False},  # 4 empty: fine
    ]
    found = problems_by_line(write(tmp_path, rows))
    assert sorted(found) == [1, 2, 3]
    assert all(len(messages) == 1 for messages in found.values()), found  # one message, not one per key
    assert all(m[0].startswith("tool calls (function calling) are not supported yet") for m in found.values())
    assert "'tools'" in found[1][0]
    assert "messages[1].tool_calls" in found[2][0] and "messages[2] (role 'tool')" in found[2][0]
    assert "messages[1].function_call" in found[3][0]
    assert "remove it" not in " ".join(m[0] for m in found.values())
    # preference data with tools, for a dpo job: the same message
    pair = {
        "input": {"messages": [U], "tools": [{"type": "function"}]},
        "preferred_output": [A],
        "non_preferred_output": [{"role": "assistant", "content": "No idea."}],
    }
    assert prefdata.check_pair(pair)[0].startswith("tool calls (function calling) are not supported yet: 'input.tools'")


def test_text_content_parts_are_joined_and_other_parts_are_not_supported(tmp_path: Path, tok) -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "Where is"}, {"type": "text", "text": "my order?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": "It ships today."}]}
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "This one:"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        ],
    }
    blank = {"role": "user", "content": [{"type": "text", "text": " "}]}
    path = write(tmp_path, [{"messages": [parts, answer]}, {"messages": [image, A]}, {"messages": [blank, A]}])
    records, problems = data.read_records(str(path), "chat")
    assert [r.line for r in records] == [1]
    assert records[0].data["messages"] == [
        {"role": "user", "content": "Where is\nmy order?"},
        {"role": "assistant", "content": "It ships today."},
    ]
    assert [(p.line, p.message) for p in problems] == [
        (
            2,
            "messages[0].content[1]: content parts of type 'image_url' are not supported (only text is trained); "
            'keep only {"type": "text"} parts in this message, or remove the example',
        ),
        (3, "messages[0].content: empty content; remove the example or fill it in"),
    ]
    # joined text trains exactly like the same text given as a string
    plain = data.Record("f", 1, {"messages": [{"role": "user", "content": "Where is\nmy order?"}, A]})
    joined, direct = (data.encode_full(r, "chat", tok) for r in (records[0], plain))
    assert joined.input_ids == direct.input_ids and joined.labels == direct.labels
    assert tok.decode([x for x in joined.labels if x != data.IGNORE_INDEX]) == "It ships today.<|im_end|>"


def test_preference_data_in_a_supervised_job_suggests_the_method_type(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {
            "input": {"messages": [U]},
            "preferred_output": [A],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        },
        {"prompt": "2+2=", "completion": "4", "label": True},
    ]
    path = write(tmp_path, rows)
    found = problems_by_line(path)
    assert found == {
        1: ["preference pairs (chosen, rejected): set spec.method.type: dpo; a supervised job cannot train on it"],
        2: [
            "OpenAI preference data (input, preferred_output, non_preferred_output): set spec.method.type: dpo; "
            "a supervised job cannot train on it"
        ],
        3: ["KTO data (prompt, completion, label): set spec.method.type: kto; a supervised job cannot train on it"],
    }
    # a promptCompletion job: the types read chat files, so both fields are named
    assert (
        "set spec.method.type: kto and spec.dataset.format: chat;" in problems_by_line(path, "promptCompletion")[3][0]
    )
    # what the validation Job and `kubetune validate --data` run: the same, in the DataError's text
    with pytest.raises(data.DataError) as err:
        data.check(Dataset(train=str(path), format="chat", minExamples=1))
    assert f"{path}:1: preference pairs (chosen, rejected): set spec.method.type: dpo" in str(err.value)
    assert "remove it" not in str(err.value)
    # the gateway's check of an OpenAI supervised job's file: the line, and what it is
    pairs = "examples/data/support-dpo.jsonl"
    error, _ = translate.check_data(pairs, None, files={pairs: "training_file"})
    assert error is not None and error.param == "training_file:1"
    first = error.message.splitlines()[0]  # 20 lines of a bounded message: what to do comes first, and survives
    assert first.startswith(
        "examples/data/support-dpo.jsonl:1: OpenAI preference data (input, preferred_output, "
        'non_preferred_output): create the job with method {"type": "dpo"}'
    )  # in the API's terms
    assert "remove it" not in error.message
    prompts = write(tmp_path, [{"prompt": "Q", "completion": "A"}], "legacy.jsonl")  # OpenAI's legacy format
    error, _ = translate.check_data(str(prompts), None, files={str(prompts): "training_file"})
    assert error is not None and error.message.splitlines()[0] == (
        f"{prompts}:1: looks like promptCompletion data (prompt, completion): convert each line to "
        '{"messages": [...]} (the only format of OpenAI\'s API); spec.dataset.format is chat (messages)'
    )
    # and the other way round: a dpo job reading chat data, a kto job reading pairs
    assert prefdata.check_pair({"messages": [U, A]}, "dpo") == [
        "supervised chat data (messages): set spec.method.type: supervised to train on it; spec.method.type: dpo reads "
        "preference pairs ({prompt, chosen, rejected} or OpenAI's {input, preferred_output, non_preferred_output})"
    ]
    assert prefdata.check_pair({"prompt": "Q", "completion": "A"}, "orpo")[0].startswith(
        "supervised promptCompletion data (prompt, completion): set spec.method.type: supervised and spec.dataset.format: "
        "promptCompletion to train on it; spec.method.type: orpo reads"
    )
    assert prefdata.check_kto(rows[0])[0].startswith(
        "preference pairs (chosen, rejected): set spec.method.type: dpo; spec.method.type: kto reads unpaired examples"
    )
    assert prefdata.check_pair(rows[2], "orpo")[0].startswith(
        "KTO data (prompt, completion, label): set spec.method.type: kto;"
    )
    assert prefdata.check_pair({"prompt": "q", "chosen": "a"}, "dpo") == [  # its own shape, incomplete: named as before
        "missing key 'rejected' (the dispreferred answer); a preference pair needs both sides"
    ]


@pytest.mark.parametrize(
    ("record", "fmt", "looks_like"),
    [
        ({"prompt": "Q", "completion": "A"}, "chat", "promptCompletion"),
        ({"messages": [U, A]}, "promptCompletion", "chat"),
        ({"instruction": "Do", "input": "", "output": "Done"}, "text", "instruction"),
        ({"text": "Plain text."}, "chat", "text"),
        ({"prompt": "Q", "completion": "A"}, "instruction", "promptCompletion"),
    ],
)
def test_data_of_another_format_suggests_spec_dataset_format(
    tmp_path: Path, record: dict, fmt: str, looks_like: str
) -> None:
    found = problems_by_line(write(tmp_path, [record]), fmt)
    assert list(found) == [1] and len(found[1]) == 1, found
    message = found[1][0]
    assert message.startswith(f"looks like {looks_like} data (")
    assert message.endswith(
        f"): set spec.dataset.format: {looks_like}; spec.dataset.format is {fmt} ({', '.join(data.FORMAT_KEYS[fmt])})"
    )
    # with the suggested format the same line is valid
    assert problems_by_line(write(tmp_path, [record], "again.jsonl"), looks_like) == {}


@pytest.mark.parametrize("weights", [(0, 1), (0.0, 1.0), (0, 1.0), (0.0, 1)])
def test_weight_0_1_and_their_float_forms_train_the_same_tokens(tmp_path: Path, tok, weights: tuple) -> None:
    skip, train = weights
    row = {
        "messages": [
            U,
            {**A, "content": "Skipped.", "weight": skip},
            {"role": "user", "content": "And?"},
            {**A, "content": "Trained.", "weight": train},
        ]
    }
    records, problems = data.read_records(str(write(tmp_path, [row])), "chat")
    assert problems == [] and len(records) == 1
    example = data.encode_full(records[0], "chat", tok)
    assert tok.decode([x for x in example.labels if x != data.IGNORE_INDEX]) == "Trained.<|im_end|>"
