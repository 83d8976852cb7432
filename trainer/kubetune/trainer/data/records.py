"""Records: read JSON Lines in bounded memory and check every record, reporting `FILE:LINE: what to do`.

Torch-free at import and at use: `kubetune validate --data`, the cluster's validation Job and the
gateway (`kubetune api`) run these checks without the ML stack (see the package docstring).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.enums import DatasetFormat

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
    import fsspec

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


def spans_field_for(spec: Any) -> str | None:
    """The record key of attention guidance's evidence spans when it guides by spans, else None."""
    term = spec.method.objective("attentionGuidance")
    if term is not None and term.attention_guidance is not None and str(term.attention_guidance.guide) == "spans":
        return str(term.attention_guidance.spans_field)
    return None


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


# ------------------------------------------------------------------------------ split


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
