"""Record shapes of preference and GRPO training, checked before any model loads.

`data.py` reads the files (encoding, JSON, line limits, counts, splits) and reports FILE:LINE
problems; this module supplies the per-record check for spec.method.type dpo, orpo, kto and grpo,
and turns valid records into the rows TRL's trainers take (TRL applies the tokenizer's chat
template to conversational rows itself, with our ChatML fallback set on the tokenizer as for SFT).

- dpo, orpo: OpenAI's preference format `{"input": {"messages": [...]}, "preferred_output":
  [assistant message], "non_preferred_output": [assistant message]}`, or TRL's `{"prompt",
  "chosen", "rejected"}`, conversational (message lists) or plain (strings). Both sides must be
  present, non-empty and different.
- kto: TRL's unpaired `{"prompt", "completion", "label"}` with a boolean label.
- grpo: `{"prompt": ...}` (string or messages) or `{"messages": [...]}` (OpenAI's reinforcement
  format), ending in a user turn, plus any other fields; the fields the graders read
  (`{{item.<field>}}`) must be present in every record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetune.api.enums import TrainingType
from kubetune.trainer.data.records import (
    REQUIRED_KEYS,
    ROLES,
    TOOL_MESSAGE_KEYS,
    _check_content,
    _check_string,
    _clip,
    _jtype,
    _unicode_problem,
    preference_shape,
    supervised_shape,
    tool_problem,
)

OPENAI_DPO_KEYS = ("input", "preferred_output", "non_preferred_output")
TRL_PAIR_KEYS = ("prompt", "chosen", "rejected")
KTO_KEYS = ("prompt", "completion", "label")
_MESSAGE_KEYS = ("role", "content", "name")


def _messages(value: Any, where: str, out: list[str], *, last: str | None = None, only: str | None = None) -> None:
    """Check a message list: roles, non-empty content; `last` is the role the list must end with,
    `only` the one role every message must have."""
    if not isinstance(value, list):
        out.append(f"{where}: expected an array of messages, got {_jtype(value)}")
        return
    if not value:
        out.append(f"{where}: empty array; give at least one message")
        return
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            out.append(f"{at}: expected an object, got {_jtype(m)}")
            continue
        out += [
            f"{at}: unknown key {_clip(repr(k), 40)}; allowed: {', '.join(_MESSAGE_KEYS)}"
            for k in m
            if k not in _MESSAGE_KEYS and k not in TOOL_MESSAGE_KEYS
        ]  # those: empty (tool_problem)
        role = m.get("role")
        if role not in ROLES:
            out.append(f"{at}.role: expected one of {', '.join(ROLES)}, got {_clip(repr(role), 40)}")
        elif only is not None and role != only:
            out.append(f"{at}.role: must be {only!r} here, got {role!r}")
        _check_content(m, at, out)
    if last is not None and isinstance(value[-1], dict) and value[-1].get("role") not in (last, None):
        out.append(f"{where}: the last message must be a {last} message (the turn the model answers)")


def _side(value: Any, where: str, out: list[str], conversational: bool) -> None:
    """One completion (chosen, rejected, completion): a non-empty string, or assistant messages."""
    if conversational:
        _messages(value, where, out, only="assistant")
    elif not isinstance(value, str):
        out.append(
            f"{where}: expected a string (or, with a conversational prompt, an array of assistant messages), got {_jtype(value)}"
        )
    elif not value.strip():
        out.append(f"{where}: empty completion; remove the example or fill it in")
    elif (bad := _unicode_problem(value)) is not None:
        out.append(f"{where}: {bad}")


def _prompt(value: Any, where: str, out: list[str]) -> bool:
    """Check a prompt (string or messages ending in a user turn); True when conversational."""
    if isinstance(value, list):
        _messages(value, where, out, last="user")
        return True
    _check_string({"p": value}, "p", where, out)
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return [str(m.get("content", "")).strip() if isinstance(m, dict) else m for m in a] == [
            str(m.get("content", "")).strip() if isinstance(m, dict) else m for m in b
        ]
    return isinstance(a, str) and isinstance(b, str) and a.strip() == b.strip()


PAIR_READS = "preference pairs ({prompt, chosen, rejected} or OpenAI's {input, preferred_output, non_preferred_output})"
KTO_READS = "unpaired examples {prompt, completion, label}"


def other_shape(data: dict, kind: str, reads: str, own: tuple[str, ...]) -> str | None:
    """One message for a record spec.method.type `kind` cannot take but whose shape we know: tool
    calls (not supported yet), another preference type's data, or supervised data. None when the
    record has any of the type's own keys `own` (then its problems are named one by one)."""
    if (tools := tool_problem(data)) is not None:
        return tools
    pref = preference_shape(data)
    if pref is not None:
        keys, wanted, what = pref
        if wanted == kind or (wanted == "dpo" and kind == "orpo"):
            return None
        return f"{what} ({', '.join(keys)}): set spec.method.type: {wanted}; spec.method.type: {kind} reads {reads}"
    if any(k in data for k in own):
        return None
    fmt = supervised_shape(data)
    if fmt is None:
        return None
    where = "" if str(fmt) == "chat" else f" and spec.dataset.format: {fmt}"
    return (
        f"supervised {fmt} data ({', '.join(REQUIRED_KEYS[fmt])}): set spec.method.type: supervised{where} to "
        f"train on it; spec.method.type: {kind} reads {reads}"
    )


def check_pair(data: dict, kind: str = "dpo") -> list[str]:
    """A DPO/ORPO record: OpenAI's or TRL's preference format."""
    if (other := other_shape(data, kind, PAIR_READS, ("chosen", "rejected") + OPENAI_DPO_KEYS)) is not None:
        return [other]
    out: list[str] = []
    if "input" in data or "preferred_output" in data or "non_preferred_output" in data:
        out += [
            f"unknown key {_clip(repr(k), 40)} for OpenAI's preference format; allowed: {', '.join(OPENAI_DPO_KEYS)}; remove it"
            for k in data
            if k not in OPENAI_DPO_KEYS
        ]
        inp = data.get("input")
        if "input" not in data:
            out.append("missing key 'input' (an object with the prompt's messages)")
        elif not isinstance(inp, dict) or "messages" not in inp:
            out.append("input: expected an object with 'messages'")
        else:
            out += [
                f"input: unknown key {_clip(repr(k), 40)}; allowed: messages, tools, parallel_tool_calls"
                for k in inp
                if k not in ("messages", "tools", "parallel_tool_calls")
            ]
            _messages(inp["messages"], "input.messages", out, last="user")
        chosen, rejected = "preferred_output", "non_preferred_output"
        for key, what in ((chosen, "the preferred answer"), (rejected, "the dispreferred answer")):
            if key not in data:
                out.append(f"missing key {key!r} ({what}); a preference pair needs both sides")
            else:
                _side(data[key], key, out, conversational=True)
    else:
        out += [
            f"unknown key {_clip(repr(k), 40)} for a preference pair; allowed: {', '.join(TRL_PAIR_KEYS)} "
            f"(or OpenAI's {', '.join(OPENAI_DPO_KEYS)}); remove it"
            for k in data
            if k not in TRL_PAIR_KEYS
        ]
        chosen, rejected = "chosen", "rejected"
        conversational = _prompt(data["prompt"], "prompt", out) if "prompt" in data else None
        if conversational is None:
            out.append("missing key 'prompt' (the question both answers reply to)")
        for key, what in ((chosen, "the preferred answer"), (rejected, "the dispreferred answer")):
            if key not in data:
                out.append(f"missing key {key!r} ({what}); a preference pair needs both sides")
            else:
                _side(
                    data[key],
                    key,
                    out,
                    conversational=bool(conversational) if conversational is not None else isinstance(data[key], list),
                )
    if not out and _same(data[chosen], data[rejected]):
        out.append(f"{chosen} and {rejected} are identical: the pair teaches nothing; remove it or change one side")
    return out


def check_kto(data: dict) -> list[str]:
    """A KTO record: a prompt, one completion and whether it is desirable."""
    if (other := other_shape(data, "kto", KTO_READS, ("label",))) is not None:
        return [other]
    out = [
        f"unknown key {_clip(repr(k), 40)} for KTO; allowed: {', '.join(KTO_KEYS)}; remove it"
        for k in data
        if k not in KTO_KEYS
    ]
    conversational = False
    if "prompt" not in data:
        out.append("missing key 'prompt'")
    else:
        conversational = _prompt(data["prompt"], "prompt", out)
    if "completion" not in data:
        out.append("missing key 'completion'")
    else:
        _side(data["completion"], "completion", out, conversational)
    if "label" not in data:
        out.append("missing key 'label' (true: a desirable completion, false: an undesirable one)")
    elif not isinstance(data["label"], bool):
        out.append(f"label: expected true or false, got {_jtype(data['label'])}")
    return out


def grpo_checker(item_fields: set[str]) -> Callable[[dict], list[str]]:
    def check(data: dict) -> list[str]:
        if (tools := tool_problem(data)) is not None:
            return [tools]
        out: list[str] = []
        if "prompt" in data and "messages" in data:
            out.append("both 'prompt' and 'messages': give the prompt once")
        elif "prompt" in data:
            _prompt(data["prompt"], "prompt", out)
        elif "messages" in data:
            _messages(data["messages"], "messages", out, last="user")
        else:
            out.append("missing key 'prompt' (or 'messages'): the prompt completions are sampled for")
        for name in sorted(item_fields - {"prompt", "messages"}):
            if name not in data:
                out.append(f"missing key {name!r}, which a grader reads ({{{{item.{name}}}}}); add it to every record")
        return out

    return check


def record_check(spec: Any) -> Callable[[dict], list[str]] | None:
    """The record check of the job's training type; None for supervised (data.py's own formats)."""
    kind = spec.method.training_type
    if kind in (TrainingType.DPO, TrainingType.ORPO):
        return lambda data: check_pair(data, str(kind))
    if kind == TrainingType.KTO:
        return check_kto
    if kind == TrainingType.GRPO:
        return grpo_checker(spec.method.grpo.item_fields())
    return None


# ------------------------------------------------------------------------------ to TRL rows


def row(data: dict, kind: TrainingType) -> dict[str, Any]:
    """A valid record as the row TRL's trainer for `kind` takes."""
    if kind in (TrainingType.DPO, TrainingType.ORPO):
        if "input" in data:
            return {
                "prompt": _plain_messages(data["input"]["messages"]),
                "chosen": _plain_messages(data["preferred_output"]),
                "rejected": _plain_messages(data["non_preferred_output"]),
            }
        return {k: _plain_messages(data[k]) if isinstance(data[k], list) else data[k] for k in TRL_PAIR_KEYS}
    if kind == TrainingType.KTO:
        return {k: _plain_messages(data[k]) if isinstance(data[k], list) else data[k] for k in KTO_KEYS}
    out = dict(data)
    prompt = out.pop("messages", None) if "messages" in out else out.pop("prompt")
    out["prompt"] = _plain_messages(prompt) if isinstance(prompt, list) else prompt
    return out


def _plain_messages(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]
