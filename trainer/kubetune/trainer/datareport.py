"""The dataset report: what is in the data and what is risky about it, before a GPU is used.

Data quality decides a fine-tune, and the expensive way to learn that a dataset is full of e-mail
addresses, copies of itself or the validation set is after training. This module looks at every
valid record once and reports:

- counts: examples, turns per conversation, characters and tokens (exact with a tokenizer, else
  estimated at 4 characters a token), a length histogram and the examples over maxSeqLength;
- exact duplicates (same content) and near duplicates (MinHash LSH over word 3-shingles,
  `datasketch`, Jaccard ≥ NEAR_THRESHOLD) inside the training set;
- train/validation overlap (leakage): validation examples identical or near-identical to a
  training example, whether the validation set is a file or a split of train;
- system-prompt variety;
- the estimated training tokens, GPU-hours and cost for the chosen epochs, and the OpenAI
  cookbook's billing figure (tokens capped at the maximum length × epochs);
- PII and secrets at FILE:LINE: e-mail, phone, credit card (Luhn-checked), IBAN (mod-97), IP
  address, API keys and tokens (the providers' documented formats), with the policy of
  spec.dataset.pii applied: allow, warn, redact (the redacted records are what trains) or refuse.

It needs no torch: `kubetune validate --data` and the validation Job build it too. Memory grows by
one small MinHash signature per example, never by the examples themselves.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from typing import Any

from kubetune.api.enums import DatasetFormat, PiiPolicy

NEAR_THRESHOLD = 0.8
"""Jaccard similarity of word 3-shingles from which two examples count as near duplicates."""
NUM_PERM = 64
NEAR_LIMIT = 100_000
"""Examples that get a MinHash signature (near duplicates and near overlap); past this many, only
exact duplicates and overlap are counted. Bounds the validation Job's memory (≈ 3 KB a signature
with its LSH entries) and time (benchmarks/RESULTS.md, data_report)."""
CHARS_PER_TOKEN = 4.0
"""Without a tokenizer, tokens are estimated at this many characters each (English, BPE)."""
SUSTAINED_FLOPS = 100e12
"""Sustained training FLOP/s per GPU assumed for the GPU-hour estimate (≈ 35 % of an A100's or a
third of an H100's dense bf16 peak): a rough figure, stated in the report."""
DEFAULT_PRICE_PER_GPU_HOUR = 2.5
PRICE_ENV = "KUBETUNE_GPU_PRICE_PER_HOUR_USD"
HISTOGRAM_BINS = 10
MAX_FINDINGS = 200
"""PII findings kept in the report (all are counted)."""
REPORT_FILE = "data-report.json"

# ------------------------------------------------------------------------------------------ PII


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and digits[0] in "3456" and _luhn(digits)


def _iban(match: str) -> bool:
    s = match.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ipv4(match: str) -> bool:
    try:
        ip = ipaddress.IPv4Address(match)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_loopback)


def _ipv6(match: str) -> bool:
    try:
        ip = ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_loopback)


_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def _phone(match: str) -> bool:
    """E.164 allows 15 digits; fewer than 9 is a date, a version or a number, more often than a phone."""
    digits = re.sub(r"\D", "", match)
    return 9 <= len(digits) <= 15 and not _DATE.match(match.strip())


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None
    placeholder: str = ""


DETECTORS: tuple[Detector, ...] = (
    # Secrets first: a token may contain digits that look like a phone number.
    Detector(
        "secret",
        re.compile(
            r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"
            r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
            r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}\b"  # GitHub
            r"|\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic
            r"|\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}\b"  # Stripe
            r"|\bxox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
            r"|\bAIza[0-9A-Za-z_\-]{35}\b"  # Google API key
            r"|\bhf_[A-Za-z0-9]{30,}\b"  # Hugging Face
            r"|\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
        ),
        None,
        "<SECRET>",
    ),
    Detector(
        "email",
        re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"),
        None,
        "<EMAIL>",
    ),
    Detector("iban", re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b"), _iban, "<IBAN>"),
    Detector("creditCard", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), _card, "<CREDIT_CARD>"),
    Detector("ipAddress", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"), _ipv4, "<IP_ADDRESS>"),
    Detector(
        "ipAddress",
        re.compile(
            r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![\w:])|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}(?![\w:])"
        ),
        _ipv6,
        "<IP_ADDRESS>",
    ),
    Detector(
        "phone",
        re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{2,4}(?:[ .\-]\d{2,4}){1,4}(?![\w])"),
        _phone,
        "<PHONE>",
    ),
)
"""The detectors in the order they claim text: a span one detector claimed is not looked at again."""
PII_KINDS = ("email", "phone", "creditCard", "iban", "ipAddress", "secret")


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    kind: str
    field: str
    preview: str

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "kind": self.kind, "field": self.field, "preview": self.preview}


def _mask(text: str) -> str:
    """Enough to find the finding again, not enough to leak it: the first 2 and last 2 characters."""
    return text[:2] + "…" + text[-2:] if len(text) > 6 else "…"


_GATES = {
    # A cheap test that must pass before a detector's pattern runs: most text has no '@', and
    # prose without digits needs none of the number patterns.
    "secret": re.compile(r"PRIVATE KEY|AKIA|ASIA|gh[pousr]_|github_pat_|sk-|k_live_|k_test_|xox|AIza|hf_|eyJ"),
    "email": re.compile("@"),
}
_DIGIT = re.compile(r"\d")


def scan_text(text: str) -> list[tuple[int, int, Detector]]:
    """(start, end, detector) of every finding in `text`, spans not overlapping, in text order."""
    taken: list[tuple[int, int, Detector]] = []
    digits = _DIGIT.search(text) is not None
    for det in DETECTORS:
        gate = _GATES.get(det.kind)
        if (gate.search(text) is None) if gate is not None else not digits:
            continue
        for m in det.pattern.finditer(text):
            s, e = m.span()
            if any(s < te and ts < e for ts, te, _ in taken):
                continue
            if det.check is not None and not det.check(m.group(0)):
                continue
            taken.append((s, e, det))
    return sorted(taken, key=lambda t: t[0])


def redact_text(text: str) -> tuple[str, list[tuple[str, str]]]:
    """`text` with every finding replaced by its placeholder, and (kind, masked) per finding."""
    spans = scan_text(text)
    out, last, found = [], 0, []
    for s, e, det in spans:
        out.append(text[last:s])
        out.append(det.placeholder)
        found.append((det.kind, _mask(text[s:e])))
        last = e
    out.append(text[last:])
    return "".join(out), found


def _string_fields(data: dict, fmt: DatasetFormat) -> Iterable[tuple[str, str, Callable[[str], None]]]:
    """(field path, text, setter) for every text field of a record in the format."""
    if fmt == DatasetFormat.CHAT and "messages" not in data:
        # Preference and GRPO records (OpenAI DPO, TRL prompt/chosen/rejected, KTO, GRPO prompts):
        # every string in the record, wherever it sits.
        yield from _all_strings(data, "")
        return
    if fmt == DatasetFormat.CHAT:
        for i, msg in enumerate(data.get("messages") or []):
            if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                yield f"messages[{i}].content", msg["content"], partial(msg.__setitem__, "content")
        return
    for key in {
        DatasetFormat.PROMPT_COMPLETION: ("prompt", "completion"),
        DatasetFormat.INSTRUCTION: ("instruction", "input", "output"),
        DatasetFormat.TEXT: ("text",),
    }[fmt]:
        if isinstance(data.get(key), str):
            yield key, data[key], partial(data.__setitem__, key)


def _all_strings(node: Any, path: str) -> Iterable[tuple[str, str, Callable[[str], None]]]:
    """(field path, text, setter) for every string under a dict/list, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if isinstance(value, str):
            yield where, value, partial(node.__setitem__, key)
        else:
            yield from _all_strings(value, where)


def scan_record(record: Any, fmt: DatasetFormat) -> list[Finding]:
    findings = []
    for path, text, _ in _string_fields(record.data, fmt):
        for s, e, det in scan_text(text):
            findings.append(Finding(record.file, record.line, det.kind, path, _mask(text[s:e])))
    return findings


def redact_record(record: Any, fmt: DatasetFormat) -> Any:
    """A copy of `record` (a data.Record) with every finding replaced by its placeholder."""
    data = json.loads(json.dumps(record.data))
    changed = False
    for _, text, setter in _string_fields(data, fmt):
        new, found = redact_text(text)
        if found:
            setter(new)
            changed = True
    return replace(record, data=data) if changed else record


@dataclass
class PiiScan:
    """Findings of a pass over the data: the first MAX_FINDINGS kept, all counted by kind."""

    findings: list[Finding] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    redacted: int = 0
    """Examples whose text was redacted (policy redact)."""

    def add(self, found: Iterable[Finding]) -> None:
        for f in found:
            self.counts[f.kind] += 1
            if len(self.findings) < MAX_FINDINGS:
                self.findings.append(f)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --------------------------------------------------------------------------------- the report


def example_text(data: dict, fmt: DatasetFormat, system: bool = True) -> str:
    """The example's text as one string (role-tagged for chat), for hashing and shingling."""
    if fmt == DatasetFormat.CHAT and "messages" in data:
        return "\n".join(
            f"{m.get('role')}: {m.get('content')}"
            for m in data.get("messages") or []
            if isinstance(m, dict) and (system or m.get("role") != "system")
        )
    return "\n".join(text for _, text, _ in _string_fields(data, fmt))


def _shingles(text: str) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < 3:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)}


@lru_cache(maxsize=1)
def _template() -> Any:
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, seed=1)


@dataclass
class _Item:
    file: str
    line: int
    digest: str
    minhash: Any
    chars: int
    tokens: int | None
    turns: int


@dataclass
class ReportBuilder:
    """Feed every valid record once (`add`), then `finish`. Keeps a digest and a MinHash per example."""

    fmt: DatasetFormat
    max_seq_length: int
    tokenize: Callable[[Any], int] | None = None
    train: list[_Item] = field(default_factory=list)
    validation: list[_Item] = field(default_factory=list)
    pii: PiiScan = field(default_factory=lambda: PiiScan())
    scan_pii: bool = True
    systems: Counter = field(default_factory=Counter)
    with_system: int = 0

    def add(self, record: Any, part: str = "train") -> None:
        from datasketch import LeanMinHash, MinHash

        text = example_text(record.data, self.fmt)
        mh = None
        if len(self.train) + len(self.validation) < NEAR_LIMIT:
            template = _template()  # drawing the permutations per example would cost more than hashing
            full = MinHash(
                num_perm=NUM_PERM, seed=template.seed, permutations=template.permutations, scheme=template.scheme
            )
            # Near duplicates by what varies: a system prompt shared by every example would make them all alike.
            full.update_batch(list(_shingles(example_text(record.data, self.fmt, system=False))))
            mh = LeanMinHash(full)  # the signature only: a third of the memory
        turns = 1
        if self.fmt == DatasetFormat.CHAT:
            msgs = [m for m in record.data.get("messages") or [] if isinstance(m, dict)]
            turns = sum(1 for m in msgs if m.get("role") == "assistant")
            system = next((m.get("content") for m in msgs if m.get("role") == "system"), None)
            if part == "train" and isinstance(system, str):
                self.with_system += 1
                self.systems[system] += 1
        tokens = self.tokenize(record) if self.tokenize is not None else None
        item = _Item(record.file, record.line, hashlib.sha256(text.encode()).hexdigest(), mh, len(text), tokens, turns)
        (self.train if part == "train" else self.validation).append(item)
        if self.scan_pii:
            self.pii.add(scan_record(record, self.fmt))

    def finish(
        self,
        *,
        validation_split: float | None = None,
        seed: int = 0,
        epochs: int | None = None,
        parameters: int | None = None,
        frozen_base: bool = True,
        price_per_gpu_hour: float | None = None,
        policy: PiiPolicy | str = PiiPolicy.WARN,
    ) -> dict[str, Any]:
        """The report as a JSON-ready dict. With `validation_split`, the training file is split as
        the trainer splits it (same seed) before overlap is measured."""
        train, validation = self.train, self.validation
        if validation_split and not validation and len(train) >= 2:
            from kubetune.trainer.data import split

            train, validation = split(train, validation_split, seed)
        lengths = [it.tokens if it.tokens is not None else max(1, round(it.chars / CHARS_PER_TOKEN)) for it in train]
        exact_tokens = bool(train) and all(it.tokens is not None for it in train)
        dups, near = _duplicates(train)
        overlap, near_overlap = _overlap(train, validation)
        epochs_n = epochs or 3
        total_tokens = sum(lengths)
        billing = sum(min(n, self.max_seq_length) for n in lengths) * epochs_n
        report: dict[str, Any] = {
            "format": str(self.fmt),
            "examples": len(train),
            "validationExamples": len(validation),
            "tokensExact": exact_tokens,
            "tokens": {"total": total_tokens, **_stats(lengths)},
            "turns": _stats([it.turns for it in train]),
            "lengthHistogram": _histogram(lengths),
            "overMaxSeqLength": sum(1 for n in lengths if n > self.max_seq_length),
            "maxSeqLength": self.max_seq_length,
            "duplicates": {
                "exact": len(dups),
                "near": len(near),
                "exactAt": dups[:20],
                "nearAt": near[:20],
                "nearChecked": sum(1 for it in train if it.minhash is not None),
            },
            "overlap": {
                "exact": len(overlap),
                "near": len(near_overlap),
                "exactAt": overlap[:20],
                "nearAt": near_overlap[:20],
            },
            "systemPrompts": {
                "distinct": len(self.systems),
                "withSystem": self.with_system,
                "top": [{"text": t[:200], "count": c} for t, c in self.systems.most_common(5)],
            },
            "pii": {
                "policy": str(policy),
                "total": self.pii.total,
                "redacted": self.pii.redacted,
                "byKind": {k: self.pii.counts.get(k, 0) for k in PII_KINDS},
                "findings": [f.as_dict() for f in self.pii.findings],
            },
            "estimate": _estimate(
                billing, total_tokens * epochs_n, epochs_n, parameters, frozen_base, price_per_gpu_hour
            ),
        }
        return report


def _stats(values: Sequence[int]) -> dict[str, Any]:
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    s = sorted(values)
    pick = lambda q: s[max(0, -(-int(q * len(s) * 1000) // 1000) - 1)]
    return {"min": s[0], "mean": round(sum(s) / len(s), 2), "p50": pick(0.5), "p95": pick(0.95), "max": s[-1]}


def _histogram(values: Sequence[int]) -> list[dict[str, int]]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // HISTOGRAM_BINS))
    bins = [
        {"from": lo + i * width, "to": lo + (i + 1) * width - 1, "count": 0}
        for i in range(HISTOGRAM_BINS)
        if lo + i * width <= hi
    ]
    for v in values:
        bins[(v - lo) // width]["count"] += 1
    return bins


def _lsh() -> Any:
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)


def _duplicates(items: Sequence[_Item]) -> tuple[list[str], list[str]]:
    """FILE:LINE of each example that repeats an earlier one exactly, and of each that is a near
    copy (estimated Jaccard ≥ NEAR_THRESHOLD) of an earlier one without being an exact repeat."""
    seen: dict[str, _Item] = {}
    exact, near = [], []
    lsh = _lsh()
    for i, it in enumerate(items):
        if it.digest in seen:
            exact.append(f"{it.file}:{it.line} (repeats line {seen[it.digest].line})")
            continue
        seen[it.digest] = it
        if it.minhash is None:
            continue
        hits = lsh.query(it.minhash)
        if hits:
            first = items[min(int(h) for h in hits)]
            near.append(f"{it.file}:{it.line} (close to {first.file}:{first.line})")
        lsh.insert(str(i), it.minhash)
    return exact, near


def _overlap(train: Sequence[_Item], validation: Sequence[_Item]) -> tuple[list[str], list[str]]:
    """FILE:LINE of each validation example found in train exactly, or nearly."""
    if not validation:
        return [], []
    digests = {it.digest: it for it in train}
    lsh = _lsh()
    for i, it in enumerate(train):
        if it.minhash is not None:
            lsh.insert(str(i), it.minhash)
    exact, near = [], []
    for it in validation:
        if it.digest in digests:
            t = digests[it.digest]
            exact.append(f"{it.file}:{it.line} (= {t.file}:{t.line})")
        elif it.minhash is not None and (hits := lsh.query(it.minhash)):
            t = train[min(int(h) for h in hits)]
            near.append(f"{it.file}:{it.line} (≈ {t.file}:{t.line})")
    return exact, near


def _estimate(
    billing_tokens: int,
    training_tokens: int,
    epochs: int,
    parameters: int | None,
    frozen_base: bool,
    price: float | None,
) -> dict[str, Any]:
    """Tokens the run trains on and, with the model's size, GPU-hours (6·N·T FLOPs for full training,
    4·N·T with a frozen base: no weight gradients) at SUSTAINED_FLOPS, and their price."""
    import os

    if price is None:
        try:
            price = float(os.environ.get(PRICE_ENV, DEFAULT_PRICE_PER_GPU_HOUR))
        except ValueError:
            price = DEFAULT_PRICE_PER_GPU_HOUR
    out: dict[str, Any] = {
        "epochs": epochs,
        "trainingTokens": training_tokens,
        "billingTokens": billing_tokens,
        "pricePerGPUHour": price,
        "sustainedTFLOPs": SUSTAINED_FLOPS / 1e12,
    }
    if parameters:
        flops = (4 if frozen_base else 6) * parameters * training_tokens
        hours = flops / SUSTAINED_FLOPS / 3600
        out.update(
            {"parameters": parameters, "gpuHours": float(f"{hours:.3g}"), "estimatedUSD": float(f"{hours * price:.3g}")}
        )
    return out


# ------------------------------------------------------------------------------------ policy


def enforce(
    policy: PiiPolicy | str, fmt: DatasetFormat | str, train: list[Any], validation: list[Any]
) -> tuple[list[Any], list[Any], PiiScan, list[str]]:
    """Scan every record and apply spec.dataset.pii before training: (train, validation, the scan,
    warnings). `redact` returns copies with each finding replaced by its placeholder (what then
    trains); `refuse` raises data.DataError naming FILE:LINE of each finding."""
    from kubetune.trainer.data import DataError, DataProblem

    policy, fmt = PiiPolicy(policy), DatasetFormat(fmt)
    scan = PiiScan()
    parts: list[list[Any]] = [[], []]
    for out, records in zip(parts, (train, validation)):
        for r in records:
            found = scan_record(r, fmt)
            scan.add(found)
            if found and policy == PiiPolicy.REDACT:
                r = redact_record(r, fmt)
                scan.redacted += 1
            out.append(r)
    warnings: list[str] = []
    if scan.total and policy == PiiPolicy.REFUSE:
        problems = [
            DataProblem(
                f.file,
                f.line,
                f"{_KIND_WORDS[f.kind]} in {f.field} ({f.preview}); remove it, or set "
                "spec.dataset.pii: redact to replace it by a placeholder before training",
            )
            for f in scan.findings
        ]
        raise DataError(problems, scan.total)
    if scan.total and policy == PiiPolicy.WARN:
        kinds = ", ".join(f"{n} {k}" for k, n in scan.counts.items())
        first = ", ".join(f.where() for f in scan.findings[:5])
        warnings.append(
            f"{scan.total} possible PII or secret findings ({kinds}), first at {first}; see data-report.json, "
            "and set spec.dataset.pii: redact or refuse to act on them"
        )
    if policy == PiiPolicy.REDACT and scan.redacted:
        warnings.append(f"redacted {scan.total} PII or secret findings in {scan.redacted} examples before training")
    return parts[0], parts[1], scan, warnings


_KIND_WORDS = {
    "email": "an e-mail address",
    "phone": "a phone number",
    "creditCard": "a credit card number (Luhn-valid)",
    "iban": "an IBAN (checksum-valid)",
    "ipAddress": "an IP address",
    "secret": "an API key, token or private key",
}


def spec_inputs(spec: Any) -> dict[str, Any]:
    """What `finish` needs from a FineTuneJob spec: split, seed, epochs, model size, frozen base."""
    from kubetune.api.estimate import BUILTIN_PARAMETERS, parameters_from_name
    from kubetune.api.methods import ADAPTATIONS

    hp = spec.hyperparameters
    source = spec.model.source
    return {
        "validation_split": None if spec.dataset.validation else (spec.dataset.validation_split or 0.1),
        "seed": hp.seed,
        "epochs": hp.epochs if isinstance(hp.epochs, int) else None,
        "parameters": BUILTIN_PARAMETERS.get(source) or parameters_from_name(source),
        "frozen_base": ADAPTATIONS[spec.method.adaptation].frozen_base,
        "policy": spec.dataset.pii,
    }


def build(
    spec: Any,
    train: Sequence[Any],
    validation: Sequence[Any],
    *,
    tokenizer: Any = None,
    encoded: Sequence[Any] | None = None,
    scan: PiiScan | None = None,
) -> dict[str, Any]:
    """The report of records already read (the trainer's, after the PII policy; `scan` is the
    policy's scan, so findings redacted away are still reported). With a tokenizer, or the
    records' `encoded` (data.Encoding, what trains: no record is tokenised again), the token
    counts are exact: each example rendered as it trains, before any truncation."""
    from kubetune.trainer import data

    ds = spec.dataset
    fmt = DatasetFormat(ds.format)
    tokenize: Callable[[Any], int] | None = None
    if encoded is not None:
        counts = {id(e.record): len(e.example.input_ids) for e in encoded}
        tokenize = lambda r: counts[id(r)]
    elif tokenizer is not None:
        tokenize = lambda r: len(data.encode_full(r, fmt, tokenizer).input_ids)
    if data.record_check_for(spec) is not None:
        tokenize = None  # preference and GRPO rows are rendered by TRL, not by encode_full
    builder = ReportBuilder(fmt, ds.max_seq_length, tokenize, scan_pii=scan is None)
    if scan is not None:
        builder.pii = scan
    for r in train:
        builder.add(r, "train")
    for r in validation:
        builder.add(r, "validation")
    inputs = spec_inputs(spec)
    inputs["validation_split"] = None  # the records are already split
    return builder.finish(**inputs)


def stream(spec: Any, *, tokenizer: Any = None, storage_options: dict | None = None) -> dict[str, Any]:
    """The report read straight from the dataset files (the validation Job, `kubetune validate
    --data`), one record in memory at a time; the training file is split as the trainer splits it.
    Run after data.check found the data valid (problems are skipped here)."""
    from kubetune.trainer import data

    ds = spec.dataset
    fmt = DatasetFormat(ds.format)
    tokenize = (lambda r: len(data.encode_full(r, fmt, tokenizer).input_ids)) if tokenizer is not None else None
    check = data.record_check_for(spec)
    if check is not None:
        tokenize = None  # preference and GRPO rows are rendered by TRL, not by encode_full
    builder = ReportBuilder(fmt, ds.max_seq_length, tokenize)
    extra = data.extra_keys_for(spec)
    for part, uri in (("train", ds.train), ("validation", ds.validation)):
        if not uri:
            continue
        for item in data.iter_records(uri, fmt, storage_options=storage_options, extra_keys=extra, record_check=check):
            if isinstance(item, data.Record):
                builder.add(item, part)
    return builder.finish(**spec_inputs(spec))


def check_policy(report: dict[str, Any]) -> list[str]:
    """For a streamed report: raise data.DataError under `refuse` when it holds findings; the
    warnings `warn` prints otherwise."""
    from kubetune.trainer.data import DataError, DataProblem

    pii = report["pii"]
    if not pii["total"] or pii["policy"] == PiiPolicy.ALLOW:
        return []
    if pii["policy"] == PiiPolicy.REFUSE:
        raise DataError(
            [
                DataProblem(
                    f["file"],
                    f["line"],
                    f"{_KIND_WORDS[f['kind']]} in {f['field']} ({f['preview']}); remove "
                    "it, or set spec.dataset.pii: redact to replace it by a placeholder before training",
                )
                for f in pii["findings"]
            ],
            pii["total"],
        )
    verb = "will be redacted before training" if pii["policy"] == PiiPolicy.REDACT else "will train as they are"
    first = ", ".join(f"{f['file']}:{f['line']}" for f in pii["findings"][:5])
    return [f"{pii['total']} possible PII or secret findings {verb}, first at {first}"]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report for people, a few lines (what `kubetune validate --data` prints)."""
    t, d, o, p = report["tokens"], report["duplicates"], report["overlap"], report["pii"]
    est = report["estimate"]
    word = "tokens" if report["tokensExact"] else "tokens (estimated at 4 characters each)"
    lines = [
        f"report: {report['examples']} training, {report['validationExamples']} validation examples; {word} per example: "
        f"min {t['min']}, p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; over maxSeqLength {report['maxSeqLength']}: {report['overMaxSeqLength']}",
        f"duplicates: {d['exact']} exact, {d['near']} near; train/validation overlap: {o['exact']} exact, {o['near']} near",
        f"system prompts: {report['systemPrompts']['distinct']} distinct in {report['systemPrompts']['withSystem']} examples",
        f"estimate for {est['epochs']} epochs: {est['trainingTokens']:,} training tokens, {est['billingTokens']:,} billing tokens"
        + (
            f", {est['gpuHours']:.4g} GPU-hours ≈ ${est['estimatedUSD']:.4g} at ${est['pricePerGPUHour']}/GPU-hour"
            if "gpuHours" in est
            else ""
        ),
        f"PII ({p['policy']}): {p['total']} findings"
        + (" (" + ", ".join(f"{n} {k}" for k, n in p["byKind"].items() if n) + ")" if p["total"] else ""),
    ]
    return lines


def finding_lines(report: dict[str, Any], limit: int = 20) -> list[str]:
    return [
        f"{f['file']}:{f['line']}: {f['kind']} in {f['field']} ({f['preview']})"
        for f in report["pii"]["findings"][:limit]
    ]


def status_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers status.dataReport holds (kubetune.api.status.DataReportSummary)."""
    est = report["estimate"]
    out = {
        "examples": report["examples"],
        "validationExamples": report["validationExamples"],
        "tokens": report["tokens"]["total"],
        "overMaxSeqLength": report["overMaxSeqLength"],
        "duplicates": report["duplicates"]["exact"],
        "nearDuplicates": report["duplicates"]["near"],
        "overlap": report["overlap"]["exact"],
        "nearOverlap": report["overlap"]["near"],
        "piiFindings": report["pii"]["total"],
        "piiPolicy": report["pii"]["policy"],
        "estimatedTrainingTokens": est["trainingTokens"],
    }
    if "gpuHours" in est:
        out["estimatedGPUHours"] = est["gpuHours"]
        out["estimatedUSD"] = est["estimatedUSD"]
    return out
