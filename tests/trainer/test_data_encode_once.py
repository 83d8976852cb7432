"""The data layer tokenises each record once (issue 17): ids, loss labels, per-message weights and the
attention-guidance evidence mask all come from one tokenizer call per record, on the run's whole
supervised data path (encode → dataset report → length policy and spans), and they equal what the
former encoder computed with one tokenisation per prefix, re-derived here from first principles.

Two fast tokenizers: the byte tokenizer and a small byte-level BPE trained here with GPT-2's
pre-tokenizer regex (real merges, so token boundaries are not character boundaries), with a BOS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.manifest import load_job
from kubetune.trainer import data, datareport
from kubetune.trainer import run as run_module
from kubetune.trainer.builtin import CHAT_TEMPLATE, byte_tokenizer
from transformers import PreTrainedTokenizerBase

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n\n",
    "Where is order 1042? It shipped on Monday.",
    "blue sky, green grass; é à ü 😀",
    "  leading spaces\tand tabs\n\nnew paragraphs  ",
]


def bpe_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


TOKENIZERS = {"byte": byte_tokenizer, "bpe": bpe_tokenizer}

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is order 1042? It shipped on Monday."},
            {"role": "assistant", "content": "Order 1042 is on its way.", "weight": 0},
            {"role": "user", "content": "And the blue sky?"},
            {"role": "assistant", "content": "green grass; é à ü 😀"},
        ],
        "evidence": [[0, 14], [9, 13, 1]],  # the last user message's "And the blue", "1042" of message 1
    },
    {
        "messages": [
            {"role": "user", "content": "  leading spaces\tand tabs"},
            {"role": "assistant", "content": "new paragraphs  "},
            {"role": "user", "content": "The quick brown fox"},
            {"role": "assistant", "content": "jumps over\n\nthe lazy dog."},
        ],
        "evidence": [[4, 15]],
    },
]
PROMPT_COMPLETION = [
    {"prompt": "ctx: the key is 42. q?", "completion": " 42", "evidence": [[5, 19], [1, 3, "completion"]]},
    {"prompt": "blue sky, green grass", "completion": "é à ü", "evidence": []},
]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """Every tokenizer entry point counted: each call appends the list of texts it tokenised."""
    seen: list[list[str]] = []
    call, encode, template = (
        PreTrainedTokenizerBase.__call__,
        PreTrainedTokenizerBase.encode,
        PreTrainedTokenizerBase.apply_chat_template,
    )

    def counted_call(self: Any, text: Any = None, *args: Any, **kw: Any) -> Any:
        seen.append([text] if isinstance(text, str) else list(text))
        return call(self, text, *args, **kw)

    def counted_encode(self: Any, text: Any, *args: Any, **kw: Any) -> Any:
        seen.append([text])
        return encode(self, text, *args, **kw)

    def counted_template(self: Any, conversation: Any, *args: Any, **kw: Any) -> Any:
        if kw.get("tokenize", True):
            seen.append(["<apply_chat_template tokenize=True>"])
        return template(self, conversation, *args, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counted_call)
    monkeypatch.setattr(PreTrainedTokenizerBase, "encode", counted_encode)
    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", counted_template)
    yield seen


def render(tok: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return str(tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt))


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def reference_chat(tok: Any, record: dict) -> tuple[list[int], list[int]]:
    """The former encoder: the whole conversation tokenised, and for each trained assistant message
    the renderings before it (with the generation prompt) and through it tokenised on their own;
    labels from the first's end through the end-of-turn token."""
    messages = record["messages"]
    full = ids(tok, render(tok, messages))
    labels = [data.IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before, upto = ids(tok, render(tok, messages[:i], True)), ids(tok, render(tok, messages[: i + 1]))
        assert upto[: len(before)] == before and full[: len(upto)] == upto  # ChatML is prefix-stable
        end = len(upto) - 1 if tok.decode(upto[-1:]) == "\n" else len(upto)  # through <|im_end|>, not the newline
        labels[len(before) : end] = full[len(before) : end]
    return full, labels


def reference_mask(tok: Any, text: str, at: int, spans: list[tuple[int, int]], first: int, n: int) -> list[int]:
    """1 on each token of `text` (tokenised alone, placed from `first`) overlapping a span at `at`."""
    mask = [0] * n
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    for start, end in spans:
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            if s < at + end and e > at + start:
                mask[first + j] = 1
    return mask


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_chat_is_tokenised_once_and_encodes_as_before(name: str, calls: list[list[str]]) -> None:
    tok = TOKENIZERS[name]()
    for line, row in enumerate(CHAT, 1):
        expected_ids, expected_labels = reference_chat(tok, row)
        text = render(tok, row["messages"])
        calls.clear()
        enc = data.encode_record(data.Record("f.jsonl", line, row), "chat", tok)
        mask = enc.guide_mask("evidence")
        assert calls == [[text]]  # one call, the rendered conversation once: nothing tokenised twice
        assert enc.example.input_ids == expected_ids
        assert enc.example.labels == expected_labels
        # the evidence mask from that same encoding equals a fresh tokenisation's offsets
        expected = [0] * len(expected_ids)
        cursor = 0
        for i, m in enumerate(row["messages"]):
            at = text.index(m["content"], cursor)
            cursor = at + len(m["content"])
            users = [k for k, x in enumerate(row["messages"]) if x["role"] == "user"]
            spans = [(s[0], s[1]) for s in row["evidence"] if (s[2] if len(s) == 3 else users[-1]) == i]
            part = reference_mask(tok, text, at, spans, 0, len(expected_ids))
            expected = [a | b for a, b in zip(expected, part)]
        assert mask == expected and sum(mask) > 0
    # weight 0 takes no loss: the first record's labels decode to the second answer only
    enc = data.encode_record(data.Record("f.jsonl", 1, CHAT[0]), "chat", tok)
    trained = tok.decode([x for x in enc.example.labels if x != data.IGNORE_INDEX])
    assert trained == "green grass; é à ü 😀<|im_end|>"


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_prompt_completion_is_tokenised_once_and_encodes_as_before(name: str, calls: list[list[str]]) -> None:
    tok = TOKENIZERS[name]()
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for line, row in enumerate(PROMPT_COMPLETION, 1):
        prompt, answer = ids(tok, row["prompt"]), ids(tok, row["completion"])
        calls.clear()
        enc = data.encode_record(data.Record("f.jsonl", line, row), "promptCompletion", tok)
        mask = enc.guide_mask("evidence")
        # one call: prompt and completion each tokenised once (apart, as ever: no merge across them)
        assert calls == [[row["prompt"], row["completion"]]]
        n = len(bos) + len(prompt) + len(answer) + 1
        assert enc.example.input_ids == bos + prompt + answer + [tok.eos_token_id]
        assert enc.example.labels == [data.IGNORE_INDEX] * (len(bos) + len(prompt)) + answer + [tok.eos_token_id]
        spans = row["evidence"]
        expected = reference_mask(tok, row["prompt"], 0, [(s[0], s[1]) for s in spans if len(s) == 2], len(bos), n)
        tail = [(s[0], s[1]) for s in spans if len(s) == 3]
        expected = [
            a | b for a, b in zip(expected, reference_mask(tok, row["completion"], 0, tail, len(bos) + len(prompt), n))
        ]
        assert mask == expected
    enc = data.encode_record(data.Record("f.jsonl", 1, PROMPT_COMPLETION[0]), "promptCompletion", tok)
    evidence = [t for t, m in zip(enc.example.input_ids, enc.guide_mask("evidence")) if m]
    assert tok.decode(evidence).startswith("the key is 42.") if name == "byte" else "key" in tok.decode(evidence)


def test_the_run_data_path_tokenises_each_record_once(tmp_path: Path, calls: list[list[str]]) -> None:
    """encode_all → datareport.build → run._encode (length policy, spans), as run.py trains: one
    tokenizer call per record, training and validation, spans included."""
    rows = [CHAT[i % 2] for i in range(10)]
    train = tmp_path / "spans.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "job.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "spans"},
                "spec": {
                    "model": {"source": "builtin://tiny-llama"},
                    "dataset": {
                        "train": str(train),
                        "validationSplit": 0.2,
                        "maxSeqLength": 85,  # truncates the first conversation, inside its trained answer
                        "overlength": "truncate",
                        "minExamples": 1,
                    },
                    "method": {
                        "adaptation": "lora",
                        "objectives": [
                            {
                                "type": "attentionGuidance",
                                "attentionGuidance": {"guide": "spans", "spansField": "evidence", "weight": 0.5},
                            }
                        ],
                    },
                    "output": {"uri": (tmp_path / "out").as_uri()},
                },
            }
        )
    )
    spec = load_job(str(tmp_path / "job.yaml")).spec
    report = data.validate(spec.dataset, extra_keys=data.extra_keys_for(spec), seed=0)
    tok = bpe_tokenizer()
    calls.clear()
    train_enc = data.encode_all(report.train, spec.dataset.format, tok)
    val_enc = data.encode_all(report.validation, spec.dataset.format, tok)
    summary = datareport.build(spec, report.train, report.validation, encoded=train_enc + val_enc)
    examples, dropped = run_module._encode(train_enc, spec)
    held_out, _ = run_module._encode(val_enc, spec)
    assert len(calls) == len(rows) == len(report.train) + len(report.validation)
    assert not dropped and len(examples) == 8 and len(held_out) == 2
    # the report counts the very encodings (before truncation); training keeps them truncated, with spans
    lengths = sorted(len(e.example.input_ids) for e in train_enc)
    assert summary["tokensExact"] and summary["tokens"]["total"] == sum(lengths)
    assert summary["tokens"]["max"] == lengths[-1] > 85 and summary["tokens"]["min"] == lengths[0]
    for enc, ex in zip(train_enc, examples):
        assert ex.input_ids == enc.example.input_ids[:85] and ex.labels == enc.example.labels[:85]
        assert ex.guide_mask == enc.guide_mask("evidence")[:85] and sum(ex.guide_mask) > 0


def test_data_package_imports_no_ml_stack() -> None:
    """The gateway and `kubetune validate --data` import the package and run its checks without torch."""
    code = (
        "import sys; from kubetune.trainer import data; import kubetune.trainer.data.checks;"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
