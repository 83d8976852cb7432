"""Generation A/B: what the base and the tuned model answer to held-out prompts, and how well.

Held-out loss says little to the people who will use the model; reading answers does. For
`spec.evaluation.samples` held-out examples (the first N of the validation set, so the same ones
every run) the prompt is answered by the base model before training and by the tuned model after,
greedily with the same settings and seed, and both answers are written to `eval/samples.jsonl` in
the output with the reference. Each answer is scored against the reference by
`spec.evaluation.metrics` (kubetune.trainer.textmetrics) and, optionally, an LLM judge compares the
two answers pairwise: once with the base answer first and once with it second, so a judge that
prefers a position cancels out to a tie.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune.api.contract import JUDGE_API_KEY_ENV
from kubetune.api.enums import DatasetFormat, EvalMetric
from kubetune.trainer import textmetrics
from kubetune.trainer.methods import prefix_tuning

log = logging.getLogger("kubetune.trainer")

SAMPLES_FILE = "eval/samples.jsonl"
JUDGE_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Sample:
    """One held-out prompt: the messages (chat) or text it is rendered from, and the reference answer."""

    prompt: str
    """For people: the user's last message (chat) or the prompt text."""
    messages: list[dict[str, str]] | None
    text: str | None
    reference: str
    where: str


def pick(records: list[Any], fmt: DatasetFormat | str, n: int) -> list[Sample]:
    """The first `n` held-out records that have a prompt and a reference answer."""
    from kubetune.trainer.data import instruction_prompt

    fmt = DatasetFormat(fmt)
    out: list[Sample] = []
    for r in records:
        if len(out) >= n:
            break
        d, where = r.data, f"{r.file}:{r.line}"
        if fmt == DatasetFormat.CHAT:
            msgs = d["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if not last:
                continue
            context = [{"role": m["role"], "content": m["content"]} for m in msgs[:last]]
            user = next((m["content"] for m in reversed(context) if m["role"] == "user"), context[-1]["content"])
            out.append(Sample(user, context, None, msgs[last]["content"], where))
        elif fmt == DatasetFormat.PROMPT_COMPLETION:
            out.append(Sample(d["prompt"], None, d["prompt"], d["completion"], where))
        elif fmt == DatasetFormat.INSTRUCTION:
            prompt = instruction_prompt(d["instruction"], d.get("input", ""))
            out.append(Sample(prompt, None, prompt, d["output"], where))
        else:  # text: continue the first half
            words = d["text"].split(" ")
            if len(words) < 4:
                continue
            half = len(words) // 2
            head, tail = " ".join(words[:half]), " ".join(words[half:])
            out.append(Sample(head, None, head + " ", tail, where))
    return out


def generate(model: Any, tokenizer: Any, samples: list[Sample], max_new_tokens: int, seed: int) -> list[str]:
    """Greedy answers (kubetune chat's generation settings at temperature 0), one prompt at a time,
    the context trimmed from the left to leave room for the answer."""
    import torch
    from kubetune.trainer.inference import chat_prompt_text, generation_kwargs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096
    answers = []
    kwargs = generation_kwargs(model, tokenizer, max_new_tokens, 0.0)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    with torch.no_grad():
        for s in samples:
            if s.messages is not None:
                ids = list(tokenizer(chat_prompt_text(tokenizer, s.messages), add_special_tokens=False)["input_ids"])
            else:
                ids = bos + list(tokenizer(s.text or "", add_special_tokens=False)["input_ids"])
            ids = ids[-max(1, limit - max_new_tokens) :]
            torch.manual_seed(seed)
            x = torch.tensor([ids], device=device)
            out = prefix_tuning.fix_generation(model).generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
            answers.append(tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return answers


def score(
    answers: list[str], samples: list[Sample], metrics: list[EvalMetric | str], regex: str | None
) -> dict[str, float]:
    """Mean score per metric over the samples, 0..1."""
    fns: dict[str, Callable[[str, Sample], float]] = {
        EvalMetric.EXACT_MATCH: lambda a, s: textmetrics.exact_match(a, s.reference),
        EvalMetric.ROUGE_L: lambda a, s: textmetrics.rouge_l(a, s.reference),
        EvalMetric.BLEU: lambda a, s: textmetrics.bleu(a, s.reference),
        EvalMetric.CHRF: lambda a, s: textmetrics.chrf(a, s.reference),
        EvalMetric.JSON_VALID: lambda a, s: textmetrics.json_valid(a),
        EvalMetric.REGEX: lambda a, s: textmetrics.regex_match(a, regex or ""),
    }
    if not samples:
        return {}
    return {
        str(m): round(sum(fns[EvalMetric(m)](a, s) for a, s in zip(answers, samples)) / len(samples), 6)
        for m in metrics
    }


def per_sample_scores(
    answer: str, sample: Sample, metrics: list[EvalMetric | str], regex: str | None
) -> dict[str, float]:
    return score([answer], [sample], metrics, regex)


# ---------------------------------------------------------------------------------- judge

JUDGE_SYSTEM = (
    "You are an impartial judge comparing two answers to the same prompt. {criteria} "
    "Ignore the order in which the answers are shown and their length. "
    'Reply with JSON only: {{"winner": "A"}}, {{"winner": "B"}} or {{"winner": "tie"}}.'
)
DEFAULT_CRITERIA = "The better answer is helpful, correct and faithful to the reference answer."


class JudgeError(Exception):
    """The judge endpoint failed or answered something unreadable."""


def _ask(judge: Any, api_key: str | None, prompt: str, reference: str, first: str, second: str) -> str:
    """One verdict: "A", "B" or "tie"."""
    body = {
        "model": judge.model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": JUDGE_SYSTEM.format(criteria=judge.criteria or DEFAULT_CRITERIA)},
            {
                "role": "user",
                "content": f"Prompt:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}",
            },
        ],
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(
        judge.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=JUDGE_TIMEOUT_SECONDS) as resp:
            reply = json.loads(resp.read())
        text = reply["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise JudgeError(f"{type(err).__name__}: {err}") from None
    return parse_verdict(str(text))


def parse_verdict(text: str) -> str:
    try:
        found = json.loads(text.strip().strip("`").removeprefix("json").strip())
        winner = str(found.get("winner", "")).strip().lower() if isinstance(found, dict) else ""
    except ValueError:  # free text: a capital A or B standing alone, or "tie" (the article "a" is no verdict)
        m = re.search(r"\b(A|B|[Tt]ie|TIE)\b", text)
        winner = m.group(1).lower() if m else ""
    if winner in ("a", "b"):
        return winner.upper()
    if winner == "tie":
        return "tie"
    raise JudgeError(f"unreadable verdict {text[:80]!r}")


def combine(first: str, second: str) -> str:
    """The sample's result from the verdict with base as A (`first`) and with tuned as A (`second`):
    "tuned", "base" or "tie". A judge that picks the same position twice has no preference."""
    votes = [{"A": "base", "B": "tuned"}.get(first, "tie"), {"A": "tuned", "B": "base"}.get(second, "tie")]
    score = votes.count("tuned") - votes.count("base")
    return "tuned" if score > 0 else "base" if score < 0 else "tie"


def judge_samples(
    judge: Any, samples: list[Sample], base: list[str], tuned: list[str], api_key: str | None = None
) -> tuple[dict[str, Any], list[str | None]]:
    """Pairwise verdicts with position swap: (the JudgeScore wire dict, each sample's result)."""
    if api_key is None:
        api_key = os.environ.get(JUDGE_API_KEY_ENV) or None
    counts = {"tuned": 0, "base": 0, "tie": 0, "failed": 0}
    results: list[str | None] = []
    for s, b, t in zip(samples, base, tuned):
        try:
            result = combine(
                _ask(judge, api_key, s.prompt, s.reference, b, t), _ask(judge, api_key, s.prompt, s.reference, t, b)
            )
        except JudgeError as err:
            log.warning("judge %s at %s: %s (sample %s counted as failed)", judge.model, judge.url, err, s.where)
            counts["failed"] += 1
            results.append(None)
            continue
        counts[result] += 1
        results.append(result)
    judged = counts["tuned"] + counts["base"] + counts["tie"]
    out: dict[str, Any] = {
        "tunedWins": counts["tuned"],
        "baseWins": counts["base"],
        "ties": counts["tie"],
        "failed": counts["failed"],
        "model": judge.model,
    }
    if judged:
        out["winRate"] = round((counts["tuned"] + counts["tie"] / 2) / judged, 6)
    return out, results


def rows(
    samples: list[Sample],
    base: list[str] | None,
    tuned: list[str],
    metrics: list[Any],
    regex: str | None,
    verdicts: list[str | None] | None,
) -> list[dict[str, Any]]:
    """The lines of eval/samples.jsonl."""
    out = []
    for i, s in enumerate(samples):
        row: dict[str, Any] = {
            "prompt": s.prompt,
            "reference": s.reference,
            "base": base[i] if base else None,
            "tuned": tuned[i],
            "source": s.where,
        }
        if s.messages is not None:
            row["messages"] = s.messages
        row["scores"] = {"tuned": per_sample_scores(tuned[i], s, metrics, regex)}
        if base:
            row["scores"]["base"] = per_sample_scores(base[i], s, metrics, regex)
        if verdicts is not None:
            row["judge"] = verdicts[i]
        out.append(row)
    return out
