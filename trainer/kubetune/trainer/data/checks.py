"""The whole check of a dataset: `check` (one streaming pass, keeps nothing, torch-free: the
validation Job, `kubetune validate --data`, the gateway) and `validate` (keeps the records the
trainer trains on; with a tokenizer also measures token lengths and applies overlength).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kubetune.api.enums import DatasetFormat, OverlengthPolicy
from kubetune.api.spec import Dataset
from kubetune.trainer.data.encode import (
    Example,
    apply_overlength,
    encode_full,
    no_supervision_message,
    overlength_message,
    supervised_tokens,
    unsupervised_warning,
)
from kubetune.trainer.data.records import (
    DEFAULT_VALIDATION_SPLIT,
    MAX_REPORTED,
    PROBLEM_LIMIT,
    RECOMMENDED_EXAMPLES,
    DataError,
    DataProblem,
    Record,
    _validation_count,
    iter_records,
    read_records,
    split,
)

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
            if not isinstance(item, DataProblem):  # keep=False: a valid record comes as None
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
