"""The data layer: every T7 problem is found with its FILE:LINE, masks are right, packing is exact.

Fixtures are written per test into tmp_path (the 10 MB line is generated, never committed). The
packing test runs the tiny built-in Llama to prove that transformers' position-id packing gives
each example exactly the logits it gets alone.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from kubetune.api.spec import Dataset
from kubetune.trainer import builtin, data
from kubetune.trainer.data import DataError, DataProblem, Record

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "examples" / "data" / "support-chat.jsonl"
SYSTEM = {"role": "system", "content": "Be kind."}


def chat(*turns, **extra) -> str:
    """One chat line: turns are (role, content) or message dicts."""
    msgs = [t if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns]
    return json.dumps({"messages": msgs, **extra})


GOOD = chat(SYSTEM, ("user", "Where is my order?"), ("assistant", "It ships today."))


def write(tmp_path: Path, lines, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    body = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(body)
    return path


def only_problem(path: Path, fmt="chat", **kw) -> DataProblem:
    records, problems = data.read_records(str(path), fmt, **kw)
    assert len(problems) == 1, problems
    return problems[0]


def assert_at(problem: DataProblem, path, line: int, fragment: str) -> None:
    assert str(problem).startswith(f"{path}:{line}: "), str(problem)
    assert fragment in problem.message, problem.message


@pytest.fixture(scope="module")
def tok():
    return builtin.byte_tokenizer()


# ------------------------------------------------------------------------------ T7 fixtures


def test_bad_json(tmp_path):
    path = write(tmp_path, [GOOD, GOOD, '{"messages": [{"role": "user",}]}'])
    assert_at(only_problem(path), path, 3, "invalid JSON")
    assert "column" in only_problem(path).message


def test_byte_order_mark(tmp_path):
    path = write(tmp_path, [b"\xef\xbb\xbf" + GOOD.encode(), GOOD])
    records, problems = data.read_records(str(path), "chat")
    assert_at(problems[0], path, 1, "remove the byte-order mark")
    assert len(problems) == 1 and len(records) == 2  # the line itself and the rest are still checked
    utf16 = write(tmp_path, [GOOD.encode("utf-16")], "utf16.jsonl")
    assert_at(only_problem(utf16), utf16, 1, "file is UTF-16; save it as UTF-8")


def test_invalid_utf8(tmp_path):
    bad = GOOD.replace("today", "t\xffday").encode("latin-1")
    path = write(tmp_path, [GOOD, bad])
    p = only_problem(path)
    assert_at(p, path, 2, "invalid UTF-8 at byte")
    column = bad.index(b"\xff") + 1
    assert f"byte {column} of the line" in p.message


def test_ten_megabyte_line_is_reported_not_loaded(tmp_path):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000_000}]})
    path = write(tmp_path, [GOOD, huge, GOOD])
    records, problems = data.read_records(str(path), "chat")
    assert len(problems) == 1 and [r.line for r in records] == [1, 3]
    assert_at(problems[0], path, 2, f"line is {len(huge):,} bytes, over the limit of 1,000,000")


def test_missing_key(tmp_path):
    path = write(tmp_path, [GOOD, chat(("user", "Hi")).replace('"content": "Hi"', '"text": "Hi"')])
    records, problems = data.read_records(str(path), "chat")
    assert_at(problems[0], path, 2, "unknown key 'text'")
    assert any(p.line == 2 and "missing key 'messages[0].content'" in p.message for p in problems)
    path = write(tmp_path, ['{"prompt": "Q"}'], "pc.jsonl")
    assert_at(only_problem(path, "promptCompletion"), path, 1, "missing key 'completion'")
    path = write(tmp_path, ['{"turns": []}'], "nomsg.jsonl")
    records, problems = data.read_records(str(path), "chat")
    assert any("missing key 'messages'" in p.message for p in problems)


def test_unknown_keys(tmp_path):
    typo = chat(("user", "Hi"), {"role": "assistant", "conent": "Hello", "content": "Hello"})
    path = write(tmp_path, [GOOD, typo, chat(("user", "a"), ("assistant", "b"), spans=[[0, 1]])])
    records, problems = data.read_records(str(path), "chat")
    assert_at(problems[0], path, 2, "messages[1]: unknown key 'conent'")
    assert_at(problems[1], path, 3, "unknown key 'spans'")
    records, problems = data.read_records(str(path), "chat", extra_keys=("spans",))
    assert len(problems) == 1 and records[-1].data["spans"] == [[0, 1]]


def test_unknown_role(tmp_path):
    path = write(tmp_path, [GOOD, chat(("user", "Hi"), ("bot", "Hello"), ("assistant", "Hey"))])
    assert_at(only_problem(path), path, 2, "unknown role 'bot'; allowed: system, user, assistant")


def test_misplaced_system_message(tmp_path):
    path = write(tmp_path, [chat(("user", "Hi"), ("assistant", "Hey"), SYSTEM, ("assistant", "Yo"))])
    assert_at(only_problem(path), path, 1, "messages[2]: misplaced system message")


def test_no_assistant_turn(tmp_path):
    path = write(tmp_path, [GOOD, GOOD, chat(SYSTEM, ("user", "Hello?"))])
    assert_at(only_problem(path), path, 3, "no assistant turn")


def test_empty_content(tmp_path):
    path = write(tmp_path, [chat(("user", "Hi"), ("assistant", "  \n "))])
    assert_at(only_problem(path), path, 1, "messages[1].content: empty content")


def test_weight_must_be_0_or_1_on_assistant(tmp_path):
    lines = [
        chat(("user", "Hi"), {"role": "assistant", "content": "Hey", "weight": 2}),
        chat({"role": "user", "content": "Hi", "weight": 1}, ("assistant", "Hey")),
        chat(("user", "Hi"), {"role": "assistant", "content": "Hey", "weight": 0}),
        chat(("user", "Hi"), {"role": "assistant", "content": "Hey", "weight": True}),
    ]
    path = write(tmp_path, lines)
    records, problems = data.read_records(str(path), "chat")
    assert [p.line for p in problems] == [1, 2, 3, 4] and not records
    assert_at(problems[0], path, 1, "messages[1].weight: must be 0 or 1, got 2")
    assert_at(problems[1], path, 2, "weight is only allowed on assistant messages")
    assert_at(problems[2], path, 3, "no assistant message has weight 1: nothing to learn")
    assert_at(problems[3], path, 4, "must be 0 or 1, got true")


def test_wrong_top_level_type(tmp_path):
    path = write(tmp_path, [GOOD, '[{"role": "user", "content": "Hi"}]', '"text"'])
    records, problems = data.read_records(str(path), "chat")
    assert_at(problems[0], path, 2, "expected a JSON object, got an array")
    assert_at(problems[1], path, 3, "expected a JSON object, got a string")


def test_wrong_field_types(tmp_path):
    path = write(tmp_path, ['{"messages": {"role": "user"}}', chat(("user", ["a"]), ("assistant", "b"))])
    records, problems = data.read_records(str(path), "chat")
    assert_at(problems[0], path, 1, "messages: expected an array, got an object")
    # an array is content parts (OpenAI's form): each must be a {"type": "text", "text": ...} object
    assert_at(
        problems[1],
        path,
        2,
        'messages[0].content[0]: expected a content part such as {"type": "text", "text": "..."}, got a string',
    )


def test_blank_lines_and_crlf_are_fine(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(f"{GOOD}\r\n\r\n   \n{GOOD}".encode())  # no final newline either
    records, problems = data.read_records(str(path), "chat")
    assert not problems and [r.line for r in records] == [1, 4]


def test_missing_file(tmp_path):
    p = only_problem(tmp_path / "nope.jsonl")
    assert_at(p, tmp_path / "nope.jsonl", 0, "file not found")


def test_too_many_tokens_with_overlength_error(tmp_path, tok):
    long = chat(("user", "Hi"), ("assistant", "y" * 300))
    path = write(tmp_path, [GOOD] * 3 + [long] + [GOOD] * 2)
    ds = Dataset(train=str(path), min_examples=1, max_seq_length=128, overlength="error")
    with pytest.raises(DataError) as e:
        data.validate(ds, tokenizer=tok)
    [p] = e.value.problems
    assert_at(p, path, 4, "tokens, maxSeqLength is 128; raise maxSeqLength or set overlength: truncate|drop")
    assert "example has 3" in p.message  # ~330 byte tokens


def test_overlength_truncate_and_drop_warn(tmp_path, tok):
    long = chat(("user", "Hi"), ("assistant", "y" * 300))
    path = write(tmp_path, [GOOD] * 5 + [long])
    for policy, kept in (("truncate", 6), ("drop", 5)):
        ds = Dataset(train=str(path), min_examples=1, max_seq_length=128, overlength=policy, validation_split=0.2)
        report = data.validate(ds, tokenizer=tok, seed=1)
        assert report.overlength == 1 and any("longer than maxSeqLength" in w for w in report.warnings)
        assert len(report.encoded_train) + len(report.encoded_validation) == kept
        assert all(len(e.input_ids) <= 128 for e in report.encoded_train)


def test_too_few_examples_is_an_error(tmp_path):
    path = write(tmp_path, [GOOD] * 10)
    with pytest.raises(DataError) as e:
        data.validate(Dataset(train=str(path)))
    assert_at(e.value.problems[0], path, 0, "only 10 valid training examples, at least 50")
    assert "minExamples" in str(e.value)
    assert data.validate(Dataset(train=str(path), min_examples=10)).examples == 9


def test_fewer_than_500_is_only_a_warning(tmp_path):
    path = write(tmp_path, [GOOD] * 60)
    report = data.validate(Dataset(train=str(path)))
    assert (report.examples, report.validation_examples) == (54, 6)  # default 10 % held out
    assert any("only 60 training examples" in w for w in report.warnings)
    assert any("warning: only 60" in line for line in report.summary_lines())


def test_validation_file_problems_name_that_file(tmp_path):
    train = write(tmp_path, [GOOD] * 60)
    val = write(tmp_path, [GOOD, "{oops"], "val.jsonl")
    with pytest.raises(DataError) as e:
        data.validate(Dataset(train=str(train), validation=str(val)))
    assert_at(e.value.problems[0], val, 2, "invalid JSON")


def test_300_bad_lines_give_a_bounded_message(tmp_path):
    path = write(tmp_path, [GOOD] * 60 + ["{bad json"] * 300)
    with pytest.raises(DataError) as e:
        data.validate(Dataset(train=str(path)))
    err = e.value
    assert err.total == 300 and len(err.problems) == 20
    text = str(err)
    lines = text.splitlines()
    assert lines[0].startswith(f"{path}:61: invalid JSON") and lines[19].startswith(f"{path}:80: ")
    assert lines[20] == "… and 280 more problems (300 in all)"
    assert len(text.encode()) <= 3072


def test_message_stays_bounded_with_long_paths():
    problems = [DataProblem("s3://" + "b" * 500 + "/t.jsonl", i, "é" * 500) for i in range(1, 40)]
    text = str(DataError(problems, stopped=True))
    assert len(text.encode()) <= 3072 and text.endswith("(39 in all); reading stopped after 10000")
    assert text.startswith("…" + "b" * 70) and "/t.jsonl:1: éé" in text


def test_reading_stops_after_the_problem_limit(tmp_path):
    path = write(tmp_path, ["[]"] * 50)
    records, problems = data.read_records(str(path), "chat", problem_limit=10)
    assert len(problems) == 10


# ------------------------------------------------------------------------------ other formats


def test_other_format_checks(tmp_path):
    cases = [
        ("promptCompletion", '{"prompt": "Q", "completion": ""}', "completion: empty content"),
        ("instruction", '{"instruction": "Do", "input": 3, "output": "ok"}', "input: expected a string"),
        ("instruction", '{"instruction": "Do", "output": "ok", "response": "x"}', "unknown key 'response'"),
        ("text", '{"text": 5}', "text: expected a string, got a number"),
    ]
    for fmt, line, fragment in cases:
        path = write(tmp_path, [line])
        assert_at(only_problem(path, fmt), path, 1, fragment)
    path = write(
        tmp_path, ['{"instruction": "Do", "output": "ok"}', '{"instruction": "Do", "input": "", "output": "ok"}']
    )
    assert data.read_records(str(path), "instruction")[1] == []


# ------------------------------------------------------------------------------ encoding


def trained_text(tok, example) -> str:
    assert all(l in (-100, i) for i, l in zip(example.input_ids, example.labels))
    return tok.decode([l for l in example.labels if l != -100])


def test_chat_loss_only_on_weighted_assistant_turns(tok):
    rec = Record(
        "f",
        1,
        {
            "messages": [
                SYSTEM,
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1", "weight": 0},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
                {"role": "user", "content": "Q3"},
                {"role": "assistant", "content": "A3", "weight": 1},
            ]
        },
    )
    ex = data.encode_example(rec, "chat", tok, 512, "truncate")
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert trained_text(tok, ex) == "A2<|im_end|>A3<|im_end|>"  # end-of-turn trained, newline not


def test_chat_without_template_uses_chatml_fallback(tok):
    plain = builtin.byte_tokenizer()
    plain.chat_template = None
    rec = Record("f", 1, json.loads(GOOD))
    assert data.encode_full(rec, "chat", plain) == data.encode_full(rec, "chat", tok)


def test_chat_template_that_is_not_prefix_stable_uses_offsets(tok):
    odd = builtin.byte_tokenizer()  # marks the end of a whole conversation: renderings of prefixes differ
    odd.chat_template = builtin.CHAT_TEMPLATE + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    rec = Record(
        "f",
        1,
        {
            "messages": [
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ]
        },
    )
    ex = data.encode_full(rec, "chat", odd)
    assert tok.decode(ex.input_ids).endswith("A2<|im_end|>\n<|endoftext|>")
    assert trained_text(tok, ex) == "A1<|im_end|>A2<|im_end|>"


def test_chat_template_refusal_names_the_line(tok):
    strict = builtin.byte_tokenizer()
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError) as e:
        data.encode_full(Record("t.jsonl", 7, json.loads(GOOD)), "chat", strict)
    assert str(e.value).startswith("t.jsonl:7: the chat template rejected this conversation: roles must alternate")


@pytest.mark.parametrize(
    "fmt, record, prompt, target",
    [
        ("promptCompletion", {"prompt": "2+2=", "completion": " 4"}, "2+2=", " 4<|im_end|>"),
        (
            "instruction",
            {"instruction": "Add.", "input": "2, 2", "output": "4"},
            "### Instruction:\nAdd.\n\n### Input:\n2, 2\n\n### Response:\n",
            "4<|im_end|>",
        ),
        (
            "instruction",
            {"instruction": "Say hi.", "output": "hi"},
            "### Instruction:\nSay hi.\n\n### Response:\n",
            "hi<|im_end|>",
        ),
        ("text", {"text": "Tents keep you dry."}, "", "Tents keep you dry.<|im_end|>"),
    ],
)
def test_prompt_tokens_are_masked(tok, fmt, record, prompt, target):
    ex = data.encode_example(Record("f", 1, record), fmt, tok, 512, "truncate")
    assert tok.decode(ex.input_ids) == prompt + target
    assert trained_text(tok, ex) == target
    assert ex.labels[: len(prompt.encode())] == [-100] * len(prompt.encode())


def test_overlength_policies(tok):
    rec = Record("t.jsonl", 3, {"text": "z" * 40})
    assert len(data.encode_example(rec, "text", tok, 16, "truncate").input_ids) == 16
    assert data.encode_example(rec, "text", tok, 16, "drop") is None
    with pytest.raises(DataError, match=r"t.jsonl:3: example has 41 tokens, maxSeqLength is 16"):
        data.encode_example(rec, "text", tok, 16, "error")


# ------------------------------------------------------------------------------ split


def test_split_is_deterministic_and_holds_out_at_least_one():
    records = list(range(100))
    train, val = data.split(records, 0.1, seed=3)
    assert (train, val) == data.split(records, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == records
    assert val != data.split(records, 0.1, seed=4)[1]
    assert len(data.split(list(range(3)), 0.1, seed=0)[1]) == 1
    code = "from kubetune.trainer.data import split; print(split(list(range(100)), 0.1, 3)[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(val)


# ------------------------------------------------------------------------------ packing


def ex(n: int, start: int = 10):
    return data.Example(list(range(start, start + n)), list(range(start, start + n)))


def test_pack_first_fit_in_order():
    packed = data.pack([ex(6), ex(6, 50), ex(3, 80), ex(3, 90)], 10)
    assert [len(p["input_ids"]) for p in packed] == [9, 9]
    assert packed[0]["input_ids"] == list(range(10, 16)) + [80, 81, 82]
    assert packed[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert packed[0]["labels"] == [-100, 11, 12, 13, 14, 15, -100, 81, 82]
    with pytest.raises(ValueError):
        data.pack([ex(11)], 10)


def test_collator_padding_and_packing():
    batch = data.Collator(pad_token_id=3)([ex(4), ex(2)])
    assert batch["input_ids"].tolist()[1] == [10, 11, 3, 3]
    assert batch["labels"].tolist()[1] == [10, 11, -100, -100]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    packed = data.Collator(pad_token_id=3, packing=True, pad_to_multiple_of=8)(data.pack([ex(3), ex(2), ex(6)], 6))
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]


def test_efficiency_numbers():
    assert data.efficiency([ex(4), ex(2)], 2, 8, packing=False) == 6 / 8
    assert data.efficiency([ex(4), ex(2)], 2, 8, packing=True) == 1.0


def test_packing_beats_padding_on_support_data(tok):
    records, problems = data.read_records(str(SUPPORT), "chat")
    assert not problems and len(records) >= 240
    examples = [data.encode_example(r, "chat", tok, 512, "truncate") for r in records]
    padded = data.efficiency(examples, 8, 512, packing=False)
    packed = data.efficiency(examples, 8, 512, packing=True)
    assert packed > padded + 0.05, (padded, packed)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked(tok, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin.ensure("tiny-llama"), attn_implementation=attn).eval()
    records, _ = data.read_records(str(SUPPORT), "chat")
    examples = [data.encode_example(r, "chat", tok, 512, "truncate") for r in records[:6]]
    packed = data.pack(examples, 1024)
    assert any(len(p["position_ids"]) > max(p["position_ids"]) + 1 for p in packed)  # really packed
    batch = data.Collator(tok.pad_token_id, packing=True)(packed)
    assert model.config.use_cache  # the trap: with a cache, transformers skips packed masking
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        data.prepare_model_for_packing(model)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]
        padded = model(**{k: v for k, v in data.Collator(tok.pad_token_id)(examples).items() if k != "labels"}).logits
    order = [i for group in data._first_fit([len(e.input_ids) for e in examples], 1024) for i in group]
    rows = [(b, s) for b, p in enumerate(packed) for s in [i for i, x in enumerate(p["position_ids"]) if x == 0]]
    worst = leak = 0.0
    for i, (b, start) in zip(order, rows):
        n = len(examples[i].input_ids)
        worst = max(worst, (logits[b, start : start + n] - alone[i]).abs().max().item())
        worst = max(worst, (padded[i, :n] - alone[i]).abs().max().item())
        leak = max(leak, (leaky[b, start : start + n] - alone[i]).abs().max().item())
    assert worst < 1e-5
    assert leak > 1e-3  # documents why prepare_model_for_packing exists; fails once transformers changes

    with torch.no_grad():  # and the summed loss over label tokens is the same

        def loss_sum(logits, labels):
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )

        packed_loss = loss_sum(logits, batch["labels"])
        single = sum(loss_sum(a[None], torch.tensor([e.labels])) for a, e in zip(alone, examples))
    assert torch.allclose(packed_loss, single, rtol=1e-5)


# ------------------------------------------------------------------------------ storage


def test_fsspec_memory_url_and_gzip(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/kubetune-test/train.jsonl", (GOOD + "\n{bad\n").encode())
    records, problems = data.read_records("memory://kubetune-test/train.jsonl", "chat")
    assert len(records) == 1 and str(problems[0]).startswith("memory://kubetune-test/train.jsonl:2: invalid JSON")
    _, problems = data.read_records("memory://kubetune-test/missing.jsonl", "chat")
    assert_at(problems[0], "memory://kubetune-test/missing.jsonl", 0, "file not found")
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress((GOOD + "\n").encode()))
    assert len(data.read_records(f"file://{gz}", "chat")[0]) == 1


class _DeniedFS(MemoryFileSystem):
    protocol = "kubetune-denied"

    def _open(self, path, mode="rb", **kwargs):
        raise PermissionError("AccessDenied")


class NoCredentialsError(Exception):
    pass


class _NoCredsFS(MemoryFileSystem):
    protocol = "kubetune-nocreds"

    def _open(self, path, mode="rb", **kwargs):
        raise NoCredentialsError("Unable to locate credentials")


def test_storage_errors_name_the_uri_and_credentials():
    fsspec.register_implementation("kubetune-denied", _DeniedFS, clobber=True)
    fsspec.register_implementation("kubetune-nocreds", _NoCredsFS, clobber=True)
    _, [p] = data.read_records("kubetune-denied://b/t.jsonl", "chat")
    assert_at(p, "kubetune-denied://b/t.jsonl", 0, "permission denied reading kubetune-denied://b/t.jsonl")
    assert "credentials" in p.message
    _, [p] = data.read_records("kubetune-nocreds://b/t.jsonl", "chat")
    assert "NoCredentialsError: Unable to locate credentials" in p.message and "credentials" in p.message
    assert "Traceback" not in str(p)


def test_pvc_uri_maps_under_the_volume_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    (tmp_path / "claim").mkdir()
    write(tmp_path / "claim", [GOOD, "[]"])
    records, problems = data.read_records("pvc://claim/train.jsonl", "chat")
    assert len(records) == 1 and str(problems[0]).startswith("pvc://claim/train.jsonl:2: ")
    _, [p] = data.read_records("pvc://claim/../../etc/passwd", "chat")
    assert p.line == 0 and "outside the volume root" in p.message


def test_validate_support_data_with_tokenizer(tok):
    ds = Dataset(train=str(SUPPORT), max_seq_length=512)
    report = data.validate(ds, tokenizer=tok, seed=0)
    assert report.examples + report.validation_examples >= 240
    stats = report.token_stats
    assert stats["p95"] <= 512 and stats["label_tokens"] > 0 and report.overlength == 0
    assert len(report.summary_lines()) >= 3


# ------------------------------------------------------------------ I2: inputs that used to crash


def test_assistant_first_conversation_is_refused_before_training(tmp_path, tok):
    """It passed the validation Job, then crashed the trainer (exit 1, retried on GPUs)."""
    path = write(
        tmp_path,
        [GOOD, chat(("assistant", "Hello!"), ("user", "hi"), ("assistant", "ok")), chat(SYSTEM, ("assistant", "Hi"))],
    )
    records, problems = data.read_records(str(path), "chat")
    assert [(p.line, p.message) for p in problems] == [
        (
            2,
            "messages[0]: the conversation starts with 'assistant'; it must start with a user message (after an optional system message)",
        ),
        (
            3,
            "messages[1]: the conversation starts with 'assistant'; it must start with a user message (after an optional system message)",
        ),
    ]
    assert [r.line for r in records] == [1] and data.encode_full(records[0], "chat", tok).input_ids


def test_lone_surrogate_is_refused_with_its_line(tmp_path):
    path = write(
        tmp_path,
        [
            GOOD,
            '{"messages": [{"role": "user", "content": "bad \\ud800 text"}, {"role": "assistant", "content": "ok"}]}',
        ],
    )
    assert_at(only_problem(path), path, 2, "unpaired surrogate '\\ud800' at character 5")
    assert "fix the \\u escape" in only_problem(path).message


def test_one_bad_line_never_stops_the_report(tmp_path):
    """A huge number or deep nesting used to end the read with "check the storage credentials"."""
    path = write(
        tmp_path,
        [
            GOOD,
            '{"messages": [], "n": ' + "9" * 5000 + "}",
            GOOD,
            '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
            GOOD,
        ],
    )
    records, problems = data.read_records(str(path), "chat")
    assert [r.line for r in records] == [1, 3, 5]
    assert [p.line for p in problems] == [2, 4]
    assert "4300" in problems[0].message or "digits" in problems[0].message
    assert "nested too deeply" in problems[1].message
    assert not any("credentials" in p.message for p in problems)


@pytest.mark.parametrize("suffix", [".gz", ".bz2"])
def test_decompression_is_capped(tmp_path, suffix):
    """A 1 MB .gz ran for more than 600 s; .bz2 packs 64 MiB into 81 bytes."""
    import bz2

    payload = b"x" * (150 * 2**20)  # one endless line: decompresses far past 100x its size
    packed = gzip.compress(payload, 9) if suffix == ".gz" else bz2.compress(payload, 9)
    path = tmp_path / f"train.jsonl{suffix}"
    path.write_bytes(packed)
    records, problems = data.read_records(str(path), "chat")
    assert records == [] and len(problems) == 1, problems  # stopped inside the endless first line
    assert problems[0].line == 0 and "decompresses to more than 100× its compressed size" in problems[0].message
    ok = tmp_path / f"ok.jsonl{suffix}"
    ok.write_bytes(
        gzip.compress((GOOD + "\n").encode() * 50) if suffix == ".gz" else bz2.compress((GOOD + "\n").encode() * 50)
    )
    assert len(data.read_records(str(ok), "chat")[0]) == 50  # ordinary compressed data reads


def test_storage_errors_are_told_apart_from_content(tmp_path):
    missing = data.read_records(str(tmp_path / "nope.jsonl"), "chat")[1]
    assert [p.message for p in missing] == ["file not found; check the path or URI (and the bucket name)"]
    path = write(tmp_path, [GOOD, "{bad"])
    content = data.read_records(str(path), "chat")[1]
    assert content[0].line == 2 and "invalid JSON" in content[0].message and "credentials" not in content[0].message


@pytest.mark.parametrize(
    ("weight", "ok"), [(0, True), (1, True), (0.0, True), (1.0, True), (True, False), ("1", False), (0.5, False)]
)
def test_weight_accepts_integral_numbers(tmp_path, weight, ok):
    line = chat(
        ("user", "q"),
        {"role": "assistant", "content": "a", "weight": 1},
        ("user", "q2"),
        {"role": "assistant", "content": "b", "weight": weight},
    )
    records, problems = data.read_records(str(write(tmp_path, [line])), "chat")
    assert bool(records) == ok, problems


def test_check_streams_and_finds_what_validate_finds(tmp_path):
    lines = [GOOD] * 120 + ['{"messages": 3}', chat(("assistant", "x"))] + [GOOD] * 10
    path = write(tmp_path, lines)
    ds = Dataset(train=str(path), format="chat", minExamples=10)
    with pytest.raises(DataError) as streamed:
        data.check(ds)
    with pytest.raises(DataError) as kept:
        data.validate(ds)
    assert [str(p) for p in streamed.value.problems] == [str(p) for p in kept.value.problems]
    assert streamed.value.total == kept.value.total == 2
    good = Dataset(train=str(write(tmp_path, [GOOD] * 130, "good.jsonl")), format="chat", minExamples=10)
    report, full = data.check(good), data.validate(good)
    assert (report.examples, report.validation_examples) == (full.examples, full.validation_examples) == (117, 13)
    assert report.train == [] and report.warnings == full.warnings


def test_chat_templates_render_in_a_sandbox(tmp_path, tok):
    """A model's chat template is untrusted input: transformers renders it in jinja2's sandbox
    (jinja2 >= 3.1.6, pyproject), so a template reaching for Python internals is refused with the
    record's FILE:LINE instead of running."""
    import copy

    evil = copy.deepcopy(tok)
    evil.chat_template = (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    record = Record(
        "train.jsonl", 7, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    with pytest.raises(DataError) as refused:
        data.encode_full(record, "chat", evil)
    assert str(refused.value).startswith("train.jsonl:7: the chat template rejected this conversation")


def test_packing_attention_choice_per_device(monkeypatch):
    """Flash-attention varlen (padding-free) on CUDA when flash_attn is installed, SDPA with the
    block-diagonal mask otherwise (CPU, or a GPU without flash_attn)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a)
    )
    assert data.packing_attention("cuda") == "flash_attention_2"
    assert data.packing_attention("cpu") == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert data.packing_attention("cuda") == "sdpa"


def test_packed_chunked_loss_equals_examples_alone(tok):
    """The trainer's packed path end to end on this device's choice: the chunked loss of packed
    rows (position ids, no mask) equals the summed losses of each example run alone."""
    from kubetune.trainer import chunked
    from transformers import AutoModelForCausalLM

    attn = data.packing_attention("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(builtin.ensure("tiny-llama"), attn_implementation=attn).eval()
    data.prepare_model_for_packing(model)
    records, _ = data.read_records(str(SUPPORT), "chat")
    examples = [data.encode_example(r, "chat", tok, 512, "truncate") for r in records[:6]]
    packed = data.pack(examples, 1024)
    batch = data.Collator(tok.pad_token_id, packing=True)(packed)
    with torch.no_grad():
        hidden = chunked.forward_hidden(model, {k: v for k, v in batch.items() if k != "labels"})
        total, n = chunked.cross_entropy_sum(hidden, batch["labels"], chunk=50)
        alone = 0.0
        for e in examples:
            h = chunked.forward_hidden(model, {"input_ids": torch.tensor([e.input_ids])})
            alone += float(chunked.cross_entropy_sum(h, torch.tensor([e.labels]))[0])
    assert n == sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
    assert float(total) == pytest.approx(alone, rel=1e-5)
