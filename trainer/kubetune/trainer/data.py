"""The trainer's data layer: read JSON Lines, find every problem, tokenise with loss masks, pack.

Bad data is the commonest reason a fine-tuning job fails, and the most expensive place to find it
is an hour into a GPU run. So this module checks everything a user can get wrong — encoding, JSON,
record shape, roles, lengths, counts — *before* a model is loaded (RELIABILITY.md T7), reads in
bounded memory (a 10 MB line is reported, not loaded), collects all problems instead of the first,
and reports them as `FILE:LINE: what to do`, with a bounded message that fits a termination log.

Decisions worth knowing:
- Unknown keys are errors, as in the API (a typo such as `"conent"` must not silently train on
  nothing). Message keys are role, content, weight, name. Top-level keys other than the format's
  own are refused unless the caller names them in `extra_keys` (attention guidance reads `spans`).
- A record of a shape we know but cannot train as asked gets one message naming it and the field
  to set, not one "unknown key" per key: preference data in a supervised job (spec.method.type),
  another format's keys (spec.dataset.format), tool calls ("not supported yet"; empty `tools` /
  `tool_calls` are tolerated). Content given as OpenAI's parts trains when every part is text:
  the texts are joined with a newline (as vLLM does for string templates) when the line is read,
  so every later reader sees a string; image, audio and file parts are "not supported".
- Chat examples are rendered with the tokenizer's chat template, or `builtin.CHAT_TEMPLATE`
  (ChatML) when the tokenizer ships none (ending assistant turns with the tokenizer's EOS when
  it lacks ChatML's special tokens, so the EOS is always trained); the trainer saves it with the
  result. Loss falls on assistant content plus the end-of-turn token the template emits after
  it, for messages whose `weight` is not 0. An example truncation leaves without such a token is
  dropped and listed (FILE:LINE); none left is an error.
- Packing relies on transformers' packed-sequence masking: with `position_ids` that restart at 0
  and no attention mask, `masking_utils.find_packed_sequence_indices` builds a block-diagonal
  causal mask (eager, sdpa, flex, flash). It is skipped whenever a KV cache exists, and models
  create one when `use_cache` is on, even in training; `prepare_model_for_packing` turns it off.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.enums import DatasetFormat, OverlengthPolicy
from kubetune.api.spec import Dataset

IGNORE_INDEX = -100
MAX_REPORTED = 20
PROBLEM_LIMIT = 10_000  # stop reading a file after this many problems: the user has enough to fix
MESSAGE_LIMIT = 3072
RECOMMENDED_EXAMPLES = 500
DEFAULT_VALIDATION_SPLIT = 0.1
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "weight", "name")
FORMAT_KEYS = {
    DatasetFormat.CHAT: ("messages",),
    DatasetFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    DatasetFormat.INSTRUCTION: ("instruction", "input", "output"),
    DatasetFormat.TEXT: ("text",),
}

# ------------------------------------------------------------------------------ problems


@dataclass(frozen=True)
class DataProblem:
    file: str
    line: int  # 1-based; 0 = the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class DataError(Exception):
    """User data that cannot train. The trainer exits with the permanent exit code on it."""

    def __init__(
        self,
        problems: Sequence[DataProblem],
        total: int | None = None,
        *,
        limit: int = MAX_REPORTED,
        stopped: bool = False,
    ):
        super().__init__(list(problems), total)
        self.problems = list(problems)[:limit]
        self.total = max(total if total is not None else len(problems), len(self.problems))
        self.stopped = stopped

    def __str__(self) -> str:
        budget = MESSAGE_LIMIT - 72  # room for the tail line
        width = min(400, budget // max(len(self.problems), 1) - 1)  # fewer problems, longer lines
        lines: list[str] = []
        for p in self.problems:
            where = p.file if len(p.file) <= 80 else "…" + p.file[-79:]
            lines.append(_clip_bytes(f"{where}:{p.line}: {p.message}", width))
        if self.total > len(lines):
            tail = f"… and {self.total - len(lines)} more problems ({self.total} in all)"
            lines.append(tail + (f"; reading stopped after {PROBLEM_LIMIT}" if self.stopped else ""))
        return "\n".join(lines)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _clip_bytes(text: str, n: int) -> str:
    raw = text.encode()
    return text if len(raw) <= n else raw[: n - 3].decode(errors="ignore") + "…"


def _jtype(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Record:
    file: str
    line: int
    data: dict


def resolve(uri: str) -> str:
    """The path or fsspec URL to open: `pvc://claim/p` is the claim mounted under the PVC root."""
    if uri.startswith("pvc://"):
        root = Path(os.environ.get(PVC_ROOT_ENV, "/mnt/pvc")).resolve()
        path = (root / uri[len("pvc://") :]).resolve()
        if root not in path.parents:
            raise ValueError(f"{uri} points outside the volume root; remove '..' from the path")
        return str(path)
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _lines(f, max_line_bytes: int, chunk_size: int = 1 << 20) -> Iterator[tuple[int, int, bytes | None, int]]:
    """(line number, byte offset, bytes or None when too long, size) in bounded memory: a line is
    read up to `max_line_bytes`, the rest of a longer one only counted."""
    reader = io.BufferedReader(_Source(f), buffer_size=chunk_size)
    line_no = offset = 0
    while True:
        line = reader.readline(max_line_bytes + 1)
        if not line:
            return
        line_no += 1
        ended = line.endswith(b"\n")
        size = len(line) - ended
        if size > max_line_bytes:
            while not ended:
                more = reader.readline(chunk_size)
                if not more:
                    break
                ended = more.endswith(b"\n")
                size += len(more) - ended
            yield line_no, offset, None, size
        else:
            yield line_no, offset, line[:size], size
        offset += size + ended


class _Source(io.RawIOBase):
    """Any file object fsspec returns, as raw bytes for io.BufferedReader (whose readline is C)."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open_problem(uri: str, exc: BaseException, line: int = 0) -> DataProblem:
    """A storage failure (not the content's fault), worded as one: what to check to read the file."""
    if isinstance(exc, FileNotFoundError):
        return DataProblem(uri, line, "file not found; check the path or URI (and the bucket name)")
    if isinstance(exc, IsADirectoryError):
        return DataProblem(uri, line, "is a directory; point the dataset at a .jsonl file")
    if isinstance(exc, PermissionError):
        return DataProblem(
            uri,
            line,
            f"permission denied reading {uri}; check the storage "
            "credentials the job uses and that they allow reading it",
        )
    detail = _clip(str(exc).strip().splitlines()[0] if str(exc).strip() else "", 200)
    where = f" after line {line}" if line else ""
    return DataProblem(
        uri,
        line,
        f"cannot read {uri}{where} ({type(exc).__name__}: {detail}); check the "
        "URI, network access and the storage credentials",
    )


MAX_EXPANSION = 100
"""A compressed dataset may decompress to at most this many times its size (JSON Lines compresses
5-10×; a 1 MB .gz bomb would otherwise unpack for ever)."""
_COMPRESSED = (".gz", ".bz2", ".xz", ".lzma", ".zst", ".zip", ".lz4", ".snappy")


class _Expanded(Exception):
    """A compressed file decompressed past MAX_EXPANSION times its size."""


class _Capped:
    """A binary file object that refuses to return more than `limit` bytes in total."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f, self._left, self.limit = f, limit, limit

    def read(self, n: int) -> bytes:
        chunk = self._f.read(min(n, self._left + 1))
        self._left -= len(chunk)
        if self._left < 0:
            raise _Expanded()
        return chunk


def iter_records(
    uri: str,
    fmt: DatasetFormat | str,
    *,
    max_line_bytes: int = 1_000_000,
    storage_options: dict | None = None,
    extra_keys: Iterable[str] = (),
    problem_limit: int = PROBLEM_LIMIT,
    keep: bool = True,
    record_check: Callable[[dict], list[str]] | None = None,
) -> Iterator[Record | DataProblem | None]:
    """Stream a JSON Lines file: each valid record, and each problem (FILE:LINE), in file order.
    With `keep=False` a valid record is only counted: it is yielded as None (checking a large
    file then allocates nothing per line).

    Never raises for bad content: one bad line is one problem, and the next line is read. A
    storage failure ends the stream with one problem that says so (and after which line).
    Blank lines are skipped; `extra_keys` are top-level keys tolerated besides the format's own.
    `record_check` replaces the format's record check (preference and GRPO records, prefdata.py).
    """
    import fsspec  # type: ignore[import-untyped]

    fmt = DatasetFormat(fmt)
    extra = tuple(extra_keys)
    try:
        path = resolve(uri)
    except ValueError as e:
        yield DataProblem(uri, 0, str(e))
        return
    line_no = problems = 0
    try:
        opened = fsspec.open(path, "rb", compression="infer", **(storage_options or {}))
        limit = None
        if str(path).lower().endswith(_COMPRESSED):
            limit = max(opened.fs.size(opened.path), 1 << 20) * MAX_EXPANSION
        with opened as raw_file:
            f = _Capped(raw_file, limit) if limit else raw_file
            for line_no, offset, raw, size in _lines(f, max_line_bytes):
                if problems >= problem_limit:
                    return
                if raw is None:
                    found, record = (
                        [
                            f"line is {size:,} bytes, over the limit of {max_line_bytes:,}; one "
                            "example per line (JSON Lines), or shorten the example"
                        ],
                        None,
                    )
                elif line_no == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                    yield DataProblem(uri, 1, "file is UTF-16; save it as UTF-8")
                    return  # every further line would be noise
                elif line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    record, found = _parse(raw[3:], 3, fmt, extra, record_check)
                    found.insert(
                        0,
                        "file starts with a UTF-8 byte-order mark; remove the byte-order "
                        "mark (save as UTF-8 without BOM)",
                    )
                else:
                    record, found = _parse(raw, offset, fmt, extra, record_check)
                for msg in found:
                    problems += 1
                    yield DataProblem(uri, line_no, msg)
                if record is not None:
                    yield Record(uri, line_no, record) if keep else None
    except _Expanded:
        yield DataProblem(
            uri,
            line_no,
            f"decompresses to more than {MAX_EXPANSION}× its compressed size "
            "(a decompression bomb?); store the dataset uncompressed or recompress it",
        )
    except Exception as e:
        yield _open_problem(uri, e, line_no)


def read_records(
    uri: str,
    fmt: DatasetFormat | str,
    *,
    max_line_bytes: int = 1_000_000,
    storage_options: dict | None = None,
    extra_keys: Iterable[str] = (),
    problem_limit: int = PROBLEM_LIMIT,
    record_check: Callable[[dict], list[str]] | None = None,
) -> tuple[list[Record], list[DataProblem]]:
    """Every valid record of a JSON Lines file and every problem (see :func:`iter_records`)."""
    records: list[Record] = []
    problems: list[DataProblem] = []
    for item in iter_records(
        uri,
        fmt,
        max_line_bytes=max_line_bytes,
        storage_options=storage_options,
        extra_keys=extra_keys,
        problem_limit=problem_limit,
        record_check=record_check,
    ):
        (records if isinstance(item, Record) else problems).append(item)  # type: ignore[arg-type]
    return records, problems


def _parse(
    raw: bytes,
    offset: int,
    fmt: DatasetFormat,
    extra: Sequence[str],
    record_check: Callable[[dict], list[str]] | None = None,
) -> tuple[dict | None, list[str]]:
    """One line's record (None for a blank or bad line) and what is wrong with it."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw or raw.isspace():
        return None, []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [
            f"invalid UTF-8 at byte {e.start + 1} of the line (file offset {offset + e.start}); save the file as UTF-8"
        ]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [f"invalid JSON: {e.msg} (column {e.colno}); each line must be one JSON object"]
    except RecursionError:
        return None, ["invalid JSON for a dataset: nested too deeply"]
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        return None, [f"invalid JSON for a dataset: {_clip(str(e), 120)}"]
    if not isinstance(data, dict):
        return None, [f"expected a JSON object, got {_jtype(data)}"]
    found = record_check(data) if record_check is not None else check_record(data, fmt, extra)
    if found:
        return None, found
    join_text_parts(data)
    return data, found


def record_check_for(spec: Any) -> Callable[[dict], list[str]] | None:
    """The record check of spec.method.type dpo, orpo, kto or grpo (prefdata.py); None for
    supervised training, whose records follow spec.dataset.format."""
    from kubetune.trainer import prefdata

    return prefdata.record_check(spec)


def extra_keys_for(spec: Any) -> tuple[str, ...]:
    """Top-level record keys the job's objectives read besides the format's own (attention
    guidance reads its spans field)."""
    term = spec.method.objective("attentionGuidance")
    if term is not None and term.attention_guidance is not None:
        return (term.attention_guidance.spans_field,)
    return ()


# ------------------------------------------------------------------------------ record checks


def check_record(data: dict, fmt: DatasetFormat, extra_keys: Sequence[str] = ()) -> list[str]:
    """Everything wrong with one parsed record, as messages a user can act on. A record of a shape
    we recognise but cannot train as this format (preference pairs, another format's keys, tool
    calls) gets one message that says so and what to set, not one "unknown key" per key."""
    if fmt == DatasetFormat.CHAT and len(data) == 1 and _plain_conversation(data.get("messages")):
        return []  # the common case, without building the lists below
    if (other := shape_problem(data, fmt)) is not None:
        return [other]
    own = FORMAT_KEYS[fmt]
    if fmt == DatasetFormat.CHAT:
        if (tools := tool_problem(data)) is not None:
            return [tools]
        own = own + TOOL_KEYS  # present but empty (an export's `"tools": []`): nothing to train
    out = [
        f"unknown key {_clip(repr(k), 40)} for format {fmt}; allowed: {', '.join(FORMAT_KEYS[fmt])}; remove it"
        for k in data
        if k not in own and k not in extra_keys
    ]
    if fmt == DatasetFormat.CHAT:
        return out + _check_chat(data)
    optional = ("input",) if fmt == DatasetFormat.INSTRUCTION else ()
    for key in own:
        _check_string(data, key, key, out, optional=key in optional)
    return out


TOOL_KEYS = ("tools", "functions", "parallel_tool_calls")
"""OpenAI's function-calling record keys: tolerated when empty, else "not supported yet"."""
TOOL_MESSAGE_KEYS = ("tool_calls", "function_call", "tool_call_id")
TOOL_ROLES = ("tool", "function", "ipython")

PREFERENCE_SHAPES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("input", "preferred_output", "non_preferred_output"), "dpo", "OpenAI preference data"),
    (("chosen", "rejected"), "dpo", "preference pairs"),
    (("prompt", "completion", "label"), "kto", "KTO data"),
)
"""Record shapes of preference training, as (keys, spec.method.type that reads them, what they are).
The messages built from them put what to set first: a long report clips each line's tail."""

REQUIRED_KEYS = {
    DatasetFormat.CHAT: ("messages",),
    DatasetFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    DatasetFormat.INSTRUCTION: ("instruction", "output"),
    DatasetFormat.TEXT: ("text",),
}


def preference_shape(data: dict) -> tuple[tuple[str, ...], str, str] | None:
    """The preference shape a record has (PREFERENCE_SHAPES), or None. A KTO label is a boolean:
    a prompt/completion record with some other `label` is not preference data."""
    for keys, kind, what in PREFERENCE_SHAPES:
        if all(k in data for k in keys) and (kind != "kto" or isinstance(data.get("label"), bool)):
            return keys, kind, what
    return None


def supervised_shape(data: dict) -> DatasetFormat | None:
    """The supervised format whose required keys a record has (chat first), or None."""
    return next((fmt for fmt, keys in REQUIRED_KEYS.items() if all(k in data for k in keys)), None)


def shape_problem(data: dict, fmt: DatasetFormat) -> str | None:
    """One message for a record a supervised job reading `fmt` cannot take but that has a shape we
    know: preference data (set spec.method.type) or another format's keys (set spec.dataset.format)."""
    if (pref := preference_shape(data)) is not None:
        keys, kind, what = pref
        also = " and spec.dataset.format: chat" if fmt != DatasetFormat.CHAT else ""  # the types read chat files
        return f"{what} ({', '.join(keys)}): set spec.method.type: {kind}{also}; a supervised job cannot train on it"
    if all(k in data for k in REQUIRED_KEYS[fmt]):
        return None
    other = supervised_shape(data)
    if other is None or other == fmt:
        return None
    return (
        f"looks like {other} data ({', '.join(REQUIRED_KEYS[other])}): set spec.dataset.format: {other}; "
        f"spec.dataset.format is {fmt} ({', '.join(FORMAT_KEYS[fmt])})"
    )


def _given(value: Any) -> bool:
    return value not in (None, [], {}, "")


def tool_problem(data: dict) -> str | None:
    """One "not supported yet" message for a record with function calling (tool definitions, tool
    calls, tool results), in any message list it has; None without. Empty tool keys are no tool use."""
    found = [f"{k!r}" for k in ("tools", "functions") if _given(data.get(k))]
    inner = data.get("input")
    if isinstance(inner, dict):
        found += [f"'input.{k}'" for k in ("tools", "functions") if _given(inner.get(k))]
    lists = [
        (k, data.get(k))
        for k in ("messages", "prompt", "chosen", "rejected", "completion", "preferred_output", "non_preferred_output")
    ]
    if isinstance(inner, dict):
        lists.append(("input.messages", inner.get("messages")))
    for where, messages in lists:
        if not isinstance(messages, list):
            continue
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                continue
            keys = [k for k in TOOL_MESSAGE_KEYS if _given(m.get(k))]
            if m.get("role") in TOOL_ROLES:
                found.append(f"{where}[{i}] (role {m['role']!r})")
            elif keys:
                found.append(f"{where}[{i}].{keys[0]}")
    if not found:
        return None
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return (
        f"tool calls (function calling) are not supported yet: {', '.join(found[:3])}{more}; train on "
        "conversations without tools (remove the tool definitions, tool calls and tool messages), or "
        "remove the example"
    )


def _unicode_problem(text: str) -> str | None:
    """JSON's `\\ud800` escapes decode to lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"contains an unpaired surrogate {text[e.start]!r} at character {e.start + 1} (invalid Unicode); "
            "fix the \\u escape"
        )
    return None


def _check_string(obj: dict, key: str, where: str, out: list[str], optional: bool = False) -> None:
    if key not in obj:
        if not optional:
            out.append(f"missing key {where!r}")
    elif not isinstance(obj[key], str):
        out.append(f"{where}: expected a string, got {_jtype(obj[key])}")
    elif not optional and not obj[key].strip():
        out.append(f"{where}: empty content; remove the example or fill it in")
    elif (bad := _unicode_problem(obj[key])) is not None:
        out.append(f"{where}: {bad}")


TEXT_PART_JOIN = "\n"
"""How a message's text content parts are joined into its content: as vLLM does for chat templates
that take string content (most text models'), so training sees what serving will."""


def _check_content(m: dict, where: str, out: list[str]) -> None:
    """A message's content: a string, or OpenAI's content parts, of which text parts are trained
    (joined with TEXT_PART_JOIN, see :func:`join_text_parts`) and others are not supported."""
    parts = m.get("content")
    if not isinstance(parts, list):
        _check_string(m, "content", f"{where}.content", out)
        return
    if not parts:
        out.append(
            f'{where}.content: empty array; give the text as a string or as [{{"type": "text", "text": "..."}}] parts'
        )
        return
    texts: list[str] = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            out.append(f'{at}: expected a content part such as {{"type": "text", "text": "..."}}, got {_jtype(part)}')
            continue
        kind = part.get("type")
        if kind != "text":
            out.append(
                f"{at}: content parts of type {_clip(repr(kind), 40)} are not supported (only text is "
                'trained); keep only {"type": "text"} parts in this message, or remove the example'
            )
            continue
        out += [
            f"{at}: unknown key {_clip(repr(k), 40)}; allowed: type, text" for k in part if k not in ("type", "text")
        ]
        before = len(out)
        if "text" not in part:
            out.append(f"missing key '{at}.text'")
        else:  # an empty part is harmless; the joined content must not be empty (below)
            _check_string(part, "text", f"{at}.text", out, optional=True)
        if len(out) == before:
            texts.append(part["text"])
    if len(texts) == len(parts) and not "".join(texts).strip():
        out.append(f"{where}.content: empty content; remove the example or fill it in")


def join_text_parts(data: dict) -> None:
    """Replace, in place, each checked message's text content parts by their joined text, so every
    later reader (tokenising, dataset report, PII redaction, samples, TRL rows) sees a string."""
    lists = [
        data.get(k)
        for k in ("messages", "prompt", "chosen", "rejected", "completion", "preferred_output", "non_preferred_output")
    ]
    if isinstance(data.get("input"), dict):
        lists.append(data["input"].get("messages"))
    for messages in lists:
        if type(messages) is not list:
            continue
        for m in messages:
            if type(m) is dict and type(m.get("content")) is list:
                m["content"] = TEXT_PART_JOIN.join(p["text"] for p in m["content"])


def _plain_conversation(messages: Any) -> bool:
    """The common case, checked fast: role/content messages, a system message first at most, then
    a user turn first, non-empty valid text, an assistant turn. Anything else takes the full
    check, which names each problem (a dataset of 10⁵ lines is then checked at about the speed
    it is read)."""
    if type(messages) is not list or not messages:
        return False
    assistant = False
    start = 0
    for i, m in enumerate(messages):
        if type(m) is not dict or len(m) != 2 or "role" not in m or "content" not in m:
            return False
        role, content = m["role"], m["content"]
        if type(content) is not str or not content or content.isspace():
            return False
        if not content.isascii() and _unicode_problem(content) is not None:
            return False
        if role == "assistant":
            if i == start:
                return False
            assistant = True
        elif role == "system":
            if i:
                return False
            start = 1
        elif role != "user":
            return False
    return assistant


def _check_chat(data: dict) -> list[str]:
    if _plain_conversation(data.get("messages")):
        return []
    if "messages" not in data:
        return ["missing key 'messages'"]
    messages = data["messages"]
    if not isinstance(messages, list):
        return [f"messages: expected an array, got {_jtype(messages)}"]
    if not messages:
        return ["messages: empty array; an example needs a conversation"]
    out: list[str] = []
    assistants = trained = 0
    first_turn = None  # the role of the first message after any system message
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            out.append(f"{where}: expected an object, got {_jtype(m)}")
            continue
        out += [
            f"{where}: unknown key {_clip(repr(k), 40)}; allowed: {', '.join(MESSAGE_KEYS)}"
            for k in m
            if k not in MESSAGE_KEYS and k not in TOOL_MESSAGE_KEYS
        ]  # those: empty, see tool_problem
        role = m.get("role")
        if "role" not in m:
            out.append(f"missing key '{where}.role'")
        elif role not in ROLES:
            out.append(f"{where}: unknown role {_clip(repr(role), 40)}; allowed: {', '.join(ROLES)}")
        elif role == "system" and i > 0:
            out.append(f"{where}: misplaced system message; a system message may only be the first")
        elif role != "system" and first_turn is None:
            first_turn = role
            if role != "user":
                out.append(
                    f"{where}: the conversation starts with {role!r}; it must start with a user message "
                    "(after an optional system message)"
                )
        _check_content(m, where, out)
        if "name" in m:
            _check_string(m, "name", f"{where}.name", out, optional=True)
        weight = m.get("weight", 1)
        if "weight" in m and role != "assistant":
            out.append(f"{where}: weight is only allowed on assistant messages")
        elif type(weight) not in (int, float) or weight not in (0, 1):
            out.append(f"{where}.weight: must be 0 or 1, got {_clip(json.dumps(weight), 40)}")
            weight = 1  # do not also claim "nothing to learn"
        if role == "assistant":
            assistants += 1
            trained += int(weight)
    if assistants == 0:
        out.append("no assistant turn; a chat example needs at least one assistant message to learn")
    elif trained == 0:
        out.append("no assistant message has weight 1: nothing to learn")
    return out


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


# ------------------------------------------------------------------------------ split, pack, batch


def _validation_count(n: int, share: float) -> int:
    return min(max(1, round(n * share)), n - 1)


def split(records: Sequence, validation_split: float, seed: int) -> tuple[list, list]:
    """Hold out a share for evaluation: same seed, same split (random.Random needs no hash seed)."""
    if len(records) < 2:
        raise ValueError("need at least 2 examples to hold out a validation split")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[: _validation_count(len(records), validation_split)])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit in input order; a max-tree over bins keeps it O(n log n)."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    tree = [capacity] * (2 * size)  # remaining room, max over each subtree
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the {capacity} a sequence holds")
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(i)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def pack(examples: Sequence[Example], max_seq_length: int) -> list[dict]:
    """Pack examples into sequences of at most max_seq_length tokens, positions restarting per example."""
    out = []
    for group in _first_fit([len(e.input_ids) for e in examples], max_seq_length):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        guide: list[int] = []
        for i in group:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]  # no token predicts across the boundary
            positions += range(len(e.input_ids))
            guide += e.guide_mask if e.guide_mask is not None else [0] * len(e.input_ids)
        row = {"input_ids": ids, "labels": labels, "position_ids": positions}
        if any(examples[i].guide_mask is not None for i in group):
            row["guide_mask"] = guide
        out.append(row)
    return out


class Collator:
    """Right-pads a list of examples (or packed sequences) into a torch batch.

    Packed batches carry `position_ids` and no `attention_mask`: transformers derives the
    block-diagonal mask from the position restarts. Padding gets its own restarting positions so
    it forms a separate block. Call `prepare_model_for_packing` on the model first.
    """

    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.packing, self.multiple = pad_token_id, packing, pad_to_multiple_of

    def __call__(self, features: Sequence[Example | dict]) -> dict:
        import torch

        rows = [
            f if isinstance(f, dict) else {"input_ids": f.input_ids, "labels": f.labels, "guide_mask": f.guide_mask}
            for f in features
        ]
        width = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
            if self.packing:
                extra[b, :n] = torch.tensor(r.get("position_ids") or range(n), dtype=torch.long)
                extra[b, n:] = torch.arange(width - n)
            else:
                extra[b, :n] = 1
        key = "position_ids" if self.packing else "attention_mask"
        batch = {"input_ids": ids, "labels": labels, key: extra}
        if any(r.get("guide_mask") is not None for r in rows):
            guide = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                mask = r.get("guide_mask") or []
                guide[b, : len(mask)] = torch.tensor(mask, dtype=torch.long)
            batch["guide_mask"] = guide
        return batch


PACKING_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def packing_attention(device: str, config: Any = None) -> str:
    """The attention implementation a packed run loads the model with, per device.

    - CUDA with `flash_attn` installed: `flash_attention_2`. transformers turns the restarting
      `position_ids` into cumulative sequence lengths and calls the varlen kernel: no mask at
      all, and no attention computed across example boundaries (padding-free).
    - Otherwise `sdpa`: transformers builds a dense block-diagonal causal mask from the position
      restarts (a [batch, 1, L, L] bool tensor, 4 MiB per 2 048-token row) and SDPA applies it.
      Correct, and the mask is small, but every cross-example block is still computed. Families
      without SDPA (Gemma 2, `families.Family.sdpa`) get `eager`, which applies the same mask.
    - Not chosen: `flex_attention` with a document mask. On torch 2.13 CPU it gives the same
      logits, but its first call compiles (torch.compile + a C++ toolchain) for minutes on a
      2-core machine — more than a short CPU fine-tune takes — and on GPU flash varlen is the
      faster, compile-free padding-free path.
    """
    import importlib.util

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    from kubetune.trainer.methods.families import family

    return "sdpa" if config is None or family(config).sdpa else "eager"  # Gemma 2: eager only, same mask


def prepare_model_for_packing(model) -> None:
    """Make packed batches safe: no KV cache (it disables packed masking), a mask-aware backend."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise ValueError(
            f"packing needs one of the attention implementations {PACKING_ATTENTION}, "
            f"the model uses {impl!r}; set spec.dataset.packing: false"
        )
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            "packing cannot be combined with prefix or prompt tuning (virtual tokens "
            "and cached prefixes defeat the per-example mask); set spec.dataset.packing: false"
        )
    config.use_cache = False


def efficiency(examples: Sequence[Example], batch_size: int, max_seq_length: int, packing: bool) -> float:
    """Share of real (non-pad) tokens in the batches the collator builds, in example order."""
    lengths = [min(len(e.input_ids), max_seq_length) for e in examples]
    if packing:
        lengths = [sum(lengths[i] for i in group) for group in _first_fit(lengths, max_seq_length)]
    real = total = 0
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i : i + batch_size]
        real, total = real + sum(batch), total + len(batch) * max(batch)
    return real / total if total else 0.0


# ------------------------------------------------------------------------------ the whole check


@dataclass
class DataReport:
    examples: int  # training examples after any validation split
    validation_examples: int
    warnings: list[str] = field(default_factory=list)
    token_stats: dict | None = None
    overlength: int = 0
    unsupervised: int = 0  # dropped: no trained token left after truncation
    train: list[Record] = field(default_factory=list, repr=False)
    validation: list[Record] = field(default_factory=list, repr=False)
    encoded_train: list[Example] | None = field(default=None, repr=False)  # after the length policy
    encoded_validation: list[Example] | None = field(default=None, repr=False)

    def summary_lines(self) -> list[str]:
        lines = [f"data: {self.examples} training examples, {self.validation_examples} validation examples"]
        s = self.token_stats
        if s:
            lines.append(
                f"tokens per example: min {s['min']}, mean {s['mean']:.0f}, p50 {s['p50']}, "
                f"p95 {s['p95']}, max {s['max']}; {s['label_tokens']:,} trained tokens"
            )
            lines.append(
                f"over maxSeqLength: {self.overlength}"
                + (f"; dropped with no trained token left: {self.unsupervised}" if self.unsupervised else "")
            )
        return lines + [f"warning: {w}" for w in self.warnings]


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _count_rules(dataset: Dataset, n: int, problems: list[DataProblem], warnings: list[str]) -> None:
    """The rules about how many examples there are; `n` counts the training file's valid records."""
    if n < dataset.min_examples:
        problems.append(
            DataProblem(
                dataset.train,
                0,
                f"only {n} valid training examples, at least "
                f"{dataset.min_examples} are needed; add examples (spec.dataset."
                "minExamples overrides the minimum)",
            )
        )
    elif n < RECOMMENDED_EXAMPLES:
        warnings.append(
            f"only {n} training examples; {RECOMMENDED_EXAMPLES} or more usually train "
            "better (few examples are easily memorised)"
        )


def validate(
    dataset: Dataset,
    *,
    tokenizer=None,
    max_problems: int = MAX_REPORTED,
    extra_keys: Iterable[str] = (),
    storage_options: dict | None = None,
    seed: int = 0,
    record_check: Callable[[dict], list[str]] | None = None,
) -> DataReport:
    """Read and check the whole dataset before any model loads; raise DataError listing problems.

    This keeps the records (the trainer trains on them); :func:`check` finds the same problems
    while keeping none. The count rule looks at the valid records of the training file, before
    any validation split. With a tokenizer (never model weights) it also measures token lengths
    and applies overlength.
    """
    fmt, extra = DatasetFormat(dataset.format), tuple(extra_keys)
    train, problems = read_records(
        dataset.train, fmt, storage_options=storage_options, extra_keys=extra, record_check=record_check
    )
    stopped = len(problems) >= PROBLEM_LIMIT
    validation: list[Record] = []
    if dataset.validation:
        validation, found = read_records(
            dataset.validation, fmt, storage_options=storage_options, extra_keys=extra, record_check=record_check
        )
        stopped |= len(found) >= PROBLEM_LIMIT
        if not validation and not found:
            found.append(DataProblem(dataset.validation, 0, "no examples; add some or use validationSplit"))
        problems += found
    warnings: list[str] = []
    n = len(train)
    _count_rules(dataset, n, problems, warnings)
    if not dataset.validation and n >= 2:
        train, validation = split(train, dataset.validation_split or DEFAULT_VALIDATION_SPLIT, seed)
    report = DataReport(len(train), len(validation), warnings, train=train, validation=validation)
    if tokenizer is not None and n and record_check is None:  # preference rows are tokenised by TRL
        problems += _measure(report, dataset, fmt, tokenizer)
    if problems:
        raise DataError(problems, len(problems), limit=max_problems, stopped=stopped)
    return report


def check(
    dataset: Dataset,
    *,
    max_problems: int = MAX_REPORTED,
    extra_keys: Iterable[str] = (),
    storage_options: dict | None = None,
    record_check: Callable[[dict], list[str]] | None = None,
) -> DataReport:
    """Every problem :func:`validate` would find, in one streaming pass that keeps no record:
    memory does not grow with the dataset. What `kubetune validate --data` and the cluster's
    validation Job (`python -m kubetune.trainer --validate-only`) run; raises DataError."""
    fmt, extra = DatasetFormat(dataset.format), tuple(extra_keys)
    problems: list[DataProblem] = []
    total, stopped = 0, False
    counts: dict[str, int] = {}
    for uri in filter(None, (dataset.train, dataset.validation)):
        valid = found = 0
        for item in iter_records(
            uri, fmt, storage_options=storage_options, extra_keys=extra, keep=False, record_check=record_check
        ):
            if item is None:
                valid += 1
                continue
            found += 1
            if len(problems) < max_problems:
                problems.append(item)
        counts[uri] = valid
        total += found
        stopped |= found >= PROBLEM_LIMIT
        if uri == dataset.validation and not valid and not found:
            problems.append(DataProblem(uri, 0, "no examples; add some or use validationSplit"))
            total += 1
    warnings: list[str] = []
    n = counts[dataset.train]
    before = len(problems)
    _count_rules(dataset, n, problems, warnings)
    total += len(problems) - before
    if dataset.validation:
        examples, held_out = n, counts[dataset.validation]
    else:
        held_out = _validation_count(n, dataset.validation_split or DEFAULT_VALIDATION_SPLIT) if n >= 2 else 0
        examples = n - held_out
    if problems:
        raise DataError(problems, total, limit=max_problems, stopped=stopped)
    return DataReport(examples, held_out, warnings)


def _measure(report: DataReport, dataset: Dataset, fmt: DatasetFormat, tokenizer) -> list[DataProblem]:
    problems: list[DataProblem] = []
    lengths: list[int] = []
    label_tokens = 0
    unlearnable: dict[str, list[Record]] = {"train": [], "validation": []}
    encoded: dict[str, list[Example]] = {"train": [], "validation": []}
    for part, records in (("train", report.train), ("validation", report.validation)):
        for record in records:
            try:
                full = encode_full(record, fmt, tokenizer)
            except DataError as e:
                problems += e.problems
                continue
            if part == "train":
                lengths.append(len(full.input_ids))
            if len(full.input_ids) > dataset.max_seq_length:
                report.overlength += 1
                if dataset.overlength == OverlengthPolicy.ERROR:
                    problems.append(
                        DataProblem(
                            record.file, record.line, overlength_message(len(full.input_ids), dataset.max_seq_length)
                        )
                    )
                    continue
            example = apply_overlength(full, record, dataset.max_seq_length, dataset.overlength)
            if example is None:
                continue
            learned = supervised_tokens(example)
            if not learned:  # the answer was cut off: dropped (and said), never trained as a no-op
                unlearnable[part].append(record)
                continue
            if part == "train":
                label_tokens += learned
            encoded[part].append(example)
    report.encoded_train, report.encoded_validation = encoded["train"], encoded["validation"]
    if lengths:
        s = sorted(lengths)
        report.token_stats = {
            "examples": len(s),
            "tokens": sum(s),
            "min": s[0],
            "mean": sum(s) / len(s),
            "p50": _percentile(s, 0.5),
            "p95": _percentile(s, 0.95),
            "max": s[-1],
            "label_tokens": label_tokens,
        }
    if report.overlength and dataset.overlength != OverlengthPolicy.ERROR:
        verb = "truncated" if dataset.overlength == OverlengthPolicy.TRUNCATE else "dropped"
        report.warnings.append(
            f"{report.overlength} examples are longer than maxSeqLength "
            f"{dataset.max_seq_length} tokens and will be {verb}"
        )
    dropped = unlearnable["train"] + unlearnable["validation"]
    report.unsupervised = len(dropped)
    for part, name, uri in (
        ("train", "training", dataset.train),
        ("validation", "validation", dataset.validation or dataset.train),
    ):
        if unlearnable[part] and not encoded[part]:
            problems.append(
                DataProblem(uri, 0, no_supervision_message(name, unlearnable[part], dataset.max_seq_length))
            )
    if dropped:
        report.warnings.append(unsupervised_warning(dropped, dataset.max_seq_length))
    return problems
