"""Encoding: one checked record → token ids, loss labels and (attention guidance) an evidence mask.

Chat examples render with the tokenizer's chat template (or the ChatML fallback); loss falls on
trained assistant content and the end-of-turn token after it; prompt tokens take none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetune.api.enums import DatasetFormat, OverlengthPolicy
from kubetune.trainer.data.records import DataError, DataProblem, Record, _clip

IGNORE_INDEX = -100  # labels that take no loss (the value torch's cross-entropy ignores)

# ------------------------------------------------------------------------------ tokenising


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    guide_mask: list[int] | None = None  # attention guidance (spans): 1 on evidence tokens


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer that ships no chat template the one training renders with
    (`builtin.fallback_chat_template`), so the saved tokenizer carries it."""
    from kubetune.trainer.builtin import fallback_chat_template

    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = fallback_chat_template(tokenizer)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    from kubetune.trainer.builtin import fallback_chat_template

    fallback = {} if getattr(tokenizer, "chat_template", None) else {"chat_template": fallback_chat_template(tokenizer)}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **fallback)


def _turn_end(tokenizer, ids: list[int], start: int) -> int:
    """End of an assistant span: through its end-of-turn special token, without the newline after."""
    special = set(tokenizer.all_special_ids)
    end = len(ids)
    while end > start and ids[end - 1] not in special and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end if end > start and ids[end - 1] in special else len(ids)


def _encode_chat(record: Record, tokenizer) -> Example:
    import jinja2

    raw = record.data["messages"]
    messages = [{k: m[k] for k in ("role", "content", "name") if k in m} for m in raw]
    trained = [i for i, m in enumerate(raw) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    try:
        full = _ids(tokenizer, _render(tokenizer, messages, False))
        labels = [IGNORE_INDEX] * len(full)
        for i in trained:
            before = _ids(tokenizer, _render(tokenizer, messages[:i], True))
            upto = _ids(tokenizer, _render(tokenizer, messages[: i + 1], False))
            if upto[: len(before)] != before or full[: len(upto)] != upto:
                return _encode_chat_offsets(record, tokenizer, messages, trained)
            end = _turn_end(tokenizer, upto, len(before))
            labels[len(before) : end] = full[len(before) : end]
    except jinja2.TemplateError as e:  # templates refuse some conversations via raise_exception()
        raise DataError(
            [
                DataProblem(
                    record.file, record.line, f"the chat template rejected this conversation: {_clip(str(e), 160)}"
                )
            ]
        ) from e
    return Example(full, labels)


def _encode_chat_offsets(record: Record, tokenizer, messages: list[dict], trained: list[int]) -> Example:
    """For templates whose renderings are not prefixes of each other: locate content by characters."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            [
                DataProblem(
                    record.file,
                    record.line,
                    "the chat template is not prefix-stable "
                    "and a slow tokenizer has no character offsets; use the model's fast tokenizer",
                )
            ]
        )
    text = _render(tokenizer, messages, False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        pos = text.find(m["content"], cursor)
        if pos < 0:
            raise DataError(
                [
                    DataProblem(
                        record.file,
                        record.line,
                        f"the chat template changes the "
                        f"content of messages[{i}], so assistant tokens cannot be located; use a "
                        "model whose template keeps message content verbatim",
                    )
                ]
            )
        cursor = pos + len(m["content"])
        if i in trained:
            spans.append((pos, cursor))
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        hit = [j for j, (s, e) in enumerate(offsets) if s < end and e > start]
        for j in hit:
            labels[j] = ids[j]
        if hit and hit[-1] + 1 < len(ids) and ids[hit[-1] + 1] in special:
            labels[hit[-1] + 1] = ids[hit[-1] + 1]  # the end-of-turn token
    return Example(ids, labels)


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt used for the instruction format (its tokens take no loss)."""
    middle = f"### Input:\n{input_text}\n\n" if input_text.strip() else ""
    return f"### Instruction:\n{instruction}\n\n{middle}### Response:\n"


def encode_full(record: Record, fmt: DatasetFormat | str, tokenizer) -> Example:
    """Tokenise one checked record with its loss mask, before any length policy."""
    fmt, d = DatasetFormat(fmt), record.data
    if fmt == DatasetFormat.CHAT:
        return _encode_chat(record, tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == DatasetFormat.PROMPT_COMPLETION:
        prompt, answer = d["prompt"], d["completion"]
    elif fmt == DatasetFormat.INSTRUCTION:
        prompt, answer = instruction_prompt(d["instruction"], d.get("input", "")), d["output"]
    else:
        ids = bos + _ids(tokenizer, d["text"]) + eos
        return Example(ids, list(ids))
    masked, target = bos + _ids(tokenizer, prompt), _ids(tokenizer, answer) + eos
    return Example(masked + target, [IGNORE_INDEX] * len(masked) + target)


def overlength_message(n: int, max_seq_length: int) -> str:
    return (
        f"example has {n} tokens, maxSeqLength is {max_seq_length}; raise maxSeqLength or set overlength: truncate|drop"
    )


def apply_overlength(
    example: Example, record: Record, max_seq_length: int, overlength: OverlengthPolicy | str
) -> Example | None:
    n = len(example.input_ids)
    if n <= max_seq_length:
        return example
    policy = OverlengthPolicy(overlength)
    if policy == OverlengthPolicy.DROP:
        return None
    if policy == OverlengthPolicy.ERROR:
        raise DataError([DataProblem(record.file, record.line, overlength_message(n, max_seq_length))])
    return Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])


def encode_example(
    record: Record, fmt: DatasetFormat | str, tokenizer, max_seq_length: int, overlength: OverlengthPolicy | str
) -> Example | None:
    """Tokens and labels for one record; None when dropped for length; DataError on `error`."""
    return apply_overlength(encode_full(record, fmt, tokenizer), record, max_seq_length, overlength)


def supervised_tokens(example: Example) -> int:
    """Tokens the loss is taken on: labels after the first (nothing predicts the first token)."""
    return sum(1 for x in example.labels[1:] if x != IGNORE_INDEX)


UNSUPERVISED_LISTED = 5


def unsupervised_warning(records: Sequence[Record], max_seq_length: int) -> str:
    """One line about examples dropped because no trained token was left, FILE:LINE of the first few."""
    where = ", ".join(f"{r.file}:{r.line}" for r in records[:UNSUPERVISED_LISTED])
    more = f" and {len(records) - UNSUPERVISED_LISTED} more" if len(records) > UNSUPERVISED_LISTED else ""
    return (
        f"{len(records)} examples have no trained token left after truncation to maxSeqLength {max_seq_length} "
        f"(the prompt fills it) and are dropped: {where}{more}; raise spec.dataset.maxSeqLength or shorten "
        "their prompts"
    )


def no_supervision_message(part: str, records: Sequence[Record], max_seq_length: int) -> str:
    """Why training cannot start when no example of `part` ('training'/'validation') keeps a trained token."""
    where = ", ".join(f"{r.file}:{r.line}" for r in records[:UNSUPERVISED_LISTED])
    return (
        f"spec.dataset.maxSeqLength: no {part} example has a trained token left after truncation to "
        f"{max_seq_length} tokens ({len(records)} dropped, e.g. {where}): training would learn nothing; raise "
        "maxSeqLength or shorten the prompts"
    )
