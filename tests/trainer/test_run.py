"""The trainer end to end on the tiny model: adapter + manifest, A/B eval, metrics, exit codes,
resume after kill -9 (T1), SIGTERM (T3), data refused before any model is loaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api.contract import PERMANENT_EXIT_CODE, PREEMPTED_EXIT_CODE
from kubetune.trainer import storage

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "support-chat.jsonl"
pytestmark = pytest.mark.slow


def manifest(tmp: Path, name: str = "t", **spec: Any) -> Path:
    body = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {"train": str(DATA), "validationSplit": 0.1, "maxSeqLength": 256, "overlength": "truncate"},
        "method": {
            "adaptation": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "targetModules": ["all-linear"]},
        },
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 4, "maxSteps": 12, "seed": 7},
        "output": {"uri": (tmp / "out").as_uri()},
        "checkpointing": {"everySteps": 4, "keep": 2},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}
        )
    )
    return path


def trainer_cmd(spec: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kubetune.trainer",
        "--spec",
        str(spec),
        "--metrics-port",
        "0",
        "--termination-path",
        str(tmp / "termination"),
        *extra,
    ]


def env(tmp: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["KUBETUNE_CACHE"] = str(tmp.parent / "shared-cache")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def test_pod_entrypoint_writes_verified_adapter(tmp_path: Path) -> None:
    spec = manifest(tmp_path)
    run = subprocess.run(trainer_cmd(spec, tmp_path), capture_output=True, text=True, env=env(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "termination").read_text())
    assert len((tmp_path / "termination").read_bytes()) <= 4096
    assert summary["status"] == "succeeded"
    m = summary["metrics"]
    assert m["evalLoss"] < m["baseEvalLoss"]
    assert 0 <= m["tokenAccuracy"] <= 1 and m["perplexity"] > 1
    store = storage.Store((tmp_path / "out").as_uri())
    ok, reason = storage.verify(store, "")
    assert ok, reason
    files = json.loads(store.read_bytes("manifest.json"))
    assert "adapter/adapter_model.safetensors" in files["files"]
    assert files["baseModel"] == "builtin://tiny-llama" and files["method"]["adaptation"] == "lora"
    assert files["hyperparameters"]["batchSize"] == 4
    # checkpoints: newest `keep` committed, each verifying
    steps = storage.list_checkpoints(store)
    assert steps == [8, 12]
    for step in steps:
        assert storage.verify(store, storage.checkpoint_prefix(step))[0]
    assert summary["steps"] == 12 and [c["step"] for c in summary["checkpoints"]] == steps  # what storage keeps
    assert summary["effective"]["learningRate"] == 3e-3 and summary["effective"]["batchSize"] == 4


def test_data_errors_fail_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.api.manifest import load_job
    from kubetune.trainer import run as run_mod
    from kubetune.trainer import sources

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": oops}\n')
    spec = manifest(tmp_path, dataset={"train": str(bad), "minExamples": 1})

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded before the data was validated")

    monkeypatch.setattr(sources, "resolve_model", boom)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(run_mod.UserError) as err:
        run_mod.run(load_job(str(spec)), run_mod.Options())
    assert err.value.reason == "InvalidData"
    assert f"{bad}:1: " in str(err.value) and f"{bad}:2: " in str(err.value)
    # and through the pod entry point: the permanent exit code, the message in the summary
    proc = subprocess.run(trainer_cmd(spec, tmp_path), capture_output=True, text=True, env=env(tmp_path), timeout=300)
    assert proc.returncode == PERMANENT_EXIT_CODE
    summary = json.loads((tmp_path / "termination").read_text())
    assert summary["reason"] == "InvalidData" and f"{bad}:2:" in summary["message"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _final_adapter(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_resume_after_kill_is_identical(tmp_path: Path) -> None:
    """T1: N steps straight vs kill -9 after a committed checkpoint and resume → identical."""
    import torch

    straight = tmp_path / "straight"
    straight.mkdir()
    spec = manifest(straight, hyperparameters={"maxSteps": 12}, checkpointing={"everySteps": 4, "keep": 5})
    run = subprocess.run(trainer_cmd(spec, straight), capture_output=True, text=True, env=env(straight), timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]

    killed = tmp_path / "killed"
    killed.mkdir()
    spec = manifest(killed, hyperparameters={"maxSteps": 12}, checkpointing={"everySteps": 4, "keep": 5})
    proc = subprocess.Popen(
        trainer_cmd(spec, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(killed)
    )
    store = storage.Store((killed / "out").as_uri())
    deadline = time.time() + 300
    while time.time() < deadline and 4 not in storage.list_checkpoints(store):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = storage.list_checkpoints(store)
    assert committed and max(committed) < 12, committed
    resumed = subprocess.run(trainer_cmd(spec, killed), capture_output=True, text=True, env=env(killed), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint" in resumed.stderr + resumed.stdout
    a, b = _final_adapter(straight / "out"), _final_adapter(killed / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = json.loads((straight / "out" / "adapter" / "training_log.json").read_text())["losses"]
    log_b = json.loads((killed / "out" / "adapter" / "training_log.json").read_text())["losses"]
    tail = [x for x in log_a if x[0] > max(committed)]
    assert tail == [x for x in log_b if x[0] > max(committed)]


def test_sigterm_checkpoints_and_exits_retriable(tmp_path: Path, s3_bucket: str) -> None:
    """T3: SIGTERM mid-training → a checkpoint committed to S3 and the retriable preemption code."""
    out = f"{s3_bucket}/sigterm"
    spec = manifest(
        tmp_path, hyperparameters={"maxSteps": 400}, checkpointing={"everySteps": 1000, "keep": 2}, output={"uri": out}
    )
    proc = subprocess.Popen(
        trainer_cmd(spec, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(tmp_path)
    )
    port = _metrics_port(proc)
    deadline = time.time() + 300
    while time.time() < deadline and _scrape(port).get("kubetune_trainer_step", 0) < 3:
        time.sleep(0.1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == PREEMPTED_EXIT_CODE
    assert time.time() - sent < 30  # within the default grace period
    store = storage.Store(out)
    steps = storage.list_checkpoints(store)
    assert len(steps) == 1 and 3 <= steps[0] < 400
    assert storage.verify(store, storage.checkpoint_prefix(steps[0]))[0]
    assert json.loads((tmp_path / "termination").read_text())["status"] == "preempted"


def _metrics_port(proc: subprocess.Popen) -> int:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("metrics: "):
            return int(line.rsplit(":", 1)[1].split("/")[0])
    raise AssertionError("no metrics line")


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_during_a_run(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    spec = manifest(tmp_path, hyperparameters={"maxSteps": 60}, checkpointing={"everySteps": 5, "keep": 1})
    proc = subprocess.Popen(
        trainer_cmd(spec, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(tmp_path)
    )
    port = _metrics_port(proc)
    text = ""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            break
        values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
        if values.get("kubetune_trainer_last_checkpoint_step", 0) >= 5 and values.get("kubetune_trainer_step", 0) >= 6:
            break
        time.sleep(0.1)
    proc.terminate()
    proc.wait(timeout=60)
    families = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "kubetune_trainer_step",
        "kubetune_trainer_total_steps",
        "kubetune_trainer_epoch",
        "kubetune_trainer_train_loss",
        "kubetune_trainer_eval_loss",
        "kubetune_trainer_learning_rate",
        "kubetune_trainer_tokens_per_second",
        "kubetune_trainer_samples_per_second",
        "kubetune_trainer_progress_ratio",
        "kubetune_trainer_eta_seconds",
        "kubetune_trainer_last_checkpoint_step",
        "kubetune_trainer_last_checkpoint_timestamp_seconds",
        "kubetune_trainer_gpu_memory_bytes",
        "kubetune_trainer_gpu_power_watts",
        "kubetune_trainer_gpu_energy_joules",
        "kubetune_trainer_base_eval_loss",
    ):
        assert name in families, name
    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert values["kubetune_trainer_total_steps"] == 60
    assert 0 < values["kubetune_trainer_progress_ratio"] <= 1
    assert values["kubetune_trainer_tokens_per_second"] > 0
    promtool = subprocess.run(
        ["bash", str(ROOT / "hack" / "get-promtool.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", (
        check.stdout + check.stderr
    )


def test_quickstart_demo(tmp_path: Path) -> None:
    """What `make demo` runs: the quickstart manifest through `kubetune run`, then `kubetune verify`."""
    out = (tmp_path / "quickstart").as_uri()
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "run", "examples/quickstart.yaml", "--output", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env(tmp_path),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    from tests.trainer.test_quiet_output import library_noise

    assert library_noise(run.stdout + run.stderr) == []  # issue 15: `make demo` prints no library warnings
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in run.stdout.splitlines()
        if line.count("│") >= 3
    }
    assert float(rows["tuned model eval loss"]) < float(rows["base model eval loss"])
    # evaluation.samples: 8 (issue 21): the samples, base vs tuned scores, and report.html in a browser.
    local = tmp_path / "quickstart"
    samples = [json.loads(line) for line in (local / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(
        isinstance(r["base"], str) and isinstance(r["tuned"], str) and r["tuned"] for r in samples
    )
    assert "rougeL (samples, base → tuned)" in rows and "→" in rows["rougeL (samples, base → tuned)"]
    assert f"report: {out.rstrip('/')}/report.html" in run.stdout
    from tests.trainer.test_evaluation import check_report_in_chromium

    check_report_in_chromium(local, tmp_path, 8)
    verify = subprocess.run([sys.executable, "-m", "kubetune.cli", "verify", out], capture_output=True, text=True)
    assert verify.returncode == 0 and "verified" in verify.stdout
    assert library_noise(verify.stdout + verify.stderr) == []
    use_the_quickstart_output(out, tmp_path)


def use_the_quickstart_output(out: str, tmp_path: Path) -> None:
    """The design note's third step on the quickstart output (issue 20): `kubetune chat --compare`
    prints both answers, and the official openai client talks to `kubetune serve`."""
    import openai

    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune.cli",
            "chat",
            out,
            "--prompt",
            "I was charged twice",
            "--compare",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env(tmp_path),
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    from tests.trainer.test_quiet_output import library_noise

    assert library_noise(chat.stdout + chat.stderr) == []
    assert "[tuned: ft:tiny-llama:quickstart]" in chat.stdout and "[base: tiny-llama]" in chat.stdout
    tuned, base = chat.stdout.split("[base: tiny-llama]")
    assert tuned.split("]", 1)[1].strip() and base.strip()  # both answered

    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "serve", out, "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
        env={**env(tmp_path), "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = next((line.split(" on ", 1)[1].split()[0] for line in proc.stderr if line.startswith("serving ")), None)  # type: ignore[union-attr]
        assert url is not None, "kubetune serve never said where it listens"
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as client:
            models = {m.id: m for m in client.models.list()}
            assert "ft:tiny-llama:quickstart" in models
            messages = [{"role": "user", "content": "How do I reset my password?"}]
            plain = client.chat.completions.create(
                model="ft:tiny-llama:quickstart", messages=messages, temperature=0, max_tokens=24
            )
            text = plain.choices[0].message.content
            assert text and plain.usage.completion_tokens > 0
            stream = client.chat.completions.create(
                model="ft:tiny-llama:quickstart", messages=messages, temperature=0, max_tokens=24, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        proc.stderr.close()  # type: ignore[union-attr]


def test_torchrun_two_processes(tmp_path: Path) -> None:
    """Under torchrun (2 CPU processes, gloo) global rank 0 alone checkpoints, commits and writes
    the termination message; local rank 0 alone serves metrics."""
    spec = manifest(
        tmp_path, hyperparameters={"maxSteps": 4, "batchSize": 2}, checkpointing={"everySteps": 2, "keep": 1}
    )
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", *trainer_cmd(spec, tmp_path)[1:]]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "termination").read_text())
    assert summary["status"] == "succeeded" and "adapter" in summary
    assert '"role":"worker","rank":1' in run.stdout
    assert run.stdout.count("metrics: http://") == 1
    store = storage.Store((tmp_path / "out").as_uri())
    assert storage.verify(store, "")[0]
    assert storage.list_checkpoints(store) == [4]
