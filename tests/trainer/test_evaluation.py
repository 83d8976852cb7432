"""Generation A/B, the LLM judge and report.html.

The judge is tested against a local OpenAI-compatible stub whose verdicts the test controls; a
biased stub that always prefers position A must come out as ties (the position swap). One tiny run
(quickstart-like, evaluation.samples: 8, spec.dataset.pii: redact) then feeds the checks of
eval/samples.jsonl, the summary, the manifest, and report.html opened in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api.contract import JUDGE_API_KEY_ENV
from kubetune.api.manifest import load_job
from kubetune.api.spec import Judge
from kubetune.trainer import evaluation
from kubetune.trainer import run as run_module
from kubetune.trainer.report import PLOT_PIXELS

from tests.trainer.test_datareport import PII, write_dataset


class Stub:
    """An OpenAI-compatible /v1/chat/completions whose reply text is `verdict(request body)`."""

    def __init__(self, verdict: Callable[[dict[str, Any]], str]) -> None:
        self.verdict = verdict
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": stub.verdict(body)},
                        }
                    ],
                }
                raw = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[[Callable[[dict[str, Any]], str]], Stub]]:
    made: list[Stub] = []

    def make(verdict: Callable[[dict[str, Any]], str]) -> Stub:
        made.append(Stub(verdict))
        return made[-1]

    yield make
    for s in made:
        s.close()


SAMPLES = [evaluation.Sample(f"question {i}", None, f"question {i}", f"answer {i}", f"f.jsonl:{i}") for i in range(4)]
BASE = [f"base answer {i}" for i in range(4)]
TUNED = [f"GOOD tuned answer {i}" for i in range(4)]


def _answers(body: dict[str, Any]) -> tuple[str, str]:
    text = body["messages"][1]["content"]
    a = re.search(r"Answer A:\n(.*?)\n\nAnswer B:", text, re.S).group(1)  # type: ignore[union-attr]
    b = text.split("Answer B:\n", 1)[1]
    return a, b


def test_a_judge_biased_to_position_a_scores_ties(stub: Any) -> None:
    s = stub(lambda body: '{"winner": "A"}')
    score, verdicts = evaluation.judge_samples(Judge(url=s.url, model="judge-1"), SAMPLES, BASE, TUNED)
    assert score == {"tunedWins": 0, "baseWins": 0, "ties": 4, "failed": 0, "model": "judge-1", "winRate": 0.5}
    assert verdicts == ["tie"] * 4
    # Each sample asked twice, the answers swapped: base first, then tuned first.
    assert [_answers(r) for r in s.requests] == [p for b, t in zip(BASE, TUNED) for p in ((b, t), (t, b))]
    assert all(r["model"] == "judge-1" and r["temperature"] == 0 for r in s.requests)


def test_a_fair_judge_finds_the_better_answer_in_either_position(stub: Any) -> None:
    def prefers_good(body: dict[str, Any]) -> str:
        a, b = _answers(body)
        return "A" if "GOOD" in a else "B" if "GOOD" in b else "tie"

    s = stub(prefers_good)
    score, _ = evaluation.judge_samples(Judge(url=s.url, model="m"), SAMPLES, BASE, TUNED)
    assert (score["tunedWins"], score["baseWins"], score["ties"], score["winRate"]) == (4, 0, 0, 1.0)
    score, _ = evaluation.judge_samples(Judge(url=s.url, model="m"), SAMPLES, TUNED, BASE)  # the base is better now
    assert (score["tunedWins"], score["baseWins"], score["winRate"]) == (0, 4, 0.0)


def test_the_api_key_comes_from_the_secret_env_and_bad_verdicts_count_as_failed(
    stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies = iter(['{"winner": "B"}', "B", "I cannot decide", '{"winner": "B"}'] + ['{"winner": "tie"}'] * 4)
    s = stub(lambda body: next(replies))
    monkeypatch.setenv(JUDGE_API_KEY_ENV, "sk-test-123")
    score, verdicts = evaluation.judge_samples(
        Judge(url=s.url, model="m", api_key_secret="judge"), SAMPLES, BASE, TUNED
    )
    assert set(s.auth) == {"Bearer sk-test-123"}
    # 0: B (tuned, base shown first), B (base, tuned shown first): a tie. 1: unreadable, failed at once.
    # 2: B (tuned), tie: tuned. 3: tie, tie.
    assert verdicts == ["tie", None, "tuned", "tie"]
    assert (score["tunedWins"], score["ties"], score["failed"], score["winRate"]) == (1, 2, 1, pytest.approx(2 / 3))


@pytest.mark.parametrize(
    "text,verdict",
    [
        ('{"winner": "B"}', "B"),
        ('```json\n{"winner": "tie"}\n```', "tie"),
        ("Answer A is better.", "A"),
        ("This is a tie.", "tie"),
    ],
)
def test_parse_verdict(text: str, verdict: str) -> None:
    assert evaluation.parse_verdict(text) == verdict


def test_combine() -> None:
    assert evaluation.combine("B", "A") == "tuned" and evaluation.combine("A", "B") == "base"
    assert evaluation.combine("tie", "A") == "tuned" and evaluation.combine("A", "A") == "tie"


# ------------------------------------------------------------------------- one tiny run


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A quickstart-like run: tiny-llama, LoRA, 8 samples, redact, a judge biased to position A."""
    tmp = tmp_path_factory.mktemp("evalrun")
    train, validation = write_dataset(tmp, planted=True)
    judge = Stub(lambda body: '{"winner": "A"}')
    spec = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {
            "train": str(train),
            "validation": str(validation),
            "maxSeqLength": 256,
            "pii": "redact",
            "minExamples": 10,
        },
        "method": {"adaptation": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]}},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8, "maxSteps": 6, "seed": 7},
        "evaluation": {
            "samples": 8,
            "maxNewTokens": 8,
            "metrics": ["exactMatch", "rougeL", "bleu", "chrf", "jsonValid"],
            "judge": {"url": judge.url, "model": "biased-judge"},
        },
        "resources": {"gpus": 0},
        "output": {"uri": (tmp / "out").as_uri()},
        "checkpointing": {"everySteps": 100, "keep": 1},
    }
    path = tmp / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "evalrun"}, "spec": spec}
        )
    )
    encoded: list[Any] = []
    original = run_module._encode

    def spy(encodings: list[Any], spec: Any) -> Any:
        encoded.extend(e.record for e in encodings)
        return original(encodings, spec)

    run_module._encode = spy  # type: ignore[assignment]
    os.environ.setdefault("KUBETUNE_CACHE", str(tmp / "cache"))
    opts = run_module.Options(scratch=tmp / "scratch")
    try:
        summary = run_module.run(load_job(path), opts)
    finally:
        run_module._encode = original  # type: ignore[assignment]
        judge.close()
    yield {
        "summary": summary,
        "out": tmp / "out",
        "encoded": encoded,
        "train": train,
        "judge": judge,
        "tmp": tmp,
        "metrics": opts.metrics,
    }


@pytest.mark.slow
def test_samples_metrics_and_manifest(finished: dict[str, Any]) -> None:
    out, summary = finished["out"], finished["summary"]
    rows = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert all(
        isinstance(r["base"], str) and isinstance(r["tuned"], str) and r["prompt"] and r["reference"] for r in rows
    )
    assert rows[0]["source"].endswith("validation.jsonl:1")
    gen = summary["metrics"]["generation"]
    assert gen["samples"] == 8 and set(gen["base"]) == set(gen["tuned"]) == {
        "exactMatch",
        "rougeL",
        "bleu",
        "chrf",
        "jsonValid",
    }
    for who in ("base", "tuned"):  # the summary's means are the means of the rows' scores
        for name, value in gen[who].items():
            assert value == pytest.approx(sum(r["scores"][who][name] for r in rows) / 8, abs=1e-6)
    judge = {k: gen["judge"].get(k, 0) for k in ("tunedWins", "baseWins", "ties", "failed", "winRate", "model")}
    assert judge == {"tunedWins": 0, "baseWins": 0, "ties": 8, "failed": 0, "winRate": 0.5, "model": "biased-judge"}
    assert len(finished["judge"].requests) == 16
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    series = {
        (s.labels["model"], s.labels["metric"]): s.value
        for fam in text_string_to_metric_families(generate_latest(finished["metrics"].registry).decode())
        for s in fam.samples
        if s.name == "kubetune_trainer_generation_score_ratio"
    }
    assert series == {
        **{("base", k): v for k, v in gen["base"].items()},
        **{("tuned", k): v for k, v in gen["tuned"].items()},
        ("tuned", "judgeWinRate"): 0.5,
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataPolicy"] == {
        "pii": "redact",
        "findings": 6,
        "redactedExamples": 6,
        "byKind": {k: 1 for k in PII},
    }
    for name in ("report.html", "data-report.json", "eval/samples.jsonl", "report-data.json"):
        import hashlib

        assert manifest["reports"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert summary["dataReport"]["piiFindings"] == 6 and summary["dataReport"]["duplicates"] == 2
    assert summary["reportUri"].endswith("/report.html")


@pytest.mark.slow
def test_the_redacted_data_is_what_trains(finished: dict[str, Any]) -> None:
    trained = {
        r.line: r.data["messages"][1]["content"] for r in finished["encoded"] if r.file == str(finished["train"])
    }
    for text, line in PII.values():
        assert text not in trained[line] and "<" in trained[line]
    from kubetune.trainer import datareport

    assert not any(datareport.scan_text(t) for t in trained.values())


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make tools` (hack/cluster-tools.sh) installs Debian's chromium")
        pytest.skip("no chromium (Debian: apt-get install --no-install-recommends chromium)")
    return found


def _browser(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _not_blank(image: Any) -> bool:
    colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return colors is None or len(colors) > 8


def check_report_in_chromium(out: Path, tmp: Path, samples: int) -> str:
    """report.html of a finished run opened in headless Chromium: the plots decode to non-blank
    PNGs of the declared size and load in the browser at that size, the tables hold the run's
    numbers (report-data.json: what the summary reported), a screenshot is kept. Returns the DOM."""
    from PIL import Image

    m = json.loads((out / "report-data.json").read_text())["metrics"]
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained, offline

    # The embedded plots decode to non-blank images of the size the page declares.
    plots = re.findall(r'<img id="(plot-[a-z]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert {name for name, _ in plots} == {"plot-loss", "plot-lr", "plot-throughput", "plot-lengths"}
    for name, data in plots:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.size == PLOT_PIXELS and _not_blank(image), name

    # The browser: every image loaded at its natural size (a script added to a copy records it).
    probe = tmp / "probe.html"
    probe.write_text(
        page.replace(
            "</body>",
            "<script>addEventListener('load', () => { for (const i of document.images) "
            "i.setAttribute('data-natural', i.naturalWidth + 'x' + i.naturalHeight); "
            "document.body.setAttribute('data-loaded', 'yes'); });</script></body>",
        )
    )
    dom = _browser(tmp, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0 and 'data-loaded="yes"' in dom.stdout, dom.stderr[-2000:]
    sizes = dict(re.findall(r'<img id="(plot-[a-z]+)"[^>]*data-natural="(\d+x\d+)"', dom.stdout))
    assert sizes == {name: f"{PLOT_PIXELS[0]}x{PLOT_PIXELS[1]}" for name, _ in plots}

    # The tables hold the run's numbers as the browser shows them.
    training = re.search(r'<table id="training">(.*?)</table>', dom.stdout, re.S).group(1)  # type: ignore[union-attr]
    assert f"<th>eval loss (tuned)</th><td>{m['evalLoss']:.4g}</td>" in training
    assert f"<th>eval loss (base)</th><td>{m['baseEvalLoss']:.4g}</td>" in training
    ab = re.search(r'<table id="ab">(.*?)</table>', dom.stdout, re.S).group(1)  # type: ignore[union-attr]
    for name, value in m["generation"]["tuned"].items():
        base = m["generation"]["base"][name]
        assert re.search(rf"<th>{name}</th><td class=\"num\">{base:.4g}</td><td class=\"num\">{value:.4g}</td>", ab), (
            name,
            ab,
        )
    table = re.search(r'<table id="samples"[^>]*>(.*?)</table>', dom.stdout, re.S).group(1)  # type: ignore[union-attr]
    assert table.count("<tr>") == samples + 1  # the header and the samples

    # A screenshot, kept as the test's artifact.
    shot = tmp / "report.png"
    taken = _browser(
        tmp, "--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html").as_uri()
    )
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1200, 2400) and _not_blank(image)
    keep = os.environ.get("KUBETUNE_TEST_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / f"{out.name}-report.png")
    print(f"report screenshot: {shot}")
    return dom.stdout


@pytest.mark.slow
def test_report_renders_in_chromium(finished: dict[str, Any]) -> None:
    dom = check_report_in_chromium(finished["out"], finished["tmp"], 8)
    data = re.search(r'<table id="data">(.*?)</table>', dom, re.S).group(1)  # type: ignore[union-attr]
    assert "<th>exact duplicates</th><td>2</td>" in data and "<th>PII findings (policy redact)</th><td>6</td>" in data
    assert "<th>train/validation overlap (exact)</th><td>1</td>" in data


@pytest.mark.slow
def test_kubetune_report_writes_and_renders(finished: dict[str, Any], tmp_path: Path) -> None:
    from click.testing import CliRunner
    from kubetune.cli import main as cli

    out = finished["out"]
    local = CliRunner().invoke(cli, ["report", str(out)])
    assert local.exit_code == 0 and local.output.strip() == str(out / "report.html")
    again = tmp_path / "again.html"
    rendered = CliRunner().invoke(cli, ["report", out.as_uri(), "--render", "-o", str(again)])
    assert rendered.exit_code == 0, rendered.output
    assert again.read_text() == (out / "report.html").read_text()  # the same page from report-data.json
    missing = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "holds no report" in missing.output
