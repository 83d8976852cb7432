"""Encoding: one checked record → token ids, loss labels and (attention guidance) an evidence mask.

Each record is tokenised once (`encode_record`); labels, per-message weights and the evidence mask of
`spans` are all derived from that one encoding, through the character offsets a fast tokenizer
returns. Chat examples render with the tokenizer's chat template (or the ChatML fallback); loss
falls on trained assistant content and the end-of-turn token after it; prompt tokens take none.

Chat labels: for a trained message i, the renderings of messages[:i] with the generation prompt
(`before`) and of messages[:i+1] (`upto`) are prefixes of the whole conversation's text when the
template is prefix-stable; the tokens from `before`'s end to the end-of-turn token inside `upto`
are labelled. Where the template is not prefix-stable (or a token straddles those boundaries),
the message's content is located by characters instead. A slow tokenizer has no offsets: it
falls back to tokenising the prefixes (one extra tokenisation per trained message), and spans
are refused for it.

Spans (`attentionGuidance.guide: spans`): `record[spans_field]` is a list `[start, end]`
(characters, end exclusive) or `[start, end, where]`; `where` names one string of the record — a
key (`text`, `prompt`, `completion`, `instruction`, `input`, `output`) or, for chat, a message
index. Without it: `text`, `prompt`, `input` (`instruction` when input is empty), or the last user
message. The mask is 1 on every token overlapping a span; batches carry it as
`batch[GUIDE_MASK_KEY]` (the collator pads it), which objectives/attention_guidance.py reads.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api.enums import DatasetFormat, OverlengthPolicy
from kubetune.trainer.data.records import DataError, DataProblem, Record, _clip

IGNORE_INDEX = -100  # labels that take no loss (the value torch's cross-entropy ignores)
GUIDE_MASK_KEY = "guide_mask"  # the batch key of the evidence mask (attention guidance, spans)

# ------------------------------------------------------------------------------ tokenising


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    guide_mask: list[int] | None = None  # attention guidance (spans): 1 on evidence tokens


Offsets = list[tuple[int, int]]
# A text tokenised as one unit: its first token in ids, its tokens' (start, end) flattened, {where: char offset}
Piece = tuple[int, array, dict[Any, int]]


def _piece(first: int, offsets: Offsets, at: dict[Any, int]) -> Piece:
    """Offsets kept flat in an int array: 8 bytes a token while the encodings live, not a tuple each."""
    return first, array("i", [x for pair in offsets for x in pair]), at


def _tokenise(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[Offsets] | None]:
    """The one tokenizer call of a record: each text without special tokens, with character
    offsets when the tokenizer is fast (None otherwise)."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
    ids = [list(x) for x in enc["input_ids"]]
    return ids, ([[(int(s), int(e)) for s, e in o] for o in enc["offset_mapping"]] if fast else None)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer that ships no chat template the one training renders with
    (`builtin.fallback_chat_template`), so the saved tokenizer carries it."""
    from kubetune.trainer.builtin import fallback_chat_template

    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = fallback_chat_template(tokenizer)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    from kubetune.trainer.builtin import fallback_chat_template

    fallback = {} if getattr(tokenizer, "chat_template", None) else {"chat_template": fallback_chat_template(tokenizer)}
    return str(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **fallback)
    )


def _turn_end(tokenizer: Any, ids: list[int], start: int) -> int:
    """End of an assistant span: through its end-of-turn special token, without the newline after."""
    special = set(tokenizer.all_special_ids)
    end = len(ids)
    while end > start and ids[end - 1] not in special and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end if end > start and ids[end - 1] in special else len(ids)


def _boundary(offsets: Offsets, char: int) -> int | None:
    """The index of the first token at or after character `char`; None when a token straddles it."""
    n = sum(1 for _, e in offsets if e <= char)
    if n < len(offsets) and offsets[n][0] < char:
        return None
    return n


def _chat_labels(
    tokenizer: Any, messages: list[dict], trained: list[int], text: str, ids: list[int], offsets: Offsets
) -> list[int] | None:
    """Labels from the prefix renderings mapped onto the one encoding; None when not prefix-stable."""
    labels = [IGNORE_INDEX] * len(ids)
    for i in trained:
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            return None
        start, stop = _boundary(offsets, len(before)), _boundary(offsets, len(upto))
        if start is None or stop is None:
            return None
        end = _turn_end(tokenizer, ids[:stop], start)
        labels[start:end] = ids[start:end]
    return labels


def _prefix_labels(tokenizer: Any, messages: list[dict], trained: list[int], ids: list[int]) -> list[int] | None:
    """Labels by tokenising the prefix renderings (slow tokenizers: no offsets); None when not prefix-stable."""
    labels = [IGNORE_INDEX] * len(ids)
    for i in trained:
        before = _ids(tokenizer, _render(tokenizer, messages[:i], True))
        upto = _ids(tokenizer, _render(tokenizer, messages[: i + 1], False))
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            return None
        end = _turn_end(tokenizer, upto, len(before))
        labels[len(before) : end] = ids[len(before) : end]
    return labels


def _offset_labels(
    record: Record,
    tokenizer: Any,
    messages: list[dict],
    trained: list[int],
    text: str,
    ids: list[int],
    offsets: Offsets,
) -> list[int]:
    """For templates whose renderings are not prefixes of each other: locate content by characters."""
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
    special = set(tokenizer.all_special_ids)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        hit = [j for j, (s, e) in enumerate(offsets) if s < end and e > start]
        for j in hit:
            labels[j] = ids[j]
        if hit and hit[-1] + 1 < len(ids) and ids[hit[-1] + 1] in special:
            labels[hit[-1] + 1] = ids[hit[-1] + 1]  # the end-of-turn token
    return labels


@dataclass
class Encoding:
    """A record tokenised once: its example before any length policy, and where the record's
    strings lie among the tokens (what evidence spans map through)."""

    record: Record
    example: Example
    pieces: list[Piece] | None  # None: the tokenizer gives no character offsets
    strings: dict[Any, str]  # the strings a span's `where` can name
    default: Any  # the `where` of a span that names none

    def guide_mask(self, spans_field: str = "spans", length: int | None = None) -> list[int]:
        """0/1 per token of `example`: 1 where a token overlaps an evidence span of
        `record[spans_field]` (module docstring); `length` keeps the first tokens, as truncation
        does. Bad spans raise DataError naming the file, line and span."""
        record = self.record

        def problem(msg: str) -> DataError:
            return DataError([DataProblem(record.file, record.line, f"{spans_field}: {msg}")])

        spans = record.data.get(spans_field, [])
        if not isinstance(spans, list):
            raise problem("expected an array of [start, end] spans")
        if self.pieces is None:
            raise problem("mapping character spans to tokens needs a fast tokenizer (character offsets)")
        mask = [0] * len(self.example.input_ids)
        for n, span in enumerate(spans):
            if not (
                isinstance(span, list)
                and len(span) in (2, 3)
                and all(isinstance(x, int) and not isinstance(x, bool) for x in span[:2])
            ):
                raise problem(f"[{n}]: expected [start, end] or [start, end, where] with integer offsets")
            start, end = span[0], span[1]
            where = span[2] if len(span) == 3 else self.default
            hashable = isinstance(where, str | int) and not isinstance(where, bool)
            piece = next((p for p in self.pieces if where in p[2]), None) if hashable else None
            if piece is None or where not in self.strings:
                raise problem(f"[{n}]: {where!r} is not a text of this example")
            if not 0 <= start < end <= len(self.strings[where]):
                raise problem(
                    f"[{n}]: [{start}, {end}) is outside {where!r} (length {len(self.strings[where])}); "
                    "offsets are characters, end exclusive"
                )
            first, flat, at = piece
            lo, hi = at[where] + start, at[where] + end
            for j in range(len(flat) // 2):
                if flat[2 * j] < hi and flat[2 * j + 1] > lo:
                    mask[first + j] = 1
        return mask[:length] if length is not None else mask


def _encode_chat(record: Record, tokenizer: Any) -> Encoding:
    import jinja2

    raw = record.data["messages"]
    messages = [{k: m[k] for k in ("role", "content", "name") if k in m} for m in raw]
    trained = [i for i, m in enumerate(raw) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    try:
        text = _render(tokenizer, messages, False)
        (ids,), offs = _tokenise(tokenizer, [text])
        if offs is None:
            labels = _prefix_labels(tokenizer, messages, trained, ids)
            if labels is None:
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
        else:
            labels = _chat_labels(tokenizer, messages, trained, text, ids, offs[0])
            if labels is None:
                labels = _offset_labels(record, tokenizer, messages, trained, text, ids, offs[0])
    except jinja2.TemplateError as e:  # templates refuse some conversations via raise_exception()
        raise DataError(
            [
                DataProblem(
                    record.file, record.line, f"the chat template rejected this conversation: {_clip(str(e), 160)}"
                )
            ]
        ) from e
    at: dict[Any, int] = {}
    cursor = 0
    for i, m in enumerate(messages):
        pos = text.find(m["content"], cursor)
        if pos >= 0:
            at[i], cursor = pos, pos + len(m["content"])
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    pieces = None if offs is None else [_piece(0, offs[0], at)]
    strings: dict[Any, str] = {i: m["content"] for i, m in enumerate(messages)}
    return Encoding(record, Example(ids, labels), pieces, strings, users[-1] if users else 0)


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt used for the instruction format (its tokens take no loss)."""
    middle = f"### Input:\n{input_text}\n\n" if input_text.strip() else ""
    return f"### Instruction:\n{instruction}\n\n{middle}### Response:\n"


def encode_record(record: Record, fmt: DatasetFormat | str, tokenizer: Any) -> Encoding:
    """Tokenise one checked record, once: its example with the loss mask (before any length
    policy) and what its evidence spans map through (`Encoding.guide_mask`)."""
    fmt, d = DatasetFormat(fmt), record.data
    if fmt == DatasetFormat.CHAT:
        return _encode_chat(record, tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    strings = {
        k: d[k] for k in ("text", "prompt", "completion", "instruction", "input", "output") if isinstance(d.get(k), str)
    }
    if fmt == DatasetFormat.TEXT:
        (ids,), offs = _tokenise(tokenizer, [d["text"]])
        full = bos + ids + eos
        pieces = None if offs is None else [_piece(len(bos), offs[0], {"text": 0})]
        return Encoding(record, Example(full, list(full)), pieces, strings, "text")
    if fmt == DatasetFormat.PROMPT_COMPLETION:
        prompt, answer, default = d["prompt"], ("completion", d["completion"]), "prompt"
        at: dict[Any, int] = {"prompt": 0}
    else:
        prompt = instruction_prompt(d["instruction"], d.get("input", ""))
        at = {"instruction": prompt.find(d["instruction"])}
        if d.get("input", "").strip():
            at["input"] = prompt.find(d["input"], at["instruction"] + len(d["instruction"]))
        answer, default = ("output", d["output"]), "input" if "input" in at else "instruction"
    (prompt_ids, answer_ids), offs = _tokenise(tokenizer, [prompt, answer[1]])
    masked, target = bos + prompt_ids, answer_ids + eos
    example = Example(masked + target, [IGNORE_INDEX] * len(masked) + target)
    pieces = None if offs is None else [_piece(len(bos), offs[0], at), _piece(len(masked), offs[1], {answer[0]: 0})]
    return Encoding(record, example, pieces, strings, default)


def encode_full(record: Record, fmt: DatasetFormat | str, tokenizer: Any) -> Example:
    """Tokenise one checked record with its loss mask, before any length policy."""
    return encode_record(record, fmt, tokenizer).example


def encode_all(records: Sequence[Record], fmt: DatasetFormat | str, tokenizer: Any) -> list[Encoding]:
    """`encode_record` each record (once): what the dataset report counts and training keeps."""
    return [encode_record(r, fmt, tokenizer) for r in records]


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


def training_examples(
    encodings: Sequence[Encoding],
    max_seq_length: int,
    overlength: OverlengthPolicy | str,
    spans_field: str | None = None,
) -> tuple[list[Example], list[Record]]:
    """The examples that train — the length policy applied, with the evidence mask of
    `spans_field` when attention guidance reads spans — and the records dropped because
    truncation left them no trained token. No record is tokenised again."""
    out: list[Example] = []
    unsupervised: list[Record] = []
    for enc in encodings:
        ex = apply_overlength(enc.example, enc.record, max_seq_length, overlength)
        if ex is None:
            continue
        if not supervised_tokens(ex):
            unsupervised.append(enc.record)
            continue
        if spans_field is not None:
            ex = Example(ex.input_ids, ex.labels, enc.guide_mask(spans_field, len(ex.input_ids)))
        out.append(ex)
    return out, unsupervised


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
