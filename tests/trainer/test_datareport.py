"""The dataset report: planted PII, duplicates and train/validation overlap are found exactly where
they were planted, spec.dataset.pii acts on them, and a clean dataset reports none."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from kubetune.api.manifest import load_job
from kubetune.cli import main as cli
from kubetune.trainer import data, datareport
from kubetune.trainer.__main__ import validate_only

SYSTEM = "You answer questions about hiking gear."
PII = {  # kind -> (text planted, line in train.jsonl)
    "email": ("write to jane.doe@example.com please", 61),
    "phone": ("call me on +44 20 7946 0958 tonight", 62),
    "creditCard": ("my card is 4111 1111 1111 1111 thanks", 63),
    "iban": ("refund to DE89 3704 0044 0532 0130 00 now", 64),
    "ipAddress": ("the server at 10.20.30.40 is down", 65),
    "secret": ("my key is AKIAIOSFODNN7EXAMPLE oops", 66),
}


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n)
    )


def _chat(user: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def _near(example: dict[str, Any]) -> dict[str, Any]:
    """The same example with one word of the answer changed (Jaccard of 3-shingles ≈ 0.9)."""
    out = json.loads(json.dumps(example))
    words = out["messages"][2]["content"].split()
    words[len(words) // 2] = "changedword"
    out["messages"][2]["content"] = " ".join(words)
    return out


def write_dataset(tmp: Path, planted: bool) -> tuple[Path, Path]:
    rng = random.Random(5)
    train = [_chat(_words(rng, 20), _words(rng, 60)) for _ in range(60)]
    validation = [_chat(_words(rng, 20), _words(rng, 60)) for _ in range(10)]
    if planted:
        train += [_chat(text, _words(rng, 60)) for text, _ in PII.values()]  # lines 61-66
        train += [train[4], train[5]]  # lines 67, 68: exact copies of lines 5 and 6
        train += [_near(train[9])]  # line 69: a near copy of line 10
        validation += [train[19], _near(train[29])]  # validation lines 11 (= train 20) and 12 (≈ train 30)
    paths = tmp / "train.jsonl", tmp / "validation.jsonl"
    for path, rows in zip(paths, (train, validation)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def job_file(tmp: Path, train: Path, validation: Path, pii: str = "warn") -> Path:
    path = tmp / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "pii"},
                "spec": {
                    "model": {"source": "builtin://tiny-llama"},
                    "dataset": {
                        "train": str(train),
                        "validation": str(validation),
                        "maxSeqLength": 1024,
                        "pii": pii,
                        "minExamples": 10,
                    },
                    "method": {"adaptation": "lora"},
                    "hyperparameters": {"epochs": 2},
                    "output": {"uri": (tmp / "out").as_uri()},
                },
            }
        )
    )
    return path


def test_planted_findings_duplicates_and_overlap_are_counted_exactly(tmp_path: Path) -> None:
    train, validation = write_dataset(tmp_path, planted=True)
    report = datareport.stream(load_job(job_file(tmp_path, train, validation)).spec)
    pii = report["pii"]
    assert pii["byKind"] == {kind: 1 for kind in PII} and pii["total"] == len(PII)
    where = {f["kind"]: (f["file"], f["line"], f["field"]) for f in pii["findings"]}
    assert where == {kind: (str(train), line, "messages[1].content") for kind, (_, line) in PII.items()}
    assert report["duplicates"]["exact"] == 2 and report["duplicates"]["near"] == 1
    assert report["duplicates"]["exactAt"] == [f"{train}:67 (repeats line 5)", f"{train}:68 (repeats line 6)"]
    assert report["duplicates"]["nearAt"] == [f"{train}:69 (close to {train}:10)"]
    assert report["overlap"]["exact"] == 1 and report["overlap"]["near"] == 1
    assert report["overlap"]["exactAt"] == [f"{validation}:11 (= {train}:20)"]
    assert report["overlap"]["nearAt"] == [f"{validation}:12 (≈ {train}:30)"]
    assert report["examples"] == 69 and report["validationExamples"] == 12
    assert report["systemPrompts"] == {"distinct": 1, "withSystem": 69, "top": [{"text": SYSTEM, "count": 69}]}
    assert sum(b["count"] for b in report["lengthHistogram"]) == 69
    est = report["estimate"]
    assert est["epochs"] == 2 and est["trainingTokens"] == 2 * report["tokens"]["total"] and est["gpuHours"] > 0


def test_a_clean_dataset_reports_none(tmp_path: Path) -> None:
    train, validation = write_dataset(tmp_path, planted=False)
    report = datareport.stream(load_job(job_file(tmp_path, train, validation)).spec)
    assert report["pii"]["total"] == 0 and report["pii"]["findings"] == []
    assert report["duplicates"]["exact"] == report["duplicates"]["near"] == 0
    assert report["overlap"]["exact"] == report["overlap"]["near"] == 0
    assert datareport.check_policy({**report, "pii": {**report["pii"], "policy": "refuse"}}) == []


def test_overlap_within_a_split_of_one_file(tmp_path: Path) -> None:
    """validationSplit: the file is split as the trainer splits it before overlap is measured."""
    train, _ = write_dataset(tmp_path, planted=False)
    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows + rows[:10]) + "\n")  # every one of the first 10 twice
    spec = load_job(job_file(tmp_path, train, train)).spec.model_copy(deep=True)
    spec.dataset.validation, spec.dataset.validation_split = None, 0.2
    report = datareport.stream(spec)
    records = [r for r in data.iter_records(str(train), "chat") if isinstance(r, data.Record)]
    tr, va = data.split(records, 0.2, spec.hyperparameters.seed)
    texts = {json.dumps(r.data) for r in tr}
    assert report["overlap"]["exact"] == sum(json.dumps(r.data) in texts for r in va) > 0


def test_refuse_names_every_finding_at_file_line(tmp_path: Path) -> None:
    train, validation = write_dataset(tmp_path, planted=True)
    job = load_job(job_file(tmp_path, train, validation, pii="refuse"))
    with pytest.raises(data.DataError) as err:
        validate_only(job)  # the validation Job: fails before any GPU is requested
    assert {(p.file, p.line) for p in err.value.problems} == {(str(train), line) for _, line in PII.values()}
    assert "spec.dataset.pii: redact" in str(err.value) and f"{train}:63: a credit card number" in str(err.value)
    assert "4111 1111 1111 1111" not in str(err.value)  # the finding is masked, not repeated
    result = CliRunner().invoke(cli, ["validate", "--data", str(job_file(tmp_path, train, validation, pii="refuse"))])
    assert result.exit_code == 1 and f"{train}:61: an e-mail address in messages[1].content" in result.output


def test_redact_replaces_each_finding_and_keeps_the_rest(tmp_path: Path) -> None:
    train, validation = write_dataset(tmp_path, planted=True)
    job = load_job(job_file(tmp_path, train, validation, pii="redact"))
    report = data.validate(job.spec.dataset)
    new_train, _, scan, warnings = datareport.enforce("redact", "chat", report.train, report.validation)
    assert scan.total == len(PII) and scan.redacted == len(PII) and "redacted 6" in warnings[0]
    by_line = {r.line: r.data["messages"][1]["content"] for r in new_train}
    placeholders = {
        "email": "<EMAIL>",
        "phone": "<PHONE>",
        "creditCard": "<CREDIT_CARD>",
        "iban": "<IBAN>",
        "ipAddress": "<IP_ADDRESS>",
        "secret": "<SECRET>",
    }
    for kind, (text, line) in PII.items():
        before, _, after = text.partition(" ")  # the first word stays
        assert by_line[line].startswith(before) and placeholders[kind] in by_line[line], (kind, by_line[line])
        assert datareport.scan_text(by_line[line]) == []
    assert [r.data for r in new_train if r.line < 61] == [r.data for r in report.train if r.line < 61]


def test_warn_and_the_validation_summary(tmp_path: Path) -> None:
    train, validation = write_dataset(tmp_path, planted=True)
    summary = validate_only(load_job(job_file(tmp_path, train, validation))).wire()
    assert summary["status"] == "validated"
    assert summary["dataReport"] | {} == {
        "examples": 69,
        "validationExamples": 12,
        "tokens": summary["dataReport"]["tokens"],
        "overMaxSeqLength": 0,
        "duplicates": 2,
        "nearDuplicates": 1,
        "overlap": 1,
        "nearOverlap": 1,
        "piiFindings": 6,
        "piiPolicy": "warn",
        "estimatedTrainingTokens": summary["dataReport"]["estimatedTrainingTokens"],
        "estimatedGPUHours": summary["dataReport"]["estimatedGPUHours"],
        "estimatedUSD": summary["dataReport"]["estimatedUSD"],
    }
    assert any("6 possible PII" in w and f"{train}:61" in w for w in summary["warnings"])
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli, ["validate", "--data", str(job_file(tmp_path, train, validation)), "--report", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "duplicates: 2 exact, 1 near; train/validation overlap: 1 exact, 1 near" in result.output
    assert json.loads(out.read_text())["pii"]["total"] == 6


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3 on 2024-01-05",
        "order 12345 costs 1,000 dollars",
        "card 4111 1111 1111 1112",
        "IBAN DE89 3704 0044 0532 0130 01",
        "localhost 127.0.0.1",
        "see you at 10:30",
    ],
)
def test_near_misses_are_not_findings(text: str) -> None:
    assert datareport.scan_text(text) == []


def test_past_the_near_limit_only_exact_duplicates_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NEAR_LIMIT bounds the signatures kept (memory of the validation Job); exact counts stay exact."""
    monkeypatch.setattr(datareport, "NEAR_LIMIT", 50)
    train, validation = write_dataset(tmp_path, planted=True)
    report = datareport.stream(load_job(job_file(tmp_path, train, validation)).spec)
    assert report["duplicates"]["nearChecked"] == 50
    assert (
        report["duplicates"]["exact"] == 2 and report["duplicates"]["near"] == 0
    )  # line 69's near copy is past the limit
    assert report["overlap"]["exact"] == 1 and report["pii"]["total"] == len(PII)
